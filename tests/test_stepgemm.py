"""The packed step GEMM (engine/layers/kernels/stepgemm.c) and its thread pool.

``kernels.step_gemm`` is held to a float64 matmul at the char-rnn size and at sizes that
are no multiple of the kernels' tiles (M not a multiple of 32, N of any width 1..40, K of
1), in the layouts the layers pass (a transposed W_h, a step's columns of the state block,
an output with a row stride), on every instruction set this CPU has and on 1 to 3 threads;
the threads and the split of N do not change a bit, and a product written over its B is
still the product (each thread packs B for itself only when they do not share memory).
What rides along (a one-hot gather and scatter, ``keep``, ``add``) equals the separate
pass it replaces to the bit. Whole
recurrent layers in float32 on the step GEMM equal the same layers on NumPy's matmul
(``RNN_ENGINE_STEP_GEMM=blas``) to 1e-5, masked and not, and take those options. The cell kernels, the gathers and the scatter-adds split over threads give the same
bits as on one, and so does the step-major to feature-major copy (``unstep``); parked
threads wake for the next task; a worker Linux leaves on the caller's core is moved off it. A
forked child computes with its own threads and never moves the parent's, and the switch reads the
environment, refusing a value this CPU cannot run in one line.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest
from test_kernels import LAYER_IDS, LAYERS, _block_run, build, close, rand

from engine.backend import BackendError
from engine.layers import kernels
from engine.layers.kernels import _native
from engine.proto import job_pb2 as pb

F32 = np.float32
ISAS = [name for name, code in (("avx512", 3), ("avx2", 2)) if _native.step_isa() >= code]
pytestmark = pytest.mark.skipif(not ISAS, reason="this CPU has neither AVX-512 nor AVX2+FMA")


@pytest.fixture(autouse=True)
def fresh_switch(monkeypatch):
    """Each test resolves the switch itself, and leaves it unresolved (the environment's)."""
    kernels.use("native")
    monkeypatch.delenv(kernels.STEP_ENV, raising=False)
    kernels.step_reset()
    yield
    kernels.step_reset()
    kernels.use(None)
    kernels.set_threads(1)


def packed(a, threads):
    p = np.empty(_native.step_packed_size(*a.shape), F32)
    _native.step_pack(p, a, threads)
    return p


def gemm(a, b, isa, threads, out=None, accumulate=False):
    out = np.zeros((a.shape[0], b.shape[1]), F32) if out is None else out
    _native.step_gemm(out, packed(a, threads), b, accumulate, {"avx512": 3, "avx2": 2}[isa],
                      threads)
    return out


SHAPES = [(2048, 512, 50), (400, 100, 32), (33, 5, 17), (31, 64, 13), (100, 1, 1), (7, 3, 40)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("isa", ISAS)
def test_step_gemm_equals_float64_matmul(isa, M, K, N, threads):
    rng = np.random.default_rng(M + K + N)
    a, b = rand(rng, (M, K)), rand(rng, (K, N))
    want = a.astype(np.float64) @ b.astype(np.float64)
    close(gemm(a, b, isa, threads), want)


def panels(a):
    """The packed layout, in NumPy: panel p holds rows 32p..32p+31 (zeros past the last),
    k-major: element (row 32p + r, k) at p·32·K + k·32 + r."""
    M, K = a.shape
    P = -(-M // 32)
    padded = np.zeros((P * 32, K), F32)
    padded[:M] = a
    return padded.reshape(P, 32, K).transpose(0, 2, 1).reshape(-1)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K", [(2048, 512), (70, 13), (33, 8), (5, 1), (96, 31)])
def test_packing_lays_out_every_layout_exactly(M, K, threads):
    """A with contiguous rows (W_h), contiguous columns (W_h^T, a transposed view) and
    neither (a strided view): the same panels, to the bit, padding rows zero (the vector
    paths move 8 x 8 blocks and 32 floats per k; the scalar one the rest)."""
    rng = np.random.default_rng(M * K)
    a = rand(rng, (M, K))
    at = np.ascontiguousarray(a.T).T
    wide = rand(rng, (M, 2 * K))
    strided = wide[:, ::2]
    strided[...] = a
    for view in (a, at, strided):
        got = np.full(_native.step_packed_size(M, K), np.nan, F32)
        _native.step_pack(got, view, threads)
        assert np.array_equal(got, panels(a))


@pytest.mark.parametrize("isa", ISAS)
def test_layouts_the_layers_pass(isa):
    """W_h^T (a transposed view), a step's columns of the (H, (T+1)·B) state block, and an
    output written into a slice of a wider block; accumulate adds to what is there."""
    rng = np.random.default_rng(1)
    H, G, B, T = 45, 4, 11, 3
    w = rand(rng, (G * H, H))
    hs = rand(rng, (H, (T + 1) * B))
    h = hs[:, 2 * B:3 * B]
    wide = rand(rng, (G * H, 3 * B))
    out = wide[:, B:2 * B]
    before = wide.copy()
    gemm(w, h, isa, 2, out=out, accumulate=True)
    close(out, before[:, B:2 * B] + w.astype(np.float64) @ h)
    assert np.array_equal(wide[:, :B], before[:, :B])     # the neighbours are untouched
    assert np.array_equal(wide[:, 2 * B:], before[:, 2 * B:])
    g = rand(rng, (G * H, B))
    close(gemm(w.T, g, isa, 2), w.T.astype(np.float64) @ g)


@pytest.mark.parametrize("isa", ISAS)
def test_neighbouring_columns_are_not_written(isa):
    rng = np.random.default_rng(2)
    a, b = rand(rng, (70, 9)), rand(rng, (9, 13))
    wide = np.full((70, 40), 7.0, F32)
    gemm(a, b, isa, 2, out=wide[:, 10:23])
    assert (wide[:, :10] == 7).all() and (wide[:, 23:] == 7).all()


@pytest.mark.parametrize("isa", ISAS)
def test_every_width_is_stored_whole_and_no_wider(isa, monkeypatch):
    """C's rows, B's packed runs and ``keep``'s copies are stored in plain pieces of 8, 4, 2
    and 1 floats (no masked store): for every N from 1 to 31 (each column-panel width of
    both tiles, and every tail of a row), the product and the copy are exact, and the
    columns on either side of them keep their values."""
    monkeypatch.setenv(kernels.STEP_ENV, isa)
    kernels.step_reset()
    kernels.set_threads(2)
    rng = np.random.default_rng(4)
    M, K = 70, 19
    a = rand(rng, (M, K))
    p = kernels.Packed(a)
    for N in range(1, 32):
        b = rand(rng, (K, N))
        wide = np.full((M, N + 20), 7.0, F32)
        kept = np.full((K, N + 20), 5.0, F32)
        got = kernels.step_gemm(wide[:, 10:10 + N], p, b, keep=kept[:, 10:10 + N])
        close(got, a.astype(np.float64) @ b)
        assert (wide[:, :10] == 7).all() and (wide[:, 10 + N:] == 7).all(), N
        assert np.array_equal(kept[:, 10:10 + N], b), N
        assert (kept[:, :10] == 5).all() and (kept[:, 10 + N:] == 5).all(), N


@pytest.mark.parametrize("isa", ISAS)
def test_threads_do_not_change_a_bit(isa):
    rng = np.random.default_rng(3)
    a, b = rand(rng, (300, 77)), rand(rng, (77, 50))
    one = gemm(a, b, isa, 1)
    for n in (2, 3, 5):
        assert np.array_equal(gemm(a, b, isa, n), one)


@pytest.mark.parametrize("isa", ISAS)
def test_every_row_panel_runs_once_whichever_thread_takes_it(isa):
    """A thread takes row panels from its own run, then those left in the others' runs, so
    a worker the host starts late leaves its panels (and the slices of ``keep`` and of the
    scatter riding along with them) to the caller. Over many calls on more threads than the
    machine has cores, a panel run twice would add its product twice to the accumulated C
    and its columns twice to the scatter's table, one not run would add nothing: each call
    must equal one thread's, bit for bit, and ``keep`` must hold b."""
    rng = np.random.default_rng(12)
    M, K, N, V = 32 * 12 + 7, 160, 50, 5
    a = rand(rng, (M, K))
    code = {"avx512": 3, "avx2": 2}[isa]
    pa = packed(a, 1)
    idx = rng.integers(0, V, N).astype(np.int32)
    threads = max(3, (os.cpu_count() or 1) + 1)
    for call in range(60):
        b, c0 = rand(rng, (K, N)), rand(rng, (M, N))
        runs = []
        for n in (1, threads):
            c, acc, kept = c0.copy(), np.zeros((V, K), F32), np.zeros((K, N), F32)
            _native.step_gemm(c, pa, b, True, code, n, acc, idx, True, kept)
            runs.append((c, acc, kept))
        (c1, acc1, kept1), (cn, accn, keptn) = runs
        assert np.array_equal(cn, c1), call
        assert np.array_equal(accn, acc1), call
        assert np.array_equal(keptn, b) and np.array_equal(kept1, b), call


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_a_product_written_over_b_waits_for_every_threads_packing(isa, threads):
    """Each thread packs all of B for itself and multiplies without waiting for the others,
    unless C shares memory with B: then every row of B is packed before any row of C is
    written, so C = A B in place (and C into the rows after B's) is still the product."""
    rng = np.random.default_rng(8)
    a = rand(rng, (256, 256))
    for shift in (0, 64):
        buf = rand(rng, (256 + shift, 40))
        b = buf[:256].copy()
        want = gemm(a, b, isa, 1)
        gemm(a, buf[:256], isa, threads, out=buf[shift:])
        assert np.array_equal(buf[shift:], want), shift


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_a_product_written_over_the_scatter_source_waits_for_every_threads_scatter(isa, threads):
    """When C shares memory with the rows a scatter reads, every thread scatters its share
    before any row of C is written: the table gets the source's columns as they were."""
    rng = np.random.default_rng(9)
    a, b = rand(rng, (256, 256)), rand(rng, (256, 40))
    idx = rng.integers(0, 7, 40).astype(np.int32)
    want = gemm(a, b, isa, 1)
    code = {"avx512": 3, "avx2": 2}[isa]
    for _ in range(3):
        buf = rand(rng, (256, 40))
        acc, table = np.zeros((7, 256), F32), np.zeros((7, 256), F32)
        for j in range(40):
            table[idx[j]] += buf[:, j]
        _native.step_gemm(buf, packed(a, threads), b, False, code, threads, acc, idx, True,
                          None, None, None, buf)
        assert np.array_equal(buf, want)
        assert np.array_equal(acc, table)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_a_product_written_over_keep2s_source_waits_for_every_threads_copy(isa, threads):
    """When C shares memory with the block ``keep2`` copies, every thread copies its share
    before any row of C is written: the copy is of the block as it was."""
    rng = np.random.default_rng(10)
    a, b = rand(rng, (256, 256)), rand(rng, (256, 40))
    want = gemm(a, b, isa, 1)
    code = {"avx512": 3, "avx2": 2}[isa]
    for _ in range(3):
        buf = rand(rng, (256, 40))
        kept, was = np.zeros((256, 40), F32), buf.copy()
        _native.step_gemm(buf, packed(a, threads), b, False, code, threads, None, None, False,
                          None, None, kept, buf)
        assert np.array_equal(buf, want)
        assert np.array_equal(kept, was)


def test_the_instruction_sets_agree():
    if len(ISAS) < 2:
        pytest.skip("this CPU has one of AVX-512 and AVX2 only")
    rng = np.random.default_rng(4)
    a, b = rand(rng, (96, 64)), rand(rng, (64, 50))
    close(gemm(a, b, "avx2", 2), gemm(a, b, "avx512", 2))


CHUNK_SHAPES = [(300, 2048, 50), (70, 129, 13), (33, 257, 7), (64, 128, 50), (40, 127, 3)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,N", CHUNK_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in CHUNK_SHAPES])
def test_avx2_k_chunks_change_no_bit(M, K, N, threads):
    """The AVX2 tile sums K in chunks (SG_KC_AVX2 = 128: K of 2048, 129 and 257 take several,
    the last one short), the AVX-512 tile all of K at once; both sum k in ascending order with
    one fused multiply-add per k, so the two give the same bits: plain, accumulating onto C,
    with a gathered table row and with an addend, which join after the last chunk."""
    if len(ISAS) < 2:
        pytest.skip("this CPU has one of AVX-512 and AVX2 only")
    rng = np.random.default_rng(K + N)
    a, b = rand(rng, (M, K)), rand(rng, (K, N))
    base = rand(rng, (M, N))
    table, idx = rand(rng, (9, M)), rng.integers(0, 9, N).astype(np.int32)
    addend = rand(rng, (M, N))
    got = {}
    for isa, code in (("avx2", 2), ("avx512", 3)):
        p = packed(a, threads)
        outs = [np.empty((M, N), F32), base.copy(), np.empty((M, N), F32), np.empty((M, N), F32)]
        _native.step_gemm(outs[0], p, b, False, code, threads)
        _native.step_gemm(outs[1], p, b, True, code, threads)
        _native.step_gemm(outs[2], p, b, False, code, threads, table, idx, False)
        _native.step_gemm(outs[3], p, b, False, code, threads, None, None, False, None, addend)
        got[isa] = outs
    for two, five in zip(got["avx2"], got["avx512"]):
        assert np.array_equal(two, five)
    close(got["avx2"][0], a.astype(np.float64) @ b)


def test_bad_arguments_raise():
    a = np.ones((40, 8), F32)
    b = np.ones((8, 5), F32)
    p = packed(a, 1)
    with pytest.raises(ValueError, match="do not fit"):
        _native.step_gemm(np.zeros((40, 5), F32), p[:-1], b, False, 2, 1)
    with pytest.raises(ValueError, match="do not fit"):
        _native.step_gemm(np.zeros((40, 6), F32), p, b, False, 2, 1)
    with pytest.raises(ValueError, match="contiguous rows"):
        _native.step_gemm(np.zeros((5, 40), F32).T, p, b, False, 2, 1)
    with pytest.raises(ValueError, match="isa"):
        _native.step_gemm(np.zeros((40, 5), F32), p, b, False, 7, 1)
    with pytest.raises(TypeError, match="float32"):
        _native.step_gemm(np.zeros((40, 5)), p, b, False, 2, 1)
    with pytest.raises(ValueError, match="packs into"):
        _native.step_pack(np.zeros(3, F32), a, 1)


ONE_HOT_SHAPES = [(2048, 512, 50, 101), (40, 33, 13, 7), (31, 17, 29, 5), (5, 3, 1, 2),
                  (6, 0, 4, 3)]   # K = 0: the table rows alone (the product is empty)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K,N,V", ONE_HOT_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n, _ in
                                                        ONE_HOT_SHAPES])
@pytest.mark.parametrize("isa", ISAS)
def test_one_hot_projection_rides_in_the_gemm(isa, M, K, N, V, threads, monkeypatch):
    """gather: the product plus the tokens' table rows, bit for bit what the product and a
    separate add give (the same two roundings); scatter: the product unchanged and b's
    columns added into the tokens' rows, bit for bit a column-by-column float32 loop (and
    kernels.scatter_t alone gives the same); rows of M or K that are no multiple of the
    tiles, 1 to 3 threads."""
    monkeypatch.setenv(kernels.STEP_ENV, isa)
    kernels.step_reset()
    kernels.set_threads(threads)
    rng = np.random.default_rng(M + K + N)
    a, b = rand(rng, (M, K)), rand(rng, (K, N))
    idx = rng.integers(0, V, N).astype(np.int32)
    idx[-1] = idx[0]                               # a token twice in one step
    p = kernels.Packed(a)
    plain = kernels.step_gemm(np.empty((M, N), F32), p, b)
    table = rand(rng, (V, M))
    got = kernels.step_gemm(np.empty((M, N), F32), p, b, gather=(table, idx))
    assert np.array_equal(got, plain + table[idx].T)
    acc0 = rand(rng, (V, K))
    want = acc0.copy()
    for j in range(N):
        want[idx[j]] += b[:, j]
    acc = acc0.copy()
    out = kernels.step_gemm(np.empty((M, N), F32), p, b, scatter=(acc, idx))
    assert np.array_equal(out, plain)
    assert np.array_equal(acc, want)
    alone = kernels.scatter_t(acc0.copy(), b, idx)
    assert np.array_equal(alone, want)
    src = rand(rng, (K, N))                        # scattered from another block's rows
    want = acc0.copy()
    for j in range(N):
        want[idx[j]] += src[:, j]
    acc = acc0.copy()
    out = kernels.step_gemm(np.empty((M, N), F32), p, b, scatter=(acc, idx), side=src)
    assert np.array_equal(out, plain)
    assert np.array_equal(acc, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_keep_copies_b_into_a_steps_columns(isa, threads, monkeypatch):
    """``keep``: b also lands in its columns of a wide feature-major block (rows far apart,
    as the weight gradient reads them), the columns beside them untouched; the product and
    a scatter riding along are unchanged."""
    monkeypatch.setenv(kernels.STEP_ENV, isa)
    kernels.step_reset()
    kernels.set_threads(threads)
    rng = np.random.default_rng(31)
    M, K, N, T, V = 64, 300, 50, 4, 9
    a, b = rand(rng, (M, K)), rand(rng, (K, N))
    p = kernels.Packed(a)
    wide = rand(rng, (K, T * N))
    before = wide.copy()
    plain = kernels.step_gemm(np.empty((M, N), F32), p, b)
    idx = rng.integers(0, V, N).astype(np.int32)
    acc, acc2 = np.zeros((V, K), F32), np.zeros((V, K), F32)
    got = kernels.step_gemm(np.empty((M, N), F32), p, b, scatter=(acc, idx),
                            keep=wide[:, 2 * N:3 * N])
    assert np.array_equal(got, plain)
    assert np.array_equal(wide[:, 2 * N:3 * N], b)
    assert np.array_equal(wide[:, :2 * N], before[:, :2 * N])
    assert np.array_equal(wide[:, 3 * N:], before[:, 3 * N:])
    assert np.array_equal(acc, kernels.scatter_t(acc2, b, idx))
    with pytest.raises(ValueError, match="keep"):
        kernels.step_gemm(np.empty((M, N), F32), p, b, keep=wide[:, :N - 1])
    src = rand(rng, (K, N))     # keep2: another block's rows, into the next step's columns
    got = kernels.step_gemm(np.empty((M, N), F32), p, b, keep=wide[:, 2 * N:3 * N],
                            keep2=wide[:, 3 * N:], side=src)
    assert np.array_equal(got, plain)
    assert np.array_equal(wide[:, 2 * N:3 * N], b)
    assert np.array_equal(wide[:, 3 * N:], src)
    assert np.array_equal(wide[:, :2 * N], before[:, :2 * N])
    with pytest.raises(ValueError, match="keep2"):
        kernels.step_gemm(np.empty((M, N), F32), p, b, keep2=wide[:, :N - 1], side=src)
    with pytest.raises(ValueError, match="side block"):
        kernels.step_gemm(np.empty((M, N), F32), p, b, keep2=wide[:, :N])
    with pytest.raises(ValueError, match="side block"):
        kernels.step_gemm(np.empty((M, N), F32), p, b, side=src)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_add_sums_a_matrix_into_the_stored_product(isa, threads, monkeypatch):
    """``add``: out = D + A b, bit for bit the product and then D added (one rounding
    each), D a block of far-apart rows; M no multiple of the tiles."""
    monkeypatch.setenv(kernels.STEP_ENV, isa)
    kernels.step_reset()
    kernels.set_threads(threads)
    rng = np.random.default_rng(41)
    M, K, N = 75, 40, 50
    a, b = rand(rng, (M, K)), rand(rng, (K, N))
    p = kernels.Packed(a)
    wide = rand(rng, (M, 5 * N))
    d = wide[:, 2 * N:3 * N]
    plain = kernels.step_gemm(np.empty((M, N), F32), p, b)
    got = kernels.step_gemm(np.empty((M, N), F32), p, b, add=d)
    assert np.array_equal(got, plain + d)
    with pytest.raises(ValueError, match="accumulated"):
        kernels.step_gemm(got, p, b, accumulate=True, add=d)
    with pytest.raises(ValueError, match="shape"):
        kernels.step_gemm(got, p, b, add=d[:-1])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K,K2,N", [(512, 512, 101, 50), (75, 40, 1, 13), (33, 64, 17, 50)],
                         ids=["charrnn", "one-more", "odd"])
@pytest.mark.parametrize("isa", ISAS)
def test_more_rows_of_b_are_one_stacked_block(isa, M, K, K2, N, threads, monkeypatch):
    """``more``: [A1 A2] packed from two matrices is the packing of their concatenation,
    and A1 b + A2 more is the product of the stacked block, to the bit; ``keep``, the
    scatter and ``add`` ride along with b's rows only, as without ``more``; written over b
    (every thread packs first) the product is the same."""
    monkeypatch.setenv(kernels.STEP_ENV, isa)
    kernels.step_reset()
    kernels.set_threads(threads)
    rng = np.random.default_rng(M + K + K2)
    a, a2 = rand(rng, (M, K)), rand(rng, (M, K2))
    b, m = rand(rng, (K, N)), rand(rng, (K2, N))
    p = kernels.Packed(a, more=a2.T.copy().T)          # more in any layout (W^T, a view)
    whole = kernels.Packed(np.concatenate([a, a2], axis=1))
    assert p.data.size == _native.step_packed_size(M, K + K2)
    assert np.array_equal(p.data, whole.data)
    want = kernels.step_gemm(np.empty((M, N), F32), whole, np.concatenate([b, m]))
    close(want, a.astype(np.float64) @ b + a2.astype(np.float64) @ m)
    assert np.array_equal(kernels.step_gemm(np.empty((M, N), F32), p, b, more=m), want)
    V = 7
    idx = rng.integers(0, V, N).astype(np.int32)
    acc = np.zeros((V, K), F32)
    wide = rand(rng, (K, 3 * N))
    before = wide.copy()
    d = rand(rng, (M, N))
    got = kernels.step_gemm(np.empty((M, N), F32), p, b, more=m, scatter=(acc, idx),
                            keep=wide[:, N:2 * N], add=d)
    assert np.array_equal(got, want + d)
    assert np.array_equal(wide[:, N:2 * N], b)
    assert np.array_equal(wide[:, :N], before[:, :N])
    assert np.array_equal(wide[:, 2 * N:], before[:, 2 * N:])
    assert np.array_equal(acc, kernels.scatter_t(np.zeros((V, K), F32), b, idx))
    if M <= K:                                          # C over b's first rows
        buf = b.copy()
        kernels.step_gemm(buf[:M], p, buf, more=m)
        assert np.array_equal(buf[:M], want)


def test_more_arguments_are_checked():
    a, a2 = np.ones((40, 8), F32), np.ones((40, 3), F32)
    b, m = np.ones((8, 5), F32), np.ones((3, 5), F32)
    c = np.zeros((40, 5), F32)
    p = kernels.Packed(a, more=a2)
    with pytest.raises(ValueError, match="more"):
        _native.step_gemm(c, p.data, b, False, 2, 1, None, None, False, None, None, None,
                          None, m[:, :4])
    with pytest.raises(ValueError, match="do not fit"):
        _native.step_gemm(c, p.data, b, False, 2, 1)
    with pytest.raises(ValueError, match="do not fit"):
        _native.step_gemm(c, kernels.Packed(a).data, b, False, 2, 1, None, None, False, None,
                          None, None, None, m)
    with pytest.raises(ValueError, match="40 rows, more 39"):
        kernels.Packed(a, more=a2[:39])


def test_one_hot_arguments_are_checked():
    a = np.ones((40, 8), F32)
    b = np.ones((8, 5), F32)
    p = packed(a, 1)
    c = np.zeros((40, 5), F32)
    idx = np.zeros(5, np.int32)
    with pytest.raises(ValueError, match="rows of 40"):
        _native.step_gemm(c, p, b, False, 2, 1, np.zeros((3, 8), F32), idx, False)
    with pytest.raises(ValueError, match="rows of 8"):
        _native.step_gemm(c, p, b, False, 2, 1, np.zeros((3, 40), F32), idx, True)
    with pytest.raises(ValueError, match="5 columns"):
        _native.step_gemm(c, p, b, False, 2, 1, np.zeros((3, 40), F32), idx[:4], False)
    with pytest.raises(IndexError, match="outside the table's 3 columns"):
        _native.step_gemm(c, p, b, False, 2, 1, np.zeros((3, 40), F32), idx + 3, False)
    with pytest.raises(ValueError, match="accumulated"):
        _native.step_gemm(c, p, b, True, 2, 1, np.zeros((3, 40), F32), idx, False)
    with pytest.raises(ValueError, match="read-only|writable"):
        ro = np.zeros((3, 8), F32)
        ro.flags.writeable = False
        _native.step_gemm(c, p, b, False, 2, 1, ro, idx, True)


def test_python_wrapper_copies_b_without_contiguous_rows():
    rng = np.random.default_rng(5)
    a = rand(rng, (64, 20))
    bT = rand(rng, (9, 20))
    out = np.zeros((64, 9), F32)
    kernels.step_gemm(out, kernels.Packed(a), bT.T)
    close(out, a.astype(np.float64) @ bT.T)


# ------------------------------------------------------------ whole layers


def block_inputs(kind, T, H, D, B, one_hot, seed):
    """A block's input (one-hot rows or dense), its output gradient and initial state."""
    rng = np.random.default_rng(seed)
    if one_hot:
        X = np.zeros((T * B, D), F32)
        X[np.arange(T * B), rng.integers(0, D, T * B)] = 1
    else:
        X = rand(rng, (T * B, D))
    R = rand(rng, (T * B, H))
    parts = [rand(rng, (B, H), 0.5) for _ in range(2 if kind == "lstm" else 1)]
    return X, R, (tuple(parts) if kind == "lstm" else parts[0]), rng


def blas_and_packed(monkeypatch, layer, *run_args, **run_kw):
    """The block run on NumPy's matmul, then on the step GEMM: (want, got, the keyword
    arguments of every step_gemm call)."""
    monkeypatch.setenv(kernels.STEP_ENV, "blas")
    kernels.step_reset()
    want = _block_run(layer, *run_args, **run_kw)
    monkeypatch.setenv(kernels.STEP_ENV, "auto")
    kernels.step_reset()
    calls = []
    real = kernels.step_gemm
    monkeypatch.setattr(kernels, "step_gemm", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = _block_run(layer, *run_args, **run_kw)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == F32
        close(a, b, f"result {k}")
    return calls


def count(calls, option):
    return sum(k.get(option) is not None for k in calls)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("H,D,B,one_hot", [(33, 5, 7, False), (64, 3, 50, False),
                                           (40, 11, 9, True), (70, 30, 1, False)],
                         ids=["odd", "folded", "one-hot", "B1"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_layer_on_the_step_gemm_equals_layer_on_the_blas(kind, act, H, D, B, one_hot,
                                                         direction, monkeypatch):
    """Outputs, final state, input and initial-state gradients and param gradients of a
    float32 block of T = 12 steps (masked at some) agree to 1e-5 between the step GEMM and
    NumPy's matmul; the step GEMM did run (and, at B = 50, the threaded cell kernels)."""
    T = 12
    layer = build(kind, H, D, act, one_hot=one_hot,
                  direction=pb.kBackward if direction == "backward" else pb.kForward)
    assert layer.reverse == (direction == "backward")
    X, R, state0, rng = block_inputs(kind, T, H, D, B, one_hot, H + D + B)
    mask = np.ones(T * B, F32)
    mask[3 * B:4 * B] = rng.random(B) < 0.5
    mask[7 * B:8 * B] = 0
    calls = blas_and_packed(monkeypatch, layer, X, state0, mask, R, T, B)
    assert len(calls) >= 2 * T - 1, "the step GEMM did not run"
    if one_hot:   # the GEMM gathers the input projection (the GRU's of z and r) and
        assert count(calls, "gather") == T      # scatters its gradient into dW_x
        assert count(calls, "scatter") == T


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["dense", "one-hot"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_an_unmasked_block_adds_dy_in_the_step_gemm(kind, act, one_hot, direction,
                                                    monkeypatch):
    """Without a mask each backward step GEMM adds the next step's output gradient as it
    stores W_h^T g (``add``), and the forward's next GEMM copies each new h into the state
    block (``keep``); outputs and gradients agree with NumPy's matmul to 1e-5."""
    T, H, D, B = 10, 48, 7, 50
    layer = build(kind, H, D, act, one_hot=one_hot,
                  direction=pb.kBackward if direction == "backward" else pb.kForward)
    X, R, state0, _ = block_inputs(kind, T, H, D, B, one_hot, 51)
    calls = blas_and_packed(monkeypatch, layer, X, state0, None, R, T, B)
    assert count(calls, "add") == T - 1
    assert count(calls, "keep") >= T - 1


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("need_state_grad", [False, True], ids=["no-state-grad", "state-grad"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_a_dense_layers_product_gradient_is_made_in_the_step_gemm(kind, act, direction,
                                                                  need_state_grad, masked,
                                                                  monkeypatch):
    """An output gradient given as a ``ProductGrad`` d w (a dense layer's input gradient)
    is made by the backward step GEMMs, [W_h^T w^T] [g; d_t^T] (``more``), never added as
    a block (no ``add``); outputs and gradients agree to 1e-5 with NumPy's matmul fed the
    product multiplied out, masked steps (whose dL/dh' the loop adds itself) included."""
    from engine.layers.base import ProductGrad
    T, H, D, B, V = 10, 48, 7, 50, 13
    layer = build(kind, H, D, act, one_hot=True,
                  direction=pb.kBackward if direction == "backward" else pb.kForward)
    X, _, state0, rng = block_inputs(kind, T, H, D, B, True, 61)
    d, w = rand(rng, (T * B, V)), rand(rng, (V, H), 0.3)
    mask = None
    if masked:
        mask = np.ones(T * B, F32)
        mask[4 * B:5 * B] = rng.random(B) < 0.5
    monkeypatch.setenv(kernels.STEP_ENV, "blas")
    kernels.step_reset()
    want = _block_run(layer, X, state0, mask, d.astype(np.float64) @ w, T, B,
                      need_state_grad=need_state_grad)
    monkeypatch.setenv(kernels.STEP_ENV, "auto")
    kernels.step_reset()
    calls = []
    real = kernels.step_gemm
    monkeypatch.setattr(kernels, "step_gemm", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = _block_run(layer, X, state0, mask, ProductGrad(d, w), T, B,
                     need_state_grad=need_state_grad)
    for k, (g, e) in enumerate(zip(got, want)):
        close(g, e.astype(F32), f"result {k}")
    assert count(calls, "add") == 0
    backward = T - 1 + need_state_grad        # W_h^T products: every step but the pass's last
    assert count(calls, "more") == backward


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_a_planned_char_rnn_folds_its_output_layers_gradient(kind, tmp_path, monkeypatch):
    """The planned executor in float32 hands the output layer's input gradient to the
    recurrent layer unmultiplied, which makes it in its step GEMMs: metrics and every
    gradient agree to 1e-5 with the same net where the recurrent layer takes it
    multiplied out (the planner then multiplies it: ``takes_product_grad`` False)."""
    import cellkinds as ck
    import test_gradcheck as gc
    from engine.backend import make_backend
    from engine.config import Phase, load_job
    from engine.layers.recurrent import Recurrent
    from engine.net import Net
    from engine.planner import PlannedWorker
    from engine.unroll import unroll
    from engine.workspace import net_info
    assert kind in ck.CELLS
    T = 10
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path), batch=6, unroll=T)
                       + gc.rec_conf(kind, "rec", "onehot", 40)
                       + gc.ip_loss("rec", gc.vocab_size()), unroll=T)
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    runs = []
    real = kernels.step_gemm
    for takes in (False, True):
        monkeypatch.setattr(Recurrent, "takes_product_grad", takes)
        calls = []
        monkeypatch.setattr(kernels, "step_gemm",
                            lambda *a, calls=calls, **k: calls.append(k) or real(*a, **k))
        net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None, np.float32),
                  net_info(path, tmp_path / "ws", 0), seed=3)
        w = PlannedWorker(net, seed=3)
        metrics = [w.run_batch(train=True) for _ in range(2)]
        runs.append((metrics, [p.grad.copy() for p in net.params], calls))
    (m0, g0, c0), (m1, g1, c1) = runs
    assert count(c0, "more") == 0 and count(c0, "add") > 0
    assert count(c1, "more") >= T - 1 and count(c1, "add") == 0
    for a, b in zip(m1, m0):
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    for k, (a, b) in enumerate(zip(g1, g0)):
        close(a, b, f"gradient {k}")


@pytest.mark.parametrize("kind,act", [("lstm", None), ("rnn", pb.TANH), ("gru", None)],
                         ids=["lstm", "rnn", "gru"])
def test_a_step_the_gemm_does_not_undo_is_scattered_after_the_loop(kind, act, monkeypatch):
    """Without the initial state's gradient the loop's last step multiplies by no W_h^T, so
    its one-hot columns go into dW_x after the loop (Products.table_grad); the gradients
    still agree with NumPy's matmul to 1e-5."""
    T, H, D, B = 9, 40, 11, 50
    layer = build(kind, H, D, act, one_hot=True)
    X, R, state0, _ = block_inputs(kind, T, H, D, B, True, 21)
    calls = blas_and_packed(monkeypatch, layer, X, state0, np.ones(T * B, F32), R, T, B,
                            need_state_grad=False)
    assert count(calls, "scatter") == T - 1


@pytest.mark.parametrize("need_input_grad", [False, True], ids=["no-input-grad", "input-grad"])
@pytest.mark.parametrize("need_state_grad", [False, True], ids=["no-state-grad", "state-grad"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["dense", "one-hot"])
@pytest.mark.parametrize("kind,act", LAYERS, ids=LAYER_IDS)
def test_every_backward_step_writes_its_gradient_into_one_block(kind, act, one_hot,
                                                                need_state_grad,
                                                                need_input_grad, monkeypatch):
    """Each backward step writes its dL/d(products) (for the RNN and the LSTM, also the
    gradient at the input projection) into the same (G·H, B) block (it stays in cache;
    the step GEMM lays it out), not into its step's block of a (T, G·H, B) array; a step
    no GEMM undoes (the last, without the initial state's gradient) is copied out after
    it. The GRU's separate gradient at its input projection does the same; the GEMM also
    copies it into a feature-major block (``keep2``) where something reads it after the
    loop (a dense input's dW_x and bias, the input's gradient). Gradients, the dense
    input's bias among them, agree with NumPy's matmul to 1e-5."""
    T, H, D, B = 9, 40, 11, 50
    layer = build(kind, H, D, act, one_hot=one_hot)
    X, R, state0, _ = block_inputs(kind, T, H, D, B, one_hot, 33)
    name = f"{kind}_backward"
    outs, real = [], getattr(kernels, name)
    keys = ("out_h", "out_x") if kind == "gru" else ("out",)
    monkeypatch.setattr(kernels, name,
                        lambda *a, **k: outs.append([k[n] for n in keys]) or real(*a, **k))
    calls = blas_and_packed(monkeypatch, layer, X, state0, None, R, T, B,
                            need_state_grad=need_state_grad, need_input_grad=need_input_grad)
    assert len(outs) == 2 * T
    packed = [o[0] for o in outs[T:]]         # the step GEMM's run (NumPy's came first)
    assert all(o is packed[0] for o in packed), "a step wrote into a block of its own"
    assert len({id(o[0]) for o in outs[:T]}) == T     # NumPy's matmul: a block per step
    undone = T - (0 if need_state_grad else 1)     # steps a W_h^T product undid
    if kind == "gru":      # its separate dL/d(input projection): one block too, laid out
        dx = [o[1] for o in outs[T:]]                # by the GEMM where it is read later
        assert all(o is dx[0] for o in dx)
        read_later = need_input_grad or not one_hot
        assert count(calls, "keep2") == (undone if read_later else 0)
    if one_hot:
        assert count(calls, "scatter") == undone


# ------------------------------------------------- the pool's other users


@pytest.mark.parametrize("flat", [True, False], ids=["contiguous", "column-slices"])
def test_cell_kernels_on_threads_give_the_same_bits(flat):
    rng = np.random.default_rng(6)
    H, B = 256, 50      # 12,800 floats a gate: over the threshold of 8192

    def lay(a):
        if flat:
            return a.copy()
        wide = np.zeros((a.shape[0], 3 * B), F32)
        wide[:, B:2 * B] = a
        return wide[:, B:2 * B]

    pre = rand(rng, (4 * H, B))
    c = rand(rng, (H, B))
    dh, dc = rand(rng, (H, B)), rand(rng, (H, B))
    results = []
    for n in (1, 2, 3):
        kernels.set_threads(n)
        p = lay(pre)
        h_new, c_new, (ifo, g, tc) = kernels.lstm_forward(p, lay(c))
        dpre, dcp = kernels.lstm_backward(lay(dh), lay(dc), lay(c), ifo, g, tc,
                                          out=lay(np.zeros((4 * H, B), F32)))
        xproj, hproj = rand(np.random.default_rng(7), (3 * H, B)), \
            rand(np.random.default_rng(8), (3 * H, B))
        gh, _ = kernels.gru_forward(lay(xproj), lay(hproj), lay(c))
        results.append([np.array(x) for x in (h_new, c_new, p, dpre, dcp, gh)])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert np.array_equal(a, b)


def test_gathers_and_scatters_on_threads_give_the_same_bits():
    rng = np.random.default_rng(9)
    R, V, n = 512, 101, 50
    table = rand(rng, (R, V))
    idx = rng.integers(0, V, n).astype(np.int32)
    d = rand(rng, (R, n))
    results = []
    for threads in (1, 2):
        kernels.set_threads(threads)
        out = rand(np.random.default_rng(10), (R, n))
        kernels.gather(out, table, idx, True)
        acc = np.zeros((V, R), F32)
        kernels.scatter_t(acc, d, idx)
        results.append((out, acc))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("threads", [1, 2])
def test_unstep_lays_out_step_major_blocks_feature_major(threads):
    rng = np.random.default_rng(12)
    T, R, B = 7, 300, 9
    steps = rand(rng, (T, R, B))
    wide = np.zeros((R, T * B + 5), F32)
    flat = wide[:, 2:2 + T * B]
    kernels.set_threads(threads)
    kernels.unstep(flat, steps)
    assert np.array_equal(flat, steps.transpose(1, 0, 2).reshape(R, T * B))
    assert (wide[:, :2] == 0).all() and (wide[:, 2 + T * B:] == 0).all()
    with pytest.raises(ValueError, match="unstep"):
        _native.unstep(np.zeros((R, T * B + 1), F32), steps, T)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_restep_lays_out_a_feature_major_block_step_major_with_its_bias(threads):
    """restep is the inverse of unstep, plus a bias per row: NumPy's sum, to the bit."""
    rng = np.random.default_rng(13)
    T, R, B = 7, 300, 9
    wide = rand(rng, (R, T * B + 5))
    flat = wide[:, 2:2 + T * B]
    bias = rand(rng, (R,))
    kernels.set_threads(threads)
    steps = np.full((T, R, B), np.nan, F32)
    kernels.restep(steps, flat, bias)
    assert np.array_equal(steps, (flat + bias[:, None]).reshape(R, T, B).transpose(1, 0, 2))
    kernels.restep(steps, flat)
    assert np.array_equal(steps, flat.reshape(R, T, B).transpose(1, 0, 2))
    with pytest.raises(ValueError, match="restep"):
        _native.restep(steps, flat, bias[1:], T)


def test_parked_threads_wake_for_the_next_task():
    rng = np.random.default_rng(13)
    a, b = rand(rng, (200, 30)), rand(rng, (30, 20))
    want = gemm(a, b, ISAS[0], 2)
    for _ in range(20):
        kernels.park()
        assert np.array_equal(gemm(a, b, ISAS[0], 2), want)


def _pool_workers():
    """The thread ids of the step GEMM's pool (its workers are named rnn-step)."""
    tids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "rnn-step":
                    tids.append(int(tid))
        except OSError:      # a thread that ended meanwhile
            pass
    return tids


def _last_core(tid):
    """The core a thread last ran on (/proc's stat, field 39)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores to put the worker on the caller's")
def test_a_worker_on_the_callers_core_is_moved_off_it():
    """Linux at times queues the worker on the caller's core and leaves it there; the caller
    then does every unit alone. Put it there (both pinned to one core, then the worker's
    mask given back): the caller moves it off within a few tasks, and its mask is as it was."""
    rng = np.random.default_rng(17)
    a, b = rand(rng, (512, 256)), rand(rng, (256, 50))
    want = gemm(a, b, ISAS[0], 2)
    workers = _pool_workers()
    assert workers, "the pool's worker has no name rnn-step"
    full, core = os.sched_getaffinity(0), min(os.sched_getaffinity(0))
    worker_mask = os.sched_getaffinity(workers[0])
    moved = False
    try:
        for _ in range(20):     # the host may move the worker itself first; try again
            before = _native.step_moves()
            gemm(a, b, ISAS[0], 2)                       # the worker is up and spinning
            os.sched_setaffinity(workers[0], {core})     # on the caller's core, still spinning
            os.sched_setaffinity(0, {core})
            os.sched_setaffinity(workers[0], worker_mask)
            for _ in range(10):
                assert np.array_equal(gemm(a, b, ISAS[0], 2), want)
            where = _last_core(workers[0])
            os.sched_setaffinity(0, full)
            if _native.step_moves() > before:
                moved = True
                break
    finally:
        os.sched_setaffinity(0, full)
    assert moved, "the worker was never moved off the caller's core"
    assert where != core, "moved, the worker still ran on the caller's core"
    assert os.sched_getaffinity(workers[0]) == worker_mask


def _child_moves(q, core):
    try:
        os.sched_setaffinity(0, {core})   # the child's worker starts on this core only
        before = _native.step_moves()      # the parent's count, copied by fork
        rng = np.random.default_rng(3)
        a, b = rand(rng, (512, 128)), rand(rng, (128, 50))
        for _ in range(3):
            gemm(a, b, ISAS[0], 2)
        q.put(_native.step_moves() - before)
    except Exception as e:  # noqa: BLE001 - any failure is reported to the parent
        q.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "sched_setaffinity")
                    or len(os.sched_getaffinity(0)) < 2, reason="needs fork and two cores")
def test_a_forked_child_never_moves_the_parents_worker():
    """A forked child's pool starts with the parent's notes of its worker: the thread id
    (no thread of the child's; another process may get it) and the core it waited on. The
    child must not move that thread: here the parent's worker last waited on the core the
    child then runs its first tasks on, alone, and the child's own worker can move nowhere
    (its mask is that core), so the child's count of moves stays 0."""
    rng = np.random.default_rng(5)
    a, b = rand(rng, (512, 128)), rand(rng, (128, 50))
    full, core = os.sched_getaffinity(0), min(os.sched_getaffinity(0))
    gemm(a, b, ISAS[0], 2)                       # the worker is up and spinning
    workers = _pool_workers()
    assert workers
    mask = os.sched_getaffinity(workers[0])
    try:
        os.sched_setaffinity(workers[0], {core})  # it waits on `core`, then sleeps there
        time.sleep(0.01)
    finally:
        os.sched_setaffinity(workers[0], mask)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_moves, args=(q, core))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung")
    assert q.get(timeout=5) == 0
    assert os.sched_getaffinity(0) == full


def _child(q):
    try:
        rng = np.random.default_rng(11)
        a, b = rand(rng, (300, 64)), rand(rng, (64, 50))
        out = np.zeros((300, 50), F32)
        _native.step_gemm(out, packed(a, 2), b, False, 2, 2)
        q.put(float(np.abs(out - a.astype(np.float64) @ b).max()))
    except Exception as e:  # noqa: BLE001 - any failure is reported to the parent
        q.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores")
def test_the_round_trip_between_two_cores():
    """kernels.core_round_trip_ns: a time a cache line can take between two cores (tens to
    hundreds of ns; a loaded host may stretch it, hence the wide bound), the caller's mask
    as it was after; a core the process may not use gives -1, the same core twice an error."""
    mask = os.sched_getaffinity(0)
    a, b = sorted(mask)[:2]
    ns = kernels.core_round_trip_ns(rounds=2000, samples=3)
    assert ns is not None and 1.0 < ns < 100_000.0
    assert 1.0 < _native.round_trip_ns(b, a, 2000) < 100_000.0
    outside = next(c for c in range(1000, 0, -1) if c not in mask)
    assert _native.round_trip_ns(a, outside, 100) == -1.0     # the echo thread cannot go there
    assert _native.round_trip_ns(outside, a, 100) == -1.0     # nor can the caller
    assert os.sched_getaffinity(0) == mask
    with pytest.raises(ValueError, match="two different cores"):
        _native.round_trip_ns(a, a, 10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_makes_its_own_threads():
    """The pool's threads are the parent's: a child forked after they started computes with
    threads of its own (it used to wait for workers it does not have)."""
    gemm(np.ones((64, 4), F32), np.ones((4, 8), F32), ISAS[-1], 2)   # the pool is up
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung")
    got = q.get(timeout=5)
    assert isinstance(got, float) and got < 1e-3, got


# ---------------------------------------------------------------- the switch


def test_switch_reads_the_environment(monkeypatch):
    assert kernels.step_mode()["isa"] == ISAS[0] or kernels.step_mode()["why"]
    monkeypatch.setenv(kernels.STEP_ENV, "blas")
    kernels.step_reset()
    assert kernels.step_mode()["isa"] == "blas"
    assert "NumPy's BLAS (RNN_ENGINE_STEP_GEMM=blas)" in kernels.step_describe()
    assert not kernels.packs(np.zeros((8, 8), F32), 50)
    monkeypatch.setenv(kernels.STEP_ENV, ISAS[-1])
    kernels.step_reset()
    if kernels.step_mode()["isa"] != "blas":
        assert kernels.step_mode()["isa"] == ISAS[-1]
        assert kernels.packs(np.zeros((8, 8), F32), kernels.STEP_MIN_T)
        assert not kernels.packs(np.zeros((8, 8), F32), kernels.STEP_MIN_T - 1)
        assert not kernels.packs(np.zeros((8, 8)), 50)          # float64: NumPy's matmul


def test_a_bad_switch_value_or_one_the_cpu_lacks_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.STEP_ENV, "fastest")
    kernels.step_reset()
    with pytest.raises(BackendError, match="RNN_ENGINE_STEP_GEMM='fastest' is not a choice"):
        kernels.step_mode()
    monkeypatch.setenv(kernels.STEP_ENV, "avx512")
    monkeypatch.setattr(_native, "step_isa", lambda: 2)     # an AVX2-only CPU
    kernels.step_reset()
    with pytest.raises(BackendError, match="gives the step GEMM avx2"):
        kernels.step_mode()


def test_without_openblas_the_step_gemm_stays_off(monkeypatch):
    """Our threads beside a BLAS pool we cannot put to sleep would fight it: without
    OpenBLAS's shutdown function the loop takes NumPy's matmul, and says why."""
    monkeypatch.setattr(kernels, "_openblas", lambda: None)
    kernels.step_reset()
    assert kernels.step_mode() == {"isa": "blas", "why": "NumPy's BLAS is not OpenBLAS"}
