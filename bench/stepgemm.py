"""The recurrent step's GEMM alone: NumPy's matmul against the engine's packed step GEMM.

    python -m bench.stepgemm [--hidden 512] [--gates 4] [--batch 50] [--steps 50] [--rounds 7]

A loop of ``--steps`` products W_h h_t (G·H × H times H × B, h_t a step's columns of the
state block) and W_h^T d_t, as a char-rnn block runs them, timed after an OpenBLAS GEMM
each round (in training the loop follows one). The packed side includes packing W_h (and
W_h^T) once per loop into blocks kept across rounds, as ``Products`` does. Prints the CPU, NumPy's BLAS and its kernel,
the step GEMM's instruction set and threads, then ms per loop and GFLOP/s, medians and
min-max over the rounds. ``RNN_ENGINE_STEP_GEMM=avx2`` measures the AVX2 micro-kernel on an
AVX-512 CPU; unset ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` first (or set the former
to Haswell to compare like with like).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.charrnn import cpu_model, describe_blas, thread_pools
from engine.layers import kernels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--gates", type=int, default=4)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    H, GH, B, T = a.hidden, a.gates * a.hidden, a.batch, a.steps
    kernels.use("native")
    mode = kernels.step_mode()
    print(f"CPU: {cpu_model()}; NumPy BLAS: {describe_blas(thread_pools())}")
    print(f"{kernels.step_describe()}")
    if mode["isa"] == "blas":
        raise SystemExit("the packed step GEMM is off here; nothing to compare")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((GH, H), dtype=np.float32)
    hs = rng.standard_normal((H, (T + 1) * B), dtype=np.float32)
    d = rng.standard_normal((T, GH, B), dtype=np.float32)
    pre = np.empty((T, GH, B), np.float32)
    back = np.empty((T, H, B), np.float32)
    big = rng.standard_normal((2048, 2048), dtype=np.float32)

    def numpy_fwd():
        for t in range(T):
            np.matmul(w, hs[:, t * B:(t + 1) * B], out=pre[t])

    kept = {}     # the packed blocks, kept across rounds as a layer keeps them

    def block(name):
        return lambda size: kept.setdefault(name, np.empty(size, np.float32))

    def packed_fwd():
        p = kernels.Packed(w, block("w"))
        for t in range(T):
            kernels.step_gemm(pre[t], p, hs[:, t * B:(t + 1) * B])

    def numpy_bwd():
        for t in range(T):
            np.matmul(w.T, d[t], out=back[t])

    def packed_bwd():
        p = kernels.Packed(w.T, block("wT"))
        for t in range(T):
            kernels.step_gemm(back[t], p, d[t])

    flop = 2.0 * GH * H * B * T
    print(f"(G·H {GH} x H {H}) times (H x B {B}), {T} steps, {a.rounds} rounds alternating, "
          f"each after a 2048^3 OpenBLAS GEMM")
    runs = {name: [] for name in ("numpy_fwd", "packed_fwd", "numpy_bwd", "packed_bwd")}
    fns = {"numpy_fwd": numpy_fwd, "packed_fwd": packed_fwd, "numpy_bwd": numpy_bwd,
           "packed_bwd": packed_bwd}
    for fn in fns.values():      # warm up (the pool's threads, the packed blocks)
        fn()
    for _ in range(a.rounds):
        for name, fn in fns.items():
            big @ big
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"  {name:11s} {med * 1e3:7.2f} ms (min-max {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})"
              f"  {flop / med / 1e9:6.1f} GFLOP/s")
    print(f"  the pool's worker, found on the caller's core, moved off it "
          f"{kernels.step_moves()} times")
    for way in ("fwd", "bwd"):
        ratio = statistics.median(runs[f"numpy_{way}"]) / statistics.median(runs[f"packed_{way}"])
        print(f"  {way}: packed is {ratio:.2f}x NumPy's matmul")


if __name__ == "__main__":
    main()
