"""The planned executor: the same unrolled graph, run in larger pieces.

The unrolled graph stays the truth (engine/unroll.py) and the node-by-node
Worker stays the reference. The planner groups the T copies of each layer
into one *block* and runs:

* a layer whose copies read one-to-one (shift 0) from blocks of the same T,
  or one-to-all from a single-copy source (kOneHot / kRNNLabel picking their
  step), as ONE call over T·B rows (step-major: rows t·B .. t·B+B-1 are step t);
  the layer declares this with ``rowwise = True``;
* a recurrent layer feature-major (engine/layers/recurrent.py): one GEMM for the
  input projections of all T steps, the step loop over the recurrent part only,
  and one GEMM each for the input- and hidden-weight gradients after the backward
  loop; or, for a narrow input into an LSTM/RNN, the input folded into each step's
  GEMM (see ``PlannedWorker._recurrent_forward``). Its output block is a
  transposed view of the state block, and its step buffers are kept across batches;
* a single-copy layer reading copy 0 (one-to-one) or the last copy
  (first-to-last) of a block as a row slice of that block.

``plan(net)`` returns a Plan, or raises NotPlannable naming the layer and why
(shifts, feedback layers, multi-output layers); callers
then fall back to the reference Worker. ``PlannedWorker`` has the Worker's
interface (run_batch, carry, state_dict) and gives the same losses and
gradients: tests/test_planner.py compares the two in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


from engine.backend import DROPOUT, LazyRNG
from engine.layers import Context
from engine.layers.recurrent import _transposed
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.layers.base import add_grads
from engine.worker import Worker


class NotPlannable(Exception):
    """The net has a shape the planner does not batch (the message says which layer and why)."""


# how a block layer reads one source
FULL, BROADCAST, FIRST, LAST, SAME = "full", "broadcast", "first", "last", "same"


@dataclass
class Step:
    """One configured layer of the plan and how it reads its sources."""

    layer: object
    index: int
    T: int                      # copies (1 or the block length)
    reads: list = field(default_factory=list)   # per srclayer: (source name, how) or None
    init_src: str | None = None  # first-to-last source giving a recurrent layer its state
    mask_from: str | None = None  # source whose mask this layer inherits (and how)
    mask_how: str | None = None
    needs_grad: bool = False


@dataclass
class Plan:
    T: int          # the longest block
    steps: list


def plan(net: Net) -> Plan:
    """Group the net's copies into blocks; NotPlannable when a layer does not fit."""
    T = max(lay.conf.unroll_len for lay in net.layers.values())
    order = net.order
    index = {name: k for k, name in enumerate(order)}
    steps: dict[str, Step] = {}
    for name in order:
        lay = net.layers[name]
        conf = lay.conf
        TL = conf.unroll_len
        st = Step(layer=lay, index=index[name], T=TL)
        if lay.multi_output:
            raise NotPlannable(f'layer "{name}" has several outputs')
        ctx_srcs = type(lay).context_sources(conf)
        if ctx_srcs and (not lay.recurrent or ctx_srcs != [(name, 1)]):
            raise NotPlannable(f'layer "{name}" is fed back from another layer')
        if TL > 1 and not lay.recurrent and not lay.is_input and not getattr(lay, "rowwise", False):
            raise NotPlannable(f'layer "{name}" ({type(lay).__name__}) does not declare rowwise')
        if lay.is_input and TL > 1 and not lay.supports_block():
            raise NotPlannable(f'input layer "{name}" cannot emit all steps at once')
        for link in net.links[name]:
            sname, conn = link.src, link.conn
            TS = net.layers[sname].conf.unroll_len
            if link.shift != 0:
                raise NotPlannable(f'layer "{name}" reads "{sname}" with a shift')
            how = None
            if conn == pb.kUnrollOneToOne:
                how = SAME if TS == TL else (FIRST if TL == 1 else None)
            elif conn == pb.kUnrollOneToAll:
                how = BROADCAST if TS == 1 else None
            elif conn == pb.kUnrollFirstToLast:
                if lay.recurrent:
                    st.init_src = sname
                    st.reads.append(None)
                    continue
                how = LAST if TL == 1 else None
            if how is None:
                raise NotPlannable(f'layer "{name}" reads "{sname}" ({TS} copies) in a way the '
                                   f"planner does not batch")
            if how == BROADCAST and TL > 1 and not getattr(lay, "step_select", False):
                raise NotPlannable(f'layer "{name}" reads one copy of "{sname}" at every step')
            st.reads.append((sname, how))
            if conn == pb.kUnrollOneToOne and st.mask_from is None:
                st.mask_from, st.mask_how = sname, how
        feeds = [r[0] for r in st.reads if r is not None] + ([st.init_src] if st.init_src else [])
        st.needs_grad = lay.differentiable and (bool(lay.params) or any(
            steps[s].needs_grad for s in feeds))
        steps[name] = st
    return Plan(T=T, steps=[steps[n] for n in order])


def _take(a, how: str, B: int):
    """The rows of block ``a`` that a reader gets."""
    if a is None:
        return None
    if how == FIRST:
        return a[:B]
    if how == LAST:
        return a[-B:]
    return a


def _put(full_like, d, how: str, B: int, xp):
    """Gradient of ``_take``: scatter ``d`` into a block-shaped zero array."""
    if how in (FIRST, LAST):
        out = xp.zeros_like(full_like)
        if how == FIRST:
            out[:B] = d
        else:
            out[-B:] = d
        return out
    return d


class PlannedWorker(Worker):
    """Runs a Net by its Plan; same interface and results as the reference Worker."""

    def __init__(self, net: Net, seed: int = 0, carry: int = pb.kCarryAuto, the_plan=None):
        super().__init__(net, seed, carry)
        self.plan = the_plan or plan(net)
        self.blocks: dict = {}
        self._needs_grad = {st.layer.name: st.needs_grad for st in self.plan.steps}
        self._bufs: dict = {}

    # ------------------------------------------------------------ forward
    def forward(self, train: bool, metrics: dict) -> None:
        B = self.batchsize
        out, aux, mask, cache, ctxs, final = {}, {}, {}, {}, {}, {}
        for st in self.plan.steps:
            lay = st.layer
            name = lay.name
            TL = st.T
            xs, src_aux = [], []
            for r in st.reads:
                if r is None:
                    xs.append(None)
                    src_aux.append(None)
                    continue
                sname, how = r
                xs.append(_take(out[sname], how, B))
                a = aux.get(sname)
                src_aux.append(_take(a, how, B) if a is not None and a.shape[0] == out[sname].shape[0]
                               else a)
            m = None
            if st.mask_from is not None and mask.get(st.mask_from) is not None:
                m = _take(mask[st.mask_from], st.mask_how, B)
            ctx = Context(step=0, unroll_len=TL, train=train, mask=m, aux=src_aux,
                          rng=LazyRNG(self.seed, DROPOUT, self.batch_index, 100000 + st.index),
                          metrics=metrics)
            if TL > 1:
                ctx.steps = self.xp.arange(TL)
                ctx.batch = B
            if lay.recurrent:
                y, fin, c = self._recurrent_forward(lay, st, xs, ctx, out, TL, B)
                final[name] = fin
            elif lay.is_input and TL > 1:
                y, _, c = lay.forward_block(ctx, xs, None)
            else:
                y, _, c = lay.forward(ctx, xs, None)
            if ctx.mask_out is not None:
                ctx.mask = ctx.mask_out
            out[name], aux[name], mask[name] = y, ctx.aux_out, ctx.mask
            if st.needs_grad:
                cache[name], ctxs[name] = c, ctx
        self.blocks, self.caches, self.ctxs = out, cache, ctxs
        # what _end_batch carries, keyed like the reference worker's nodes
        self.states = {f"{self.net.layers[n].conf.unroll_len - 1}#{n}": s for n, s in final.items()}
        self.outs = {}

    def first_nonfinite_output(self) -> str | None:
        xp, B = self.xp, self.batchsize
        for st in self.plan.steps:
            y = self.blocks.get(st.layer.name)
            if y is None or not np.issubdtype(y.dtype, np.floating):
                continue
            bad = ~xp.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
            if bool(bad.any()):
                return f"{int(xp.argmax(bad)) // B}#{st.layer.name}"
        return None

    def _buffer(self, lay, what, shape):
        """A scratch block of ``lay`` kept across batches (rewritten every batch), so the
        step loop does not allocate and fault in fresh pages each time."""
        key = (lay.name, what)
        buf = self._bufs.get(key)
        if buf is None or buf.shape != shape or buf.dtype != lay.dtype:
            buf = self._bufs[key] = self.xp.empty(shape, dtype=lay.dtype)
        return buf

    #: fold the input projection into the step GEMM when the input is this narrow
    #: against the hidden size (D + 1 <= FOLD_INPUT * H; one-hot characters into a
    #: wide layer): see _recurrent_forward
    FOLD_INPUT = 0.5

    def _recurrent_forward(self, lay, st, xs, ctx, out, TL, B):
        """The step loop in feature-major layout (see engine/layers/recurrent.py).

        hs (H, (T+1)*B) holds the states: column block 0 the initial h, block t+1 the
        output of step t; per step the gates are computed in a slice of one
        (T, G*H, B) block. The input projections of all steps are one GEMM,
        (G*H, T*B) with step t in columns t*B..t*B+B-1, added per step to W_h h; or,
        for a narrow input and a cell that only needs their sum (LSTM, RNN), hs is
        the top of a stacked z = [h; x; 1] (H+D+1, (T+1)*B) and each step is ONE GEMM
        [W_h W_x b] z_t: that skips writing and re-reading the (G*H, T*B) projection
        block, and the backward gets all weight grads from one GEMM with z."""
        xp = self.xp
        x = xs[lay.data_pos]
        if st.init_src is not None:
            state = lay.state_from_source(out[st.init_src][-B:])
        else:
            state = self.initial_state(lay)
        H, GH, N = lay.H, lay.GATES * lay.H, TL * B
        D = lay.D
        fold = lay.sums_projections and D + 1 <= self.FOLD_INPUT * H
        pre = self._buffer(lay, "pre", (TL, GH, B))
        if fold:
            nb = 1 if lay.b_keys else 0
            z = self._buffer(lay, "z", (H + D + nb, N + B))
            z[H:H + D, :N] = x.reshape(N, D).T
            if nb:
                z[H + D, :N] = 1
            wc = self._buffer(lay, "wc", (GH, H + D + nb))
            wc[:, :H] = lay._stack(lay.hh_keys)
            wc[:, H:H + D] = lay._stack(lay.hx_keys)
            if nb:
                wc[:, H + D] = lay._stack(lay.b_keys)
            hs = z[:H]
        else:
            z = None
            xproj = lay.project_t(x, out=self._buffer(lay, "xproj", (GH, N)))
            hs = self._buffer(lay, "hs", (H, N + B))
        parts = state if isinstance(state, tuple) else (state,)
        hs[:, :B] = parts[0].T
        cur = (hs[:, :B],) + tuple(s.T for s in parts[1:])
        m = None if ctx.mask is None else ctx.mask.reshape(TL, B)
        step_caches = []
        lay.hold_weights(not fold)  # a folded step reads wc, not the layer's W_h
        try:
            for t in range(TL):
                cols = slice(t * B, (t + 1) * B)
                mm = None if m is None else lay._mask(m[t])
                now = cur if len(cur) > 1 else cur[0]
                if fold:
                    h, new, sc = lay.cell_from_pre(xp.matmul(wc, z[:, cols], out=pre[t]), now, mm)
                else:
                    h, new, sc = lay.cell_step(xproj[:, cols], now, mm, pre[t])
                nxt = hs[:, (t + 1) * B:(t + 2) * B]
                nxt[...] = h
                cur = (nxt,) + (tuple(new[1:]) if isinstance(new, tuple) else ())
                step_caches.append(sc)
        finally:
            lay.hold_weights(False)
        # the carried state must not alias the buffers the next batch rewrites
        fin = tuple(xp.ascontiguousarray(s.T) for s in cur)
        final = fin if isinstance(state, tuple) else fin[0]
        return hs[:, B:].T, final, (x, step_caches, hs, z, wc if fold else None)

    # ----------------------------------------------------------- backward
    def backward(self) -> None:
        xp, B = self.xp, self.batchsize
        by_name = {st.layer.name: st for st in self.plan.steps}
        dout: dict = {}

        def acc(sname, d, how):
            if d is None or not by_name[sname].needs_grad:
                return
            d = _put(self.blocks[sname], d, how, B, xp)
            dout[sname] = add_grads(dout.get(sname), d)

        for st in reversed(self.plan.steps):
            if not st.needs_grad:
                continue
            lay = st.layer
            name = lay.name
            y = self.blocks[name]
            dy = dout.pop(name, None)
            if dy is None and not lay.is_loss:
                dy = xp.zeros_like(y)
            if self.probe and self.first_bad_grad is None and dy is not None:
                bad = ~xp.isfinite(dy.reshape(dy.shape[0], -1)).all(axis=1)
                if bool(bad.any()):  # backward order visits the last step first
                    self.first_bad_grad = f"{int(xp.flatnonzero(bad)[-1]) // B}#{name}"
            if lay.recurrent:
                dxs, dstate0 = self._recurrent_backward(lay, st, dy, self.caches[name], B)
                if st.init_src is not None and dstate0 is not None:
                    acc(st.init_src, lay.source_grad_from_state(dstate0), LAST)
            else:
                dxs, _ = lay.backward(self.ctxs[name], dy, None, self.caches[name])
            for r, dx in zip(st.reads, dxs):
                if r is not None and dx is not None:
                    acc(r[0], dx, r[1])

    def _recurrent_backward(self, lay, st, dy, c, B):
        x, step_caches, hs, z, wc = c
        TL = len(step_caches)
        GH, N = lay.GATES * lay.H, TL * B
        dx_all = self._buffer(lay, "dxproj", (GH, N))
        dh_all = self._buffer(lay, "dhproj", (GH, N)) if lay.separate_dhproj else dx_all
        dst = None
        # with the input folded in, W_h^T is read from [W_h W_x b]: besides saving a
        # copy, its row stride (H+D+1, not a power of two) makes the GEMM a little faster
        lay.hold_weights(True, None if wc is None else wc[:, :lay.H])
        try:
            for t in range(TL - 1, -1, -1):
                cols = slice(t * B, (t + 1) * B)
                _, _, dst = lay.cell_backward(
                    dy[cols].T, dst, step_caches[t], out_x=dx_all[:, cols],
                    out_h=None if dh_all is dx_all else dh_all[:, cols], defer=True,
                    need_dprev=t > 0 or st.init_src is not None)
        finally:
            lay.hold_weights(False)
        src = st.reads[lay.data_pos]
        need_dx = src is not None and self._needs_grad[src[0]]
        if z is None:
            # the W_h gradient of every step in one GEMM: sum_t dhproj_t h_t^T
            lay._accumulate(lay.hh_keys, dh_all @ hs[:, :N].T)
            dx = lay.projection_backward_t(x, dx_all, need_dx)
        else:
            # folded input: [dW_h dW_x db] = sum_t dpre_t z_t^T, one GEMM
            H, D = lay.H, lay.D
            g = dx_all @ z[:, :N].T
            lay._accumulate(lay.hh_keys, g[:, :H])
            lay._accumulate(lay.hx_keys, g[:, H:H + D])
            if lay.b_keys:
                lay._accumulate(lay.b_keys, g[:, H + D])
            dx = lay.input_grad_t(x, dx_all) if need_dx else None
        dxs = [None] * len(st.reads)
        dxs[lay.data_pos] = dx
        return dxs, _transposed(dst)


def make_worker(net: Net, seed: int = 0, carry: int = pb.kCarryAuto, executor: str = "auto"):
    """(worker, note): the planned worker when the net fits, else the reference one."""
    if executor == "reference":
        return Worker(net, seed, carry), "executor: reference (node by node)"
    try:
        p = plan(net)
    except NotPlannable as e:
        if executor == "planned":
            raise
        return Worker(net, seed, carry), f"executor: reference (node by node): {e}"
    return PlannedWorker(net, seed, carry, p), f"executor: planned ({len(p.steps)} blocks, T={p.T})"

