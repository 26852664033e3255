"""Layer family: recurrent (kRNN, kGRU, kLSTM).

A recurrent layer computes one time step per unrolled copy, reading its own
previous copy's state as context. It runs in two ways, both through the step
functions ``_step`` / ``_step_backward`` below and the cell maths of
``engine/layers/cells.py``:

* one copy at a time (``forward`` / ``backward``, the contract of
  ``engine/layers/base.py``, used by the reference executor);
* all T copies of a batch in one call (``forward_block`` / ``backward_block``,
  the block interface the planned executor uses): one GEMM for the input
  projections of all steps, the step loop over the recurrent part only, and
  the weight gradients of all steps as one GEMM each after the backward loop.
  A one-hot input (a source with ``one_hot_rows``, kOneHot) is not multiplied:
  its projection is a column of W_x + b, gathered (see ``forward_block``), and
  dW_x the gradient's columns added up by token. A narrow dense input
  (D + 1 <= FOLD_INPUT · H) into a cell that only needs the sum of its
  projections (RNN, LSTM) is folded into the step GEMM instead: each step is ONE
  GEMM [W_h W_x b] @ [h; x; 1], and all weight gradients one GEMM with the same
  stacked block. That skips writing and re-reading a (G·H, T·B) projection block
  (20 MB for LSTM 512).
  The step buffers are kept from batch to batch, so a step does not fault in
  fresh pages.

Layout. Inside, the maths is feature-major: states and gates are (features, B)
arrays, a step's GEMM is W_h (G·H, H) @ h (H, B), which BLAS runs faster than
the row-major h @ W_h^T at these batch sizes (``python -m bench.gemm_layout``).
Outside, the layer contract is row-major: outputs and states are (B, H). A
block's output is a transposed view (T·B, H) of the feature-major state block.

Params. Each gate group (input weights W_x, hidden weights W_h, biases b) is
stored as one stacked array whose row blocks are the params' data and grad
(``GateWeights``), so the step GEMMs read it without copying.

Sources. Exactly one *data* source (one-to-one or one-to-all, ``out_shape``
(D,)); at most one *initial-state* source connected kUnrollFirstToLast
(encoder -> decoder, ``out_shape`` (H,)), whose output becomes copy 0's state
(``state_from_source``) and is passed as ``None`` in ``xs``.

Masking. ``ctx.mask`` is None or a (B,) array of 1/0: a masked sequence keeps
its previous state exactly, new = m ⊙ new + (1 − m) ⊙ prev for h (and c), and
outputs that state. A data position holding None (a one-to-one source with a
shift, at the first copies) means no input this step: the projection is b.

Direction. ``direction: kBackward`` in the layer's conf runs the pass from the
last copy to the first: copy i reads copy i+1's state as its context
(``context_sources`` gives offset −1, so the unroller draws (i+1)#L -> i#L), and
copy T−1 starts from the initial state (zeros, or the first-to-last source,
which the unroller connects to copy T−1). With masks, the padded steps at the
end of a sequence keep that initial state, so a sequence's backward pass starts
at its last valid step and padding never reaches the state. A backward layer
never carries state across batches (engine/worker.py). A forward and a backward
layer over the same source, joined by a kConcate, make a bidirectional layer.
"""
from __future__ import annotations

from engine.layers.base import Layer, LayerError, add_grads, one_array, register
from engine.layers import cells
from engine.layers.cells import GRUCell, LSTMCell, RNNCell
from engine.proto import job_pb2 as pb


class GateWeights:
    """A recurrent layer's params as three stacked gate groups: ``"x"`` W_x (G·H, D),
    ``"h"`` W_h (G·H, H), ``"b"`` b (G·H,), gate k in rows k·H..(k+1)·H.

    ``fuse()`` stores each group as one array whose row blocks are the params' data and
    grad (views); a group holding a param tied to another layer's stays separate and is
    concatenated when read. In a Net the params' grads already lie back to back in the
    net's gradient buffer (``engine.params.GradBuffer``, declaration order), so a group's
    stacked grad is a view of that buffer and every gradient stays in it; a param outside
    a Net (a layer tested alone) gets a concatenated one. A val/test net whose layer uses
    the training net's params ``adopt``s that layer's stacked arrays."""

    def __init__(self, layer, groups: dict):
        self.layer = layer
        self.groups = groups            # name -> param keys, in gate order
        self.stacked: dict = {}         # name -> (data, grad) of a fused group

    def keys(self, group: str) -> tuple:
        return self.groups[group]

    def fuse(self) -> None:
        xp, H = self.layer.xp, self.layer.H
        for group, keys in self.groups.items():
            ps = [self.layer.params[k] for k in keys]
            if len(ps) < 2 or any(p.owner_layer != self.layer.name or p.data is None for p in ps):
                continue
            data = xp.concatenate([p.data for p in ps], axis=0)
            buffer = ps[0].grad_buffer
            if buffer is None:
                grad = xp.concatenate([p.grad for p in ps], axis=0)
            else:
                grad = buffer.stacked(ps)
                if grad is None:  # the buffer lays a layer's own params out back to back
                    raise RuntimeError(f"{self.layer.name}: the grads of gate group {group} "
                                       f"are not adjacent in the net's gradient buffer")
            for k, p in enumerate(ps):
                p.data = data[k * H:(k + 1) * H]
                p.grad = grad[k * H:(k + 1) * H]
            self.stacked[group] = (data, grad)

    def adopt(self, other: "GateWeights") -> None:
        """Read ``other``'s stacked arrays for the groups whose params are now the same
        objects as ``other``'s; the rest are concatenated when read."""
        mine, theirs = self.layer.params, other.layer.params
        self.stacked = {g: arrays for g, arrays in other.stacked.items()
                        if all(mine.get(k) is theirs.get(k) for k in self.groups[g])}

    def data(self, group: str):
        """The group's weights stacked along axis 0 (a stored array after ``fuse``)."""
        fused = self.stacked.get(group)
        if fused is not None:
            return fused[0]
        keys = self.groups[group]
        if len(keys) == 1:
            return self.layer.params[keys[0]].data
        return self.layer.xp.concatenate([self.layer.params[k].data for k in keys], axis=0)

    def add_grad(self, group: str, g) -> None:
        """Accumulate a stacked gradient (rows k·H..(k+1)·H: gate k) into the group."""
        fused = self.stacked.get(group)
        if fused is not None:
            fused[1][...] += g
            return
        H = self.layer.H
        for k, key in enumerate(self.groups[group]):
            self.layer.params[key].grad += g[k * H:(k + 1) * H]


class Recurrent(Layer):
    """Shared set-up, state handling and step loops of the recurrent layers.

    Subclasses set ``CONF_FIELD`` and ``required``, give the param keys (``_keys``) and
    the cell (``make_cell``)."""

    recurrent = True
    has_params = True
    CONF_FIELD = ""
    #: fold the input projection into the step GEMM when D + 1 <= FOLD_INPUT · H (and the
    #: cell sums its projections)
    FOLD_INPUT = 0.5

    @classmethod
    def _keys(cls, conf):
        """(input-to-hidden keys, hidden-to-hidden keys, bias keys), in param order."""
        raise NotImplementedError

    @classmethod
    def default_param_names(cls, conf):
        hx, hh, b = cls._keys(conf)
        return list(hx) + list(hh) + list(b)

    @classmethod
    def context_sources(cls, conf):
        """Copy i reads copy i−1 (kForward) or copy i+1 (kBackward) of this layer."""
        backward = getattr(conf, cls.CONF_FIELD).direction == pb.kBackward
        return [(conf.name, -1 if backward else 1)]

    def make_cell(self):
        raise NotImplementedError

    def _bias_default(self, key):
        return ("constant", 0.0)

    # ------------------------------------------------------------------ setup
    def setup(self, srcs):
        self.cell = self.make_cell()
        self.H = H = int(getattr(self.conf, self.CONF_FIELD).dim_hidden)
        data, init = [], []
        for k, conn in enumerate(self.src_conn[:len(srcs)]):
            (init if conn == pb.kUnrollFirstToLast else data).append(k)
        data += list(range(len(self.src_conn), len(srcs)))  # no connection given: one-to-one
        names = [s.name for s in srcs]
        if len(data) != 1:
            raise self.error(
                f"has {len(data)} data sources {[names[k] for k in data]}; it needs exactly one "
                f"srclayer (one-to-one or one-to-all) giving (D,) float features; join several "
                f"with a kConcate layer first")
        if len(init) > 1:
            raise self.error(f"has {len(init)} kUnrollFirstToLast sources "
                             f"{[names[k] for k in init]}; at most one can give the initial state")
        self.data_pos = data[0]
        shape = tuple(srcs[self.data_pos].out_shape)
        if len(shape) != 1 or shape[0] <= 0:
            raise self.error(
                f"data source {names[self.data_pos]!r} has out_shape {shape}; a recurrent layer "
                f"needs (D,) float features per row; put a kOneHot or kEmbedding layer between "
                f"token ids and it, or flatten the source")
        self.D = D = int(shape[0])
        #: the data source's rows are one-hot codes (kOneHot): a block gathers the columns
        #: of W_x instead of multiplying x by it (see forward_block)
        self.one_hot_input = bool(getattr(srcs[self.data_pos], "one_hot_rows", False))
        if init:
            ishape = tuple(srcs[init[0]].out_shape)
            if ishape != (H,):
                raise self.error(
                    f"initial-state source {names[init[0]]!r} (kUnrollFirstToLast) has out_shape "
                    f"{ishape} but the state is ({H},); make the encoder's hidden size equal this "
                    f"layer's dim_hidden")
        self.init_pos = init[0] if init else None
        hx, hh, b = self._keys(self.conf)
        for key in hx:
            self.add_param(key, (H, D), ("uniform", -0.08, 0.08), fan_in=D, fan_out=H)
        for key in hh:
            self.add_param(key, (H, H), ("uniform", -0.08, 0.08), fan_in=H, fan_out=H)
        for key in b:
            self.add_param(key, (H,), self._bias_default(key), fan_in=H, fan_out=H)
        self.weights = GateWeights(self, {"x": tuple(hx), "h": tuple(hh), "b": tuple(b)})
        self.has_bias = bool(b)
        #: the key of a bias added to rows ``hbias_from:`` of W_h h right after its GEMM (the
        #: GRU's b_hn, ``GRULayer``), or None; its gradient is the sum of those rows of
        #: dL/d(W_h h)
        self.hbias_key = None
        self.hbias_from = 0
        #: the pass runs from copy T−1 down to copy 0 (direction: kBackward)
        self.reverse = self.reverse_pass(self.conf)
        self.out_shape = (H,)
        #: step blocks kept across batches by forward_block / backward_block
        self._blocks: dict = {}

    def params_ready(self, like=None) -> None:
        if like is None:
            self.weights.fuse()
        else:
            self.weights.adopt(like.weights)

    def _add_hbias(self, hproj) -> None:
        """hproj[hbias_from:] += the hidden-side bias (columns are sequences)."""
        if self.hbias_key is not None:
            hproj[self.hbias_from:] += self.params[self.hbias_key].data[:, None]

    def _hbias_grad(self, dhproj) -> None:
        """Accumulate the hidden-side bias's gradient from dL/d(W_h h) (G·H, N)."""
        if self.hbias_key is not None:
            self.params[self.hbias_key].grad += dhproj[self.hbias_from:].sum(axis=1)

    @property
    def folds_input(self) -> bool:
        """Whether a block runs each step as one GEMM over [h; x; 1] (see the docstring); a
        one-hot input is gathered instead, never folded."""
        return (self.cell.sums_projections and self.hbias_key is None
                and not self.one_hot_input and self.D + 1 <= self.FOLD_INPUT * self.H)

    # ----------------------------------------------------------------- state
    def zero_state(self, batch):
        xp = self.xp
        parts = tuple(xp.zeros((batch, self.H), dtype=self.dtype) for _ in range(self.cell.parts))
        return self._outer(parts)

    def _outer(self, parts):
        """Row-major state as the layer contract passes it: h, or the tuple (h, c)."""
        return parts[0] if len(parts) == 1 else tuple(parts)

    def _inner(self, state):
        """Feature-major state parts (transposed views) of a row-major state."""
        parts = state if isinstance(state, tuple) else (state,)
        return tuple(None if s is None else s.T for s in parts)

    # ---------------------------------------------------------- one step, maths
    def _mask(self, mask):
        """(m, 1 − m) as (1, B) rows of self.dtype, or None."""
        if mask is None:
            return None
        m = self.xp.asarray(mask, dtype=self.dtype).reshape(1, -1)
        return m, 1 - m

    def _step(self, pre, xproj, parts, mm):
        """One step, feature-major: ``pre`` (G·H, B) holds W_x x + b + W_h h (cells that sum
        their projections) or W_h h (the GRU, with ``xproj`` = W_x x + b); ``parts`` the
        state parts before the step; ``mm`` the mask rows. Returns (new parts, cache)."""
        raw, cache = self.cell.forward(self.xp, pre, xproj, parts)
        if mm is not None:
            raw = tuple(mm[0] * r + mm[1] * p for r, p in zip(raw, parts))
        return raw, (parts, cache, mm)

    def _step_backward(self, dh, dstate, cache, w_hT, out_x=None, out_h=None, need_dprev=True):
        """Reverse of ``_step``: ``dh`` the gradient at the step's output h', ``dstate`` the
        gradient at its state parts (from the next step; None at the last). Returns
        (dxproj, dhproj, dprev parts); the W_h gradient (dhproj h^T) is the caller's; dprev
        is None without ``need_dprev`` (the first step of a state nothing learns from)."""
        xp = self.xp
        parts, cache, mm = cache
        d = [None] * len(parts) if dstate is None else list(dstate)
        d[0] = add_grads(dh, d[0])
        if d[0] is None:
            d[0] = xp.zeros_like(parts[0])
        keep = [None] * len(parts)
        if mm is not None:  # masked columns pass their gradient straight to the old state
            for k, g in enumerate(d):
                if g is not None:
                    d[k], keep[k] = mm[0] * g, mm[1] * g
        dx, dhp, direct = self.cell.backward(xp, d[0], d[1:], parts, cache, out_x, out_h)
        if not need_dprev:
            return dx, dhp, None
        back = xp.matmul(w_hT, dhp)  # the part through W_h h, which reaches h only
        dprev = []
        for k, (g, kept) in enumerate(zip(direct, keep)):
            if k == 0:
                if g is None:
                    g = back
                else:
                    g += back
            if kept is not None:
                if g is None:
                    g = kept
                else:
                    g += kept
            dprev.append(g)
        return dx, dhp, tuple(dprev)

    # ------------------------------------------------------- one copy (reference)
    def forward(self, ctx, xs, state):
        xp = self.xp
        try:
            x = one_array(xs[self.data_pos])
        except LayerError as e:
            raise self.error(str(e)) from None
        if x is None:
            if state is None:
                raise self.error(f"copy {ctx.step} gets no input and no state; check the data "
                                 f"source's shift")
            batch = self._inner(state)[0].shape[1]
        else:
            batch = x.shape[0]
            if x.ndim != 2 or x.shape[1] != self.D:
                raise self.error(f"input of shape {tuple(x.shape)}, expected (batch, {self.D})")
        parts = self._inner(self.zero_state(batch) if state is None else state)
        w = self.weights
        if x is None:
            xproj = xp.zeros((self.cell.gates * self.H, batch), dtype=self.dtype)
        else:
            xproj = xp.matmul(w.data("x"), x.T)
        if self.has_bias:
            xproj += w.data("b")[:, None]
        pre = xp.matmul(w.data("h"), parts[0])
        self._add_hbias(pre)
        if self.cell.sums_projections:
            pre += xproj
        new, cache = self._step(pre, xproj, parts, self._mask(ctx.mask))
        y = new[0].T
        return y, self._outer((y,) + tuple(p.T for p in new[1:])), (x, len(xs), cache)

    def backward(self, ctx, dy, dstate, cache):
        x, n, step_cache = cache
        w = self.weights
        dx_pre, dhp, dprev = self._step_backward(
            None if dy is None else dy.T, None if dstate is None else self._inner(dstate),
            step_cache, w.data("h").T)
        w.add_grad("h", dhp @ step_cache[0][0].T)
        self._hbias_grad(dhp)
        if self.has_bias:
            w.add_grad("b", dx_pre.sum(axis=1))
        dxs = [None] * n
        if x is not None:
            w.add_grad("x", dx_pre @ x)
            dxs[self.data_pos] = dx_pre.T @ w.data("x")
        return dxs, self._outer(tuple(d.T for d in dprev))

    # --------------------------------------------------- all copies (planned)
    def supports_block(self) -> bool:
        return True

    def _buffer(self, what, shape):
        """A block of this layer kept across batches (rewritten every batch)."""
        buf = self._blocks.get(what)
        if buf is None or buf.shape != shape or buf.dtype != self.dtype:
            buf = self._blocks[what] = self.xp.empty(shape, dtype=self.dtype)
        return buf

    def forward_block(self, ctx, xs, state):
        """The step loop over T copies, feature-major. ``hs`` (H, (T+1)·B) holds the states:
        forward, column block 0 the initial h and block t+1 the output of step t; backward
        (``reverse``), block T the initial h and block t the output of step t, so the state
        before step t is block t (forward) or t+1 (backward) and the outputs are T
        consecutive blocks either way. Step t's gates are computed in slice t of one
        (T, G·H, B) block. Either the input projections of all steps are one GEMM
        (G·H, T·B), added per step to W_h h; or, folding the input, ``hs`` is the top of
        z = [h; x; 1] (H+D+1, (T+1)·B), x_t sitting in the column block of the state before
        step t, and each step is ONE GEMM [W_h W_x b] z_t.

        One-hot input (``one_hot_input``): W_x x + b is a column of the table W_x + b, so
        it is gathered, not multiplied, and never folded: each step is the GEMM W_h h plus
        the step's gathered columns (cells that sum their projections), or the input
        projections of all steps are one gather (the GRU). Against the folded GEMM this
        measured 8 ms less per LSTM 512 batch (the GEMM's K shrinks from H+D+1 to H)."""
        xp = self.xp
        x = one_array(xs[self.data_pos])
        parts = self._inner(state)
        B = parts[0].shape[1]
        H, D, GH = self.H, self.D, self.cell.gates * self.H
        N = x.shape[0]
        T = N // B
        w = self.weights
        fold = self.folds_input
        rev = self.reverse
        before = (lambda t: t + 1) if rev else (lambda t: t)  # block of the state before step t
        first = T if rev else 0                               # block of the initial state
        pre = self._buffer("pre", (T, GH, B))
        idx = table = None
        if self.one_hot_input:
            idx = cells.one_hot_index(xp, x)
            table = self._buffer("table", (GH, D))
            table[...] = w.data("x")
            if self.has_bias:
                table += w.data("b")[:, None]
        wc = xproj = None
        if fold:
            nb = 1 if self.has_bias else 0
            z = self._buffer("z", (H + D + nb, N + B))
            xcols = slice(B, N + B) if rev else slice(0, N)
            z[H:H + D, xcols] = x.T
            if nb:
                z[H + D, xcols] = 1
            wc = self._buffer("wc", (GH, H + D + nb))
            wc[:, :H] = w.data("h")
            wc[:, H:H + D] = w.data("x")
            if nb:
                wc[:, H + D] = w.data("b")
            hs = z[:H]
        else:
            z = None
            if idx is None:
                xproj = xp.matmul(w.data("x"), x.T, out=self._buffer("xproj", (GH, N)))
                if self.has_bias:
                    xproj += w.data("b")[:, None]
            elif not self.cell.sums_projections:
                xproj = cells.gather_columns(xp, self._buffer("xproj", (GH, N)), table, idx)
            hs = self._buffer("hs", (H, N + B))
        w_h = w.data("h")
        hs[:, first * B:(first + 1) * B] = parts[0]
        cur = (hs[:, first * B:(first + 1) * B],) + parts[1:]
        m = None if ctx.mask is None else ctx.mask.reshape(T, B)
        caches = [None] * T
        for t in (range(T - 1, -1, -1) if rev else range(T)):
            cols = slice(t * B, (t + 1) * B)
            mm = None if m is None else self._mask(m[t])
            if fold:
                zt = z[:, before(t) * B:(before(t) + 1) * B]
                new, sc = self._step(xp.matmul(wc, zt, out=pre[t]), None, cur, mm)
            else:
                p = xp.matmul(w_h, cur[0], out=pre[t])
                self._add_hbias(p)
                if xproj is None:  # one-hot input into a cell that sums its projections
                    cells.gather_columns(xp, p, table, idx[cols], add=True)
                elif self.cell.sums_projections:
                    p += xproj[:, cols]
                new, sc = self._step(p, None if xproj is None else xproj[:, cols], cur, mm)
            out = t if rev else t + 1
            nxt = hs[:, out * B:(out + 1) * B]
            nxt[...] = new[0]
            cur = (nxt,) + new[1:]
            caches[t] = sc
        # the carried state must not alias the blocks the next batch rewrites
        final = self._outer(tuple(xp.ascontiguousarray(s.T) for s in cur))
        ys = hs[:, :N] if rev else hs[:, B:]
        return ys.T, final, (x, len(xs), caches, hs, z, idx)

    def backward_block(self, ctx, dy, cache):
        """Reverse of ``forward_block``: the step loop in the opposite direction of the pass,
        each step's input- and hidden-projection gradients written into (G·H, T·B) blocks,
        then every weight gradient of the batch from one GEMM per group (one in all when the
        input is folded; the columns of a one-hot input's dW_x added up instead of a GEMM)
        and the input gradient from one GEMM."""
        xp = self.xp
        x, n_srcs, caches, hs, z, idx = cache
        T = len(caches)
        N = x.shape[0]
        B = N // T
        H, D, GH = self.H, self.D, self.cell.gates * self.H
        dx_all = self._buffer("dxproj", (GH, N))
        dh_all = self._buffer("dhproj", (GH, N)) if self.cell.separate_dhproj else dx_all
        w = self.weights
        w_hT = w.data("h").T  # a contiguous copy measured no faster (bench.onehot)
        # dy feature-major (an InnerProduct above gives it so: dyT is then a view): each
        # step's dL/dh' is a block with contiguous rows, added in place to the gradient the
        # next step sends back (which this loop owns)
        dyT = cells.transposed(xp, dy, self._buffer("dyT", (H, N)))
        rev = self.reverse
        start = T - 1 if rev else 0          # the pass's first step: dprev is the initial state's
        before = slice(B, N + B) if rev else slice(0, N)  # the states before steps 0..T-1
        dst = None
        for t in (range(T) if rev else range(T - 1, -1, -1)):
            cols = slice(t * B, (t + 1) * B)
            dh = dyT[:, cols]
            if dst is not None:
                dst[0][...] += dh
                dh = None
            _, _, dst = self._step_backward(
                dh, dst, caches[t], w_hT, out_x=dx_all[:, cols],
                out_h=None if dh_all is dx_all else dh_all[:, cols],
                need_dprev=t != start or ctx.need_state_grad)
        if z is None:
            w.add_grad("h", dh_all @ hs[:, before].T)  # sum_t dhproj_t h_t^T
            self._hbias_grad(dh_all)
            if idx is None:
                if self.has_bias:
                    w.add_grad("b", dx_all.sum(axis=1))
                w.add_grad("x", dx_all @ x)
            else:
                dtable = self._buffer("dtable", (GH, D))
                dtable[...] = 0
                cells.scatter_columns(xp, dtable, dx_all, idx)
                if self.has_bias:  # every column of dx_all went into one column of dtable
                    w.add_grad("b", dtable.sum(axis=1))
                w.add_grad("x", dtable)
        else:
            g = dx_all @ z[:, before].T            # [dW_h dW_x db] = sum_t dpre_t z_t^T
            w.add_grad("h", g[:, :H])
            w.add_grad("x", g[:, H:H + D])
            if self.has_bias:
                w.add_grad("b", g[:, H + D])
        dxs = [None] * n_srcs
        need = ctx.need_input_grads
        if need is None or need[self.data_pos]:
            # dx = dpre^T W_x, made feature-major: a recurrent layer below reads dy^T as a view
            dxs[self.data_pos] = (w.data("x").T @ dx_all).T.reshape(x.shape)
        return dxs, None if dst is None else self._outer(tuple(d.T for d in dst))


@register(pb.kRNN)
class RNNLayer(Recurrent):
    """Vanilla recurrent layer (kRNN, rnn_conf: dim_hidden, bias_term, activation, direction).

    h' = act(x W_hx^T + h W_hh^T + b),  act = tanh (TANH, default), max(·, 0) (RELU) or the
    identity (LINEAR: a linear recurrence).
    Output y = h'; state h (B, H); h is copy i−1's state, or copy i+1's with
    direction: kBackward (module docstring).
    Params in order: w_hx (H×D), w_hh (H×H), then b (H) if bias_term.
    """

    CONF_FIELD = "rnn_conf"
    required = (("rnn_conf", "dim_hidden"),)

    @classmethod
    def _keys(cls, conf):
        return ("w_hx",), ("w_hh",), (("b",) if conf.rnn_conf.bias_term else ())

    def make_cell(self):
        act = self.conf.rnn_conf.activation
        if act not in (pb.TANH, pb.RELU, pb.LINEAR):
            raise self.error(f"rnn_conf.activation {pb.ActivationType.Name(act)} is not "
                             f"supported; use TANH, RELU or LINEAR")
        return RNNCell(relu=act == pb.RELU, linear=act == pb.LINEAR)


@register(pb.kGRU)
class GRULayer(Recurrent):
    """Gated recurrent unit (kGRU, gru_conf: dim_hidden, bias_term, recurrent_bias,
    direction), SINGA's equations.

    z = σ(x W_zx^T + h W_zh^T + b_z)
    r = σ(x W_rx^T + h W_rh^T + b_r)
    c = tanh(x W_cx^T + b_c + r ⊙ (h W_ch^T + b_ch))     b_ch only with recurrent_bias
    h' = z ⊙ h + (1 − z) ⊙ c
    Output y = h'; state h (B, H); h is copy i−1's state, or copy i+1's with
    direction: kBackward (module docstring).
    Params in order: z_hx, r_hx, c_hx (H×D), z_hh, r_hh, c_hh (H×H), then z_b, r_b, c_b (H)
    if bias_term, then c_hb (H, b_ch above, initialised to 0) if recurrent_bias. With
    recurrent_bias this is PyTorch's GRU exactly (c_hb is its b_hn, r_b its b_ir + b_hr, z_b
    its b_iz + b_hz). The cell maths (``engine/layers/cells.py``) is unchanged: b_ch is
    added to the c rows of W_h h right after the step's GEMM, and its gradient is the sum
    over steps and sequences of those rows of dL/d(W_h h).
    """

    CONF_FIELD = "gru_conf"
    required = (("gru_conf", "dim_hidden"),)

    @classmethod
    def _keys(cls, conf):
        b = ("z_b", "r_b", "c_b") if conf.gru_conf.bias_term else ()
        return ("z_hx", "r_hx", "c_hx"), ("z_hh", "r_hh", "c_hh"), b

    @classmethod
    def default_param_names(cls, conf):
        extra = ["c_hb"] if conf.gru_conf.recurrent_bias else []
        return super().default_param_names(conf) + extra

    def setup(self, srcs):
        super().setup(srcs)
        if self.conf.gru_conf.recurrent_bias:
            H = self.H
            self.add_param("c_hb", (H,), ("constant", 0.0), fan_in=H, fan_out=H)
            self.hbias_key = "c_hb"
            self.hbias_from = 2 * H

    def make_cell(self):
        return GRUCell()


@register(pb.kLSTM)
class LSTMLayer(Recurrent):
    """Long short-term memory (kLSTM, lstm_conf: dim_hidden, bias_term, forget_bias,
    direction).

    i = σ(x W_ix^T + h W_ih^T + b_i),  f = σ(x W_fx^T + h W_fh^T + b_f)
    o = σ(x W_ox^T + h W_oh^T + b_o),  g = tanh(x W_gx^T + h W_gh^T + b_g)
    c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')
    Output y = h'; state the tuple (h, c), each (B, H), copy i−1's (or copy i+1's with
    direction: kBackward).
    Params in order: i_hx, f_hx, o_hx, g_hx (H×D), i_hh, f_hh, o_hh, g_hh (H×H), then
    i_b, f_b, o_b, g_b (H) if bias_term; f_b starts at forget_bias [1], the others at 0.
    A first-to-last source's output y becomes the state (y, 0).
    """

    CONF_FIELD = "lstm_conf"
    required = (("lstm_conf", "dim_hidden"),)

    @classmethod
    def _keys(cls, conf):
        b = ("i_b", "f_b", "o_b", "g_b") if conf.lstm_conf.bias_term else ()
        return ("i_hx", "f_hx", "o_hx", "g_hx"), ("i_hh", "f_hh", "o_hh", "g_hh"), b

    def make_cell(self):
        return LSTMCell()

    def _bias_default(self, key):
        if key == "f_b":
            return ("constant", float(self.conf.lstm_conf.forget_bias))
        return ("constant", 0.0)

    def state_from_source(self, y):
        return (y, self.xp.zeros_like(y))

    def source_grad_from_state(self, dstate):
        return dstate[0]
