"""The BPTT worker: unrolled over T steps == T one-step runs with the state carried."""
from __future__ import annotations

import numpy as np
import pytest

from charjobs import TEXT, char_job
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.workspace import net_info
from engine.unroll import unroll
from engine.worker import ContinuityError, Worker


def build(path, unroll_len=None, carry=pb.kCarryAuto, dtype=np.float64):
    job = load_job(path)
    if unroll_len is not None:
        for layer in job.neuralnet.layer:
            if layer.unroll_len > 1:
                layer.unroll_len = unroll_len
            if layer.HasField("char_rnn_conf"):
                layer.char_rnn_conf.unroll_len = unroll_len
    u = unroll(job.neuralnet, Phase.TRAIN)
    net = Net(u, make_backend(None, dtype), net_info(path, path.parent / "ws", 0), seed=7)
    return net, Worker(net, seed=7, carry=carry)


@pytest.mark.parametrize("rnn", ["kGRU", "kLSTM", "kRNN"])
@pytest.mark.parametrize("stacked", [False, True])
def test_unrolled_equals_stepwise(tmp_path, rnn, stacked):
    T = 6
    path = char_job(tmp_path, rnn=rnn, hidden=7, batch=3, unroll=T, stacked=stacked, val=False)
    top = "rnn2" if stacked else "rnn1"
    net_t, w_t = build(path)
    net_1, w_1 = build(path, unroll_len=1)
    for a, b in zip(net_t.params, net_1.params):
        assert a.name == b.name
        np.testing.assert_array_equal(a.data, b.data)
    for batch in range(2):  # two unrolled batches == 2T one-step batches
        m_t = w_t.run_batch(train=False)
        outs_t = [w_t.outs[f"{i}#{top}"] for i in range(T)]
        logits_t = [w_t.outs[f"{i}#ip1"] for i in range(T)]
        loss_1 = 0.0
        for i in range(T):
            m_1 = w_1.run_batch(train=False)
            loss_1 += m_1["loss"][0]
            np.testing.assert_allclose(w_1.outs[f"0#{top}"], outs_t[i], rtol=1e-12, atol=1e-12,
                                       err_msg=f"batch {batch} step {i}")
            np.testing.assert_allclose(w_1.outs["0#ip1"], logits_t[i], rtol=1e-12, atol=1e-12)
        assert m_t["loss"][0] == pytest.approx(loss_1, rel=1e-12)


def test_carry_policy_reset_batch_differs_from_carry(tmp_path):
    path = char_job(tmp_path, hidden=5, batch=2, unroll=4, val=False)
    _, w_carry = build(path)
    _, w_reset = build(path, carry=pb.kResetBatch)
    for w in (w_carry, w_reset):
        w.run_batch(train=False)
        w.run_batch(train=False)
    # first copy of the second batch starts from the carried state only in w_carry
    assert not np.allclose(w_carry.outs["0#rnn1"], w_reset.outs["0#rnn1"])
    # and the last copy's state is what is carried
    assert "rnn1" in w_carry.carry and not w_reset.carry


def test_state_resets_when_stream_wraps(tmp_path):
    path = char_job(tmp_path, hidden=5, batch=2, unroll=4, val=False)
    net, w = build(path)
    data = net.layers["data"]
    w.run_batch(train=False)
    first = w.outs["0#rnn1"].copy()
    # jump to the end of the streams: the next load wraps to 0 and must reset the state
    data.cursor = data.stream_len - 2
    w.run_batch(train=False)  # wraps: the same text as the first batch, from a zero state
    assert data.epoch == 1
    np.testing.assert_allclose(w.outs["0#rnn1"], first, rtol=1e-12)


def test_continuity_is_checked_when_carrying(tmp_path):
    path = char_job(tmp_path, hidden=5, batch=2, unroll=4, val=False)
    net, w = build(path)
    w.run_batch(train=False)
    net.layers["data"].cursor += 1  # the next batch no longer continues the previous one
    with pytest.raises(ContinuityError, match='layer "data": row 0 starts at offset'):
        w.run_batch(train=False)


def test_shared_param_gradient_is_sum_over_copies(tmp_path):
    """The gradient of a param shared by T copies equals the sum of per-copy contributions."""
    path = char_job(tmp_path, hidden=4, batch=2, unroll=3, val=False)
    net, w = build(path)
    w.load()
    w.forward(True, {})
    for p in net.params:
        p.grad[...] = 0
    w.backward()
    ip_w = net.layers["ip1"].params["w"]
    total = ip_w.grad.copy()
    # recompute by hand: dL/dW = sum_i dlogits_i^T h_i with dlogits = (p - onehot)/B
    expect = np.zeros_like(total)
    for i in range(3):
        p = w.outs[f"{i}#loss"]
        lab = w.outs[f"{i}#label"]
        d = p.copy()
        d[np.arange(2), lab] -= 1
        d /= 2
        expect += d.T @ w.outs[f"{i}#rnn1"]
    np.testing.assert_allclose(total, expect, rtol=1e-10, atol=1e-12)


def test_bp_worker_feedforward_learns(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 5))
    y = (x[:, 0, 0] + x[:, 0, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    job = tmp_path / "job.conf"
    job.write_text(f"""name: "ff" train_steps: 60 disp_freq: 20
train_one_batch {{ alg: kBP }}
updater {{ type: kSGD momentum: 0.9 learning_rate {{ type: kFixed base_lr: 0.1 }} }}
neuralnet {{
  layer {{ name: "data" type: kRecordInput store_conf {{ path: "{tmp_path / 'd.npz'}" batchsize: 16 }} }}
  layer {{ name: "ip" type: kInnerProduct srclayers: "data" innerproduct_conf {{ num_output: 2 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "data" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    from engine.updaters import Updater
    net, w = build(job)
    up = Updater(load_job(job).updater, net.params, np)
    losses = []
    for step in range(60):
        m = w.run_batch(train=True)
        up.update(step)
        losses.append(m["loss"][0] / m["loss"][1])
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4])
    assert np.mean([m["accuracy"][0] / m["accuracy"][1]]) > 0.8


def test_text_fixture_fits_the_output_width():
    assert len(set(TEXT)) <= 40
