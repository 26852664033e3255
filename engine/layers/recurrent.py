"""Layer family: recurrent (kRNN, kGRU, kLSTM).

Every layer here computes one time step per copy and follows the contract of
``engine/layers/base.py``. A step is split in two so that a time-batched
executor (or a fused CuPy kernel) can sit beside the reference code:

* ``project(x)`` -- the input projection ``x W_x^T + b`` of all gates at once,
  shape ``(..., G*H)`` for ``G`` gates; it works on any leading dims, so the
  projections of all T steps can be one GEMM on a ``(T*B, D)`` array.
* ``step_from_projection(xproj, state, mask)`` -- the recurrent part of one
  step, given its input projection ``(B, G*H)``.
* ``step_backward(dy, dstate, step_cache)`` -- the reverse of the recurrent
  part: accumulates the hidden-to-hidden grads, returns ``(dxproj, dprev)``.
* ``projection_backward(x, dxproj)`` -- the reverse of ``project``:
  accumulates the input-to-hidden and bias grads, returns ``dx``; it too takes
  any leading dims, so the input grads of all steps can be one GEMM.

``forward`` is ``project`` + ``step_from_projection``; ``backward`` is
``step_backward`` + ``projection_backward``.

Feature-major core. The arithmetic of a step lives in ``cell_step`` and
``cell_backward``, which work on (features, B) arrays: the step GEMM is
W_h (G*H, H) @ h (H, B), which BLAS runs well faster than the row-major
h @ W_h^T for the batch sizes of these jobs (``python -m bench.gemm_layout``
compares them side by side), and each gate is a contiguous row block. The
row-major methods above pass transposed views to them, so the reference
executor and the planned one (engine/planner.py, which keeps whole blocks
feature-major: ``project_t``, ``projection_backward_t``) share one
implementation. The gate maths is in the module-level functions
``rnn_cell_forward``, ``gru_cell_forward``, ``lstm_cell_forward`` and their
``*_backward`` twins; they take the array module ``xp`` and arrays only.

Sources. Each srclayer is either a *data* source (exactly one; its
``out_shape`` is ``(D,)``) or, when connected by ``kUnrollFirstToLast``, an
*initial-state* source (encoder -> decoder; at most one; ``out_shape (H,)``):
the worker turns its output into the initial state with ``state_from_source``
and passes ``None`` at its position in ``xs``. The previous copy of the layer
itself is the context source; its output arrives as ``state``.

Masking. ``ctx.mask`` is ``None`` or a ``(B,)`` array of 1/0 (a (1, B) row
inside the cells): a masked sequence keeps its previous state exactly,
``new = m * new + (1 - m) * prev`` for ``h`` (and ``c``), and, since the
output is the new ``h``, outputs that state.

A data position holding ``None`` (a one-to-one source with a shift, at the
first copies) means "no input this step": the projection is the bias alone.
"""
from __future__ import annotations

from engine.layers.base import Layer, LayerError, one_array, register
from engine.proto import job_pb2 as pb


# ---------------------------------------------------------------- gate maths
# Feature-major: arrays are (features, B), one column per sequence; gate k of a
# stacked projection is the row block [k*H:(k+1)*H].
def sigmoid_(xp, a):
    """σ(a) = 1 / (1 + exp(-a)), computed as 0.5 tanh(a / 2) + 0.5 (no overflow) and
    written into ``a`` itself (a scratch array or a view of one); returns ``a``."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


def rnn_cell_forward(xp, pre, relu):
    """h' = act(pre), pre = xproj + hproj (G*H = H rows), computed in ``pre``."""
    if relu:
        return xp.maximum(pre, 0, out=pre)
    return xp.tanh(pre, out=pre)


def rnn_cell_backward(xp, dh_new, h_new, relu, out=None):
    """Gradient at the pre-activation, given dL/dh' and h' (the unmasked output)."""
    if relu:
        return xp.multiply(dh_new, h_new > 0, out=out)
    d = xp.multiply(h_new, h_new, out=out)
    xp.subtract(1, d, out=d)
    d *= dh_new
    return d


def gru_cell_forward(xp, xproj, hproj, h):
    """One GRU step from its projections, feature-major.

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


def gru_cell_backward(xp, dh_new, h, zr, c, hc, out_x=None, out_h=None):
    """Reverse of ``gru_cell_forward``.

    Given dL/dh' (unmasked) and the forward cache, returns (dxproj (3H, B),
    dhproj (3H, B), dh_direct (H, B)) where dh_direct = z ⊙ dh' is the part of dL/dh
    that does not pass through hproj. ``out_x`` / ``out_h`` receive dxproj / dhproj
    when given (views of the caller's all-steps blocks).
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


def lstm_cell_forward(xp, pre, c):
    """One LSTM step from its summed projections, feature-major (gate order i, f, o, g).

    pre = xproj + hproj (4H, B), a scratch array the gates are computed in;
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


def lstm_cell_backward(xp, dh_new, dc_new, c, ifo, g, tc, out=None):
    """Reverse of ``lstm_cell_forward``.

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


def _add(a, b):
    """a + b where either may be None (an absent gradient)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# ------------------------------------------------------------ param bookkeeping
class _Recurrent(Layer):
    """Shared setup, projections and masking of the recurrent layers.

    Subclasses set ``TYPE_NAME``, ``CONF_FIELD`` and ``GATES`` and implement
    ``_keys``, ``step_from_projection`` and ``step_backward``.
    """

    has_params = True

    recurrent = True
    #: True when ``cell_backward``'s dhproj is not its dxproj (see GRULayer)
    separate_dhproj = False
    TYPE_NAME = ""
    CONF_FIELD = ""
    GATES = 1

    @classmethod
    def _keys(cls, conf):
        """(input-to-hidden keys, hidden-to-hidden keys, bias keys), in param order."""
        raise NotImplementedError

    @classmethod
    def default_param_names(cls, conf):
        hx, hh, b = cls._keys(conf)
        return list(hx) + list(hh) + list(b)

    def _bias_default(self, key):
        return ("constant", 0.0)

    def _where(self):
        return f"layer {self.name!r} ({self.TYPE_NAME})"

    # ------------------------------------------------------------------ setup
    def setup(self, srcs):
        sub = getattr(self.conf, self.CONF_FIELD)
        H = int(sub.dim_hidden) if self.conf.HasField(self.CONF_FIELD) else 0
        if H <= 0:
            raise LayerError(f"{self._where()}: {self.CONF_FIELD}.dim_hidden must be set to a "
                             f"positive hidden size (got {H})")
        self.H = H
        data, init = [], []
        for k, src in enumerate(srcs):
            conn = self.src_conn[k] if k < len(self.src_conn) else pb.kUnrollOneToOne
            (init if conn == pb.kUnrollFirstToLast else data).append(k)
        names = [getattr(s, "name", "?") for s in srcs]
        if len(data) != 1:
            raise LayerError(
                f"{self._where()} has {len(data)} data sources {[names[k] for k in data]}; it "
                f"needs exactly one srclayer (one-to-one or one-to-all) giving (D,) float "
                f"features; join several with a kConcate layer first")
        if len(init) > 1:
            raise LayerError(
                f"{self._where()} has {len(init)} kUnrollFirstToLast sources "
                f"{[names[k] for k in init]}; at most one can give the initial state")
        self.data_pos = data[0]
        src = srcs[self.data_pos]
        shape = tuple(src.out_shape)
        if len(shape) != 1 or shape[0] <= 0:
            raise LayerError(
                f"{self._where()}: data source {names[self.data_pos]!r} has out_shape {shape}; a "
                f"recurrent layer needs (D,) float features per row; put a kOneHot or kEmbedding "
                f"layer between token ids and it, or flatten the source")
        self.D = D = int(shape[0])
        if init:
            ishape = tuple(srcs[init[0]].out_shape)
            if ishape != (H,):
                raise LayerError(
                    f"{self._where()}: initial-state source {names[init[0]]!r} "
                    f"(kUnrollFirstToLast) has out_shape {ishape} but the state is ({H},); make "
                    f"the encoder's hidden size equal this layer's dim_hidden")
        self.init_pos = init[0] if init else None
        hx, hh, b = self._keys(self.conf)
        for key in hx:
            self.add_param(key, (H, D), ("uniform", -0.08, 0.08), fan_in=D, fan_out=H)
        for key in hh:
            self.add_param(key, (H, H), ("uniform", -0.08, 0.08), fan_in=H, fan_out=H)
        for key in b:
            self.add_param(key, (H,), self._bias_default(key), fan_in=H, fan_out=H)
        self.hx_keys, self.hh_keys, self.b_keys = hx, hh, b
        self.out_shape = (H,)

    # ------------------------------------------------------------ param stacks
    def _stack(self, keys):
        """The params' data stacked along axis 0 (one GEMM for all gates).

        After ``fuse_params`` this is a stored array (the params are views of it),
        so no copy is made per step."""
        fused = self._fused.get(tuple(keys))
        if fused is not None:
            return fused[0]
        if len(keys) == 1:
            return self.params[keys[0]].data
        return self.xp.concatenate([self.params[k].data for k in keys], axis=0)

    def _accumulate(self, keys, g):
        """Add the gate blocks of a stacked gradient (rows k*H:(k+1)*H) to each param."""
        fused = self._fused.get(tuple(keys))
        if fused is not None:
            grad = fused[1]
            grad += g
            return
        H = self.H
        for k, key in enumerate(keys):
            self.params[key].grad += g[k * H:(k + 1) * H]

    @property
    def _fused(self) -> dict:
        return self.__dict__.setdefault("_fused_groups", {})

    def params_ready(self, like=None) -> None:
        if like is None:
            self.fuse_params()
        else:
            self.share_fusion(like)

    def share_fusion(self, other) -> None:
        """After this layer's params were replaced by ``other``'s (a val/test net using
        the train net's weights), read the stacked arrays of ``other`` for the groups whose
        params are now the same objects; drop the rest (they are concatenated per step)."""
        theirs = other._fused if isinstance(other, _Recurrent) else {}
        self.__dict__["_fused_groups"] = {
            keys: arrays for keys, arrays in theirs.items()
            if all(self.params.get(k) is other.params.get(k) for k in keys)}

    def fuse_params(self) -> bool:
        """Store each gate group (input weights, hidden weights, biases) as one array
        whose row blocks are the params' data and grad (views), so the per-step GEMMs
        read the stacked weights without copying them. Groups holding a param tied to
        another layer's stay separate. Call after the params are initialised."""
        xp = self.xp
        done = False
        for keys in (self.hx_keys, self.hh_keys, self.b_keys):
            ps = [self.params[k] for k in keys]
            if len(ps) < 2 or any(p.owner_layer != self.name or p.data is None for p in ps):
                continue
            data = xp.concatenate([p.data for p in ps], axis=0)
            grad = xp.concatenate([p.grad for p in ps], axis=0)
            H = self.H
            for k, p in enumerate(ps):
                p.data = data[k * H:(k + 1) * H]
                p.grad = grad[k * H:(k + 1) * H]
            self._fused[tuple(keys)] = (data, grad)
            done = True
        return done

    @staticmethod
    def _blend(new, old, mm):
        """Masked columns keep ``old``: m ⊙ new + (1 − m) ⊙ old (``new`` when unmasked)."""
        return new if mm is None else mm[0] * new + mm[1] * old

    def _incoming(self, dy, dstate, like, mm):
        """Gradient arriving at h' (dy + dstate; zeros when neither), split by the mask
        into (the part through this step, the part passed straight to h) — (dh, None)
        when unmasked."""
        dh = _add(dy, dstate)
        if dh is None:
            dh = self.xp.zeros_like(like)
        if mm is None:
            return dh, None
        return mm[0] * dh, mm[1] * dh

    def _mask(self, mask):
        """(m, 1 - m) as (1, B) rows of self.dtype (feature-major), or None."""
        if mask is None:
            return None
        m = self.xp.asarray(mask, dtype=self.dtype).reshape(1, -1)
        return m, 1 - m

    # ------------------------------------------------------------- projection
    def project(self, x, batch=None):
        """x W_x^T + b for all gates: (..., D) -> (..., G*H), the transpose of
        ``project_t``.

        ``x`` None (no input this step) gives the bias alone, ``batch`` rows.
        """
        GH = self.GATES * self.H
        if x is None:
            out = self.xp.zeros((batch, GH), dtype=self.dtype)
            if self.b_keys:
                out += self._stack(self.b_keys)
            return out
        return self.project_t(x).T.reshape(x.shape[:-1] + (GH,))

    def projection_backward(self, x, dxproj, need_dx: bool = True):
        """Reverse of ``project``: accumulates W_x and b grads, returns dx (or None, also
        when ``need_dx`` is False because nothing below learns, e.g. a one-hot input)."""
        dp = dxproj.reshape(-1, dxproj.shape[-1]).T
        if x is None:
            if self.b_keys:
                self._accumulate(self.b_keys, dp.sum(axis=1))
            return None
        return self.projection_backward_t(x, dp, need_dx)

    def project_t(self, x, out=None):
        """Feature-major input projection of N rows: W_x x^T + b, (N, D) -> (G*H, N),
        into ``out`` when given."""
        out = self.xp.matmul(self._stack(self.hx_keys), x.reshape(-1, x.shape[-1]).T, out=out)
        if self.b_keys:
            out += self._stack(self.b_keys)[:, None]
        return out

    def projection_backward_t(self, x, dproj, need_dx: bool = True):
        """Reverse of ``project_t``: dproj (G*H, N); accumulates W_x and b grads and
        returns dx (N, D), or None when ``need_dx`` is False."""
        if self.b_keys:
            self._accumulate(self.b_keys, dproj.sum(axis=1))
        self._accumulate(self.hx_keys, dproj @ x.reshape(-1, x.shape[-1]))
        return self.input_grad_t(x, dproj) if need_dx else None

    def input_grad_t(self, x, dproj):
        """The gradient at the input, (W_x^T dproj)^T, shaped like ``x``."""
        return (dproj.T @ self._stack(self.hx_keys)).reshape(x.shape)

    # ---------------------------------------------------------- hidden weights
    #: the stacked W_h (G*H, H) held by ``hold_weights`` for a run of steps
    _wh = None

    def hold_weights(self, on: bool, w_h=None) -> None:
        """Hold the stacked W_h while a caller runs many steps with unchanged weights
        (tied, unfused params are concatenated once per batch instead of every step),
        or the caller's copy ``w_h`` of it; ``hold_weights(False)`` drops it before the
        weights change."""
        self._wh = (self._stack(self.hh_keys) if w_h is None else w_h) if on else None

    def _w_h(self):
        return self._wh if self._wh is not None else self._stack(self.hh_keys)

    def hidden_projection_t(self, h, out=None):
        """W_h h for all gates, (H, B) -> (G*H, B), into ``out`` when given."""
        return self.xp.matmul(self._w_h(), h, out=out)

    def _hidden_backward_t(self, dhproj, h, defer: bool, need: bool = True):
        """Reverse of ``hidden_projection_t``: accumulates the W_h grads dhproj h^T
        (unless ``defer``: a caller running all steps adds them with one GEMM) and
        returns the gradient at h, W_h^T dhproj (None when not ``need``-ed)."""
        if not defer:
            self._accumulate(self.hh_keys, dhproj @ h.T)
        return self.xp.matmul(self._w_h().T, dhproj) if need else None

    # ---------------------------------------------------------------- compute
    def _batch(self, state):
        if state is None:
            return None
        return (state[0] if isinstance(state, (tuple, list)) else state).shape[0]

    def forward(self, ctx, xs, state):
        try:
            x = one_array(xs[self.data_pos])
        except LayerError as e:
            raise LayerError(f"{self._where()}: {e}") from None
        if x is None:
            batch = self._batch(state)
            if batch is None:
                raise LayerError(f"{self._where()}: copy {ctx.step} gets no input and no state; "
                                 f"check the data source's shift")
        else:
            batch = x.shape[0]
            if x.ndim != 2 or x.shape[1] != self.D:
                raise LayerError(f"{self._where()}: input of shape {tuple(x.shape)}, expected "
                                 f"(batch, {self.D})")
        if state is None:
            state = self.zero_state(batch)
        xproj = self.project(x, batch)
        y, new_state, step_cache = self.step_from_projection(xproj, state, ctx.mask)
        return y, new_state, (x, len(xs), step_cache)

    def backward(self, ctx, dy, dstate, cache):
        x, n, step_cache = cache
        dxproj, dprev = self.step_backward(dy, dstate, step_cache)
        dxs = [None] * n
        dxs[self.data_pos] = self.projection_backward(x, dxproj)
        return dxs, dprev

    def zero_state(self, batch):
        return self.xp.zeros((batch, self.H), dtype=self.dtype)

    def step_from_projection(self, xproj, state, mask):
        """One step in the row-major layout of the layer contract: xproj (B, G*H), state
        (B, H) arrays; returns (y, new state, step cache). Runs ``cell_step`` on
        transposed views."""
        h, st, cache = self.cell_step(xproj.T, _transposed(state), self._mask(mask))
        y = h.T
        if isinstance(st, tuple):  # the output and the state's h stay one array
            st = (y,) + _transposed(st[1:])
        else:
            st = y if st is h else st.T
        return y, st, cache

    def step_backward(self, dy, dstate, step_cache):
        """Reverse of ``step_from_projection``: accumulates the W_h grads and returns
        (dxproj (B, G*H), dprev state)."""
        dx, _, dprev = self.cell_backward(_transposed(dy), _transposed(dstate), step_cache)
        return dx.T, _transposed(dprev)

    def cell_step(self, xproj, state, mm, pre=None):
        """One step, feature-major: xproj (G*H, B) the input projection, state (H, B)
        arrays, mm the mask as (1, B) rows or None, ``pre`` a (G*H, B) scratch array
        the gates are computed in (it stays in the cache). Returns (h', state', cache)."""
        h = state[0] if isinstance(state, tuple) else state
        pre = self.hidden_projection_t(h, out=pre)
        pre += xproj
        return self.cell_from_pre(pre, state, mm)

    #: True when a step needs only the sum of its two projections, W_x x + b + W_h h
    #: (RNN, LSTM; the GRU applies r to W_ch h alone): then a caller may compute that
    #: sum with one GEMM over the stacked [h; x; 1] and call ``cell_from_pre``
    sums_projections = True

    def cell_from_pre(self, pre, state, mm):
        """The rest of ``cell_step`` given pre = xproj + W_h h (G*H, B), computed in
        place; same returns and cache."""
        raise NotImplementedError

    def cell_backward(self, dh, dstate, cache, out_x=None, out_h=None, defer=False,
                      need_dprev=True):
        """Reverse of ``cell_step``: (dxproj, dhproj, dprev state), feature-major.
        dhproj (the gradient at W_h h) is dxproj itself except in the GRU; ``out_x`` and
        ``out_h`` receive them when given; ``defer`` leaves the W_h grads to the caller;
        without ``need_dprev`` (the first step of a state nothing learns from) dprev is
        None."""
        raise NotImplementedError


def _transposed(state):
    """A state (array, tuple of arrays or None) with each array transposed (a view)."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return tuple(None if s is None else s.T for s in state)
    return state.T


@register(pb.kRNN)
class RNNLayer(_Recurrent):
    """Vanilla recurrent layer (kRNN, rnn_conf: dim_hidden, bias_term, activation).

    h' = act(x W_hx^T + h W_hh^T + b),  act = tanh (TANH, default) or max(·, 0) (RELU).
    Output y = h'; state h (B, H).
    Params in order: w_hx (H×D), w_hh (H×H), then b (H) if bias_term.
    """

    TYPE_NAME = "kRNN"
    CONF_FIELD = "rnn_conf"
    required = (("rnn_conf", "dim_hidden"),)
    GATES = 1

    @classmethod
    def _keys(cls, conf):
        return ("w_hx",), ("w_hh",), (("b",) if conf.rnn_conf.bias_term else ())

    def setup(self, srcs):
        act = self.conf.rnn_conf.activation
        if act not in (pb.TANH, pb.RELU):
            raise LayerError(f"{self._where()}: rnn_conf.activation "
                             f"{pb.ActivationType.Name(act)} is not supported; use TANH or RELU")
        self.relu = act == pb.RELU
        super().setup(srcs)

    def cell_from_pre(self, pre, h, mm):
        h_raw = rnn_cell_forward(self.xp, pre, self.relu)
        h_new = self._blend(h_raw, h, mm)
        return h_new, h_new, (h, h_raw, mm)

    def cell_backward(self, dy, dstate, cache, out_x=None, out_h=None, defer=False,
                      need_dprev=True):
        h, h_raw, mm = cache
        dh, dkeep = self._incoming(dy, dstate, h, mm)
        dpre = rnn_cell_backward(self.xp, dh, h_raw, self.relu, out=out_x)
        dprev = self._hidden_backward_t(dpre, h, defer, need_dprev)
        if dprev is not None and dkeep is not None:
            dprev += dkeep
        return dpre, dpre, dprev


@register(pb.kGRU)
class GRULayer(_Recurrent):
    """Gated recurrent unit (kGRU, gru_conf: dim_hidden, bias_term), SINGA's equations.

    z = σ(x W_zx^T + h W_zh^T + b_z)
    r = σ(x W_rx^T + h W_rh^T + b_r)
    c = tanh(x W_cx^T + b_c + r ⊙ (h W_ch^T))
    h' = z ⊙ h + (1 − z) ⊙ c
    Output y = h'; state h (B, H).
    Params in order: z_hx, r_hx, c_hx (H×D), z_hh, r_hh, c_hh (H×H), then z_b, r_b, c_b (H)
    if bias_term.
    """

    TYPE_NAME = "kGRU"
    CONF_FIELD = "gru_conf"
    required = (("gru_conf", "dim_hidden"),)
    GATES = 3
    #: the gradient at W_h h differs from the one at the input projection (r ⊙ in c)
    separate_dhproj = True
    sums_projections = False

    @classmethod
    def _keys(cls, conf):
        b = ("z_b", "r_b", "c_b") if conf.gru_conf.bias_term else ()
        return ("z_hx", "r_hx", "c_hx"), ("z_hh", "r_hh", "c_hh"), b

    def cell_step(self, xproj, h, mm, pre=None):
        hproj = self.hidden_projection_t(h, out=pre)
        h_raw, gates = gru_cell_forward(self.xp, xproj, hproj, h)
        h_new = self._blend(h_raw, h, mm)
        return h_new, h_new, (h, gates, mm)

    def cell_backward(self, dy, dstate, cache, out_x=None, out_h=None, defer=False,
                      need_dprev=True):
        h, gates, mm = cache
        dh, dkeep = self._incoming(dy, dstate, h, mm)
        dx, dhp, dprev = gru_cell_backward(self.xp, dh, h, *gates, out_x=out_x, out_h=out_h)
        back = self._hidden_backward_t(dhp, h, defer, need_dprev)
        if back is None:
            return dx, dhp, None
        dprev += back
        if dkeep is not None:
            dprev += dkeep
        return dx, dhp, dprev


@register(pb.kLSTM)
class LSTMLayer(_Recurrent):
    """Long short-term memory (kLSTM, lstm_conf: dim_hidden, bias_term, forget_bias).

    i = σ(x W_ix^T + h W_ih^T + b_i),  f = σ(x W_fx^T + h W_fh^T + b_f)
    o = σ(x W_ox^T + h W_oh^T + b_o),  g = tanh(x W_gx^T + h W_gh^T + b_g)
    c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')
    Output y = h'; state the tuple (h, c), each (B, H).
    Params in order: i_hx, f_hx, o_hx, g_hx (H×D), i_hh, f_hh, o_hh, g_hh (H×H), then
    i_b, f_b, o_b, g_b (H) if bias_term; f_b starts at forget_bias [1], the others at 0.
    A first-to-last source's output y becomes the state (y, 0).
    """

    TYPE_NAME = "kLSTM"
    CONF_FIELD = "lstm_conf"
    required = (("lstm_conf", "dim_hidden"),)
    GATES = 4

    @classmethod
    def _keys(cls, conf):
        b = ("i_b", "f_b", "o_b", "g_b") if conf.lstm_conf.bias_term else ()
        return ("i_hx", "f_hx", "o_hx", "g_hx"), ("i_hh", "f_hh", "o_hh", "g_hh"), b

    def _bias_default(self, key):
        if key == "f_b":
            return ("constant", float(self.conf.lstm_conf.forget_bias))
        return ("constant", 0.0)

    def zero_state(self, batch):
        xp = self.xp
        return (xp.zeros((batch, self.H), dtype=self.dtype),
                xp.zeros((batch, self.H), dtype=self.dtype))

    def state_from_source(self, y):
        return (y, self.xp.zeros_like(y))

    def source_grad_from_state(self, dstate):
        return dstate[0]

    def cell_from_pre(self, pre, state, mm):
        h, c = state
        h_raw, c_raw, gates = lstm_cell_forward(self.xp, pre, c)
        h_new, c_new = self._blend(h_raw, h, mm), self._blend(c_raw, c, mm)
        return h_new, (h_new, c_new), (h, c, gates, mm)

    def cell_backward(self, dy, dstate, cache, out_x=None, out_h=None, defer=False,
                      need_dprev=True):
        h, c, gates, mm = cache
        dh_s, dc = (None, None) if dstate is None else dstate
        dh, dkeep_h = self._incoming(dy, dh_s, h, mm)
        dkeep_c = None
        if dc is not None and mm is not None:
            dc, dkeep_c = mm[0] * dc, mm[1] * dc
        dpre, dc_prev = lstm_cell_backward(self.xp, dh, dc, c, *gates, out=out_x)
        dh_prev = self._hidden_backward_t(dpre, h, defer, need_dprev)
        if dh_prev is None:
            return dpre, dpre, None
        if dkeep_h is not None:
            dh_prev += dkeep_h
        if dkeep_c is not None:
            dc_prev += dkeep_c
        return dpre, dpre, (dh_prev, dc_prev)
