"""A cell is its formula: the tape derives a backward from it, hand-written and fused steps
equal that reference, and a cell with only a formula (kMGU) trains.

Every cell of the registry is covered (tests/cellkinds.py); a new cell class is tested here
without being named."""
from __future__ import annotations

import numpy as np
import pytest

import cellkinds as ck
from engine.layers import kernels
from engine.layers.base import Context
from engine.layers.recurrent import MGULayer, Recurrent, describe_cells
from engine.layers.tape import Direct, Tape, Taped
from engine.params import init_param
from engine.proto import job_pb2 as pb
from layercheck import FakeSrc, check_layer

B, D, H, T = 3, 4, 5, 4
KINDS = list(ck.VARIANTS)
HAND = [k for k in KINDS if ck.cls_of(k).hand_written()]


def build(kind, dtype=np.float64, derived=False, direction=None, one_hot=False, seed=0, D=D):
    conf = ck.make_conf(kind, hidden=H, **({} if direction is None else {"direction": direction}))
    layer = ck.cls_of(kind)(conf, np, dtype)
    layer.derived = derived
    layer.setup([FakeSrc((D,), name="data", one_hot_rows=one_hot)])
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        init_param(p, np, dtype, rng)
        p.data *= 6       # gates away from 0.5, so a wrong derivative shows
        p.grad = np.zeros_like(p.data)
    layer.params_ready()
    return layer


def block_run(layer, X, state0, mask, dy):
    """forward_block then backward_block: outputs, final state, dx, dstate0, param grads."""
    ctx = Context(step=0, unroll_len=T, steps=np.arange(T), batch=B, aux=[None],
                  mask=mask, need_input_grads=[True], need_state_grad=True)
    Y, final, cache = layer.forward_block(ctx, [X], state0)
    Y, final = Y.copy(), tuple(np.array(s) for s in (final if isinstance(final, tuple) else (final,)))
    dxs, d0 = layer.backward_block(ctx, dy, cache)
    grads = {k: p.grad.copy() for k, p in layer.params.items()}
    d0 = tuple(np.array(s) for s in (d0 if isinstance(d0, tuple) else (d0,)))
    return Y, final, np.array(dxs[0]), d0, grads


def inputs(layer, rng, one_hot=False, dtype=np.float64):
    if one_hot:
        X = np.eye(D, dtype=dtype)[rng.integers(0, D, T * B)]
    else:
        X = rng.standard_normal((T * B, D)).astype(dtype)
    st = tuple(rng.uniform(-1, 1, (B, H)).astype(dtype) for _ in range(layer.parts))
    mask = np.ones(T * B, dtype=dtype)
    mask[-2:] = 0                       # the last step of two sequences is padding
    dy = rng.standard_normal((T * B, H)).astype(dtype)
    return X, (st[0] if len(st) == 1 else st), mask, dy


@pytest.mark.parametrize("direction", [pb.kForward, pb.kBackward], ids=["forward", "backward"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["dense", "one-hot"])
@pytest.mark.parametrize("kind", HAND)
def test_hand_written_steps_equal_the_derived_reference(kind, one_hot, direction):
    """Hand-written NumPy steps (float64) == the tape run on the cell's formula: outputs,
    final state, input gradient, initial-state gradient and every param gradient, with
    masks, both directions, dense and one-hot inputs."""
    rng = np.random.default_rng(1)
    hand = build(kind, direction=direction, one_hot=one_hot)
    ref = build(kind, derived=True, direction=direction, one_hot=one_hot)
    assert not hand.uses_formula and ref.uses_formula
    X, st, mask, dy = inputs(hand, rng, one_hot)
    got, want = block_run(hand, X, st, mask, dy), block_run(ref, X, st, mask, dy)
    for what, a, b in zip(("y", "final", "dx", "dstate0"), got[:4], want[:4]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=what)
    assert got[4].keys() == want[4].keys()
    for k in got[4]:
        np.testing.assert_allclose(got[4][k], want[4][k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.skipif(not kernels.available(), reason="the native kernels are not built")
@pytest.mark.parametrize("kind", [k for k in HAND if ck.cls_of(k).fused])
def test_fused_kernels_equal_the_derived_reference(kind):
    """The fused float32 kernels == the derived reference in float64 (to float32 precision)."""
    rng = np.random.default_rng(2)
    fused = build(kind, dtype=np.float32)
    ref = build(kind, derived=True)
    X, st, mask, dy = inputs(ref, rng)
    f32 = (lambda a: tuple(x.astype(np.float32) for x in a) if isinstance(a, tuple)
           else a.astype(np.float32))
    kernels.use("native")
    try:
        got = block_run(fused, f32(X), f32(st), f32(mask), f32(dy))
    finally:
        kernels.use(None)
    want = block_run(ref, X, st, mask, dy)
    for what, a, b in zip(("y", "final", "dx", "dstate0"), got[:4], want[:4]):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4, err_msg=what)
    for k in got[4]:
        scale = np.abs(want[4][k]).max() + 1e-6
        assert np.abs(got[4][k] - want[4][k]).max() / scale < 2e-3, k


@pytest.mark.parametrize("kind", KINDS)
def test_the_formula_on_plain_arrays_is_the_step(kind):
    """``evaluate`` (the formula on arrays, no tape) == what the layer's step computes."""
    rng = np.random.default_rng(3)
    layer = build(kind)
    X, st, mask, dy = inputs(layer, rng)
    x = X[:B]
    parts = st if isinstance(st, tuple) else (st,)
    y, new, _ = layer.forward(Context(aux=[None]), [x], st)
    P = layer.weights
    W_h, W_x = P.data("h"), P.data("x")
    b = P.data("b") if layer.has_bias else 0

    def U(gates, v):
        rows = slice(*[g * H for g in (gates.indices(layer.gates)[:2] if isinstance(gates, slice)
                                       else (gates, gates + 1))])
        out = W_h[rows] @ v
        if layer.hbias_key is not None and rows.stop == layer.gates * H:
            out[layer.hbias_from - rows.start:] += layer.params[layer.hbias_key].data[:, None]
        return out

    xproj = W_x @ x.T + (b[:, None] if layer.has_bias else 0)
    xs = [xproj[k * H:(k + 1) * H] for k in range(layer.gates)]
    want = layer.evaluate(np, xs, tuple(p.T for p in parts), U)
    np.testing.assert_allclose(y, want[0].T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", [k for k in KINDS if not ck.cls_of(k).hand_written()])
def test_a_formula_only_cell_has_finite_difference_gradients(kind):
    """The derived backward is right: every param, the input and the state, by central
    differences, over one step with a mask and over four steps."""
    rng = np.random.default_rng(4)
    layer = build(kind)
    x = rng.standard_normal((B, D))
    h = rng.uniform(-1, 1, (B, H))
    check_layer(layer, [x], state=h)
    check_layer(layer, [x], state=h, ctx_factory=lambda: Context(mask=np.array([1.0, 0.0, 1.0])))


def test_mgu_is_its_equations():
    """kMGU: f = σ(W_f x + U_f h + b_f), c = tanh(W_c x + U_c (f ⊙ h) + b_c),
    h' = (1 − f) ⊙ h + f ⊙ c, written out here with the params by name."""
    rng = np.random.default_rng(5)
    layer = build("mgu")
    assert [k for k in layer.params] == ["f_hx", "c_hx", "f_hh", "c_hh", "f_b", "c_b"]
    x = rng.standard_normal((B, D))
    h = rng.uniform(-1, 1, (B, H))
    P = {k: p.data for k, p in layer.params.items()}
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    f = sig(x @ P["f_hx"].T + h @ P["f_hh"].T + P["f_b"])
    c = np.tanh(x @ P["c_hx"].T + (f * h) @ P["c_hh"].T + P["c_b"])
    y, _, _ = layer.forward(Context(aux=[None]), [x], h)
    np.testing.assert_allclose(y, (1 - f) * h + f * c, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("direction", [pb.kForward, pb.kBackward], ids=["forward", "backward"])
def test_mgu_block_equals_copies(direction):
    """The one step loop: T copies one at a time (state carried) == one block call."""
    rng = np.random.default_rng(6)
    layer = build("mgu", direction=direction)
    X, h0, mask, dy = inputs(layer, rng)
    Y, final, dx, d0, grads = block_run(layer, X, h0, mask, dy)
    for p in layer.params.values():
        p.grad[...] = 0
    order = range(T - 1, -1, -1) if direction == pb.kBackward else range(T)
    state, caches = h0, {}
    ys = {}
    for t in order:
        ctx = Context(step=t, unroll_len=T, aux=[None], mask=mask[t * B:(t + 1) * B])
        ys[t], state, caches[t] = layer.forward(ctx, [X[t * B:(t + 1) * B]], state)
    np.testing.assert_allclose(np.concatenate([ys[t] for t in range(T)]), Y, rtol=1e-12)
    np.testing.assert_allclose(state, final[0], rtol=1e-12)
    dstate, dxs = None, {}
    for t in reversed(list(order)):
        ctx = Context(step=t, unroll_len=T, aux=[None], mask=mask[t * B:(t + 1) * B])
        d, dstate = layer.backward(ctx, dy[t * B:(t + 1) * B], dstate, caches[t])
        dxs[t] = d[0]
    np.testing.assert_allclose(np.concatenate([dxs[t] for t in range(T)]), dx, rtol=1e-10)
    np.testing.assert_allclose(dstate, d0[0], rtol=1e-10, atol=1e-12)
    for k, p in layer.params.items():
        np.testing.assert_allclose(p.grad, grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_the_tape_differentiates_the_dozen_ops():
    """The tape's gradient of a small expression over every op == central differences."""
    rng = np.random.default_rng(7)
    a0, b0 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))

    def expr(f, a, b):
        return f.tanh(a * b - 0.5) + f.sigmoid(2.0 * a) * (1 - b) + f.relu(-a + b) - f.identity(b * b)

    tape = Tape(np)
    a, b = tape.leaf(a0), tape.leaf(b0)
    out = expr(Taped(tape), a, b)
    np.testing.assert_allclose(out.value, expr(Direct(np), a0, b0), rtol=1e-14)
    g = rng.standard_normal(a0.shape)
    tape.backward([(out, g)])
    eps = 1e-6
    for leaf, base in ((a, a0), (b, b0)):
        num = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += eps
            minus[i] -= eps
            args = lambda v: (v, b0) if leaf is a else (a0, v)  # noqa: E731
            num[i] = ((expr(Direct(np), *args(plus)) - expr(Direct(np), *args(minus))) * g).sum() / (2 * eps)
        np.testing.assert_allclose(tape.grad(leaf), num, rtol=1e-6, atol=1e-8)


def test_cell_facts_live_on_the_classes():
    """What the rest of the engine reads about a cell comes from its class: export forms
    (interop's table is derived), the maths each runs."""
    from engine import interop
    assert set(interop.CELLS) == {t for t, (_, cls) in ((ck.CELLS[k][0], ck.CELLS[k])
                                                        for k in ck.CELLS) if cls.export}
    assert pb.kMGU not in interop.CELLS and MGULayer.export is None
    assert issubclass(MGULayer, Recurrent) and not MGULayer.hand_written()


def test_the_banner_says_what_each_cell_runs():
    """Per cell type, not per process: a kernel, NumPy formulas, or the derived backward."""
    layers = [build("mgu"), build("gru"), build("rnn-linear"), build("gru", derived=True)]
    assert describe_cells(layers) == ("kMGU: formula, derived backward, kGRU: NumPy formulas, "
                                      "kRNN: NumPy formulas, kGRU: formula, derived backward")
    if kernels.available():
        kernels.use("native")
        try:
            got = describe_cells([build("gru", dtype=np.float32), build("rnn-linear", dtype=np.float32)])
        finally:
            kernels.use(None)
        assert got == "kGRU: gru kernel, kRNN: NumPy formulas"


def test_an_mgu_char_rnn_trains_samples_and_refuses_export(tmp_path):
    """The whole tool with a cell that is only a formula: train (planned executor, the
    banner names what it runs), the loss falls, sample, and export says in one line that
    the exchange formats have no such cell."""
    import json
    from charjobs import char_job, run_cli
    job = char_job(tmp_path, rnn="kMGU", steps=40, hidden=24, unroll=10, val=False)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    assert "kMGU: formula, derived backward" in r.stdout and "executor: planned" in r.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ws" / "metrics.jsonl").open()
              if json.loads(line).get("phase") == "train"]
    assert losses[-1] < losses[0] - 0.5, losses   # 3.58 -> 2.89 nats when measured
    ck = tmp_path / "ws" / "checkpoints" / "step40.npz"
    s = run_cli("engine.sample", "--checkpoint", ck, "--length", "30", "--prime", "def ")
    assert s.returncode == 0 and s.stdout.startswith("def ") and len(s.stdout) >= 30, s.stderr
    e = run_cli("engine.export", ck, tmp_path / "m.onnx")
    assert e.returncode == 2 and e.stderr.count("\n") == 1 and "kMGU" in e.stderr, e.stderr
