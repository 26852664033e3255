"""What a recurrent block does with one-hot input, against folding it into the GEMMs.

    python -m bench.onehot [--hidden 512] [--gates 4] [--vocab 101] [--batch 50]
                           [--steps 50] [--rounds 7]

For a layer of G gates, hidden size H, one-hot input of V symbols, batch B and
T steps, times (median of ``--rounds``, each part over a whole batch of T steps,
float32, the BLAS and the compiled kernels the engine uses):

- forward step GEMMs: folded, each step ONE GEMM [W_h W_x b] @ [h; x; 1]
  (K = H + V + 1); gathered, each step W_h @ h (K = H) plus the step's columns of
  the table W_x + b added into the result (``kernels.gather``), what
  ``engine/layers/recurrent.py`` runs for a kOneHot source;
- the weight gradients after the step loop: folded, one GEMM dpre @ [h; x; 1]^T;
  gathered, dpre @ h^T and the scatter-add of dpre's columns by token into the
  transposed table gradient (``kernels.scatter_t``; in the layers the backward step
  GEMM does this scatter step by step, see docs/speed.md);
- the backward step GEMMs W_h^T @ dpre: from a transposed view of the stored W_h
  (what the layers do), and from a contiguous copy made once per batch
  (``kernels.transpose``, included), which measured no faster.

Prints the CPU, the BLAS and its kernel first; run it with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (see docs/speed.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def interleaved_ms(fns, rounds: int) -> list[float]:
    """Median ms of each function, timed in turn round after round (A B C A B C ...), so
    that a slow spell of a busy machine falls on all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.onehot", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--gates", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=101)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    from bench.charrnn import cpu_model, describe_blas, thread_pools
    from engine.layers import kernels
    if not kernels.available():
        print("the native kernels are not built: " + kernels.describe())
        return 1
    H, G, V, B, T = a.hidden, a.gates, a.vocab, a.batch, a.steps
    GH, N = G * H, T * B
    print(f"CPU: {cpu_model()}; NumPy BLAS: {describe_blas(thread_pools())}; "
          f"kernels: {kernels.describe()}")
    print(f"G*H = {GH}, H = {H}, one-hot V = {V}, batch {B}, {T} steps; ms per batch, "
          f"median of {a.rounds} interleaved rounds")
    rng = np.random.default_rng(0)
    f32 = np.float32
    wc = rng.standard_normal((GH, H + V + 1), dtype=f32)    # [W_h W_x b]
    w_h = np.ascontiguousarray(wc[:, :H])                  # the stored, stacked W_h
    table = np.ascontiguousarray(wc[:, H:H + V])
    idx = rng.integers(0, V, N).astype(np.int32)
    z = rng.standard_normal((H + V + 1, N + B), dtype=f32)  # [h; x; 1] per column
    z[H:H + V] = 0
    z[H + idx, np.arange(N)] = 1
    z[H + V] = 1
    pre = np.empty((T, GH, B), f32)
    dpre = rng.standard_normal((GH, N), dtype=f32)
    dtable_t = np.zeros((V, GH), f32)
    w_hT = np.empty((H, GH), f32)
    back = np.empty((H, B), f32)

    def fwd_folded():
        for t in range(T):
            np.matmul(wc, z[:, t * B:(t + 1) * B], out=pre[t])

    def fwd_gathered():
        for t in range(T):
            np.matmul(w_h, z[:H, t * B:(t + 1) * B], out=pre[t])
            kernels.gather(pre[t], table, idx[t * B:(t + 1) * B], True)

    def gather_only():
        for t in range(T):
            kernels.gather(pre[t], table, idx[t * B:(t + 1) * B], True)

    def wgrad_folded():
        dpre @ z[:, :N].T

    def wgrad_gathered():
        dpre @ z[:H, :N].T
        dtable_t[...] = 0
        kernels.scatter_t(dtable_t, dpre, idx)

    def scatter_only():
        kernels.scatter_t(dtable_t, dpre, idx)

    def bwd_view():
        for t in range(T):
            np.matmul(w_h.T, dpre[:, t * B:(t + 1) * B], out=back)

    def bwd_copy():
        kernels.transpose(w_hT, w_h)       # once per batch: the weights change every step
        for t in range(T):
            np.matmul(w_hT, dpre[:, t * B:(t + 1) * B], out=back)

    def transpose_only():
        kernels.transpose(w_hT, w_h)

    transpose_only()
    rows = [("forward step GEMMs", fwd_folded, fwd_gathered, gather_only, "the gathers"),
            ("weight gradients", wgrad_folded, wgrad_gathered, scatter_only, "the scatter-add"),
            ("backward step GEMMs", bwd_view, bwd_copy, transpose_only, "the transpose")]
    print(f"{'part':<22}{'folded / view':>15}{'gathered / copy':>17}   of which")
    for label, old, new, part, what in rows:
        t_old, t_new, t_part = interleaved_ms((old, new, part), a.rounds)
        print(f"{label:<22}{t_old:15.2f}{t_new:17.2f}   {what} {t_part:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
