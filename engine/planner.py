"""The planned executor: the same unrolled graph, run in larger pieces.

The unrolled graph stays the truth (engine/unroll.py) and the node-by-node
Worker (engine/worker.py) stays the reference. The planner only decides which
layers run their T copies as one *block* call and in which order; the layers
compute, through the block interface of ``engine/layers/base.py``
(``supports_block`` / ``forward_block`` / ``backward_block``). Rows of a block
are step-major: rows t·B .. t·B+B-1 are copy t.

How a layer reads a source, from the links the Net read off the graph's edges:

* SAME       one-to-one (no shift) from a source of the same T: its block as is;
* BROADCAST  one-to-all from a single-copy source (kOneHot / kRNNLabel picking
             their step with ``step_ids``): that copy's B rows;
* REPEAT     one-to-all from a single-copy source into a layer that does not pick a
             step from it: that copy's B rows once per copy (its gradient: their sum);
* FIRST      one-to-one into a single-copy layer: copy 0 of the source (rows 0..B-1);
* HEAD       one-to-one (no shift) from a source of more copies: its first T copies;
* LAST       first-to-last: the last copy of the source (its last B rows); into a
             recurrent layer it is the initial state instead;
* JOIN       all-to-one: every copy of the source as one input per row, joined along
             the first feature axis in time order ((T·B, F) -> (B, T·F));
* ONLY_FIRST one-to-first: the last copy of the source as the block's first B rows,
             zeros in the rows of the other copies (the unroller's ``zeros``).

A layer with context reads its own copies at offset 1 (copy i-1) or -1 (copy i+1,
``direction: kBackward``); its ``forward_block`` / ``backward_block`` run the step
loop in its direction, and the state given to ``forward_block`` starts the pass
(carried or zeros, or a first-to-last source's last copy).

``plan(net)`` returns a Plan, or raises NotPlannable naming the layer and why (a
layer without the block interface, shifts, feedback from another layer, other
context offsets, several outputs); ``make_worker`` then falls back to the reference
Worker and says why.
``PlannedWorker`` has the Worker's interface (run_batch, carry, state_dict) and
gives the same losses and gradients: tests/test_planner.py compares the two in
float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.backend import DROPOUT, LazyRNG
from engine.common import type_name
from engine.layers import Context
from engine.layers.base import ProductGrad, add_grads, dense_grad
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.unroll import node_id
from engine.worker import Worker


class NotPlannable(Exception):
    """The net has a shape the planner does not batch (the message says which layer and why)."""


# how a block reads one source
SAME, BROADCAST, FIRST, LAST, ONLY_FIRST = "same", "broadcast", "first", "last", "only-first"
REPEAT, HEAD, JOIN = "repeat", "head", "join"


@dataclass
class Block:
    """One configured layer of the plan: its T copies, run as one call, and its sources."""

    layer: object
    index: int
    T: int                      # copies (1 or the block length)
    reads: list = field(default_factory=list)   # per srclayer: (source name, how) or None
    init_src: str | None = None  # first-to-last source giving a recurrent layer its state
    mask_from: str | None = None  # source whose mask this layer inherits (and how)
    mask_how: str | None = None
    needs_grad: bool = False
    need_input_grads: list = field(default_factory=list)  # per srclayer
    need_state_grad: bool = False


@dataclass
class Plan:
    T: int          # the longest block
    blocks: list


def _how(link, TS: int, TL: int, recurrent: bool, step_select: bool = True) -> str | None:
    """How a layer of TL copies reads a source of TS copies through ``link``; None when
    the planner does not batch that (shifts are refused before)."""
    if link.conn == pb.kUnrollOneToOne:
        return SAME if TS == TL else (FIRST if TL == 1 else HEAD)
    if link.conn == pb.kUnrollOneToAll:
        if TS != 1:
            return None
        return BROADCAST if (step_select or TL == 1) else REPEAT
    if link.conn == pb.kUnrollFirstToLast:
        return LAST if (recurrent or TL == 1) else None
    if link.conn == pb.kUnrollOneToFirst:
        return ONLY_FIRST
    if link.conn == pb.kUnrollAllToOne:
        return JOIN
    return None


def plan(net: Net) -> Plan:
    """Group the net's copies into blocks; NotPlannable when a layer does not fit."""
    blocks: dict[str, Block] = {}
    for index, name in enumerate(net.order):
        lay = net.layers[name]
        TL = lay.conf.unroll_len
        what = f'layer "{name}" ({type_name(lay.conf.type)})'
        if lay.multi_output:
            raise NotPlannable(f"{what} has several outputs")
        ctx_srcs = type(lay).context_sources(lay.conf)
        others = [c for c, _ in ctx_srcs if c != name]
        if others and (TL > 1 or any(net.layers[c].conf.unroll_len > 1 for c in others)):
            raise NotPlannable(f"{what} is fed back from another layer within a batch")
        if others:   # one copy fed from the last batch (a sampling net): the carried state
            ctx_srcs = []
        if ctx_srcs and ctx_srcs not in ([(name, 1)], [(name, -1)]):
            raise NotPlannable(f"{what} reads its own copies at offsets {[o for _, o in ctx_srcs]}")
        if (TL > 1 or ctx_srcs) and not lay.supports_block():
            raise NotPlannable(f"{what} does not publish the block interface (supports_block, "
                               f"forward_block, backward_block in engine/layers/base.py), so its "
                               f"{TL} copies cannot run as one call")
        b = Block(layer=lay, index=index, T=TL)
        for link in net.links[name]:
            TS = net.layers[link.src].conf.unroll_len
            if link.shift != 0:
                raise NotPlannable(f'{what} reads "{link.src}" with a shift ({link.shift})')
            how = _how(link, TS, TL, lay.recurrent, lay.step_select)
            if how is None:
                raise NotPlannable(f'{what} reads "{link.src}" ({TS} copies) '
                                   f"{pb.UnrollConnType.Name(link.conn)}, a way the planner does "
                                   f"not batch")
            if how == LAST and lay.recurrent:
                b.init_src = link.src
                b.reads.append(None)
                continue
            b.reads.append((link.src, how))
            if link.conn == pb.kUnrollOneToOne and b.mask_from is None:
                b.mask_from, b.mask_how = link.src, how
        b.need_input_grads = [r is not None and blocks[r[0]].needs_grad for r in b.reads]
        b.need_state_grad = b.init_src is not None and blocks[b.init_src].needs_grad
        b.needs_grad = lay.differentiable and (bool(lay.params) or any(b.need_input_grads)
                                               or b.need_state_grad)
        blocks[name] = b
    T = max(b.T for b in blocks.values())
    return Plan(T=T, blocks=[blocks[n] for n in net.order])


def _take(a, how: str, B: int, T: int = 1, xp=None, dtype=None):
    """The rows of block ``a`` that a reader of ``T`` copies gets (ONLY_FIRST: float zeros of
    ``dtype`` in the other copies' rows, as the reference worker's ``Zeros``)."""
    if a is None:
        return None
    if how == FIRST:
        return a[:B]
    if how == HEAD:
        return a[:T * B]
    if how == LAST:
        return a[-B:]
    if how == REPEAT:
        return xp.concatenate([a] * T) if T > 1 else a
    if how == JOIN:
        steps = a.shape[0] // B
        parts = a.reshape((steps, B) + a.shape[1:])
        return xp.concatenate(list(parts), axis=1)
    if how == ONLY_FIRST:
        return xp.concatenate([a[-B:].astype(dtype),
                               xp.zeros(((T - 1) * B,) + a.shape[1:], dtype=dtype)])
    return a


def _put(full_like, d, how: str, B: int, xp):
    """Gradient of ``_take``: scatter ``d`` into a block-shaped zero array (REPEAT: add
    the copies' gradients up)."""
    if how == REPEAT:
        return d.reshape((-1,) + full_like.shape).sum(axis=0)
    if how == JOIN:
        steps = full_like.shape[0] // B
        return xp.concatenate(xp.split(d, steps, axis=1), axis=0)
    if how in (FIRST, HEAD, LAST, ONLY_FIRST):
        out = xp.zeros_like(full_like)
        if how in (FIRST, HEAD):
            out[:d.shape[0]] = d
        else:
            out[-B:] = d[:B]
        return out
    return d


class PlannedWorker(Worker):
    """Runs a Net by its Plan; same interface and results as the reference Worker."""

    def __init__(self, net: Net, seed: int = 0, carry: int = pb.kCarryAuto, the_plan=None):
        super().__init__(net, seed, carry)
        self.plan = the_plan or plan(net)
        self.blocks: dict = {}

    # ------------------------------------------------------------ forward
    def forward(self, train: bool, metrics: dict) -> None:
        B = self.batchsize
        out, aux, mask, cache, ctxs, final = {}, {}, {}, {}, {}, {}
        for b in self.plan.blocks:
            lay = b.layer
            name = lay.name
            xs, src_aux = [], []
            for r in b.reads:
                if r is None:
                    xs.append(None)
                    src_aux.append(None)
                    continue
                sname, how = r
                xs.append(_take(out[sname], how, B, b.T, self.xp, self.net.dtype))
                a = aux.get(sname) if how not in (ONLY_FIRST, JOIN) else None
                src_aux.append(_take(a, how, B, b.T, self.xp, a.dtype if a is not None else None)
                               if a is not None and a.shape[0] == out[sname].shape[0]
                               else a)
            m = None
            if b.mask_from is not None and mask.get(b.mask_from) is not None:
                m = _take(mask[b.mask_from], b.mask_how, B, b.T, self.xp)
            ctx = Context(step=0, unroll_len=b.T, train=train, mask=m, aux=src_aux,
                          rng=LazyRNG(self.seed, DROPOUT, self.batch_index, self._stream(b)),
                          metrics=metrics, checks=self.checks, need_input_grads=b.need_input_grads,
                          need_state_grad=b.need_state_grad, product_grads=True)
            if b.T > 1:
                ctx.steps = self.xp.arange(b.T)
                ctx.batch = B
                ctx.copy_streams = [(self.seed, DROPOUT, self.batch_index,
                                     self.net.by_id[node_id(t, lay.name)].index)
                                    for t in range(b.T)]
            if lay.recurrent:
                state = (lay.state_from_source(out[b.init_src][-B:]) if b.init_src is not None
                         else self.initial_state(lay))
                y, final[name], c = lay.forward_block(ctx, xs, state)
            elif b.T > 1:
                y, _, c = lay.forward_block(ctx, xs, None)
            else:   # one copy; fed back from another layer's last batch (sampling) if so
                state = self.initial_state(lay) if name in self.starts_from_state else None
                y, _, c = lay.forward(ctx, xs, state)
            if ctx.mask_out is not None:
                ctx.mask = ctx.mask_out
            out[name], aux[name], mask[name] = y, ctx.aux_out, ctx.mask
            if b.needs_grad:
                cache[name], ctxs[name] = c, ctx
        self.blocks, self.caches, self.ctxs, self.final = out, cache, ctxs, final

    def _stream(self, b: Block) -> int:
        """The random stream of a block: a single copy draws from its node's stream, as in
        the reference executor (so a sampler draws the same characters under both); a block
        of several copies from one of its own."""
        if b.T == 1:
            return self.net.by_id[node_id(0, b.layer.name)].index
        return 100000 + b.index

    def output(self, layer: str, copy: int | None = None):
        """Copy ``copy`` (default: the last) of ``layer``'s block: its rows of that copy."""
        y = self.blocks.get(layer)
        if y is None:
            return None
        T = self.net.layers[layer].conf.unroll_len
        B = y.shape[0] // T
        t = T - 1 if copy is None else copy
        return y[t * B:(t + 1) * B]

    def end_state(self, layer: str):
        return self.final.get(layer)

    def first_nonfinite_output(self) -> str | None:
        xp, B = self.xp, self.batchsize
        for b in self.plan.blocks:
            y = self.blocks.get(b.layer.name)
            if y is None or not np.issubdtype(y.dtype, np.floating):
                continue
            bad = ~xp.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
            if bool(bad.any()):
                return node_id(int(xp.argmax(bad)) // B, b.layer.name)
        return None

    # ----------------------------------------------------------- backward
    def backward(self) -> None:
        xp, B = self.xp, self.batchsize
        by_name = {b.layer.name: b for b in self.plan.blocks}
        dout: dict = {}

        def acc(sname, d, how):
            if d is None or not by_name[sname].needs_grad:
                return
            if isinstance(d, ProductGrad) and not (
                    how == SAME and sname not in dout and by_name[sname].layer.takes_product_grad):
                d = d.value()    # only a source that reads it whole takes it unmultiplied
            d = _put(self.blocks[sname], d, how, B, xp)
            dout[sname] = add_grads(dout.get(sname), d)

        for b in reversed(self.plan.blocks):
            if not b.needs_grad:
                continue
            lay = b.layer
            name = lay.name
            y = self.blocks[name]
            dy = dout.pop(name, None)
            if dy is None and not lay.is_loss:
                dy = xp.zeros_like(y)
            if self.probe and self.first_bad_grad is None and dy is not None:
                bad = ~xp.isfinite(dense_grad(dy).reshape(dy.shape[0], -1)).all(axis=1)
                if bool(bad.any()):  # backward order visits the last step first
                    self.first_bad_grad = node_id(int(xp.flatnonzero(bad)[-1]) // B, name)
            ctx, c = self.ctxs[name], self.caches[name]
            if lay.recurrent:
                dxs, dstate0 = lay.backward_block(ctx, dy, c)
                if b.init_src is not None and dstate0 is not None:
                    acc(b.init_src, lay.source_grad_from_state(dstate0), LAST)
            elif b.T > 1:
                dxs, _ = lay.backward_block(ctx, dy, c)
            else:
                dxs, _ = lay.backward(ctx, dy, None, c)
            for r, dx in zip(b.reads, dxs):
                if r is not None and dx is not None:
                    acc(r[0], dx, r[1])


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
    return PlannedWorker(net, seed, carry, p), f"executor: planned ({len(p.blocks)} blocks, T={p.T})"
