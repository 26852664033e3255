"""A recurrent layer written here, against nothing but the contract of engine/layers/base.py,
trains under the default executor: node by node (with the reason printed) when it has only
the per-copy forward/backward, planned when it also publishes the block interface. Its
gradients pass the finite-difference check, and the planned run equals the reference one.

The layer is an Elman cell without bias, h' = tanh(x W^T + h U^T), registered for these
tests in place of kRNN (``monkeypatch.setitem`` on the registry), so a job file names it
with ``type: kRNN rnn_conf { dim_hidden: H }``.
"""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine import gradcheck, train
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.layers.base import REGISTRY, Layer
from engine.net import Net
from engine.planner import PlannedWorker, make_worker
from engine.worker import Worker
from engine.proto import job_pb2 as pb
from engine.unroll import unroll
from engine.updaters import Updater
from engine.workspace import net_info

H = 6


class Elman(Layer):
    """h' = tanh(x W^T + h U^T); y = h'. Params w (H×D), u (H×H). Per copy only."""

    recurrent = True
    has_params = True

    def setup(self, srcs):
        self.H = int(self.conf.rnn_conf.dim_hidden)
        D = int(srcs[0].out_shape[0])
        self.add_param("w", (self.H, D), ("uniform", -0.3, 0.3))
        self.add_param("u", (self.H, self.H), ("uniform", -0.3, 0.3))
        self.out_shape = (self.H,)

    def zero_state(self, batch):
        return self.xp.zeros((batch, self.H), dtype=self.dtype)

    def forward(self, ctx, xs, state):
        x = xs[0][0] if isinstance(xs[0], list) else xs[0]
        if state is None:
            state = self.zero_state(x.shape[0])
        w, u = self.params["w"].data, self.params["u"].data
        h = self.xp.tanh(x @ w.T + state @ u.T)
        return h, h, (x, state, h)

    def backward(self, ctx, dy, dstate, cache):
        x, h_prev, h = cache
        d = (dy + dstate) * (1 - h * h)
        self.params["w"].grad += d.T @ x
        self.params["u"].grad += d.T @ h_prev
        return [d @ self.params["w"].data], d @ self.params["u"].data


class BlockElman(Elman):
    """The same cell, also running all its copies in one call (the block interface)."""

    def supports_block(self):
        return True

    def forward_block(self, ctx, xs, state):
        B = state.shape[0]
        x = xs[0][0] if isinstance(xs[0], list) else xs[0]
        ys, caches, h = [], [], state
        for t in range(x.shape[0] // B):
            h, _, c = self.forward(ctx, [x[t * B:(t + 1) * B]], h)
            ys.append(h)
            caches.append(c)
        return self.xp.concatenate(ys), h, caches

    def backward_block(self, ctx, dy, cache):
        B = cache[0][0].shape[0]
        dxs, dh = [None] * len(cache), self.xp.zeros_like(cache[0][1])
        for t in range(len(cache) - 1, -1, -1):
            (dxs[t],), dh = self.backward(ctx, dy[t * B:(t + 1) * B], dh, cache[t])
        return [self.xp.concatenate(dxs)], dh


def job(tmp_path, steps=6):
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path))
                       + f'layer {{ name: "rec" type: kRNN srclayers: "onehot" '
                         f"rnn_conf {{ dim_hidden: {H} }} }}\n"
                       + gc.ip_loss("rec", gc.vocab_size()),
                       extra='updater { type: kSGD learning_rate { type: kFixed base_lr: 0.1 } }\n'
                             f"train_steps: {steps} disp_freq: 3\n")
    return gc.write_job(tmp_path, text)


@pytest.mark.parametrize("cls,executor", [(Elman, "reference (node by node): layer \"rec\" (kRNN) "
                                                  "does not publish the block interface"),
                                          (BlockElman, "planned")], ids=["per-copy", "block"])
def test_custom_layer_trains_under_auto(tmp_path, monkeypatch, capsys, cls, executor):
    monkeypatch.setitem(REGISTRY, pb.kRNN, cls)
    path = job(tmp_path)
    assert train.main([str(path), "--workspace", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    assert f"executor: {executor}" in out, out
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines()
              if line.lstrip().startswith("step") and " train " in line]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("cls", [Elman, BlockElman], ids=["per-copy", "block"])
def test_custom_layer_gradients(tmp_path, monkeypatch, cls):
    monkeypatch.setitem(REGISTRY, pb.kRNN, cls)
    net, w = gc.build(tmp_path, job(tmp_path).read_text())
    worst = gradcheck.check(net, w)
    assert set(worst) == {"rec/w", "rec/u", "ip/w", "ip/b"}
    assert max(worst.values()) < gc.TOL, worst


def test_custom_block_layer_equals_the_reference(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, pb.kRNN, BlockElman)
    path = job(tmp_path)
    loaded = load_job(path)
    runs = []
    for cls in (Worker, PlannedWorker):
        net = Net(unroll(loaded.neuralnet, Phase.TRAIN), make_backend(None, np.float64),
                  net_info(path, tmp_path / "ws", 0), seed=1)
        worker = cls(net, seed=1)
        up = Updater(loaded.updater, net.params, np)
        losses = []
        for step in range(3):
            losses.append(worker.run_batch(train=True)["loss"][0])
            up.update(step)
        runs.append((losses, [p.data.copy() for p in net.params]))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-10)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)
    assert isinstance(make_worker(net)[0], PlannedWorker)


def test_a_custom_layer_adding_with_plus_equals_gets_a_zeroed_gradient_every_batch(
        tmp_path, monkeypatch):
    """The buffer skips zeroing only the params of layers that claim their gradients
    (``claims_grads``); this layer adds with ``+=``, so its params are zeroed before each
    batch, while the output layer's are written by their first contribution. The
    gradients of the third batch equal those of a fresh net run on that batch."""
    monkeypatch.setitem(REGISTRY, pb.kRNN, BlockElman)
    path = job(tmp_path)
    loaded = load_job(path)

    def fresh():
        return Net(unroll(loaded.neuralnet, Phase.TRAIN), make_backend(None, np.float64),
                   net_info(path, tmp_path / "ws", 0), seed=1)

    net = fresh()
    assert {p.name for p in net.grads.lazy} == {"ip/w", "ip/b"}
    worker = PlannedWorker(net, seed=1)
    for _ in range(2):
        worker.run_batch(train=True)
    snap = worker.snapshot()
    worker.run_batch(train=True)
    again = fresh()
    again_w = PlannedWorker(again, seed=1)
    for a, b in zip(net.params, again.params):
        b.data[...] = a.data
    again_w.restore(snap)
    again_w.run_batch(train=True)
    for a, b in zip(net.params, again.params):
        assert np.abs(b.grad).max() > 0, b.name
        np.testing.assert_array_equal(a.grad, b.grad, err_msg=a.name)
