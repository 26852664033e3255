"""The per-step GEMMs of a recurrent layer in both memory layouts, side by side.

    python -m bench.gemm_layout [--hidden 512] [--batch 50] [--gates 4] [--repeat 300]

A recurrent step multiplies the stacked hidden weights W_h (G*H, H) with the
batch's hidden states. Row-major (the layer contract's (B, H) arrays) that is
h @ W_h^T; feature-major ((H, B) arrays, what the cells in
engine/layers/recurrent.py compute in) it is W_h @ h, the same numbers
transposed. BLAS runs the two shapes with different kernels and blockings, so
their speed differs; this prints both, forward (W_h h) and backward (W_h^T dpre),
each with a fresh output array and with a preallocated ``out=``, and the
speed-up of the feature-major form over the row-major one measured in the same
process. It also times the input projection of one-hot tokens for all steps, a
GEMM with the dense one-hot block against NumPy's gather of the columns of W_x
(what the recurrent layers do with one-hot input now, compiled and step by step,
is measured by ``python -m bench.onehot``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def best_time(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t) / repeat)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gemm_layout", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--gates", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=101, help="one-hot width for the projection")
    ap.add_argument("--steps", type=int, default=50, help="steps in the projection block")
    a = ap.parse_args(argv)
    H, B, G = a.hidden, a.batch, a.gates
    rng = np.random.default_rng(0)
    W = rng.standard_normal((G * H, H), dtype=np.float32)      # stacked W_h, as stored
    h_rows = rng.standard_normal((B, H), dtype=np.float32)     # (B, H)
    h_cols = np.ascontiguousarray(h_rows.T)                    # (H, B)
    d_rows = rng.standard_normal((B, G * H), dtype=np.float32)
    d_cols = np.ascontiguousarray(d_rows.T)
    out = {"fr": np.empty((B, G * H), np.float32), "fc": np.empty((G * H, B), np.float32),
           "br": np.empty((B, H), np.float32), "bc": np.empty((H, B), np.float32)}
    flop = 2 * B * H * G * H
    cases = [
        ("forward ", "row-major  h @ W_h^T", lambda: h_rows @ W.T,
         lambda: np.matmul(h_rows, W.T, out=out["fr"])),
        ("forward ", "feature-major W_h @ h", lambda: W @ h_cols,
         lambda: np.matmul(W, h_cols, out=out["fc"])),
        ("backward", "row-major  d @ W_h", lambda: d_rows @ W,
         lambda: np.matmul(d_rows, W, out=out["br"])),
        ("backward", "feature-major W_h^T @ d", lambda: W.T @ d_cols,
         lambda: np.matmul(W.T, d_cols, out=out["bc"])),
    ]
    print(f"W_h ({G * H} x {H}), batch {B}, float32; {flop / 1e6:.0f} MFLOP per product")
    res = {}
    for phase, label, fresh, into in cases:
        tf, ti = best_time(fresh, a.repeat), best_time(into, a.repeat)
        res[(phase, label.split()[0])] = min(tf, ti)
        print(f"  {phase} {label:<26} {tf * 1e6:8.1f} us fresh  {ti * 1e6:8.1f} us out=  "
              f"({flop / min(tf, ti) / 1e9:6.1f} GFLOP/s best)")
    for phase in ("forward ", "backward"):
        r = res[(phase, "row-major")] / res[(phase, "feature-major")]
        print(f"  {phase.strip()}: feature-major is {r:.2f}x the speed of row-major (best of each)")

    V, n = a.vocab, a.steps * B
    w_x = rng.standard_normal((G * H, V), dtype=np.float32)
    ids = rng.integers(0, V, n)
    onehot = np.eye(V, dtype=np.float32)[ids]
    proj = np.empty((G * H, n), np.float32)
    t_gemm = best_time(lambda: np.matmul(w_x, onehot.T, out=proj), max(1, a.repeat // 50))
    t_take = best_time(lambda: np.take(w_x, ids, axis=1, out=proj), max(1, a.repeat // 50))
    print(f"one-hot input projection, {V} symbols x {n} rows -> ({G * H}, {n}):")
    print(f"  GEMM with the one-hot block {t_gemm * 1e3:8.2f} ms   gather of W_x columns "
          f"{t_take * 1e3:8.2f} ms   (gather/GEMM time {t_take / t_gemm:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
