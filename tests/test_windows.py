"""Records longer than unroll_len are walked window by window with the state carried (no
step is dropped): windows of T steps over S-step records compute what one unroll over S
steps computes, the last window's steps past S are masked, and per-sequence labels with
long records are one error line."""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine.backend import make_backend
from engine.config import ConfigError, Phase, load_job
from engine.net import Net
from engine.planner import PlannedWorker
from engine.unroll import unroll
from engine.worker import Worker
from engine.workspace import net_info
from test_planner import UPDATER, assert_same

N, B, F, H = 4, 2, 2, 3


def store(tmp_path, S, per_step=True):
    rng = np.random.default_rng(21)
    y = rng.standard_normal((N, S)) if per_step else rng.standard_normal((N,))
    return gc.save_npz(tmp_path / f"long{S}.npz", x=rng.standard_normal((N, S, F)), y=y)


def text(path, T, kind="rnn"):
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              + gc.rec_conf(kind, "rec", "data", H)
              + 'layer { name: "ip" type: kInnerProduct srclayers: "rec" innerproduct_conf { num_output: 1 } }\n'
                'layer { name: "loss" type: kEuclideanLoss srclayers: "ip" srclayers: "data" '
                "euclideanloss_conf { target: kLabels } }\n")
    return gc.job_text(layers, unroll=T)


def net_and_worker(tmp_path, job_text, name, cls=Worker):
    path = gc.write_job(tmp_path, job_text, name)
    job = load_job(path)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None, np.float64),
              net_info(path, tmp_path / "ws", 0), seed=3)
    return net, cls(net, seed=3, carry=job.train_one_batch.state_carry)


@pytest.mark.parametrize("S,T", [(8, 4), (10, 4)])
@pytest.mark.parametrize("cls", [Worker, PlannedWorker])
def test_windows_compute_what_one_unroll_over_the_record_computes(tmp_path, S, T, cls):
    path = store(tmp_path, S)
    full_net, full = net_and_worker(tmp_path, text(path, S), "full.conf")
    win_net, win = net_and_worker(tmp_path, text(path, T), "win.conf", cls)
    for a, b in zip(full_net.params, win_net.params):
        b.data[...] = a.data
    assert win_net.layers["data"].windows == -(-S // T)
    m_full = full.run_batch(train=True)
    g_full = {p.name: p.grad.copy() for p in full_net.params}
    loss, count, grads = 0.0, 0, {p.name: 0.0 for p in win_net.params}
    for w in range(-(-S // T)):
        m = win.run_batch(train=True)
        assert win_net.layers["data"].new_sequence == (w == 0)
        loss += m["loss"][0]
        count += m["loss"][1]
        for p in win_net.params:
            grads[p.name] = grads[p.name] + p.grad
        if cls is Worker:
            for t in range(T):
                if w * T + t < S:
                    np.testing.assert_allclose(win.outs[f"{t}#rec"], full.outs[f"{w * T + t}#rec"],
                                               rtol=1e-12, atol=1e-14)
    # every step counted once: the same loss over the same S·B predictions
    assert count == m_full["loss"][1] == S * B
    assert loss == pytest.approx(m_full["loss"][0], rel=1e-12)
    # the output layer's gradient has no path across windows: the sums agree exactly
    for name in ("ip/w", "ip/b"):
        np.testing.assert_allclose(grads[name], g_full[name], rtol=1e-10, atol=1e-13)
    # the next batch starts new rows from a zero state
    win.run_batch(train=False)
    assert win_net.layers["data"].new_sequence and win_net.layers["data"].window == 0


def test_planned_equals_reference_across_windows(tmp_path):
    t = text(store(tmp_path, 10), 4, "lstm").replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER)
    assert_same(tmp_path, t, steps=4)


def test_cursor_state_resumes_inside_a_record(tmp_path):
    path = store(tmp_path, 8)
    net, w = net_and_worker(tmp_path, text(path, 4), "a.conf")
    lay = net.layers["data"]
    lay.load_batch()
    d = lay.cursor_state()
    assert d["window"] == 0 and len(d["rows"]) == B
    lay.load_batch()
    expect = lay.xb.copy()
    net2, _ = net_and_worker(tmp_path, text(path, 4), "b.conf")
    lay2 = net2.layers["data"]
    lay2.load_cursor_state(d)
    lay2.load_batch()
    np.testing.assert_array_equal(lay2.xb, expect)
    assert not lay2.new_sequence


def test_per_sequence_labels_with_long_records_are_one_line(tmp_path):
    path = store(tmp_path, 8, per_step=False)
    with pytest.raises(ConfigError, match=r"8 steps but unroll_len is 4.*2 windows.*per-step "
                                          r"labels y \[N, 8\].*set unroll_len to 8") as e:
        net_and_worker(tmp_path, text(path, 4), "c.conf")
    assert "\n" not in str(e.value)
