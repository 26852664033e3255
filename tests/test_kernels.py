"""The fused CPU cell kernels (engine/layers/kernels) against the NumPy formulas
(engine/layers/cells.py), and the switch between them.

In float32 every kernel's outputs agree with its NumPy twin to 1e-5 relative (of the
array's largest entry), in the layouts the layers pass (column slices of step blocks,
transposed views) and at odd sizes (H not a multiple of the vector width, B = 1); so do
whole recurrent layers, block and per-copy, with masks. The kernels' tanh is measured
against float64. The switch: RNN_ENGINE_KERNELS=numpy, a missing extension and float64
all take the NumPy formulas, and the training banner says which maths runs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from charjobs import ROOT, char_job, run_cli
from engine.backend import BackendError
from engine.layers import cells, kernels
from engine.layers.base import Context
import cellkinds as ck
from engine.proto import job_pb2 as pb
from layercheck import FakeSrc

F32 = np.float32
# (H, B): the char-rnn size, B = 1, and sizes that are not multiples of any vector width
SIZES = [(512, 50), (13, 1), (17, 7), (33, 19)]
SIZE_IDS = [f"H{h}-B{b}" for h, b in SIZES]


@pytest.fixture(autouse=True)
def native():
    """Every test starts on the compiled kernels (and leaves the switch as it found it)."""
    assert kernels.available(), (
        "the native cell kernels are not built in this environment; reinstall with a C "
        "compiler (pip install -e .); engine.layers.kernels says: " + kernels.describe())
    kernels.use("native")
    yield
    kernels.use(None)


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request, monkeypatch):
    """The loops' copy for one instruction set (RNN_ENGINE_CELL_ISA), where the CPU has it."""
    level = kernels._CELL_LEVEL[request.param]
    if level > kernels.info()["cpu_level"]:
        pytest.skip(f"this CPU (or build) runs no {request.param} copy")
    monkeypatch.setenv(kernels.CELL_ENV, request.param)
    kernels.use("native")
    assert kernels.info()["level"] == level
    return request.param


def close(got, want, what=""):
    """Agreement to 1e-5 relative to the largest entry of ``want``."""
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def cols(a, B, at=1):
    """A (rows, B) column slice of a wider block, as the layers pass a step's columns."""
    wide = np.zeros((a.shape[0], B * (at + 2)), F32)
    wide[:, at * B:(at + 1) * B] = a
    return wide[:, at * B:(at + 1) * B]


def transposed(a):
    """(rows, B) as the transposed view of a (B, rows) array (the per-copy path's layout)."""
    return np.ascontiguousarray(a.T).T


# ------------------------------------------------------------- the kernels' tanh
def test_tanh_is_within_a_few_ulps_of_the_true_tanh(isa):
    x = np.concatenate([np.linspace(-12, 12, 1_200_001, dtype=F32),
                        np.geomspace(1e-30, 1e-2, 2000, dtype=F32)])
    x = np.concatenate([x, -x[-2000:]])
    y = x.reshape(1, -1).copy()
    kernels._native.tanh(y)
    true = np.tanh(x.astype(np.float64))
    ulps = np.abs(y[0] - true) / np.spacing(np.abs(true).astype(F32)).astype(np.float64)
    assert ulps.max() <= 8, f"{ulps.max():.1f} ulp at x = {x[ulps.argmax()]}"
    assert np.abs(y).max() <= 1


def test_tanh_of_special_values(isa):
    x = np.array([[np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, 9.0, -9.5]], F32)
    kernels._native.tanh(x)
    assert np.isnan(x[0, 0])
    np.testing.assert_array_equal(x[0, 1:6], [1, -1, 1, -1, 0])
    np.testing.assert_allclose(x[0, 6:], [1, -1], rtol=1e-7)


# ------------------------------------------------------------------- cell kernels
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("H,B", SIZES, ids=SIZE_IDS)
def test_rnn_kernels(H, B, relu, isa):
    rng = np.random.default_rng(H + B)
    pre = rand(rng, (H, B), 2.0)
    ref = cells.rnn_forward(np, pre.copy(), relu)
    got = kernels.rnn_forward(pre.copy(), relu)
    close(got, ref, "h'")
    dh = rand(rng, (H, B))
    out = cols(np.zeros((H, B), F32), B)
    d = kernels.rnn_backward(transposed(dh), cols(got, B), relu, out=out)
    assert d is out
    close(d, cells.rnn_backward(np, dh, ref, relu), "dpre")
    close(kernels.rnn_backward(dh, got, relu), cells.rnn_backward(np, dh, ref, relu), "dpre")


@pytest.mark.parametrize("H,B", SIZES, ids=SIZE_IDS)
def test_gru_kernels(H, B, isa):
    rng = np.random.default_rng(H * B)
    xproj, hproj, h = rand(rng, (3 * H, B), 1.5), rand(rng, (3 * H, B), 1.5), rand(rng, (H, B))
    hp_ref, hp_got = hproj.copy(), hproj.copy()
    h_ref, cache_ref = cells.gru_forward(np, xproj, hp_ref, h)
    h_got, cache_got = kernels.gru_forward(cols(xproj, B), hp_got, cols(h, B))
    close(h_got, h_ref, "h'")
    close(hp_got[:2 * H], hp_ref[:2 * H], "z, r")     # the gates go where the formulas put them
    for name, a, b in zip(("zr", "c", "hc"), cache_got, cache_ref):
        close(a, b, name)
    dh = rand(rng, (H, B))
    ref = cells.gru_backward(np, dh, h, *cache_ref)
    out_x, out_h = cols(np.zeros((3 * H, B), F32), B, 2), cols(np.zeros((3 * H, B), F32), B, 0)
    got = kernels.gru_backward(dh, cols(h, B), *cache_got, out_x=out_x, out_h=out_h)
    assert got[0] is out_x and got[1] is out_h
    for name, a, b in zip(("dxproj", "dhproj", "dh direct"), got, ref):
        close(a, b, name)
    got = kernels.gru_backward(transposed(dh), transposed(h), *cache_got)
    for name, a, b in zip(("dxproj", "dhproj", "dh direct"), got, ref):
        close(a, b, name + " (transposed inputs)")


@pytest.mark.parametrize("with_dc", [True, False], ids=["dc", "no-dc"])
@pytest.mark.parametrize("H,B", SIZES, ids=SIZE_IDS)
def test_lstm_kernels(H, B, with_dc, isa):
    rng = np.random.default_rng(H + 7 * B)
    pre, c = rand(rng, (4 * H, B), 2.0), rand(rng, (H, B))
    p_ref, p_got = pre.copy(), pre.copy()
    h_ref, c_ref, cache_ref = cells.lstm_forward(np, p_ref, c)
    h_got, c_got, cache_got = kernels.lstm_forward(p_got, transposed(c))
    close(h_got, h_ref, "h'")
    close(c_got, c_ref, "c'")
    close(p_got, p_ref, "gates")
    for name, a, b in zip(("ifo", "g", "tanh c'"), cache_got, cache_ref):
        close(a, b, name)
    dh, dc = rand(rng, (H, B)), (rand(rng, (H, B)) if with_dc else None)
    d_ref, dc_ref = cells.lstm_backward(np, dh, dc, c, *cache_ref)
    out = cols(np.zeros((4 * H, B), F32), B)
    d_got, dc_got = kernels.lstm_backward(transposed(dh), dc, cols(c, B), *cache_got, out=out)
    assert d_got is out
    close(d_got, d_ref, "dpre")
    close(dc_got, dc_ref, "dc")


def test_contiguous_blocks_and_column_slices_give_the_same_bits():
    """A call on contiguous blocks runs each gate block as one row of H·B; a call on column
    slices runs row by row: every element is computed the same way either way."""
    rng = np.random.default_rng(0)
    H, B = 37, 19
    pre, c = rand(rng, (4 * H, B), 2.0), rand(rng, (H, B))
    dh, dc = rand(rng, (H, B)), rand(rng, (H, B))
    results = []
    for wrap in (lambda a: a, lambda a: cols(a, B)):
        p = wrap(pre.copy())
        h, c2, cache = kernels.lstm_forward(p, wrap(c))
        results.append((h, c2, np.array(p)) + kernels.lstm_backward(wrap(dh), wrap(dc), wrap(c),
                                                                    *cache, out=wrap(pre * 0)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_kernels_check_what_they_are_given():
    a = np.zeros((4, 3), F32)
    with pytest.raises(ValueError, match="shape"):
        kernels._native.gru_forward(a, a, a, a, a)
    with pytest.raises(TypeError, match="float32"):
        kernels._native.rnn_forward(a.astype(np.float64), False)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernels._native.rnn_forward(np.zeros((3, 4), F32).T, False)


# ------------------------------------------------- one-hot inputs, transposes
def test_gather_scatter_and_transpose_equal_numpy(isa):
    """The compiled column gather, scatter-add (into a transposed table, step by step) and
    transpose give NumPy's results exactly (they only move and add numbers, in the same
    order), on column slices."""
    rng = np.random.default_rng(3)
    R, V, n = 37, 11, 23
    table = rand(rng, (R, V))
    idx = rng.integers(0, V, n).astype(np.int32)
    out = cols(rand(rng, (R, n)), n)
    want = out + table[:, idx]
    assert cells.gather_columns(np, out, table, idx, add=True) is out
    np.testing.assert_array_equal(out, want)
    cells.gather_columns(np, out, table, idx)
    np.testing.assert_array_equal(out, table[:, idx])
    T = 3
    d_steps = rand(rng, (T, R, n))
    acc = rand(rng, (V, R))         # the transposed table gradient: a row per token
    want = acc.copy()
    tokens = rng.integers(0, V, T * n).astype(np.int32)
    for t in (2, 0):                # the steps given, in their order; step 1 left out
        for j in range(n):
            want[tokens[t * n + j]] += d_steps[t][:, j]
    assert cells.scatter_steps(np, acc, d_steps, tokens, [2, 0], n) is acc
    np.testing.assert_array_equal(acc, want)
    for shape in [(R, V), (8, 8), (64, 50), (1, 9), (9, 1)]:   # 8 x 8 tiles and their edges
        a = cols(rand(rng, shape), shape[1])
        got = cells.transposed(np, a, np.empty(shape[::-1], F32))
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, a.T)
    a = rand(rng, (R, V))
    b = np.ascontiguousarray(a.T).T   # its transpose has contiguous rows: no copy is made
    assert cells.transposed(np, b, None).base is not None
    # the NumPy path of the same helpers (int64 indices do not take the kernels)
    before = acc.copy()
    cells.scatter_steps(np, acc, d_steps, tokens.astype(np.int64), [1], n)
    close(acc - before, np.eye(V, dtype=F32)[tokens[n:2 * n]].T @ d_steps[1].T)
    before = acc.copy()            # every step, in the backward loop's order
    cells.scatter_steps(np, acc, d_steps, tokens.astype(np.int64), [2, 1, 0], n)
    close(acc - before, sum(np.eye(V, dtype=F32)[tokens[t * n:(t + 1) * n]].T @ d_steps[t].T
                            for t in range(T)))
    out2 = cells.gather_columns(np, np.zeros((R, n), F32), table, idx.astype(np.int64))
    np.testing.assert_array_equal(out2, table[:, idx])


def test_one_hot_kernels_refuse_a_bad_index():
    table = np.zeros((4, 3), F32)
    out = np.zeros((4, 2), F32)
    with pytest.raises(IndexError, match="outside the table's 3 columns"):
        kernels._native.gather(out, table, np.array([0, 3], np.int32), False)
    with pytest.raises(IndexError, match=r"idx\[0\] = -1"):
        kernels._native.scatter_t(table.T.copy(), out, np.array([-1, 0], np.int32), 0)
    with pytest.raises(TypeError, match="int32"):
        kernels._native.gather(out, table, np.array([0, 1], np.int64), False)


# ---------------------------------------------------------------- whole layers
def build(kind, H, D, act=None, seed=0, one_hot=False, dtype=F32, **fields):
    conf = ck.make_conf(kind, hidden=H, **({} if act is None else {"activation": act}), **fields)
    layer = ck.cls_of(kind)(conf, np, dtype)
    layer.src_conn = []
    layer.setup([FakeSrc((D,), name="data", one_hot_rows=one_hot)])
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p.data = rng.uniform(-0.5, 0.5, p.shape).astype(dtype)
        p.grad = np.zeros(p.shape, dtype)
    layer.params_ready()
    return layer


LAYERS = [("rnn", pb.TANH), ("rnn", pb.RELU), ("gru", None), ("lstm", None)]
LAYER_IDS = ["rnn-tanh", "rnn-relu", "gru", "lstm"]


def _block_run(layer, X, state0, mask, R, T, B, need_state_grad=True, need_input_grad=True):
    for p in layer.params.values():
        p.grad[...] = 0
    ctx = Context(step=0, unroll_len=T, mask=mask, steps=np.arange(T), batch=B, aux=[None],
                  need_input_grads=[need_input_grad], need_state_grad=need_state_grad)
    Y, final, cache = layer.forward_block(ctx, [X], state0)
    Y = Y.copy()
    (dX,), d0 = layer.backward_block(ctx, R, cache)
    assert (dX is None) == (not need_input_grad)
    flat = (lambda s: [] if s is None else list(s) if isinstance(s, tuple) else [s])
    return ([Y] + [np.array(s) for s in flat(final)] + ([dX] if need_input_grad else [])
            + [np.array(d) for d in flat(d0)] + [p.grad.copy() for p in layer.params.values()])


def _copy_run(layer, X, state0, masks, R, T, B):
    for p in layer.params.values():
        p.grad[...] = 0
    state, caches, ys = state0, [], []
    for t in range(T):
        ctx = Context(step=t, unroll_len=T, mask=masks[t])
        y, state, c = layer.forward(ctx, [X[t * B:(t + 1) * B]], state)
        ys.append(np.array(y))
        caches.append((ctx, c))
    dstate = layer.zero_state(B)
    dxs = []
    for t in reversed(range(T)):
        (dx,), dstate = layer.backward(caches[t][0], R[t * B:(t + 1) * B], dstate, caches[t][1])
        dxs.append(dx)
    flat = (lambda s: list(s) if isinstance(s, tuple) else [s])
    return ([np.concatenate(ys)] + [np.array(s) for s in flat(state)]
            + [np.concatenate(dxs[::-1])] + [np.array(d) for d in flat(dstate)]
            + [p.grad.copy() for p in layer.params.values()])


@pytest.mark.parametrize("how", ["block", "per-copy"])
@pytest.mark.parametrize("H,D,B", [(33, 5, 7), (16, 40, 1), (64, 3, 50)],
                         ids=["odd", "B1-wide-input", "folded"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_layer_with_kernels_equals_layer_with_formulas(kind, act, H, D, B, how):
    """A recurrent layer in float32 gives the same outputs, final state, input and
    initial-state gradients and param gradients on the kernels as on the NumPy formulas
    (to 1e-5), with sequences masked at some steps."""
    T = 5
    layer = build(kind, H, D, act)
    rng = np.random.default_rng(H + D + B)
    X = rand(rng, (T * B, D))
    R = rand(rng, (T * B, H))
    parts = [rand(rng, (B, H), 0.5) for _ in range(2 if kind == "lstm" else 1)]
    state0 = tuple(parts) if kind == "lstm" else parts[0]
    masks = [None, (rng.random(B) < 0.5).astype(F32), None, np.zeros(B, F32), None]
    mask = np.concatenate([np.ones(B, F32) if m is None else m for m in masks])
    run = (lambda: _block_run(layer, X, state0, mask, R, T, B)) if how == "block" else \
        (lambda: _copy_run(layer, X, state0, masks, R, T, B))
    kernels.use("numpy")
    want = run()
    kernels.use("native")
    got = run()
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == F32
        close(a, b, f"result {k}")


def test_float64_and_the_numpy_switch_take_the_formulas(monkeypatch):
    """With the switch on numpy, or for float64 arrays, no kernel is called."""
    class Refuse:
        def __getattr__(self, name):
            raise AssertionError(f"kernel {name} called")

    layer64 = build("gru", 8, 3)
    monkeypatch.setattr(kernels, "_native", Refuse())
    rng = np.random.default_rng(0)
    h64 = rng.standard_normal((8, 2))
    gru64 = build("gru", 8, 3, dtype=np.float64)
    y, _, c64 = gru64.forward(Context(aux=[None]), [rng.standard_normal((2, 3))], h64.T)
    gru64.backward(Context(aux=[None]), np.ones_like(y), None, c64)
    assert not kernels.usable(h64)
    kernels.use("numpy")
    assert kernels.mode() == "numpy" and not kernels.usable(h64.astype(F32))
    X = rand(rng, (2 * 4, 3))
    ctx = Context(step=0, unroll_len=2, steps=np.arange(2), batch=4, aux=[None],
                  need_input_grads=[True], need_state_grad=True)
    Y, _, cache = layer64.forward_block(ctx, [X], np.zeros((4, 8), F32))
    layer64.backward_block(ctx, np.ones_like(Y), cache)


# ------------------------------------------------------------------ the switch
def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "numpy")
    assert kernels.use(None) == "numpy"
    assert "NumPy formulas (RNN_ENGINE_KERNELS=numpy)" in kernels.describe()
    monkeypatch.setenv(kernels.ENV, "native")
    assert kernels.use(None) == "native"
    assert kernels.describe().startswith("cell kernels: native (")
    assert kernels.describe(np.float64) == "cell maths: NumPy formulas (float64)"
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(BackendError, match="RNN_ENGINE_KERNELS='fast' is not a kernel choice"):
        kernels.use(None)


def test_the_instruction_set_switch_runs_another_copy(monkeypatch):
    """RNN_ENGINE_CELL_ISA=baseline runs the copy without fused multiply-adds, whose tanh
    rounds otherwise than the CPU's best copy somewhere in a million inputs; the update
    rule, compiled without contraction, gives the same bits in every copy."""
    best = kernels.info()["cpu_level"]
    if best < 2:
        pytest.skip("this CPU (or build) has only the baseline copy")
    x = np.linspace(-6, 6, 1_000_001, dtype=F32).reshape(1, -1)
    rng = np.random.default_rng(3)
    w0, g0, h0 = rand(rng, (10_001,)), rand(rng, (10_001,), 0.1), np.abs(rand(rng, (10_001,)))
    out = {}
    for want in ("auto", "baseline"):
        monkeypatch.setenv(kernels.CELL_ENV, want)
        kernels.use("native")
        assert kernels.info()["level"] == (best if want == "auto" else 1)
        y, w, g, h = x.copy(), w0.copy(), g0.copy(), h0.copy()
        kernels._native.tanh(y)
        kernels._native.adarule(w, g, h, 0.002, 0.95, 0.05, 1e-6, False, True, -0.05, 0.05, 1)
        out[want] = (y, w, g, h)
    assert not np.array_equal(out["auto"][0], out["baseline"][0])
    close(out["baseline"][0], out["auto"][0])
    for a, b in zip(out["auto"][1:], out["baseline"][1:]):
        assert np.array_equal(a, b)
    assert kernels.describe().startswith("cell kernels: native (baseline x86-64, lowered from ")


def test_the_instruction_set_switch_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv(kernels.CELL_ENV, "sse9")
    with pytest.raises(BackendError, match="RNN_ENGINE_CELL_ISA='sse9' is not a choice; use "
                                           "one of auto, avx512, avx2, baseline"):
        kernels.use("native")
    info = kernels.info()
    monkeypatch.setattr(kernels._native, "info", lambda: {**info, "cpu_level": 2})
    monkeypatch.setenv(kernels.CELL_ENV, "avx512")
    with pytest.raises(BackendError, match="RNN_ENGINE_CELL_ISA=avx512: this CPU gives the "
                                           "cell kernels at most avx2; use RNN_ENGINE_CELL_ISA=auto"):
        kernels.use("native")
    with pytest.raises(ValueError, match="level 4"):
        kernels._native.cell_isa(4)


def _train_banner(tmp_path, env_value=None, block_native=False):
    """Train a tiny LSTM job for 5 steps; returns (process, the final train loss)."""
    job = char_job(tmp_path, rnn="kLSTM", steps=5, val=False)
    env = dict(os.environ)
    env.pop(kernels.ENV, None)
    if env_value is not None:
        env[kernels.ENV] = env_value
    code = ("import sys; sys.modules['engine.layers.kernels._native'] = None\n" if block_native
            else "") + "from engine.train import main; raise SystemExit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(job)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    loss = [line for line in r.stdout.splitlines() if "train loss" in line]
    return r, loss[-1].split("train loss")[1].split()[0] if loss else None


def test_training_banner_and_fallbacks(tmp_path):
    """The banner's backend line names the cell maths; with the extension missing or the
    switch on numpy the job trains on the NumPy formulas to the same loss."""
    native, loss_native = _train_banner(tmp_path / "native")
    assert native.returncode == 0, native.stderr
    assert "cell kernels: native (" in native.stdout
    off, loss_off = _train_banner(tmp_path / "off", env_value="numpy")
    assert off.returncode == 0, off.stderr
    assert "cell kernels: NumPy formulas (RNN_ENGINE_KERNELS=numpy)" in off.stdout
    gone, loss_gone = _train_banner(tmp_path / "gone", block_native=True)
    assert gone.returncode == 0, gone.stderr
    assert "cell kernels: NumPy formulas (the native kernels do not load" in gone.stdout
    assert loss_native is not None and loss_off == loss_gone
    assert float(loss_native) == pytest.approx(float(loss_off), rel=1e-4)


def test_a_bad_switch_value_is_one_error_line(tmp_path):
    job = char_job(tmp_path, steps=2, val=False)
    r = run_cli("engine.train", job, env={**os.environ, kernels.ENV: "fast"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: RNN_ENGINE_KERNELS='fast' is not a kernel choice; use "
                                "RNN_ENGINE_KERNELS=native (the compiled cell kernels) or "
                                "RNN_ENGINE_KERNELS=numpy")


def test_a_bad_instruction_set_is_one_error_line(tmp_path):
    job = char_job(tmp_path, steps=2, val=False)
    r = run_cli("engine.train", job, env={**os.environ, kernels.CELL_ENV: "sse9"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: RNN_ENGINE_CELL_ISA='sse9' is not a choice; use one "
                                "of auto, avx512, avx2, baseline")


@pytest.mark.parametrize("dtype", [np.float64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_one_hot_source_gathers_what_a_dense_one_multiplies(kind, act, dtype):
    """A block whose source declares one-hot rows (kOneHot) gathers W_x's columns and
    adds up dW_x's by index; it gives the outputs, states and every gradient of the same
    layer reading the rows as dense features (which folds them into the step GEMM, H
    being wide enough), with masked steps: to 1e-12 in float64, 1e-5 in float32."""
    H, D, B, T = 64, 7, 5, 4
    rng = np.random.default_rng(7)
    X = np.eye(D, dtype=dtype)[rng.integers(0, D, T * B)]
    R = rng.standard_normal((T * B, H)).astype(dtype)
    parts = [(rng.standard_normal((B, H)) * 0.5).astype(dtype)
             for _ in range(2 if kind == "lstm" else 1)]
    state0 = tuple(parts) if kind == "lstm" else parts[0]
    mask = np.ones(T * B, dtype)
    mask[B:2 * B] = rng.random(B) < 0.5
    got, want = ([np.asarray(a) for a in _block_run(build(kind, H, D, act, one_hot=oh,
                                                          dtype=dtype),
                                                    X, state0, mask, R, T, B)]
                 for oh in (True, False))
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        if dtype == np.float64:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"result {k}")
        else:
            close(a, b, f"result {k}")


# ------------------------------------------------------- softmax cross-entropy
XENT_V = [101, 1, 16, 17, 3, 40]


@pytest.mark.parametrize("V", XENT_V)
def test_softmax_xent_against_float64(V, isa):
    """kernels.softmax_xent: p within a few float32 ulps of the float64 softmax of the
    float32 differences s - max wherever the true value is a normal float (its exp is ~1 ulp,
    on scores spread over [-80, 80] so that exp runs over its whole range), the cross-entropy to 1e-6 of its size, and the argmax
    hit equal to np.argmax == label, on rows full of ties (labels before, at and after the
    first maximum) and on rows with column slices' strides."""
    rng = np.random.default_rng(V)
    R = 300
    s = (rng.uniform(-80, 80, (R, V))).astype(F32)
    s[:100] = rng.integers(-2, 3, (100, V)).astype(F32)          # ties everywhere
    lab = rng.integers(0, V, R)
    wide = np.zeros((R, V + 5), F32)
    wide[:, 2:2 + V] = s
    for scores in (s, wide[:, 2:2 + V]):
        p, nll, hit = kernels.softmax_xent(scores, lab)
        z = (s - s.max(1, keepdims=True)).astype(np.float64)   # s - max rounds in float32
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        want = np.exp(logp)
        normal = want > 1.2e-38
        assert np.all(np.abs(p - want)[normal] <= 4e-7 * want[normal])
        assert np.all(np.abs(p[~normal]) <= 1.2e-38)
        want_nll = -logp[np.arange(R), lab]
        assert np.all(np.abs(nll - want_nll) <= 1e-6 * np.maximum(1.0, want_nll))
        assert hit.dtype == F32
        assert np.array_equal(hit == 1, np.argmax(s, axis=1) == lab)
    assert V == 1 or 0 < hit[:100].sum() < 100     # some rows hit, some miss


def test_softmax_xent_special_values_and_bad_labels(isa):
    s = np.array([[0.0, np.nan, 1.0], [np.inf, 0.0, 0.0], [-np.inf, 0.0, 0.0]], F32)
    p, nll, hit = kernels.softmax_xent(s, np.array([0, 0, 1]))
    assert np.isnan(p[0]).all() and np.isnan(nll[0])       # NaN spreads, as in NumPy
    assert np.isnan(p[1]).all() and np.isnan(nll[1])       # inf - inf, as in NumPy
    np.testing.assert_allclose(p[2], [0.0, 0.5, 0.5])      # exp(-inf) = 0
    assert nll[2] == pytest.approx(np.log(2.0))
    with pytest.raises(IndexError, match="outside"):
        kernels.softmax_xent(np.zeros((2, 3), F32), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        kernels.softmax_xent(np.zeros((2, 3), F32), np.array([0, 1, 2]))


@pytest.mark.parametrize("V", XENT_V)
def test_xent_grad_is_the_numpy_formula_to_the_bit(V, isa):
    rng = np.random.default_rng(V + 1)
    R = 200
    p = rng.uniform(0, 1, (R, V)).astype(F32)
    lab = rng.integers(0, V, R)
    c = (0.37 * (rng.uniform(size=R) > 0.2)).astype(F32)
    want = p.copy()
    want[np.arange(R), lab] -= 1.0
    want *= c[:, None]
    assert np.array_equal(kernels.xent_grad(p, lab, c), want)


@pytest.mark.parametrize("topk", [1, 3])
def test_softmax_loss_layer_with_the_kernel_equals_the_formulas(topk):
    """The float32 SoftmaxLoss on the kernel and on the NumPy formulas: the same metrics
    (loss to float32 rounding, accuracy exactly), output and gradient, with masked rows
    whose labels are out of range."""
    from engine.layers.base import REGISTRY
    from layercheck import setup_layer

    rng = np.random.default_rng(7)
    B, V = 64, 101
    s = rand(rng, (B, V), 3.0)
    lab = rng.integers(0, V, B)
    lab[5] = -1
    mask = (rng.uniform(size=B) > 0.1).astype(F32)
    mask[5] = 0.0
    conf = pb.LayerProto(name="loss", type=pb.kSoftmaxLoss)
    conf.softmaxloss_conf.topk = topk
    conf.softmaxloss_conf.scale = 2.0
    got = {}
    for how in ("native", "numpy"):
        kernels.use(how)
        layer = setup_layer(REGISTRY[pb.kSoftmaxLoss], conf, [FakeSrc((V,)), FakeSrc(())],
                            dtype=F32)
        c = Context(mask=mask)
        y, _, cache = layer.forward(c, [s.copy(), lab], None)
        (g, _), _ = layer.backward(c, None, None, cache)
        got[how] = (y, g, c.metrics["loss"], c.metrics["accuracy"])
    (y1, g1, l1, a1), (y2, g2, l2, a2) = got["native"], got["numpy"]
    close(y1, y2)
    close(g1, g2)
    assert float(l1[0]) == pytest.approx(float(l2[0]), rel=1e-6) and l1[1] == l2[1]
    assert a1 == a2


@pytest.mark.parametrize("clip", [False, True])
def test_the_update_rule_on_threads_gives_the_same_bits(clip, isa):
    """A large param's RMSProp step split over the step GEMM's pool (2 and 3 threads, runs
    that start 16-aligned, a length that is not) is the one-thread pass bit for bit."""
    from engine.layers.kernels import _native
    rng = np.random.default_rng(9)
    n = 200_003
    w0, g0 = rand(rng, (n,)), rand(rng, (n,), 0.1)
    h0 = np.abs(rand(rng, (n,)))
    got = []
    for threads in (1, 2, 3):
        w, g, h = w0.copy(), g0.copy(), h0.copy()
        _native.adarule(w, g, h, 0.002, 0.95, 0.05, 1e-6, False, clip, -0.05, 0.05, threads)
        got.append((w, g, h))
    _native.park()
    for other in got[1:]:
        for a, b in zip(got[0], other):
            assert np.array_equal(a, b)
    assert not np.array_equal(got[0][0], w0)
