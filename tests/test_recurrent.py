"""Tests of the recurrent layers (every registered cell: tests/cellkinds.py) in float64 on NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from engine.layers.base import Context, LayerError
from engine.layers.recurrent import GRULayer, LSTMLayer, Recurrent, RNNLayer
from engine.proto import job_pb2 as pb
from layercheck import FakeSrc, check_layer, rel_err
import cellkinds as ck

B, D, H = 3, 4, 5
MASK = np.array([1.0, 0.0, 1.0])


def make_conf(kind, name="rec", hidden=H, bias=True, activation=None, forget_bias=None,
              direction=None, recurrent_bias=False):
    fields = {}
    if activation is not None:
        fields["activation"] = activation
    if forget_bias is not None:
        fields["forget_bias"] = forget_bias
    if direction is not None:
        fields["direction"] = direction
    if recurrent_bias:
        fields["recurrent_bias"] = True
    return ck.make_conf(kind, name=name, hidden=hidden, bias=bias, **fields)


# every registered cell and variant (tests/cellkinds.py): (kind, None)
VARIANTS = [(k, None) for k in ck.VARIANTS if k != "gru-hb"]
VARIANT_IDS = [k for k, _ in VARIANTS]


def build(kind, bias=True, activation=None, src_conn=None, srcs=None, seed=0, **kw):
    conf = make_conf(kind, bias=bias, activation=activation, **kw)
    if srcs is None:
        srcs = [FakeSrc((D,), name="data")]
    layer = ck.cls_of(kind)(conf, np, np.float64)
    layer.src_conn = list(src_conn or [])
    layer.setup(srcs)
    from engine.params import init_param
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        init_param(p, np, np.float64, rng)
    # make the weights large enough that the gates are not all near 0.5 / 0
    for p in layer.params.values():
        p.data[...] = rng.uniform(-0.8, 0.8, p.shape)
    return layer


def rand_state(layer, rng):
    if layer.parts == 2:
        return (rng.uniform(-1, 1, (B, H)), rng.uniform(-1, 1, (B, H)))
    return rng.uniform(-1, 1, (B, H))


def ctx_with(mask):
    return lambda: Context(step=0, unroll_len=1, train=True, mask=mask,
                           rng=np.random.default_rng(1))


# ------------------------------------------------------------ gradient checks
@pytest.mark.parametrize("kind,act", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
def test_single_step_gradients(kind, act, bias, mask):
    layer = build(kind, bias=bias, activation=act)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, D))
    state = rand_state(layer, rng)
    n_params = len(layer.params)
    assert n_params == (len(layer.weights.keys("x")) * (3 if bias else 2))
    err = check_layer(layer, [x], state, ctx_factory=ctx_with(mask), eps=1e-4, tol=1e-6)
    assert err < 1e-6


@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_single_step_gradients_gru_recurrent_bias(bias, mask):
    layer = build("gru", bias=bias, recurrent_bias=True)
    assert list(layer.params)[-1] == "c_hb" and len(layer.params) == (10 if bias else 7)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((B, D))
    err = check_layer(layer, [x], rand_state(layer, rng), ctx_factory=ctx_with(mask),
                      eps=1e-5, tol=1e-6)
    assert err < 1e-6
    assert np.abs(layer.params["c_hb"].grad).max() > 0


@pytest.mark.parametrize("kind,act", VARIANTS, ids=VARIANT_IDS)
def test_gradients_with_initial_state_source(kind, act):
    """A first-to-last source sits before the data source; its xs slot is None."""
    srcs = [FakeSrc((H,), name="encoder"), FakeSrc((D,), name="data")]
    layer = build(kind, activation=act, srcs=srcs,
                  src_conn=[pb.kUnrollFirstToLast, pb.kUnrollOneToOne])
    assert layer.data_pos == 1 and layer.init_pos == 0
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, D))
    enc_y = rng.uniform(-1, 1, (B, H))
    state = layer.state_from_source(enc_y)
    check_layer(layer, [None, x], state, ctx_factory=ctx_with(None), eps=1e-4, tol=1e-6)
    y, new_state, cache = layer.forward(Context(), [None, x], state)
    dxs, dprev = layer.backward(Context(), np.ones_like(y), layer.zero_state(B), cache)
    assert dxs[0] is None and dxs[1].shape == (B, D)
    g = layer.source_grad_from_state(dprev)
    assert g.shape == (B, H)


def test_lstm_state_from_source():
    layer = build("lstm")
    y = np.arange(B * H, dtype=np.float64).reshape(B, H)
    h, c = layer.state_from_source(y)
    assert h is y and np.array_equal(c, np.zeros((B, H)))
    dh, dc = np.ones((B, H)), np.full((B, H), 2.0)
    assert layer.source_grad_from_state((dh, dc)) is dh
    g = build("gru")
    assert g.state_from_source(y) is y and g.source_grad_from_state(dh) is dh


def _run_chain(layer, xs, state0, masks):
    """Forward T steps, carrying the state; returns outputs, states and caches."""
    ys, caches, state = [], [], state0
    for t, x in enumerate(xs):
        ctx = Context(step=t, unroll_len=len(xs), mask=masks[t])
        y, state, cache = layer.forward(ctx, [x], state)
        ys.append(y)
        caches.append((ctx, cache))
    return ys, state, caches


def _flat(s):
    return list(s) if isinstance(s, tuple) else [s]


@pytest.mark.parametrize("kind,act", VARIANTS, ids=VARIANT_IDS)
def test_bptt_four_steps(kind, act):
    """Chain T=4 copies by hand; BPTT grads equal finite differences of the whole chain."""
    T = 4
    layer = build(kind, activation=act)
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((B, D)) for _ in range(T)]
    state0 = rand_state(layer, rng)
    masks = [None, np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0]), None]
    R = [rng.standard_normal((B, H)) for _ in range(T)]

    def loss():
        ys, _, _ = _run_chain(layer, xs, state0, masks)
        return sum(float(np.sum(y * r)) for y, r in zip(ys, R))

    for p in layer.params.values():
        p.grad[...] = 0
    ys, last, caches = _run_chain(layer, xs, state0, masks)
    dstate = layer.zero_state(B)
    dxs = [None] * T
    for t in reversed(range(T)):
        ctx, cache = caches[t]
        (dxs[t],), dstate = layer.backward(ctx, R[t], dstate, cache)

    targets = [(f"param {k}", p.data, p.grad.copy()) for k, p in layer.params.items()]
    targets += [(f"x{t}", xs[t], dxs[t]) for t in range(T)]
    targets += [(f"state0[{k}]", s, g) for k, (s, g) in
                enumerate(zip(_flat(state0), _flat(dstate)))]
    eps = 1e-4
    for name, arr, g in targets:
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss()
            arr[idx] = old - eps
            lm = loss()
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * eps)
        assert rel_err(g, num) < 1e-6, name
        assert np.any(num != 0), name


BLOCK_VARIANTS = VARIANTS + [("gru-hb", None)]
BLOCK_IDS = VARIANT_IDS + ["gru-recurrent-bias"]


def build_variant(kind, act, **kw):
    return build(kind, **kw)


@pytest.mark.parametrize("direction", [pb.kForward, pb.kBackward], ids=["forward", "backward"])
@pytest.mark.parametrize("fold", [True, False], ids=["input-in-step-gemm", "separate-input-gemm"])
@pytest.mark.parametrize("kind,act", BLOCK_VARIANTS, ids=BLOCK_IDS)
def test_block_equals_steps(kind, act, fold, direction, monkeypatch):
    """forward_block over T copies == T single-copy forwards with the state carried (from
    copy 0 up, or from copy T-1 down for kBackward), and backward_block == the per-copy
    backward: outputs, final state, the input gradient, the initial state's gradient and
    every param gradient (with masks, both input layouts)."""
    monkeypatch.setattr(Recurrent, "FOLD_INPUT", 1e9 if fold else 0.0)
    T = 4
    layer = build_variant(kind, act, direction=direction)
    backward = direction == pb.kBackward
    assert layer.reverse == backward
    assert type(layer).context_sources(layer.conf) == [("rec", -1 if backward else 1)]
    assert layer.folds_input == (fold and layer.sums_projections)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((T, B, D))
    state0 = rand_state(layer, rng)
    masks = [None, np.array([0.0, 1.0, 1.0]), None, np.array([1.0, 0.0, 0.0])]
    R = rng.standard_normal((T, B, H))
    order = list(reversed(range(T))) if backward else list(range(T))  # the pass

    for p in layer.params.values():
        p.grad[...] = 0
    ys, last, caches = [None] * T, state0, [None] * T
    for t in order:
        ctx = Context(step=t, unroll_len=T, mask=masks[t])
        ys[t], last, cache = layer.forward(ctx, [X[t]], last)
        caches[t] = (ctx, cache)
    dstate, dX = layer.zero_state(B), np.zeros_like(X)
    for t in reversed(order):
        (dX[t],), dstate = layer.backward(caches[t][0], R[t], dstate, caches[t][1])
    ref_grads = {k: p.grad.copy() for k, p in layer.params.items()}
    assert all(np.abs(g).max() > 0 for g in ref_grads.values())

    for p in layer.params.values():
        p.grad[...] = 0
    mask = np.stack([np.ones(B) if m is None else m for m in masks]).reshape(-1)
    ctx = Context(step=0, unroll_len=T, mask=mask, steps=np.arange(T), batch=B,
                  aux=[None], need_input_grads=[True], need_state_grad=True)
    Y, final, cache = layer.forward_block(ctx, [X.reshape(T * B, D)], state0)
    np.testing.assert_allclose(Y.reshape(T, B, H), np.stack(ys), rtol=1e-12, atol=1e-12)
    for a, b in zip(_flat(last), _flat(final)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    (dXb,), dstate0 = layer.backward_block(ctx, R.reshape(T * B, H), cache)
    np.testing.assert_allclose(dXb.reshape(T, B, D), dX, rtol=1e-10, atol=1e-12)
    for a, b in zip(_flat(dstate), _flat(dstate0)):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    for k, p in layer.params.items():
        np.testing.assert_allclose(p.grad, ref_grads[k], rtol=1e-10, atol=1e-12, err_msg=k)
    # what nothing asks for is not computed
    ctx.need_input_grads, ctx.need_state_grad = [False], False
    Y, final, cache = layer.forward_block(ctx, [X.reshape(T * B, D)], state0)
    (dXb,), dstate0 = layer.backward_block(ctx, R.reshape(T * B, H), cache)
    assert dXb is None and dstate0 is None


# -------------------------------------------------------------------- masking
@pytest.mark.parametrize("kind,act", VARIANTS, ids=VARIANT_IDS)
def test_fully_masked_step_keeps_state(kind, act):
    layer = build(kind, activation=act)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, D))
    state = rand_state(layer, rng)
    ctx = Context(mask=np.zeros(B))
    y, new_state, cache = layer.forward(ctx, [x], state)
    for a, b in zip(_flat(new_state), _flat(state)):
        assert np.array_equal(a, b)
    assert np.array_equal(y, _flat(state)[0])
    for p in layer.params.values():
        p.grad[...] = 0
    dy = rng.standard_normal((B, H))
    dstate = tuple(rng.standard_normal((B, H)) for _ in _flat(state))
    dstate = dstate if isinstance(state, tuple) else dstate[0]
    (dx,), dprev = layer.backward(ctx, dy, dstate, cache)
    assert np.array_equal(dx, np.zeros((B, D)))
    for p in layer.params.values():
        assert np.array_equal(p.grad, np.zeros(p.shape))
    expect = [dy + _flat(dstate)[0]] + _flat(dstate)[1:]
    for a, b in zip(_flat(dprev), expect):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("block", [False, True], ids=["step", "block"])
def test_mask_of_ones_is_no_mask(block):
    """A step whose mask keeps every column (the full steps of a padded batch) runs as an
    unmasked step, in both executors' paths (``_mask`` gives None: no blend with the old
    state, which cost a fifth of a bi-LSTM 100 step), with the same outputs and gradients
    as no mask, to the bit."""
    layer = build("lstm")
    rng = np.random.default_rng(6)
    T = 2 if block else 1
    X = rng.standard_normal((T * B, D))
    state = rand_state(layer, rng)
    R = rng.standard_normal((T * B, H))
    runs = []
    for mask in (None, np.ones(T * B)):
        for p in layer.params.values():
            p.grad[...] = 0
        if block:
            ctx = Context(step=0, unroll_len=T, mask=mask, steps=np.arange(T), batch=B,
                          aux=[None], need_input_grads=[True], need_state_grad=False)
            y, _, cache = layer.forward_block(ctx, [X], state)
            (dx,), _ = layer.backward_block(ctx, R, cache)
        else:
            ctx = Context(mask=mask)
            y, _, cache = layer.forward(ctx, [X], state)
            (dx,), _ = layer.backward(ctx, R, layer.zero_state(B), cache)
        runs.append((y.copy(), dx.copy(), {k: p.grad.copy() for k, p in layer.params.items()}))
    (y0, dx0, g0), (y1, dx1, g1) = runs
    assert np.array_equal(y0, y1) and np.array_equal(dx0, dx1)
    for k in g0:
        assert np.array_equal(g0[k], g1[k]), k
    assert layer._mask(np.ones(B)) is None and layer._mask(None) is None
    m, rest = layer._mask(np.array([1.0, 0.0, 1.0]))
    assert np.array_equal(m, [[1, 0, 1]]) and np.array_equal(rest, [[0, 1, 0]])


@pytest.mark.parametrize("kind,act", VARIANTS, ids=VARIANT_IDS)
def test_partial_mask_rows(kind, act):
    """Masked rows keep the previous state; unmasked rows equal the unmasked step."""
    layer = build(kind, activation=act)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((B, D))
    state = rand_state(layer, rng)
    y_all, s_all, _ = layer.forward(Context(), [x], state)
    y_m, s_m, _ = layer.forward(Context(mask=MASK), [x], state)
    for full, masked, prev in zip(_flat(s_all), _flat(s_m), _flat(state)):
        assert np.array_equal(masked[1], prev[1])
        assert np.array_equal(masked[[0, 2]], full[[0, 2]])
    assert np.array_equal(y_m, _flat(s_m)[0])


def test_none_state_is_zero_state():
    for kind in ("rnn", "gru", "lstm"):
        layer = build(kind)
        x = np.random.default_rng(0).standard_normal((B, D))
        y1, s1, _ = layer.forward(Context(), [x], None)
        y2, s2, _ = layer.forward(Context(), [x], layer.zero_state(B))
        assert np.array_equal(y1, y2)
        z = layer.zero_state(B)
        for a in _flat(z):
            assert a.shape == (B, H) and a.dtype == np.float64 and not a.any()


# ---------------------------------------------------- formulas, params, config
def sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def test_gru_params_and_formula():
    layer = build("gru")
    keys = ["z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b"]
    assert list(layer.params) == keys
    assert GRULayer.default_param_names(layer.conf) == keys
    for k, p in layer.params.items():
        assert p.name == f"rec/{k}"
        if k.endswith("_hx"):
            assert p.shape == (H, D) and (p.fan_in, p.fan_out) == (D, H)
            assert p.default_init == ("uniform", -0.08, 0.08)
        elif k.endswith("_hh"):
            assert p.shape == (H, H) and (p.fan_in, p.fan_out) == (H, H)
            assert p.default_init == ("uniform", -0.08, 0.08)
        else:
            assert p.shape == (H,) and p.default_init[0] == "constant"
            assert p.default_init[1] == 0
    assert layer.out_shape == (H,) and GRULayer.recurrent

    rng = np.random.default_rng(9)
    x = rng.standard_normal((B, D))
    h = rng.uniform(-1, 1, (B, H))
    P = {k: p.data for k, p in layer.params.items()}
    z = sig(x @ P["z_hx"].T + h @ P["z_hh"].T + P["z_b"])
    r = sig(x @ P["r_hx"].T + h @ P["r_hh"].T + P["r_b"])
    c = np.tanh(x @ P["c_hx"].T + P["c_b"] + r * (h @ P["c_hh"].T))
    expect = z * h + (1 - z) * c
    y, s, _ = layer.forward(Context(), [x], h)
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-14)
    assert s is y

    nob = build("gru", bias=False)
    assert list(nob.params) == keys[:6]


def test_param_names_from_config():
    conf = make_conf("gru")
    for n in ["Wzx", "Wrx", "Wcx"]:
        conf.param.add(name=n)
    layer = GRULayer(conf, np, np.float64)
    layer.setup([FakeSrc((D,))])
    assert [p.name for p in layer.params.values()][:4] == ["Wzx", "Wrx", "Wcx", "rec/z_hh"]


def test_rnn_params_and_formula():
    for act, fn in [(pb.TANH, np.tanh), (pb.RELU, lambda a: np.maximum(a, 0))]:
        layer = build("rnn", activation=act)
        assert list(layer.params) == ["w_hx", "w_hh", "b"]
        assert [layer.params[k].shape for k in layer.params] == [(H, D), (H, H), (H,)]
        rng = np.random.default_rng(1)
        x, h = rng.standard_normal((B, D)), rng.uniform(-1, 1, (B, H))
        P = {k: p.data for k, p in layer.params.items()}
        expect = fn(x @ P["w_hx"].T + h @ P["w_hh"].T + P["b"])
        y, _, _ = layer.forward(Context(), [x], h)
        np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-14)
    assert list(build("rnn", bias=False).params) == ["w_hx", "w_hh"]
    assert RNNLayer.default_param_names(make_conf("rnn")) == ["w_hx", "w_hh", "b"]


def test_lstm_forget_bias_and_formula():
    from engine.params import init_param
    conf = make_conf("lstm", forget_bias=2.5)
    layer = LSTMLayer(conf, np, np.float64)
    layer.setup([FakeSrc((D,))])
    keys = ["i_hx", "f_hx", "o_hx", "g_hx", "i_hh", "f_hh", "o_hh", "g_hh",
            "i_b", "f_b", "o_b", "g_b"]
    assert list(layer.params) == keys
    rng = np.random.default_rng(0)
    for p in layer.params.values():
        init_param(p, np, np.float64, rng)
    assert np.array_equal(layer.params["f_b"].data, np.full(H, 2.5))
    for k in ("i_b", "o_b", "g_b"):
        assert np.array_equal(layer.params[k].data, np.zeros(H))
    assert np.all(np.abs(layer.params["i_hx"].data) <= 0.08)
    # default forget_bias is 1
    d = LSTMLayer(make_conf("lstm"), np, np.float64)
    d.setup([FakeSrc((D,))])
    assert d.params["f_b"].default_init == ("constant", 1.0)

    x, h, c = rng.standard_normal((B, D)), rng.uniform(-1, 1, (B, H)), rng.uniform(-1, 1, (B, H))
    P = {k: p.data for k, p in layer.params.items()}
    gate = {g: x @ P[g + "_hx"].T + h @ P[g + "_hh"].T + P[g + "_b"] for g in "ifog"}
    i, f, o, g = sig(gate["i"]), sig(gate["f"]), sig(gate["o"]), np.tanh(gate["g"])
    assert np.all(f > 0.8)  # the forget bias keeps the forget gate open
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    y, (hs, cs), _ = layer.forward(Context(), [x], (h, c))
    np.testing.assert_allclose(y, h_new, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cs, c_new, rtol=1e-12, atol=1e-14)
    assert hs is y
    check_layer(layer, [x], (h, c), eps=1e-4, tol=1e-6)


def test_one_to_all_single_copy_input():
    layer = build("gru", src_conn=[pb.kUnrollOneToAll])
    x = np.random.default_rng(0).standard_normal((B, D))
    y1, _, _ = layer.forward(Context(), [[x]], None)
    y2, _, _ = layer.forward(Context(), [x], None)
    assert np.array_equal(y1, y2)


def test_absent_input_uses_bias_only():
    layer = build("rnn")
    h = np.random.default_rng(0).uniform(-1, 1, (B, H))
    y, _, cache = layer.forward(Context(), [None], h)
    P = {k: p.data for k, p in layer.params.items()}
    np.testing.assert_allclose(y, np.tanh(h @ P["w_hh"].T + P["b"]), rtol=1e-12)
    dxs, _ = layer.backward(Context(), np.ones((B, H)), np.zeros((B, H)), cache)
    assert dxs == [None]
    with pytest.raises(LayerError, match="rec"):
        layer.forward(Context(), [None], None)


# --------------------------------------------------------------------- errors
def test_rnn_bad_activation():
    conf = make_conf("rnn", name="vanilla", activation=pb.SIGMOID)
    with pytest.raises(LayerError, match=r'"vanilla".*SIGMOID.*TANH, RELU or LINEAR'):
        RNNLayer(conf, np, np.float64).setup([FakeSrc((D,))])


@pytest.mark.parametrize("kind", list(ck.CELLS))
def test_source_errors(kind):
    cls = ck.cls_of(kind)

    def setup(srcs, conn=()):
        layer = cls(make_conf(kind, name="dec"), np, np.float64)
        layer.src_conn = list(conn)
        layer.setup(srcs)
        return layer

    with pytest.raises(LayerError, match=r'"dec".*out_shape.*kOneHot or kEmbedding'):
        setup([FakeSrc((), name="ids")])
    with pytest.raises(LayerError, match=r'"dec".*out_shape'):
        setup([FakeSrc((2, D), name="img")])
    with pytest.raises(LayerError, match=r'"dec".*2 data sources.*kConcate'):
        setup([FakeSrc((D,), name="a"), FakeSrc((D,), name="b")])
    with pytest.raises(LayerError, match=r'"dec".*0 data sources'):
        setup([FakeSrc((H,), name="enc")], [pb.kUnrollFirstToLast])
    with pytest.raises(LayerError, match=r"\"dec\".*'enc'.*dim_hidden"):
        setup([FakeSrc((H + 1,), name="enc"), FakeSrc((D,))],
              [pb.kUnrollFirstToLast, pb.kUnrollOneToOne])
    with pytest.raises(LayerError, match=r'"dec".*at most one'):
        setup([FakeSrc((H,), name="e1"), FakeSrc((H,), name="e2"), FakeSrc((D,))],
              [pb.kUnrollFirstToLast, pb.kUnrollFirstToLast, pb.kUnrollOneToOne])
    layer = setup([FakeSrc((D,))])
    with pytest.raises(LayerError, match=r'"dec".*expected'):
        layer.forward(Context(), [np.zeros((B, D + 1))], None)


def test_registered():
    from engine.layers import layer_class
    assert layer_class(pb.kGRU) is GRULayer
    assert layer_class(pb.kRNN) is RNNLayer
    assert layer_class(pb.kLSTM) is LSTMLayer


# ---------------------------------------------------------------- vs PyTorch
def test_against_torch_cells():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    x, h, c = rng.standard_normal((B, D)), rng.uniform(-1, 1, (B, H)), rng.uniform(-1, 1, (B, H))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    cat = lambda P, keys: np.concatenate([P[k] for k in keys], axis=0)

    def set_cell(cell, w_ih, w_hh, b_ih):
        with torch.no_grad():
            cell.weight_ih.copy_(t(w_ih))
            cell.weight_hh.copy_(t(w_hh))
            cell.bias_ih.copy_(t(b_ih))
            cell.bias_hh.zero_()

    # GRU: torch's gate rows are [r, z, n]; n = tanh(W_in x + b_in + r*(W_hn h + b_hn))
    layer = build("gru")
    P = {k: p.data for k, p in layer.params.items()}
    cell = torch.nn.GRUCell(D, H).double()
    set_cell(cell, cat(P, ["r_hx", "z_hx", "c_hx"]), cat(P, ["r_hh", "z_hh", "c_hh"]),
             cat(P, ["r_b", "z_b", "c_b"]))
    y, _, _ = layer.forward(Context(), [x], h.copy())
    np.testing.assert_allclose(y, cell(t(x), t(h)).detach().numpy(), rtol=1e-10, atol=1e-12)

    # LSTM: torch's gate rows are [i, f, g, o]
    layer = build("lstm")
    P = {k: p.data for k, p in layer.params.items()}
    order = ["i", "f", "g", "o"]
    cell = torch.nn.LSTMCell(D, H).double()
    set_cell(cell, cat(P, [g + "_hx" for g in order]), cat(P, [g + "_hh" for g in order]),
             cat(P, [g + "_b" for g in order]))
    y, (_, cs), _ = layer.forward(Context(), [x], (h.copy(), c.copy()))
    th, tc = cell(t(x), (t(h), t(c)))
    np.testing.assert_allclose(y, th.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cs, tc.detach().numpy(), rtol=1e-10, atol=1e-12)

    # RNN: tanh and relu
    for act, name in [(pb.TANH, "tanh"), (pb.RELU, "relu")]:
        layer = build("rnn", activation=act)
        P = {k: p.data for k, p in layer.params.items()}
        cell = torch.nn.RNNCell(D, H, nonlinearity=name).double()
        set_cell(cell, P["w_hx"], P["w_hh"], P["b"])
        y, _, _ = layer.forward(Context(), [x], h.copy())
        np.testing.assert_allclose(y, cell(t(x), t(h)).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_gru_recurrent_bias_params_and_pytorch_gru():
    """recurrent_bias adds c_hb (b_ch in r ⊙ (h W_ch^T + b_ch)) last: PyTorch's b_hn, so the
    layer equals torch's GRUCell with any bias_hh (b_hr, b_hz fold into r_b, z_b)."""
    layer = build("gru", recurrent_bias=True)
    keys = ["z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b", "c_hb"]
    assert list(layer.params) == keys == GRULayer.default_param_names(layer.conf)
    hb = layer.params["c_hb"]
    assert hb.name == "rec/c_hb" and hb.shape == (H,) and hb.default_init == ("constant", 0.0)
    assert list(build("gru", bias=False, recurrent_bias=True).params) == keys[:6] + ["c_hb"]
    rng = np.random.default_rng(12)
    x, h = rng.standard_normal((B, D)), rng.uniform(-1, 1, (B, H))
    P = {k: p.data for k, p in layer.params.items()}
    assert np.abs(P["c_hb"]).min() > 0
    z = sig(x @ P["z_hx"].T + h @ P["z_hh"].T + P["z_b"])
    r = sig(x @ P["r_hx"].T + h @ P["r_hh"].T + P["r_b"])
    c = np.tanh(x @ P["c_hx"].T + P["c_b"] + r * (h @ P["c_hh"].T + P["c_hb"]))
    y, _, _ = layer.forward(Context(), [x], h)
    np.testing.assert_allclose(y, z * h + (1 - z) * c, rtol=1e-12, atol=1e-14)

    torch = pytest.importorskip("torch")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    cat = lambda keys: np.concatenate([P[k] for k in keys], axis=0)
    b_hh = np.concatenate([rng.uniform(-1, 1, 2 * H), P["c_hb"]])
    cell = torch.nn.GRUCell(D, H).double()
    with torch.no_grad():
        cell.weight_ih.copy_(t(cat(["r_hx", "z_hx", "c_hx"])))
        cell.weight_hh.copy_(t(cat(["r_hh", "z_hh", "c_hh"])))
        cell.bias_ih.copy_(t(cat(["r_b", "z_b", "c_b"]) - np.concatenate([b_hh[:2 * H], np.zeros(H)])))
        cell.bias_hh.copy_(t(b_hh))
    np.testing.assert_allclose(y, cell(t(x), t(h)).detach().numpy(), rtol=1e-10, atol=1e-12)
