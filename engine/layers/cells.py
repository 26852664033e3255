"""The hand-written maths of one recurrent step (RNN, GRU, LSTM), and the one-hot
helpers of the step loop.

Everything here is feature-major: arrays are (features, B), one column per
sequence, and gate k of a stacked (G·H, B) array is the row block
[k·H:(k+1)·H]. The functions take the array module ``xp`` (NumPy or CuPy) and
arrays only, written with in-place operations; the cell classes of
``engine/layers/recurrent.py`` call them from their hand-written steps (each
cell's ``formula`` there is the definition they are tested against). A fused
kernel for a cell (a compiled CPU loop, a CuPy ElementwiseKernel) goes beside
its pair of functions here, behind the same signature, and the tests compare it
with these.
"""
from __future__ import annotations

from engine.layers import kernels


def sigmoid_(xp, a):
    """σ(a) = 1 / (1 + exp(-a)), computed as 0.5 tanh(a / 2) + 0.5 (no overflow) and
    written into ``a`` itself (a scratch array or a view of one); returns ``a``."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


# ------------------------------------------------------------------- RNN
def rnn_forward(xp, pre, relu):
    """h' = act(pre), pre = W_x x + b + W_h h (H, B), computed in ``pre``; act = tanh, or
    max(·, 0) when ``relu``."""
    if relu:
        return xp.maximum(pre, 0, out=pre)
    return xp.tanh(pre, out=pre)


def rnn_backward(xp, dh_new, h_new, relu, out=None):
    """dL/dpre given dL/dh' and h' (unmasked): dh' ⊙ (1 − h'²) for tanh, dh' ⊙ [h' > 0]
    for relu; into ``out`` when given."""
    if relu:
        return xp.multiply(dh_new, h_new > 0, out=out)
    d = xp.multiply(h_new, h_new, out=out)
    xp.subtract(1, d, out=d)
    d *= dh_new
    return d


# ------------------------------------------------------------------- GRU
def gru_forward(xp, xproj, hproj, h):
    """One GRU step (SINGA's equations) from its projections.

    xproj = [W_zx x + b_z; W_rx x + b_r; W_cx x + b_c]     (3H, B)
    hproj = [W_zh h;       W_rh h;       W_ch h]            (3H, B), a scratch array:
    z, r = σ(xproj[z, r] + hproj[z, r]) are computed in its first 2H rows;
    c = tanh(xproj[c] + r ⊙ hproj[c]);  h' = z ⊙ h + (1 − z) ⊙ c  (as c + z ⊙ (h − c)).
    Returns (h', cache) with cache = (zr, c, hc): zr = [z; r] (2H, B), hc = hproj[c].
    """
    H = h.shape[0]
    zr = hproj[:2 * H]
    zr += xproj[:2 * H]
    sigmoid_(xp, zr)
    hc = hproj[2 * H:]
    c = zr[H:] * hc
    c += xproj[2 * H:]
    xp.tanh(c, out=c)
    h_new = xp.subtract(h, c)
    h_new *= zr[:H]
    h_new += c
    return h_new, (zr, c, hc)


def gru_backward(xp, dh_new, h, zr, c, hc, out_x=None, out_h=None):
    """Reverse of ``gru_forward``.

    Given dL/dh' (unmasked) and the cache, returns (dxproj (3H, B), dhproj (3H, B),
    dh_direct (H, B)) where dh_direct = z ⊙ dh' is the part of dL/dh that does not pass
    through hproj. ``out_x`` / ``out_h`` receive dxproj / dhproj when given.
    """
    H = h.shape[0]
    z = zr[:H]
    r = zr[H:]
    dx = xp.empty((3 * H,) + h.shape[1:], dtype=c.dtype) if out_x is None else out_x
    dc_pre = dx[2 * H:]
    xp.multiply(c, c, out=dc_pre)                # (1 - c²)(1 - z) dh'
    xp.subtract(1, dc_pre, out=dc_pre)
    dc_pre *= dh_new
    dc_pre -= dc_pre * z
    xp.subtract(h, c, out=dx[:H])
    dx[:H] *= dh_new
    xp.multiply(dc_pre, hc, out=dx[H:2 * H])
    dx[:2 * H] *= zr - zr * zr
    if out_h is None:
        dhp = dx.copy()
    else:
        dhp = out_h
        dhp[:2 * H] = dx[:2 * H]
    xp.multiply(dc_pre, r, out=dhp[2 * H:])
    return dx, dhp, dh_new * z


# ------------------------------------------------------------------ LSTM
def lstm_forward(xp, pre, c):
    """One LSTM step from its summed projections (gate order i, f, o, g).

    pre = W_x x + b + W_h h (4H, B), a scratch array the gates are computed in;
    i, f, o = σ(pre[i, f, o]);  g = tanh(pre[g]);  c' = f ⊙ c + i ⊙ g;  h' = o ⊙ tanh(c')
    Returns (h', c', cache) with cache = (ifo, g, tanh(c')).
    """
    H = c.shape[0]
    ifo = sigmoid_(xp, pre[:3 * H])
    g = pre[3 * H:]
    xp.tanh(g, out=g)
    tc = xp.multiply(ifo[:H], g)      # i ⊙ g, then tanh(c') in the same array
    c_new = ifo[H:2 * H] * c
    c_new += tc
    xp.tanh(c_new, out=tc)
    h_new = ifo[2 * H:] * tc
    return h_new, c_new, (ifo, g, tc)


def lstm_backward(xp, dh_new, dc_new, c, ifo, g, tc, out=None):
    """Reverse of ``lstm_forward``.

    Given dL/dh', dL/dc' (unmasked; dc_new may be None) and the cache, returns
    (dpre (4H, B), dc_prev (H, B)); dpre, the gradient of both projections, is
    written into ``out`` when given (not the gate storage itself). Gate by gate with
    one (H, B) scratch, so a step's working set stays small: the gates come back
    from memory, and this order measured 69.7 against 71.3 ms per LSTM 512 step
    (the same process, alternating) over whole-block temporaries.
    """
    H = c.shape[0]
    dpre = xp.empty((4 * H,) + c.shape[1:], dtype=tc.dtype) if out is None else out
    i, f, o = ifo[:H], ifo[H:2 * H], ifo[2 * H:]
    t = xp.empty_like(tc)
    d_o = dpre[2 * H:3 * H]                   # dh' ⊙ tanh(c') ⊙ σ'(o)
    xp.subtract(1, o, out=t)
    t *= o
    xp.multiply(dh_new, tc, out=d_o)
    d_o *= t
    dct = xp.multiply(tc, tc)                 # dL/dc' = dh' ⊙ o ⊙ (1 − tanh²c') + dc'
    xp.subtract(1, dct, out=dct)
    dct *= o
    dct *= dh_new
    if dc_new is not None:
        dct += dc_new
    d_i = dpre[:H]                            # dct ⊙ g ⊙ σ'(i)
    xp.subtract(1, i, out=t)
    t *= i
    xp.multiply(dct, g, out=d_i)
    d_i *= t
    d_f = dpre[H:2 * H]                       # dct ⊙ c ⊙ σ'(f)
    xp.subtract(1, f, out=t)
    t *= f
    xp.multiply(dct, c, out=d_f)
    d_f *= t
    xp.multiply(g, g, out=t)                  # dct ⊙ i ⊙ (1 − g²)
    xp.subtract(1, t, out=t)
    t *= i
    xp.multiply(dct, t, out=dpre[3 * H:])
    dct *= f                                  # dL/dc = dct ⊙ f
    return dpre, dct


# ------------------------------------------------------- one-hot inputs, transposes
# A one-hot input x_n = e_{idx[n]} projects to W x_n = column idx[n] of W: the recurrent
# layers gather columns instead of multiplying by the zeros of x, and add the gradient's
# columns into the rows of dW^T (dW = dpre x^T). The compiled twins (kernels.gather,
# .scatter_t) run where ``kernels.usable`` says so.
def one_hot_index(xp, x):
    """The column of the 1 in each row of ``x`` (N, V), as an int32 array (N,)."""
    return xp.argmax(x, axis=1).astype(xp.int32)


def gather_columns(xp, out, table, idx, add=False):
    """out (R, n) = table[:, idx] (R, V) (``add``: +=); returns ``out``."""
    if kernels.usable(table, inplace=out) and kernels.usable_index(idx):
        return kernels.gather(out, table, idx, add)
    cols = xp.take(table, idx, axis=1)
    if add:
        out += cols
    else:
        out[...] = cols
    return out


def gather_steps(xp, out, table, idx):
    """out (T, R, B)[t] = table[:, idx[t·B:(t+1)·B]] (R, V): the columns of each step in a
    contiguous block of its own; returns ``out``."""
    T, _, B = out.shape
    if kernels.usable(table, inplace=out[0]) and kernels.usable_index(idx):
        for t in range(T):
            kernels.gather(out[t], table, idx[t * B:(t + 1) * B], False)
        return out
    xp.copyto(out, xp.take(table, idx, axis=1).reshape(table.shape[0], T, B).transpose(1, 0, 2))
    return out


def scatter_steps(xp, acc_t, d_steps, idx, steps, B):
    """acc_t[idx[t·B + j]] += d_steps[t][:, j] for each step t of ``steps`` (in that order)
    and column j: the columns of the step-major gradient ``d_steps`` (T, R, B) added into
    the rows of their tokens of a transposed table gradient ``acc_t`` (V, R), one vector
    per column (the compiled kernel; NumPy or CuPy otherwise, in any order); returns
    ``acc_t``."""
    steps = list(steps)
    if kernels.usable(d_steps[0], inplace=acc_t) and kernels.usable_index(idx):
        for t in steps:
            kernels.scatter_t(acc_t, d_steps[t], idx[t * B:(t + 1) * B])
        return acc_t
    if not steps:
        return acc_t
    # one GEMM with the one-hot block of the steps' tokens: (V, k·B) @ (k·B, R)
    steps = sorted(steps)
    cols = xp.concatenate([idx[t * B:(t + 1) * B] for t in steps])
    hot = xp.zeros((acc_t.shape[0], cols.shape[0]), dtype=acc_t.dtype)
    hot[cols, xp.arange(cols.shape[0])] = 1
    picked = d_steps[xp.asarray(steps)] if len(steps) < d_steps.shape[0] else d_steps
    acc_t += hot @ picked.transpose(0, 2, 1).reshape(cols.shape[0], -1)
    return acc_t


def transposed(xp, a, out):
    """a^T with contiguous rows (what the cell kernels take): the view a.T when it has
    them, else a copy in ``out``."""
    t = a.T
    if t.flags.c_contiguous:
        return t
    if kernels.usable(a, inplace=out):
        return kernels.transpose(out, a)
    out[...] = t
    return out
