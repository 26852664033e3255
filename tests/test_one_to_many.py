"""Karpathy's one-to-many pattern: kUnrollOneToFirst (one input into the first copy, zeros
into the others) and per-step labels from a one-copy data layer (y [N, T], column t for
copy t, the same rule for kSoftmaxLoss and kEuclideanLoss). Values by hand, gradients by
finite differences, and the planned executor equal to the reference one in float64."""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine import gradcheck
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.net import Net
from engine.planner import PlannedWorker, make_worker
from engine.unroll import unroll
from engine.workspace import net_info
from test_planner import UPDATER, assert_same

T, B, N = 4, 3, 6


def one_to_many_text(path, loss: str, T: int = T, kind: str = "rnn", n_out: int = 1,
                     loss_extra: str = "") -> str:
    layers = (f'layer {{ name: "data" type: kRecordInput unroll_len: 1 '
              f'store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              + gc.rec_conf(kind, "rec", "data", 4, extra="unroll_conn_type: kUnrollOneToFirst")
              + f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec" '
                f"innerproduct_conf {{ num_output: {n_out} }} }}\n"
              + f'layer {{ name: "loss" type: {loss} srclayers: "ip" srclayers: "data" '
                f"unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollOneToAll {loss_extra} }}\n")
    return gc.job_text(layers, unroll=T)


def real_store(tmp_path, T=T):
    rng = np.random.default_rng(7)
    return gc.save_npz(tmp_path / "ramp.npz", x=rng.standard_normal((N, 1, 2)),
                       y=rng.standard_normal((N, T)))


def class_store(tmp_path, T=T, classes=3):
    rng = np.random.default_rng(8)
    return gc.save_npz(tmp_path / "up.npz", x=rng.standard_normal((N, 1, 2)),
                       y=rng.integers(0, classes, size=(N, T)))


EUCLID = "kEuclideanLoss"
EUCLID_LABELS = "euclideanloss_conf { target: kLabels }"


def test_linear_rnn_copy_0_reads_the_input_and_later_copies_zeros(tmp_path):
    """h_0 = W_hx x, h_t = W_hh h_{t-1}: the input reaches the first copy only."""
    path = real_store(tmp_path)
    text = one_to_many_text(path, EUCLID, loss_extra=EUCLID_LABELS).replace(
        "dim_hidden: 4", "dim_hidden: 4 activation: LINEAR bias_term: false")
    net, w = gc.build(tmp_path, text)
    w.run_batch(train=False)
    rec = net.layers["rec"]
    Wx, Wh = rec.params["w_hx"].data, rec.params["w_hh"].data
    x = w.outs["0#data"]
    assert x.shape == (B, 2)
    h = x @ Wx.T
    for t in range(T):
        np.testing.assert_allclose(w.outs[f"{t}#rec"], h, rtol=1e-12, atol=1e-14)
        h = h @ Wh.T


@pytest.mark.parametrize("kind,idle", [("rnn", []), ("gru", ["rec/r_hx"]), ("lstm", ["rec/f_hx"])])
def test_one_to_many_real_targets_gradients(tmp_path, kind, idle):
    """Finite differences agree; the gate weights that only see the input where the state
    is still zero (GRU's reset, LSTM's forget gate at copy 0) get no gradient, because the
    later copies read zeros."""
    net, w = gc.build(tmp_path, one_to_many_text(real_store(tmp_path), EUCLID, kind=kind,
                                                 loss_extra=EUCLID_LABELS))
    worst = gradcheck.check(net, w)
    assert worst and all(v <= gc.TOL for v in worst.values()), worst
    assert [p.name for p in net.params if not np.abs(p.grad).max() > 0] == idle


def test_one_to_many_class_labels_gradients(tmp_path):
    net, w = gc.build(tmp_path, one_to_many_text(class_store(tmp_path), "kSoftmaxLoss", n_out=3))
    gc.assert_grads_ok(net, w)


def test_euclidean_copy_t_reads_column_t_of_the_labels(tmp_path):
    """The loss of copy t is 0.5 (p_t - y[:, t])^2: the reported mse is the mean over copies
    and rows of the squared error against column t."""
    path = real_store(tmp_path)
    net, w = gc.build(tmp_path, one_to_many_text(path, EUCLID, loss_extra=EUCLID_LABELS))
    m = w.run_batch(train=False)
    rows = [int(np.flatnonzero((np.load(path)["x"][:, 0] == r).all(axis=1))[0])
            for r in w.outs["0#data"]]
    y = np.load(path)["y"][rows]
    pred = np.stack([w.outs[f"{t}#ip"][:, 0] for t in range(T)], axis=1)
    assert m["mse"][0] / m["mse"][1] == pytest.approx(((pred - y) ** 2).mean(), rel=1e-12)


@pytest.mark.parametrize("store,loss,extra,n_out", [
    (real_store, EUCLID, EUCLID_LABELS, 1), (class_store, "kSoftmaxLoss", "", 3)])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_planned_equals_reference(tmp_path, store, loss, extra, n_out, kind):
    text = one_to_many_text(store(tmp_path), loss, kind=kind, n_out=n_out, loss_extra=extra)
    text = text.replace("train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER)
    assert_same(tmp_path, text)
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), net_info(path, tmp_path, 0))
    w, note = make_worker(net)
    assert type(w) is PlannedWorker, note


def test_labels_with_too_few_columns_are_one_line(tmp_path):
    path = gc.save_npz(tmp_path / "short.npz", x=np.ones((N, 1, 2)), y=np.ones((N, 2)))
    net, w = gc.build(tmp_path, one_to_many_text(path, EUCLID, loss_extra=EUCLID_LABELS))
    with pytest.raises(Exception, match=r'layer "loss".*shape \(3, 2\).*copy 2 reads column 2.*'
                                        r"y \[N, 3\]") as e:
        w.run_batch(train=False)
    assert "\n" not in str(e.value)


# ------------------------------------------- the planner covers these sources too

def assert_planned_and_same(tmp_path, text):
    text = text.replace("train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER)
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), net_info(path, tmp_path, 0))
    w, note = make_worker(net)
    assert type(w) is PlannedWorker, note
    assert note.startswith("executor: planned")
    assert_same(tmp_path, text)


def test_one_copy_input_at_every_step_is_planned(tmp_path):
    """One-to-all from a one-copy data layer into a layer that does not pick a step (the
    same features at every copy, Karpathy's one-to-many with the input repeated)."""
    layers = (f'layer {{ name: "data" type: kRecordInput unroll_len: 1 '
              f'store_conf {{ path: "{real_store(tmp_path)}" batchsize: {B} }} }}\n'
              'layer { name: "proj" type: kInnerProduct srclayers: "data" '
              "unroll_conn_type: kUnrollOneToAll innerproduct_conf { num_output: 3 } }\n"
              'layer { name: "act" type: kActivation srclayers: "proj" activation_conf { type: TANH } }\n'
              + gc.rec_conf("rnn", "rec", "act", 4)
              + 'layer { name: "ip" type: kInnerProduct srclayers: "rec" innerproduct_conf { num_output: 1 } }\n'
                'layer { name: "loss" type: kEuclideanLoss srclayers: "ip" srclayers: "data" '
                "unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollOneToAll "
                f"{EUCLID_LABELS} }}\n")
    assert_planned_and_same(tmp_path, gc.job_text(layers, unroll=T))


def test_fewer_copies_reading_the_first_steps_is_planned(tmp_path):
    """A layer of 2 copies reading a 4-copy source one-to-one reads its first 2 copies."""
    rng = np.random.default_rng(9)
    path = gc.save_npz(tmp_path / "seq.npz", x=rng.standard_normal((N, T, 2)),
                       y=rng.standard_normal((N, T)), lengths=np.array([4, 1, 3, 2, 4, 4]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              + gc.rec_conf("lstm", "rec", "data", 4)
              + 'layer { name: "ip" type: kInnerProduct unroll_len: 2 srclayers: "rec" '
                "innerproduct_conf { num_output: 1 } }\n"
                'layer { name: "loss" type: kEuclideanLoss unroll_len: 2 srclayers: "ip" srclayers: "data" '
                f"{EUCLID_LABELS} }}\n")
    assert_planned_and_same(tmp_path, gc.job_text(layers, unroll=T))


def test_export_refuses_a_one_to_first_link(tmp_path):
    """An exported model maps step t to output t: a one-to-many net is not one (one line,
    instead of a model that would feed the input at every step)."""
    from engine.interop import InteropError, chain_of
    net, _ = gc.build(tmp_path, one_to_many_text(real_store(tmp_path), EUCLID, loss_extra=EUCLID_LABELS))
    with pytest.raises(InteropError, match=r'layer "rec".*reads "data" kUnrollOneToFirst') as e:
        chain_of(net, "job.conf")
    assert "\n" not in str(e.value)
