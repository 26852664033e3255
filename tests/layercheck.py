"""Finite-difference checks for a single layer, used by the layer tests.

``check_layer(layer, xs, state=None, ctx=None)`` runs forward in float64,
builds the scalar L = sum(y * Ry) + sum(new_state * Rs) with fixed random
weights R, runs backward with dy = Ry and dstate = Rs, and compares every
param gradient and every float input gradient (and the state gradient) with
central finite differences. Returns the worst relative error; asserts it is
below ``tol``.
"""
from __future__ import annotations

import numpy as np

from engine.layers.base import Context


def _flat_states(s):
    if s is None:
        return []
    if isinstance(s, (tuple, list)):
        return list(s)
    return [s]


def _loss(layer, ctx_factory, xs, state, R):
    ctx = ctx_factory()
    y, new_state, _ = layer.forward(ctx, xs, state)
    ys = y if isinstance(y, (list, tuple)) else [y]
    total = sum(float(np.sum(a * r)) for a, r in zip(ys, R["y"]))
    for a, r in zip(_flat_states(new_state), R["s"]):
        total += float(np.sum(a * r))
    return total


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-6, np.abs(a) + np.abs(b))))


def check_layer(layer, xs, state=None, ctx_factory=None, eps=1e-6, tol=1e-6, seed=0,
                check_inputs=True):
    """Compare analytic and numeric gradients of one layer; returns worst error."""
    rng = np.random.default_rng(seed)
    if ctx_factory is None:
        ctx_factory = lambda: Context(step=0, unroll_len=1, train=True, rng=np.random.default_rng(1))
    ctx = ctx_factory()
    y, new_state, cache = layer.forward(ctx, xs, state)
    ys = y if isinstance(y, (list, tuple)) else [y]
    R = {"y": [rng.standard_normal(np.shape(a)) for a in ys],
         "s": [rng.standard_normal(np.shape(a)) for a in _flat_states(new_state)]}
    for p in layer.params.values():
        p.grad[...] = 0
    dy = R["y"] if isinstance(y, (list, tuple)) else R["y"][0]
    if new_state is None:
        dstate = None
    elif isinstance(new_state, (tuple, list)):
        dstate = type(new_state)(R["s"])
    else:
        dstate = R["s"][0]
    dxs, dprev = layer.backward(ctx, dy, dstate, cache)

    worst = 0.0
    targets = []  # (name, array to perturb, analytic grad)
    for key, p in layer.params.items():
        targets.append((f"param {key}", p.data, p.grad.copy()))
    if check_inputs:
        for k, x in enumerate(xs):
            if x is None or not np.issubdtype(np.asarray(x).dtype, np.floating):
                continue
            targets.append((f"input {k}", x, dxs[k]))
    for k, s in enumerate(_flat_states(state)):
        targets.append((f"state {k}", s, _flat_states(dprev)[k]))

    for name, arr, g in targets:
        assert g is not None, f"{name}: no gradient returned"
        num = np.zeros_like(arr)
        it = np.nditer(arr, flags=["multi_index"])
        for _ in it:
            idx = it.multi_index
            old = arr[idx]
            arr[idx] = old + eps
            lp = _loss(layer, ctx_factory, xs, state, R)
            arr[idx] = old - eps
            lm = _loss(layer, ctx_factory, xs, state, R)
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * eps)
        err = rel_err(g, num)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
        worst = max(worst, err)
    return worst


def setup_layer(cls, conf, srcs, dtype=np.float64, seed=0):
    """Build, set up and initialise a layer with params in float64."""
    from engine.params import init_param

    layer = cls(conf, np, dtype)
    layer.setup(srcs)
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        init_param(p, np, dtype, rng)
    return layer


class FakeSrc:
    """Stand-in for a set-up source layer: only out_shape (and extras) matter."""

    vocab = None
    vocab_size = None
    outputs_probabilities = False

    def __init__(self, out_shape, **extra):
        self.out_shape = tuple(out_shape)
        self.name = extra.pop("name", "src")
        for k, v in extra.items():
            setattr(self, k, v)


def make(layer_type, name, src_shapes, **conf_fields):
    """A float64 layer of ``layer_type`` set up on stand-in sources of ``src_shapes``;
    ``conf_fields`` like ``innerproduct_conf__num_output=3`` fill its settings."""
    from engine.layers.base import REGISTRY
    from engine.proto import job_pb2 as pb

    conf = pb.LayerProto(name=name, type=layer_type)
    for path, value in conf_fields.items():
        msg_name, field = path.split("__")
        setattr(getattr(conf, msg_name), field, value)
    return setup_layer(REGISTRY[layer_type], conf, [FakeSrc(s) for s in src_shapes])
