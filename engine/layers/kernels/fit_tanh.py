"""Fits the rational tanh of native.c and measures it in float32.

    python engine/layers/kernels/fit_tanh.py

tanh(x) ≈ x P(x²) / Q(x²) on [0, 9], P and Q of degree 4, Q(0) = 1, minimising the
largest relative error: linearised weighted least squares (x P(s) − tanh(x) Q(s) ≈ 0,
weighted by 1 / (tanh(x) Q_prev(s))) with Lawson's reweighting towards the minimax
solution. Prints the coefficients rounded to float32 (as native.c writes them) and the
largest error of the float32 evaluation in ulps of the true tanh.
"""
from __future__ import annotations

import numpy as np

X_MAX = 9.0     # beyond it tanh rounds to ±1 in float32


def fit(m: int = 4, n: int = 4, iters: int = 60, points: int = 4000):
    """(largest relative error, P coefficients, Q coefficients), lowest degree first."""
    x = X_MAX * (0.5 - 0.5 * np.cos(np.linspace(0, np.pi, points)))  # dense at both ends
    x = x[x > 1e-4]
    s, f = x * x, np.tanh(x)
    q_prev, lawson = np.ones_like(x), np.ones_like(x)
    best = None
    for _ in range(iters):
        a = np.concatenate([x[:, None] * s[:, None] ** np.arange(m + 1),
                            -f[:, None] * s[:, None] ** np.arange(1, n + 1)], axis=1)
        w = np.sqrt(lawson) / (f * q_prev)
        coef, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = coef[:m + 1], np.concatenate([[1.0], coef[m + 1:]])
        q_prev = np.polyval(q[::-1], s)
        err = np.abs(x * np.polyval(p[::-1], s) / q_prev - f) / f
        if best is None or err.max() < best[0]:
            best = (err.max(), p.copy(), q.copy())
        lawson = lawson * err
        lawson /= lawson.sum()
    return best


def tanh32(x, p, q):
    """The float32 evaluation native.c does (Horner, clamps)."""
    p, q = p.astype(np.float32), q.astype(np.float32)
    a = np.clip(x, np.float32(-X_MAX), np.float32(X_MAX))
    s = a * a
    pv = np.full_like(s, p[-1])
    for c in p[-2::-1]:
        pv = pv * s + c
    qv = np.full_like(s, q[-1])
    for c in q[-2::-1]:
        qv = qv * s + c
    return np.clip(a * pv / qv, np.float32(-1), np.float32(1))


def main() -> None:
    err, p, q = fit()
    print(f"largest relative error in float64: {err:.2e}")
    print("P:", ", ".join(f"{np.float32(c):.9e}f" for c in p))
    print("Q:", ", ".join(f"{np.float32(c):.9e}f" for c in q))
    x = np.linspace(0, 12, 3_000_001, dtype=np.float32)
    true = np.tanh(x.astype(np.float64))
    ulps = np.abs(tanh32(x, p, q) - true) / np.spacing(true.astype(np.float32)).astype(np.float64)
    print(f"float32 evaluation: at most {ulps.max():.2f} ulp (at x = {x[ulps.argmax()]})")


if __name__ == "__main__":
    main()
