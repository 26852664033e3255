"""Bidirectional recurrence: a kBackward layer's pass over masked sequences starts at each
sequence's last valid step (padding never reaches its state), and it never carries state
across batches, in both executors."""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.layers import Context
from engine.net import Net
from engine.planner import PlannedWorker
from engine.proto import job_pb2 as pb
from engine.unroll import unroll
from engine.workspace import net_info
from engine.worker import Worker

T, F, H = 6, 3, 4
LENGTHS = np.array([6, 2, 4, 1, 5, 3])


def store(tmp_path, x, name="s.npz"):
    y = np.arange(len(x)) % 3
    return gc.save_npz(tmp_path / name, x=x, y=y, lengths=LENGTHS)


def padded(seed=0, pad_value=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(LENGTHS), T, F))
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    x[pad] = 0.0 if pad_value is None else pad_value * rng.standard_normal(x[pad].shape)
    return x


def run(tmp_path, path, kind, executor, fname="job.conf"):
    """(net, worker) after one training batch of the bidirectional many-to-one job."""
    text = gc.bidir_many_to_one_text(path, kind, T=T, batch=len(LENGTHS), hidden=H)
    job = load_job(gc.write_job(tmp_path, text, fname))
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None, np.float64),
              net_info(tmp_path / fname, tmp_path / "ws", 0), seed=2)
    rng = np.random.default_rng(9)
    for p in net.params:
        p.data[...] = rng.uniform(-0.7, 0.7, p.shape)
    w = executor(net, seed=2, carry=pb.kResetBatch)
    w.run_batch(train=True)
    return net, w


def backward_output(net, w, name="bwd"):
    """The output of layer ``name`` (the backward one) at every copy, [T, B, H]."""
    if isinstance(w, PlannedWorker):
        return np.asarray(w.blocks[name]).reshape(T, -1, H)
    return np.stack([w.outs[f"{t}#{name}"] for t in range(T)])


@pytest.mark.parametrize("executor", [Worker, PlannedWorker], ids=["reference", "planned"])
@pytest.mark.parametrize("kind", ["gru-hb", "lstm", "rnn"])
def test_backward_pass_starts_at_the_last_valid_step(tmp_path, kind, executor):
    """Row r's state at step 0 is the backward run over its unpadded sequence alone
    (steps len_r-1 .. 0 from zeros, no mask), and the padded steps hold zeros."""
    x = padded()
    net, w = run(tmp_path, store(tmp_path, x), kind, executor)
    got = backward_output(net, w)
    lay = net.layers["bwd"]
    for r, n in enumerate(LENGTHS):
        state = None
        for t in range(n - 1, -1, -1):
            y, state, _ = lay.forward(Context(step=t, unroll_len=n), [x[r:r + 1, t]], state)
            np.testing.assert_allclose(got[t, r], y[0], rtol=1e-12, atol=1e-14)
        assert not got[n:, r].any()


@pytest.mark.parametrize("executor", [Worker, PlannedWorker], ids=["reference", "planned"])
def test_padding_content_changes_nothing(tmp_path, executor):
    """Whatever the padded steps hold, the objective and every gradient are the same."""
    results = []
    for k, pad in enumerate((None, 50.0)):
        d = tmp_path / str(k)
        d.mkdir()
        net, w = run(d, store(d, padded(pad_value=pad)), "lstm", executor)
        results.append(({p.name: p.grad.copy() for p in net.params}, backward_output(net, w)))
    (g0, y0), (g1, y1) = results
    np.testing.assert_array_equal(y0[0], y1[0])
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-12, atol=1e-14, err_msg=name)
    assert any(np.abs(g).max() > 0 for g in g0.values())


@pytest.mark.parametrize("executor", [Worker, PlannedWorker], ids=["reference", "planned"])
def test_backward_layers_never_carry(tmp_path, executor):
    """Under kCarry the forward layer carries its last state into the next batch; the
    backward layer starts every batch from zeros, so a batch's backward outputs do not
    depend on the batch before."""
    x = padded(seed=3)
    path = store(tmp_path, x)
    text = gc.bidir_many_to_one_text(path, "gru", T=T, batch=3, hidden=H).replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT state_carry: kCarry }")
    job = load_job(gc.write_job(tmp_path, text))
    outs = []
    for skip in (False, True):
        net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None, np.float64),
                  net_info(tmp_path / "job.conf", tmp_path / "ws", 0), seed=2)
        w = executor(net, seed=2, carry=pb.kCarry)
        if skip:   # the first batch's rows are skipped: no state from them
            net.inputs[0].load_batch()
            net.inputs[0].end_batch()
        else:
            w.run_batch(train=False)
            assert set(w.carry) == {"fwd"}
        w.run_batch(train=False)
        outs.append((backward_output(net, w), backward_output(net, w, "fwd")))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert np.abs(outs[0][1] - outs[1][1]).max() > 1e-3   # the forward layer did carry
