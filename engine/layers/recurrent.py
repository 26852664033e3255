"""Layer family: recurrent (kRNN, kGRU, kLSTM, kMGU).

A recurrent layer computes one time step per unrolled copy, reading its own
previous copy's state as context. A cell is one class here: it declares its
facts (gates, state parts, param names, export form, whether a fused kernel
exists) and writes its step once, as ``formula``; the base class ``Recurrent``
owns everything else, in ONE step loop:

* all T copies of a batch in one call (``forward_block`` / ``backward_block``,
  the block interface the planned executor uses);
* one copy at a time (``forward`` / ``backward``, the contract of
  ``engine/layers/base.py``, used by the reference executor) is the same loop
  with T = 1 (its buffers fresh, since each copy's cache must outlive the next).

The cell's step. ``formula(f, x, state, U)`` computes the new state parts from
``x`` (the per-gate input projections W_x x + b, each (H, B)), ``state`` (the
parts before the step, feature-major (H, B)) and ``U(gates, v)``, the recurrent
product of those gates' rows of W_h with a vector ``v``: a cell may gate h before
multiplying (MGU's U_h (f ⊙ h)), or use one product for all gates (the common
form). ``f`` holds the element-wise functions. From that formula alone the cell
trains: ``step_forward`` / ``step_backward`` run it on a tape
(``engine/layers/tape.py``) that derives the backward. A cell may override the
two with hand-written maths, and a fused kernel beside them (RNN, GRU, LSTM:
``engine/layers/cells.py`` and ``kernels/``); the tests check those against the
derived reference.

What the loop does around the step (``Products``): the recurrent products
(``ops.product`` / ``ops.product_backward``), so that each group of W_h's rows
gets its gradient from ONE GEMM over all steps after the backward loop; the
input projections, one GEMM for all steps, or, for a one-hot input (a source
with ``one_hot_rows``, kOneHot), gathered columns of W_x + b and the gradient's
columns added up by token; for a cell that only needs the sum W_x x + b + W_h h
(``sums_projections``: RNN, LSTM) and a narrow dense input (D + 1 <=
FOLD_INPUT · H), the input folded into the step GEMM: each step is ONE GEMM
[W_h W_x b] @ [h; x; 1], all weight gradients one GEMM with the same stacked
block, and no (G·H, T·B) projection block is written and read back (20 MB for
LSTM 512). Masks, direction, carried and initial state are the loop's too.
Block buffers are kept from batch to batch, so a step does not fault in fresh
pages.

Layout. Inside, the maths is feature-major: states and gates are (features, B)
arrays, a step's GEMM is W_h (G·H, H) @ h (H, B), which BLAS runs faster than
the row-major h @ W_h^T at these batch sizes (``python -m bench.gemm_layout``; in
a 50-step loop on the AVX-512 machine of issue 25 the two were equal, docs/speed.md).
Blocks a step reads or writes whole (gates, projections, gradients) are step-major,
(T, G·H, B), so each step's is contiguous; column slices of (G·H, T·B) blocks made
the gate kernels 2 to 3 times slower.
Outside, the layer contract is row-major: outputs and states are (B, H). A
block's output is a transposed view (T·B, H) of the feature-major state block.

Params. Each gate group (input weights W_x, hidden weights W_h, biases b) is
stored as one stacked array whose row blocks are the params' data and grad
(``GateWeights``), so the step GEMMs read it without copying.

Sources. Exactly one *data* source (one-to-one or one-to-all, ``out_shape``
(D,)); at most one *initial-state* source connected kUnrollFirstToLast
(encoder -> decoder, ``out_shape`` (H,)), whose output becomes copy 0's state
(``state_from_source``) and is passed as ``None`` in ``xs``.

Masking. ``ctx.mask`` is None or a (B,) array of 1/0 per step: a masked sequence
keeps its previous state exactly, new = m ⊙ new + (1 − m) ⊙ prev for h (and c),
and outputs that state. A data position holding None (a one-to-one source with a
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

Adding a cell: one class below, registered under its LayerType, with its facts
and its ``formula`` (kMGU is the example: nothing else), its ``<name>_conf`` in
proto/job.proto, and its name in the tests' lists of cells. See
docs/architecture.md, "Adding a cell".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.layers import cells, kernels
from engine.layers.base import (Layer, LayerError, ProductGrad, add_grad, add_grads, dense_grad,
                                one_array, overwrites, register)
from engine.layers.tape import Direct, Tape, Taped
from engine.proto import job_pb2 as pb


@dataclass(frozen=True)
class ExportForm:
    """How a cell maps to PyTorch's and ONNX's layouts (engine/interop.py reads it).

    ``torch_name``: the torch.nn module (and ONNX operator); ``hx``, ``hh``, ``b``: the
    engine's param roles, one per gate in PyTorch's gate order; ``onnx_order``: ONNX's gate
    order as positions in PyTorch's; ``reset_gated``: the gate whose recurrent part is
    multiplied by the reset gate (its recurrent bias cannot join the input bias), or None;
    ``hb``: the engine's role of that gate's recurrent bias (PyTorch's b_hn), a param a
    layer has when it is configured so (``gru_conf { recurrent_bias: true }``).
    """

    torch_name: str
    hx: tuple
    hh: tuple
    b: tuple
    onnx_order: tuple
    reset_gated: int | None = None
    hb: str | None = None

    @property
    def gates(self) -> int:
        return len(self.hx)


@dataclass
class StepCache:
    """What one step keeps for its backward: the state parts before it (feature-major),
    what the cell's forward kept (``cell``), and the mask rows (m, 1 − m) or None."""

    state: tuple
    cell: Any
    mask: Any


@dataclass
class BlockCache:
    """What one call of the step loop keeps for its backward."""

    x: Any              # the data source's rows (T·B, D), or None (no input)
    n_srcs: int         # len(xs)
    steps: list         # StepCache per step, in step order
    hs: Any             # (H, (T+1)·B) the states (see ``Recurrent._forward``)
    ops: "Products"     # the recurrent products and the input projections
    idx: Any            # one-hot input: the token of each row, else None


@dataclass
class TapedStep:
    """A derived cell's step as recorded: the tape, the leaves (per-gate input projections,
    state parts) and the outputs (new state parts)."""

    tape: Tape
    x: list
    state: tuple
    out: tuple


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

    def _whole(self, group: str):
        """(the group's params, ONE array holding all of their grads: the stacked view, or
        the grad of a group of one param), or (params, None)."""
        ps = [self.layer.params[k] for k in self.groups[group]]
        fused = self.stacked.get(group)
        if fused is not None:
            return ps, fused[1]
        return ps, (ps[0].grad if len(ps) == 1 else None)

    def add_grad(self, group: str, g) -> None:
        """Accumulate a stacked gradient (rows k·H..(k+1)·H: gate k) into the group (write
        it, for the batch's first contribution: ``overwrites``)."""
        ps, whole = self._whole(group)
        if whole is not None:
            if overwrites(ps):
                whole[...] = g
            else:
                whole[...] += g
            return
        H = self.layer.H
        for k, p in enumerate(ps):
            add_grad(p, g[k * H:(k + 1) * H])

    def add_product(self, group: str, a, b) -> None:
        """Accumulate the stacked gradient a @ b into the group: the batch's first
        contribution is the GEMM's output itself, written into the gradient buffer (no
        product array, no add pass over it)."""
        ps, whole = self._whole(group)
        if whole is not None and overwrites(ps):
            self.layer.xp.matmul(a, b, out=whole)
            return
        self.add_grad(group, a @ b)


#: every gate's rows: the common one-product form (``U(ALL, h)``)
ALL = slice(None)


class Products:
    """The recurrent products and input projections of one call of the step loop (T steps
    of B columns), step by step: ``at(t, h)`` makes step t current (``h`` its state h).

    ``product(gates, v, with_input)`` computes W_h[rows of ``gates``] @ v (+ the GRU's
    recurrent bias on its rows), plus, ``with_input``, the step's input projection of those
    rows (added, gathered, or folded into the GEMM). It keeps ``v`` for the weight gradient:
    a product of the state h itself reads the loop's state block, any other vector (MGU's
    f ⊙ h) is copied into a block of its own. ``product_backward(gates, g)`` stores dL/d
    (the product) for the weight gradient and returns W_h[rows]^T g, the gradient at ``v``.
    ``weight_grads`` then adds Σ_t g_t v_t^T per group of rows, one GEMM each."""

    def __init__(self, layer: "Recurrent", T: int, B: int, hs, buffer):
        self.layer, self.xp = layer, layer.xp
        self.T, self.B, self.H = T, B, layer.H
        self.GH = layer.gates * layer.H
        self.hs = hs
        self.buffer = buffer
        self.pre = buffer("pre", (T, self.GH, B))
        self.w_h = layer.weights.data("h")
        self.w_hT = self.w_h.T   # a contiguous copy measured no faster (bench.onehot)
        # the step GEMM (kernels.step_gemm): W_h packed once for the T steps of this call,
        # and W_h^T at the first backward step; None: NumPy's matmul
        self.packed = self.packed_T = None
        self.packing = not layer.uses_formula and kernels.packs(self.w_h, T)
        kernels.loop_threads(self.packing)
        #: (first row, last row) -> None (the product reads the state h) or its (H, T·B) block
        self.groups: dict = {}
        self.xproj = None        # (T, G·H, B) input projections, when materialised
        self.table = self.idx = None   # one-hot input: W_x + b and the tokens
        self.table_T = None            # ... W_x + b transposed, for the step GEMM (table_t)
        self.split_rows = 0            # ... its rows the GEMM adds, the rest per step
        self.x_rest = None             # (split_input)
        self.dtable_T = None           # ... dW_x transposed (table_grad)
        self.wc = self.z = None        # folded input: [W_h W_x b] and [h; x; 1]
        self.dx_steps = self.dh_steps = None   # backward: dL/d(input projection), dL/d(products)
        self._dx = self._dh = None             # the same feature-major (``dx``, ``dh``)
        self.t, self.cols, self.h, self.zt = 0, slice(0, B), None, None
        self._state = self._state_block = None   # forward: h and its block of hs (state_to)
        self.dy_next, self._took_dy = None, False   # backward: took_dy
        self.dyT = None                        # ... the outputs' gradient, feature-major
        self.dy_w = self.dy_steps = self.dy_zero = None   # ... or folded (output_grad)
        self.hot, self._hot_t = None, None     # backward: the step's gradient block in cache

    def at(self, t: int, h, zt=None) -> None:
        self._settle()
        self.t, self.cols, self.h, self.zt = t, slice(t * self.B, (t + 1) * self.B), h, zt

    def state_to(self, block, h=None) -> None:
        """The state ``h`` of the step just made belongs in ``block`` (its columns of hs):
        the next step's product of h copies it there while the step GEMM packs it
        (``keep``). A state still waiting from before (no GEMM took it) is copied first;
        None: just that."""
        if self._state_block is not None:
            self._state_block[...] = self._state
        self._state_block, self._state = block, h

    def rows(self, gates) -> tuple:
        """(first, last) row of W_h for a gate index or a slice of gates."""
        H = self.H
        if gates is ALL:      # the common one-product form: every row
            return 0, self.GH
        if isinstance(gates, slice):
            start, stop, _ = gates.indices(self.layer.gates)
            return start * H, stop * H
        return gates * H, (gates + 1) * H

    # ------------------------------------------------------------- forward
    def product(self, gates, v, with_input: bool = False):
        xp = self.xp
        every = gates is ALL          # the common form: no row slices (a step's Python cost)
        r0, r1 = (0, self.GH) if every else self.rows(gates)
        out = self.pre[self.t] if every else self.pre[self.t][r0:r1]
        folded = with_input and self.z is not None
        if folded:                                # ONE GEMM [W_h W_x b] [h; x; 1]
            if not every or v is not self.h:
                raise RuntimeError(f"{self.layer.name}: a folded input needs one product of h "
                                   f"for all gates")
            w, operand = self.wc, self.zt
        else:
            w, operand = (self.w_h if every else self.w_h[r0:r1]), v
        gather = None
        if every and self.packing:                # the step GEMM, W packed at the first step
            if self.packed is None:
                self.packed = kernels.Packed(w, lambda n: self.buffer("packed", n))
            if with_input and not folded and self.xproj is None and \
                    self.layer.hbias_key is None:  # one-hot: W_x + b's columns added in the GEMM
                gather = (self.table_t(), self.idx[self.cols])
            keep = None
            if self._state_block is not None and v is self._state:   # h into hs, as packed
                keep, self._state_block = self._state_block, None
            kernels.step_gemm(out, self.packed, operand, gather=gather, keep=keep)
        else:
            xp.matmul(w, operand, out=out)
        if not folded and gather is None:
            if self.layer.hbias_key is not None:
                self.layer.add_hbias(out, r0)
            if with_input:
                if self.xproj is None:     # one-hot input: the step's columns of W_x + b
                    table = self.table if every else self.table[r0:r1]
                    cells.gather_columns(xp, out, table, self.idx[self.cols], add=True)
                else:
                    out += self.xproj[self.t][r0:r1]
        self._keep(r0, r1, v)
        return out

    def table_t(self):
        """The one-hot input's table W_x + b transposed (V, G·H), a row per token: what the
        step GEMM adds to its product (made at the loop's first step); zero past the rows
        it adds (``split_input``)."""
        if self.table_T is None:
            self.table_T = cells.transposed(self.xp, self.table,
                                            self.token_rows("tableT", self.table.shape[::-1]))
            if self.split_rows:
                self.table_T[:, self.split_rows:] = 0
        return self.table_T

    def token_rows(self, name, shape):
        """A (V, R) block of a row per token (a one-hot input's table or its gradient,
        transposed) whose rows lie R + 16 floats apart: a step GEMM reads or adds the rows
        of its 50 tokens at the same offsets, and rows a multiple of 4 KB apart (R = 1024,
        2048) fall into the same few sets of L1. Adding a step's columns into rows 8 KB
        apart (R = 2048, one thread, AVX2) took 5.6 against 1.6 ms per 50 steps."""
        V, R = shape
        return self.buffer(name, (V, R + 16))[:, :R]

    def split_input(self, rows: int) -> None:
        """A one-hot input's projection, for a cell that sums it with the products of its
        first ``rows`` rows only (the GRU's z and r): the step GEMM adds those rows' in its
        registers (a product ``with_input``: the table's other columns are zeros there, and
        adding a zero changes no sum), and ``input_projection`` gives, per step, a block in
        cache holding the other rows' (zeros in these). A 15 MB block of every step's
        projections, gathered before the loop, then is not written, nor read back."""
        self.split_rows = rows
        self.x_rest = self.buffer("xrest", (self.GH, self.B))
        self.x_rest[:rows] = 0

    @property
    def input_split(self) -> bool:
        """Whether the step GEMM adds the projection of the leading rows (split_input)."""
        return self.x_rest is not None

    def park(self) -> None:
        """The loop's pool work is over for now: its threads sleep at once, leaving the
        cores to OpenBLAS, which does the GEMMs that come next (kernels.park)."""
        if self.packing:
            kernels.park()

    def _keep(self, r0, r1, v) -> None:
        key = (r0, r1)
        block = self.groups.get(key, False)
        if block is False:
            block = self.groups[key] = None if v is self.h else self.buffer(
                f"operand{r0}", (self.H, self.T * self.B))
        if block is not None:
            block[:, self.cols] = v
        elif v is not self.h:
            raise RuntimeError(f"{self.layer.name}: rows {r0}:{r1} multiply h at one step and "
                               f"another vector at the next")

    def input_projection(self):
        """This step's W_x x + b (G·H, B): materialised projections, or, after
        ``split_input``, the rows the product did not take (zeros in those it did)."""
        if self.x_rest is not None:
            r = self.split_rows
            cells.gather_columns(self.xp, self.x_rest[r:], self.table[r:], self.idx[self.cols])
            return self.x_rest
        return None if self.xproj is None else self.xproj[self.t]

    # ------------------------------------------------------------ backward
    def start_backward(self, separate: bool, zero: bool, reuse_xproj: bool = False,
                       input_grad: bool = True) -> None:
        """Blocks for the gradients: dL/d(input projections) and, when ``separate``,
        dL/d(products) apart from it (the same block otherwise: a cell that sums its
        projections has one gradient for both); ``zero`` clears them first (a derived cell
        writes only the rows that its tape reached). The steps write step-major (T, G·H, B)
        blocks, each step's contiguous: into the columns of a (G·H, T·B) block, rows T·B
        apart, the LSTM 512 backward kernel took 15.5 against 6.5 ms per batch (partial
        cache lines a GEMM evicts between steps). ``dx`` and ``dh`` lay them out
        feature-major when asked, one copy each; on the step GEMM, dL/d(products) is
        copied into its feature-major block by the W_h^T product of each step, from cache
        (``keep``: the separate copy after the loop read 20 MB back from memory).
        ``reuse_xproj``: the forward's step-major input projections are dead (a
        hand-written step keeps what it needs in its cache), so dL/d(input projections)
        takes their memory. ``input_grad``: the input's gradient is asked for (``dx``
        is then read after the loop)."""
        kernels.loop_threads(self.packing)
        shape = (self.T, self.GH, self.B)
        self.dx_steps = self.buffer("xproj" if reuse_xproj else "dxsteps", shape)
        self.dh_steps = self.buffer("dhsteps", shape) if separate else self.dx_steps
        self._dx = self._dh = None
        if zero:
            self.dx_steps[...] = 0
            if separate:
                self.dh_steps[...] = 0
        # On the step GEMM (T >= STEP_MIN_T) each step's W_h^T product also lays its
        # dL/d(products) out feature-major, and, for a one-hot input, scatters
        # dL/d(input projection) into dW_x: from the rows it packs, or, for a cell whose
        # input projection has a gradient of its own (the GRU's), from that block's rows;
        # ``on_gemm`` marks the steps it did
        self.on_gemm = [False] * self.T
        self.flat_dh = self.buffer("flat", (self.GH, self.T * self.B)) if self.packing else None
        self.scatters = self.packing and self.table is not None
        # ... so each step writes its dL/d(products) (for a cell with one gradient for
        # both, its only one) into ONE (G·H, B) block that stays in cache, and only a step
        # no GEMM took is copied into its block of the step-major array (``_settle``):
        # writing every step's into that 20 MB array read each line from memory first
        # (LSTM 512's backward kernel over 50 steps 4.2 against 2.8 ms with the block in
        # cache). So does a separate dL/d(input projection) when the GEMM scatters it;
        # otherwise it goes step-major, for the passes after the loop.
        self.hot = (self.buffer("dhot", (self.GH, self.B))
                    if self.packing and self.T > 1 else None)
        self.hot_x = (self.buffer("dxhot", (self.GH, self.B))
                      if self.hot is not None and separate else None)
        # ... and, when something after the loop reads it (the input's gradient, a dense
        # input's dW_x, the bias), the GEMM copies it into its columns of a feature-major
        # block as it copies dL/d(products) (``keep2``): no step-major block, and no copy
        # of it after the loop (2 × GRU 512's upper layer: 3.4 ms a step)
        self.flat_dx = (self.buffer("flatx", (self.GH, self.T * self.B))
                        if self.hot_x is not None and (input_grad or not self.scatters)
                        else None)
        self._hot_t = None
        if self.table is not None:     # one-hot input: dW_x transposed, from zero
            self.dtable_T = self.token_rows("dtableT", self.table.shape[::-1])
            self.dtable_T[...] = 0

    def output_grad(self, dy) -> None:
        """The gradient at the loop's outputs (T·B rows of H, or None), read by ``dy_at``
        and added by the step GEMM (``dy_next``): a block, read transposed, or a
        ``ProductGrad`` d w (d (T·B, V), w (V, H): a dense layer's input gradient). On the
        step GEMM that product is never multiplied out: each step's W_h^T
        product makes it with its own, [W_h^T w^T] packed and d's rows of the next step
        transposed as B's last rows, one sum over K = G·H + V. Against the dense layer's
        (T·B, V) (V, H) GEMM and a pass adding its far-apart columns per step, RNN 512's
        backward was 1.6 ms shorter (AVX2) a batch."""
        xp, T, B = self.xp, self.T, self.B
        self.dyT = self.dy_w = self.dy_steps = None
        if dy is None:
            return
        if isinstance(dy, ProductGrad) and self.packing:
            d, self.dy_w = dy.d, dy.w
            self.dy_steps = self.buffer("dysteps", (T, d.shape[1], B))   # step t: d_t^T
            xp.copyto(self.dy_steps, d.reshape(T, B, d.shape[1]).transpose(0, 2, 1))
            return
        self.dyT = cells.transposed(xp, dense_grad(dy), self.buffer("dyT", (self.H, T * B)))

    def dy_at(self, t: int):
        """dL/dh' of step t (H, B): not to be written into."""
        if self.dy_steps is not None:
            return self.dy_w.T @ self.dy_steps[t]
        return self.dyT[:, t * self.B:(t + 1) * self.B]

    @property
    def has_dy(self) -> bool:
        return self.dyT is not None or self.dy_steps is not None

    def _flat(self, steps, name):
        """``steps`` (T, G·H, B) as a (G·H, T·B) block: step t in columns t·B..t·B+B-1."""
        T, GH, B = self.T, self.GH, self.B
        if T == 1:
            return steps.reshape(GH, B)
        flat = self.buffer(name, (GH, T * B))
        if self.packing and steps.flags.c_contiguous and kernels.usable(flat, steps):
            kernels.unstep(flat, steps)     # on the loop's threads, which then sleep: a GEMM
            self.park()                     # of OpenBLAS's reads the block next
            return flat
        self.xp.copyto(flat.reshape(GH, T, B), steps.transpose(1, 0, 2))
        return flat

    def _fill_in(self, flat, steps):
        """``flat`` (G·H, T·B), which the step GEMM laid out, with the steps it did not
        take copied in from the step-major ``steps``."""
        B = self.B
        for t in range(self.T):
            if not self.on_gemm[t]:
                flat[:, t * B:(t + 1) * B] = steps[t]
        return flat

    @property
    def dh(self):
        """dL/d(products) of every step, (G·H, T·B), for the weight gradients."""
        self._settle()
        if self._dh is None:
            if self.flat_dh is not None:  # the step GEMM laid out most steps already
                self._dh = self._fill_in(self.flat_dh, self.dh_steps)
            else:
                self._dh = self._flat(self.dh_steps, "flat")
            if self.dh_steps is self.dx_steps:
                self._dx = self._dh
        return self._dh

    @property
    def dx(self):
        """dL/d(input projections) of every step, (G·H, T·B) (a GEMM with the input)."""
        self._settle()
        if self._dx is None:
            if self.dh_steps is self.dx_steps:
                return self.dh
            if self.flat_dx is not None:      # the step GEMM laid out most steps already
                self._dx = self._fill_in(self.flat_dx, self.dx_steps)
            elif self.hot_x is not None:
                raise RuntimeError(f"{self.layer.name}: the backward kept no dL/d(input "
                                   f"projections) (start_backward(input_grad=False))")
            else:
                self._dx = self._flat(self.dx_steps, "flatx")
        return self._dx

    def _step_grad(self):
        """The block of this step's dL/d(products): the block in cache (``hot``) or the
        step's own block of ``dh_steps``."""
        if self.hot is None:
            return self.dh_steps[self.t]
        self._hot_t = self.t
        return self.hot

    def _settle(self) -> None:
        """The step that wrote into the block in cache (if any) is done: unless its W_h^T
        product was on the step GEMM (which laid it out and scattered it), copy it into its
        block of the step-major array, where the passes after the loop read it."""
        t, self._hot_t = self._hot_t, None
        if t is not None and not self.on_gemm[t]:
            self.dh_steps[t][...] = self.hot
            if self.hot_x is not None:
                self.dx_steps[t][...] = self.hot_x

    def d_input(self):
        """Where this step's dL/d(W_x x + b) (G·H, B) goes."""
        if self.dx_steps is self.dh_steps:
            return self._step_grad()
        if self.hot_x is None:
            return self.dx_steps[self.t]
        self._hot_t = self.t
        return self.hot_x

    def d_product(self, gates):
        """Where this step's dL/d(product of ``gates``) goes."""
        if gates is ALL:
            return self._step_grad()
        r0, r1 = self.rows(gates)
        return self._step_grad()[r0:r1]

    def bias_grad(self):
        """Σ over the steps and columns of dL/d(input projections), (G·H,): the input
        bias's gradient."""
        if self.hot is None:
            return self.dx_steps.sum(axis=(0, 2))
        return self.dx.sum(axis=1)

    def product_backward(self, gates, g=None):
        """Store ``g`` = dL/d(product) (None: the caller wrote it into ``d_product``) and
        return W_h[rows]^T g, the gradient at the vector the product multiplied."""
        if gates is ALL:
            dst, w_hT = self._step_grad(), self.w_hT
        else:
            r0, r1 = self.rows(gates)
            dst, w_hT = self._step_grad()[r0:r1], self.w_hT[:, r0:r1]
        if g is not None:
            dst[...] = g
        dy, self.dy_next = self.dy_next, None     # the step whose dL/dh' is added, or None
        if gates is ALL and self.packing:
            fold = self.dy_steps is not None      # (output_grad)
            if self.packed_T is None:
                self.packed_T = kernels.Packed(w_hT, lambda n: self.buffer("packedT", n),
                                               more=self.dy_w.T if fold else None)
            add = more = None
            if fold:   # B's last rows: the step's d^T, or zeros (no dL/dh' to add)
                if dy is None and self.dy_zero is None:
                    self.dy_zero = self.xp.zeros(self.dy_steps.shape[1:], dtype=dst.dtype)
                more = self.dy_zero if dy is None else self.dy_steps[dy]
            elif dy is not None:
                add = self.dyT[:, dy * self.B:(dy + 1) * self.B]
            # dst into the columns the weight gradient reads and (also dL/d(input
            # projection)) into dW_x, as the GEMM packs it, from cache, instead of passes
            # over the blocks after the loop; the next step's dL/dh' added as it stores
            scatter = (self.dtable_T, self.idx[self.cols]) if self.scatters else None
            keep2 = None if self.flat_dx is None else self.flat_dx[:, self.cols]
            side = None     # the GRU's dL/d(W_x x + b), apart: scattered and laid out too
            if self.dx_steps is not self.dh_steps and (scatter or keep2 is not None):
                side = self.d_input()
            self.on_gemm[self.t] = True
            self._took_dy = dy is not None
            return kernels.step_gemm(self.xp.empty((self.H, self.B), dtype=dst.dtype),
                                     self.packed_T, dst, scatter=scatter,
                                     keep=self.flat_dh[:, self.cols], add=add, keep2=keep2,
                                     side=side, more=more)
        return self.xp.matmul(w_hT, dst)

    def took_dy(self) -> bool:
        """Whether the step just undone added the output gradient of step ``dy_next`` (the
        step undone next, set by the loop) to W_h^T g as the step GEMM stored it (or made it
        with its product, ``output_grad``): the loop then
        does not add it (a pass of its own over its far-apart columns took 1.8 ms a LSTM
        512 batch). A cell adds the product's result into its state gradient once, so the
        sum is the same."""
        took, self._took_dy, self.dy_next = self._took_dy, False, None
        return took

    def table_grad(self):
        """dW_x of the one-hot input, transposed (V, G·H): every step's dL/d(input
        projection) columns added into the rows of their tokens (the steps the step GEMM
        did not already scatter, in the order the loop undid them)."""
        self._settle()
        T, B = self.T, self.B
        order = range(T) if self.layer.reverse else range(T - 1, -1, -1)
        left = [t for t in order if not (self.scatters and self.on_gemm[t])]
        cells.scatter_steps(self.xp, self.dtable_T, self.dx_steps, self.idx, left, B)
        return self.dtable_T

    def weight_grads(self, before) -> None:
        """Add dW_h, and the recurrent bias's gradient, from the stored gradients: per group
        of rows Σ_t g_t v_t^T (``before``: the columns of ``hs`` holding the states before
        steps 0..T−1). Not for a folded input (``Recurrent._backward`` does that one)."""
        layer, w = self.layer, self.layer.weights
        if list(self.groups) == [(0, self.GH)] and self.groups[(0, self.GH)] is None:
            w.add_product("h", self.dh, self.hs[:, before].T)   # one group: Σ_t dhproj_t h_t^T
        elif self.groups:
            g = self.xp.zeros((self.GH, self.H), dtype=layer.dtype)
            for (r0, r1), block in self.groups.items():
                v = self.hs[:, before] if block is None else block
                g[r0:r1] += self.dh[r0:r1] @ v.T
            w.add_grad("h", g)
        layer.hbias_grad(self.dh)


class Recurrent(Layer):
    """The step loop, state handling and set-up shared by every cell.

    A cell subclass sets ``CONF_FIELD``, ``required``, ``gates`` (G), ``gate_names``,
    ``parts`` and writes ``formula``; it may declare ``sums_projections``, give hand-written
    ``step_forward`` / ``step_backward`` (``fused`` names their kernel), an ``export`` form,
    and override ``_keys`` for param names of its own."""

    recurrent = True
    has_params = True
    claims_grads = True
    takes_product_grad = True    # a dense layer's input gradient, folded (Products.output_grad)
    CONF_FIELD = ""
    #: gates stacked in the projections (G), and their names (param keys ``<gate>_hx`` ...)
    gates = 1
    gate_names: tuple = ()
    #: state parts: 1 (h) or 2 (h, c)
    parts = 1
    #: the step needs only the sum W_x x + b + W_h h, so the loop may compute it with ONE
    #: GEMM over the stacked [h; x; 1] (the GRU applies r to W_ch h alone)
    sums_projections = False
    #: for a cell that does not sum its projections: how many leading gates do (the GRU's
    #: z and r), so that the step GEMM may add a one-hot input's projection of theirs to
    #: the product (``Products.split_input``)
    summed_gates = 0
    #: the gradient at W_h h differs from the gradient at the input projection (set with
    #: hand-written steps that keep the two apart, the GRU's)
    separate_dhproj = True
    #: the hand-written step's fused CPU kernel (engine/layers/kernels), or "" when the cell
    #: runs its formula or NumPy maths only
    fused = ""
    #: how the cell maps to PyTorch's and ONNX's layouts, or None (not exportable)
    export: ExportForm | None = None
    #: fold the input projection into the step GEMM when D + 1 <= FOLD_INPUT · H (and the
    #: cell sums its projections)
    FOLD_INPUT = 0.5
    #: run the formula on a tape even where the cell has hand-written steps (tests compare
    #: the two; a class without hand-written steps always does)
    derived = False

    # ------------------------------------------------------------- the cell
    def formula(self, f, x, state, U):
        """The cell's step: new state parts (h first) from ``x`` (per-gate input projections),
        ``state`` (the parts before the step) and ``U(gates, v)`` (the recurrent product);
        see the module docstring."""
        raise NotImplementedError(f"{type(self).__name__} has no formula")

    @classmethod
    def hand_written(cls) -> bool:
        """Whether the class gives its own step_forward/step_backward."""
        return cls.step_forward is not Recurrent.step_forward

    def describe_maths(self) -> str:
        """What this layer's step runs: its fused kernel, its hand-written NumPy maths, or
        its formula with the derived backward."""
        if self.uses_formula:
            return "formula, derived backward"
        if self.has_kernel() and kernels.usable(self.xp.zeros((1, 1), dtype=self.dtype)):
            return f"{self.fused} kernel"
        return "NumPy formulas"

    def has_kernel(self) -> bool:
        """Whether a fused kernel exists for this layer's settings."""
        return bool(self.fused)

    def step_forward(self, xp, ops: Products, x, state):
        """One step: (raw new state parts, what the backward needs); ``x`` is the step's
        input projection (G·H, B), or None when the loop does not materialise it (a cell
        that sums its projections asks ``ops.product(..., with_input=True)`` instead). This
        default runs the formula on a tape (``formula_forward``)."""
        return self.formula_forward(xp, ops, x, state)

    def step_backward(self, xp, ops: Products, d, state, cache, need_dprev: bool):
        """Reverse of ``step_forward``: ``d`` the gradients at the new state parts (None:
        none); writes dL/d(input projection) into ``ops.d_input()`` and the products'
        gradients through ``ops.product_backward``; returns the gradients at the state
        parts before the step (None where none flows), or None without ``need_dprev``.
        This default walks the tape back (``formula_backward``)."""
        return self.formula_backward(xp, ops, d, state, cache, need_dprev)

    def formula_forward(self, xp, ops: Products, x, state):
        """``formula`` on a tape: the step's new state parts and the recorded tape."""
        tape = Tape(xp)
        H = self.H
        xv = [tape.leaf(x[k * H:(k + 1) * H]) for k in range(self.gates)]
        sv = tuple(tape.leaf(s) for s in state)

        def U(gates, v):
            value = ops.product(gates, v.value if hasattr(v, "value") else v)
            return tape.record(value, (v,), lambda g: (ops.product_backward(gates, g),))

        out = tuple(self.formula(Taped(tape), xv, sv, U))
        return tuple(o.value for o in out), TapedStep(tape, xv, sv, out)

    def formula_backward(self, xp, ops: Products, d, state, cache: TapedStep, need_dprev: bool):
        """The backward derived from ``formula``: the tape of ``formula_forward`` walked in
        reverse (see ``step_backward`` for what it writes and returns)."""
        tape = cache.tape
        tape.backward(zip(cache.out, d))
        dx, H = ops.d_input(), self.H
        for k, leaf in enumerate(cache.x):
            g = tape.grad(leaf)
            dx[k * H:(k + 1) * H] = 0 if g is None else g
        if not need_dprev:
            return None
        # the loop adds into what it gets back: never hand it an array it gave (a seed
        # passed straight through an addition)
        grads = tuple(tape.grad(s) for s in cache.state)
        return tuple(g.copy() if g is not None and any(g is s for s in d) else g for g in grads)

    def evaluate(self, xp, x, state, U):
        """The formula on plain arrays (its forward value only)."""
        return tuple(self.formula(Direct(xp), x, state, U))

    # ---------------------------------------------------------------- params
    @classmethod
    def _keys(cls, conf):
        """(input-to-hidden keys, hidden-to-hidden keys, bias keys), in param order."""
        b = tuple(f"{g}_b" for g in cls.gate_names) if cls.cell_conf(conf).bias_term else ()
        return (tuple(f"{g}_hx" for g in cls.gate_names),
                tuple(f"{g}_hh" for g in cls.gate_names), b)

    @classmethod
    def cell_conf(cls, conf):
        return getattr(conf, cls.CONF_FIELD)

    @classmethod
    def default_param_names(cls, conf):
        hx, hh, b = cls._keys(conf)
        return list(hx) + list(hh) + list(b)

    @classmethod
    def context_sources(cls, conf):
        """Copy i reads copy i−1 (kForward) or copy i+1 (kBackward) of this layer."""
        backward = cls.cell_conf(conf).direction == pb.kBackward
        return [(conf.name, -1 if backward else 1)]

    def _bias_default(self, key):
        return ("constant", 0.0)

    # ------------------------------------------------------------------ setup
    def setup(self, srcs):
        self.check_cell()
        self.H = H = int(self.cell_conf(self.conf).dim_hidden)
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
        #: the data source's rows are one-hot codes (kOneHot): the loop gathers the columns
        #: of W_x instead of multiplying x by it
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

    def check_cell(self) -> None:
        """Refuse settings the cell cannot run (one line naming the layer)."""

    def params_ready(self, like=None) -> None:
        if like is None:
            self.weights.fuse()
        else:
            self.weights.adopt(like.weights)

    def add_hbias(self, hproj, first_row: int = 0) -> None:
        """Add the hidden-side bias to a product's rows (``first_row``: its first row of W_h h;
        columns are sequences)."""
        if self.hbias_key is not None:
            lo = self.hbias_from - first_row
            if 0 <= lo < hproj.shape[0]:
                hproj[lo:] += self.params[self.hbias_key].data[:, None]

    def hbias_grad(self, dhproj) -> None:
        """Accumulate the hidden-side bias's gradient from dL/d(W_h h) (G·H, N)."""
        if self.hbias_key is not None:
            add_grad(self.params[self.hbias_key], dhproj[self.hbias_from:].sum(axis=1))

    @property
    def uses_formula(self) -> bool:
        """The step runs on the tape (no hand-written step, or ``derived`` asked for)."""
        return self.derived or not self.hand_written()

    @property
    def folds_input(self) -> bool:
        """Whether a block runs each step as one GEMM over [h; x; 1] (see the docstring); a
        one-hot input is gathered instead, never folded."""
        return (self.sums_projections and not self.uses_formula and self.hbias_key is None
                and not self.one_hot_input and self.D + 1 <= self.FOLD_INPUT * self.H)

    # ----------------------------------------------------------------- state
    def zero_state(self, batch):
        xp = self.xp
        parts = tuple(xp.zeros((batch, self.H), dtype=self.dtype) for _ in range(self.parts))
        return self._outer(parts)

    def _outer(self, parts):
        """Row-major state as the layer contract passes it: h, or the tuple (h, c)."""
        return parts[0] if len(parts) == 1 else tuple(parts)

    def _inner(self, state):
        """Feature-major state parts (transposed views) of a row-major state."""
        parts = state if isinstance(state, tuple) else (state,)
        return tuple(None if s is None else s.T for s in parts)

    def _mask(self, mask):
        """(m, 1 − m) as (1, B) rows of self.dtype, or None: no mask, or a mask on the host
        that keeps every column (the full steps of a padded batch). There the blend would
        give the step's own values back, for six array operations per step forward and as
        many backward, a fifth of a bi-LSTM 100 step on the addition problem; a mask on
        the GPU is blended as it is (the test would wait for the device)."""
        if mask is None or (type(mask) is np.ndarray and bool(np.all(mask == 1))):
            return None
        m = self.xp.asarray(mask, dtype=self.dtype).reshape(1, -1)
        return m, 1 - m

    # ------------------------------------------------------- one copy (reference)
    def forward(self, ctx, xs, state):
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
        fresh = lambda what, shape: self.xp.empty(shape, dtype=self.dtype)  # noqa: E731
        return self._forward(ctx, x, len(xs), parts, 1, batch, fresh)

    def backward(self, ctx, dy, dstate, cache):
        dxs, d0 = self._backward(ctx, dy, None if dstate is None else self._inner(dstate),
                                 cache, True)
        return dxs, None if d0 is None else self._outer(tuple(d.T for d in d0))

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
        """The step loop over all T copies (see ``_forward``)."""
        x = one_array(xs[self.data_pos])
        parts = self._inner(state)
        B = parts[0].shape[1]
        return self._forward(ctx, x, len(xs), parts, x.shape[0] // B, B, self._buffer)

    def backward_block(self, ctx, dy, cache):
        """Reverse of ``forward_block``: the gradient at the final state is not wanted (it
        is carried into the next batch without one)."""
        dxs, d0 = self._backward(ctx, dy, None, cache, ctx.need_state_grad)
        return dxs, None if d0 is None else self._outer(tuple(d.T for d in d0))

    # ----------------------------------------------------------- the step loop
    def _forward(self, ctx, x, n_srcs, parts, T, B, buffer):
        """T steps from the state ``parts``. ``hs`` (H, (T+1)·B) holds the states: forward,
        column block 0 the initial h and block t+1 the output of step t; backward
        (``reverse``), block T the initial h and block t the output of step t, so the state
        before step t is block t (forward) or t+1 (backward) and the outputs are T
        consecutive blocks either way. Step t's products are computed in slice t of one
        (T, G·H, B) block. The input projections: one GEMM (G·H, T·B), laid out step-major
        (T, G·H, B); or, for a one-hot input, gathered columns of the table W_x + b (into a
        step-major block, or per step added
        to the product of a cell that sums its projections: the GEMM's K shrinks from
        H+D+1 to H, 8 ms less per LSTM 512 batch than the folded GEMM); or folded: ``hs``
        is the top of z = [h; x; 1] (H+D+1, (T+1)·B), x_t in the column block of the state
        before step t, and each step ONE GEMM [W_h W_x b] z_t. Returns the output (T·B, H)
        row-major (a view), the final state (row-major, not aliasing the kept blocks) and
        the cache."""
        xp = self.xp
        H, D, GH = self.H, self.D, self.gates * self.H
        N = T * B
        w = self.weights
        rev = self.reverse
        before = (lambda t: t + 1) if rev else (lambda t: t)  # block of the state before step t
        first = T if rev else 0                               # block of the initial state
        formula = self.uses_formula
        step = self.formula_forward if formula else self.step_forward
        fold = x is not None and self.folds_input
        idx = None
        if fold:
            nb = 1 if self.has_bias else 0
            z = buffer("z", (H + D + nb, N + B))
            xcols = slice(B, N + B) if rev else slice(0, N)
            z[H:H + D, xcols] = x.T
            if nb:
                z[H + D, xcols] = 1
            hs = z[:H]
            ops = Products(self, T, B, hs, buffer)
            ops.z = z
            ops.wc = wc = buffer("wc", (GH, H + D + nb))
            wc[:, :H] = ops.w_h
            wc[:, H:H + D] = w.data("x")
            if nb:
                wc[:, H + D] = w.data("b")
        else:
            hs = buffer("hs", (H, N + B))
            ops = Products(self, T, B, hs, buffer)
            # materialised projections are step-major (T, G·H, B): a step reads its own
            # contiguous block (GRU 512's forward kernel read its columns of a (G·H, T·B)
            # block in 10 against 3 ms per batch)
            if x is None:                       # no input this step: the projection is b
                ops.xproj = xproj = buffer("xproj", (T, GH, B))
                xproj[...] = w.data("b")[None, :, None] if self.has_bias else 0
            elif self.one_hot_input:
                idx = cells.one_hot_index(xp, x)
                ops.idx = idx
                ops.table = table = buffer("table", (GH, D))
                table[...] = w.data("x")
                if self.has_bias:
                    table += w.data("b")[:, None]
                if not formula and not self.sums_projections and self.summed_gates and \
                        ops.packing and self.hbias_key is None:
                    ops.split_input(self.summed_gates * H)
                elif formula or not self.sums_projections:
                    ops.xproj = cells.gather_steps(xp, buffer("xproj", (T, GH, B)), table, idx)
            else:
                flat = xp.matmul(w.data("x"), x.T, out=buffer("flat", (GH, N)))
                ops.xproj = buffer("xproj", (T, GH, B))
                bias = w.data("b") if self.has_bias else None
                if ops.packing and kernels.usable(flat, ops.xproj, bias):
                    # the bias and the step-major layout in one pass on the loop's threads
                    # (two NumPy passes over 15 MB were 4.4 ms of a 2 x GRU 512 step)
                    kernels.restep(ops.xproj, flat, None if bias is None else
                                   xp.ascontiguousarray(bias))
                else:
                    if bias is not None:
                        flat += bias[:, None]
                    xp.copyto(ops.xproj, flat.reshape(GH, T, B).transpose(1, 0, 2))
        hs[:, first * B:(first + 1) * B] = parts[0]
        cur = (hs[:, first * B:(first + 1) * B],) + tuple(parts[1:])
        m = None if ctx.mask is None else ctx.mask.reshape(T, B)
        steps = [None] * T
        # On the step GEMM the new h goes on as the step's own array, and the next step's
        # GEMM copies it into its columns of hs while it packs it (``Products.state_to``):
        # a copy of its own into hs's far-apart rows cost LSTM 512 2 ms a batch
        handed = ops.packing and not fold
        for t in (range(T - 1, -1, -1) if rev else range(T)):
            mm = None if m is None else self._mask(m[t])
            zt = None if not fold else ops.z[:, before(t) * B:(before(t) + 1) * B]
            ops.at(t, cur[0], zt)
            new, cc = step(xp, ops, ops.input_projection(), cur)
            if mm is not None:
                new = tuple(mm[0] * r + mm[1] * p for r, p in zip(new, cur))
            out = t if rev else t + 1
            nxt = hs[:, out * B:(out + 1) * B]
            steps[t] = StepCache(cur, cc, mm)
            if handed:
                ops.state_to(nxt, new[0])
            else:
                nxt[...] = new[0]
            cur = (new[0] if handed else nxt,) + tuple(new[1:])
        ops.state_to(None)        # the last h (or one no GEMM took) into hs now
        ops.park()
        ys = (hs[:, :N] if rev else hs[:, B:]).T
        if buffer == self._buffer:
            # the carried state must not alias the blocks the next batch rewrites
            final = self._outer(tuple(xp.ascontiguousarray(s.T) for s in cur))
        else:   # one copy, fresh blocks: its output is its state h
            final = self._outer((ys,) + tuple(s.T for s in cur[1:]))
        return ys, final, BlockCache(x, n_srcs, steps, hs, ops, idx)

    def _backward(self, ctx, dy, dfinal, cache: BlockCache, need_state_grad: bool):
        """Reverse of ``_forward``: the step loop in the opposite direction of the pass
        (``dfinal``: the gradient at the final state parts, or None), each step's gradients
        at the input projection and the products written into step-major (T, G·H, B)
        blocks (laid out (G·H, T·B) after the loop where a GEMM reads them), then every
        weight gradient of the call from one GEMM per group (one in all when the input is
        folded; the columns of a one-hot input's dW_x added up step by step instead of a GEMM)
        and the input gradient from one GEMM. Returns (dxs, gradient at the initial state
        parts or None)."""
        xp = self.xp
        x, steps, ops = cache.x, cache.steps, cache.ops
        T = len(steps)
        B = ops.B
        N = T * B
        H, D = self.H, self.D
        w = self.weights
        formula = self.uses_formula
        step = self.formula_backward if formula else self.step_backward
        need_in = ctx.need_input_grads
        input_grad = x is not None and (need_in is None or bool(need_in[self.data_pos]))
        ops.start_backward(formula or self.separate_dhproj, zero=formula,
                           reuse_xproj=not formula and ops.xproj is not None,
                           input_grad=input_grad)
        # dy feature-major (an InnerProduct above gives it so: dyT is then a view), or left
        # as the InnerProduct's product and folded into the step GEMM (Products.output_grad):
        # each step's dL/dh' is a block with contiguous rows, added in place to the
        # gradient the next step sends back (which this loop owns)
        ops.output_grad(dy)
        has_dy = ops.has_dy
        rev = self.reverse
        start = T - 1 if rev else 0           # the pass's first step: dprev is the initial state's
        before = slice(B, N + B) if rev else slice(0, N)  # the states before steps 0..T-1
        # dst: the gradients at the state after the step being undone; owned by this loop
        # (fresh arrays), so dL/dh' of the step is added in place
        dst = None if dfinal is None else [None if g is None else g.copy() for g in dfinal]
        added = False           # dst[0] holds this step's dL/dh' already (Products.dy_next)
        for t in (range(T) if rev else range(T - 1, -1, -1)):
            sc = steps[t]
            d = [None] * self.parts if dst is None else dst
            if has_dy and not added:
                dh = ops.dy_at(t)
                if d[0] is None:
                    d[0] = dh        # not owned: nothing below writes into it
                else:
                    d[0] += dh
            if d[0] is None:
                d[0] = xp.zeros_like(sc.state[0])
            keep = [None] * self.parts
            if sc.mask is not None:  # masked columns pass their gradient straight to the old state
                for k, g in enumerate(d):
                    if g is not None:
                        d[k], keep[k] = sc.mask[0] * g, sc.mask[1] * g
            ops.at(t, sc.state[0])
            need = t != start or need_state_grad
            nxt = t + 1 if rev else t - 1
            if has_dy and need and 0 <= nxt < T and all(k is None for k in keep):
                ops.dy_next = nxt
            dprev = step(xp, ops, d, sc.state, sc.cell, need)
            added = ops.took_dy()
            if not need:
                dst = None
                continue
            dst = [add_grads(g, kept) for g, kept in zip(dprev, keep)]
        ops.park()
        if ops.z is not None:
            g = ops.dx @ ops.z[:, before].T           # [dW_h dW_x db] = Σ_t dpre_t z_t^T
            w.add_grad("h", g[:, :H])
            w.add_grad("x", g[:, H:H + D])
            if self.has_bias:
                w.add_grad("b", g[:, H + D])
        else:
            ops.weight_grads(before)
            if x is None:
                if self.has_bias:
                    w.add_grad("b", ops.bias_grad())
            elif cache.idx is None:
                if self.has_bias:
                    w.add_grad("b", ops.bias_grad())
                w.add_product("x", ops.dx, x)
            else:
                dtable = ops.table_grad().T
                if self.has_bias:  # every column of dx went into one column of dtable
                    w.add_grad("b", dtable.sum(axis=1))
                w.add_grad("x", dtable)
        ops.park()
        dxs = [None] * cache.n_srcs
        if input_grad:
            # dx = dpre^T W_x, made feature-major: a recurrent layer below reads dy^T as a view
            dxs[self.data_pos] = (w.data("x").T @ ops.dx).T.reshape(x.shape)
        if dst is not None:
            dst = [xp.zeros_like(p) if g is None else g for g, p in zip(dst, steps[start].state)]
        return dxs, dst


# ------------------------------------------------------------------ the cells


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
    gate_names = ("w",)
    sums_projections = True
    separate_dhproj = False
    fused = "rnn"
    export = ExportForm("RNN", ("w_hx",), ("w_hh",), ("b",), onnx_order=(0,))

    @classmethod
    def _keys(cls, conf):
        return ("w_hx",), ("w_hh",), (("b",) if conf.rnn_conf.bias_term else ())

    def check_cell(self):
        act = self.conf.rnn_conf.activation
        if act not in (pb.TANH, pb.RELU, pb.LINEAR):
            raise self.error(f"rnn_conf.activation {pb.ActivationType.Name(act)} is not "
                             f"supported; use TANH, RELU or LINEAR")
        self.relu, self.linear = act == pb.RELU, act == pb.LINEAR

    def has_kernel(self) -> bool:
        return not self.linear   # the identity needs no kernel

    def formula(self, f, x, state, U):
        act = f.relu if self.relu else f.identity if self.linear else f.tanh
        return (act(x[0] + U(ALL, state[0])),)

    def step_forward(self, xp, ops, x, state):
        pre = ops.product(ALL, state[0], with_input=True)
        if self.linear:
            return (pre,), pre
        if kernels.usable(state[0], inplace=pre):
            h = kernels.rnn_forward(pre, self.relu)
        else:
            h = cells.rnn_forward(xp, pre, self.relu)
        return (h,), h

    def step_backward(self, xp, ops, d, state, cache, need_dprev):
        out = ops.d_input()
        if self.linear:
            out[...] = d[0]
        elif kernels.usable(d[0], cache, out):
            kernels.rnn_backward(d[0], cache, self.relu, out=out)
        else:
            cells.rnn_backward(xp, d[0], cache, self.relu, out=out)
        return (ops.product_backward(ALL),) if need_dprev else None


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
    its b_iz + b_hz): b_ch is added to the c rows of W_h h right after the step's GEMM, and
    its gradient is the sum over steps and sequences of those rows of dL/d(W_h h).
    """

    CONF_FIELD = "gru_conf"
    required = (("gru_conf", "dim_hidden"),)
    gates = 3
    gate_names = ("z", "r", "c")
    summed_gates = 2
    fused = "gru"
    export = ExportForm("GRU", ("r_hx", "z_hx", "c_hx"), ("r_hh", "z_hh", "c_hh"),
                        ("r_b", "z_b", "c_b"), onnx_order=(1, 0, 2), reset_gated=2, hb="c_hb")

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

    def formula(self, f, x, state, U):
        h = state[0]
        z = f.sigmoid(x[0] + U(0, h))
        r = f.sigmoid(x[1] + U(1, h))
        c = f.tanh(x[2] + r * U(2, h))
        return (z * h + (1 - z) * c,)

    def step_forward(self, xp, ops, x, state):
        # z's and r's input projection added to the product by the step GEMM, when it can:
        # x then holds only c's (Products.split_input)
        hp = ops.product(ALL, state[0], with_input=ops.input_split)
        if kernels.usable(x, state[0], inplace=hp):
            h, cache = kernels.gru_forward(x, hp, state[0])
        else:
            h, cache = cells.gru_forward(xp, x, hp, state[0])
        return (h,), cache

    def step_backward(self, xp, ops, d, state, cache, need_dprev):
        out_x, out_h = ops.d_input(), ops.d_product(ALL)
        if kernels.usable(d[0], state[0], *cache, out_x, out_h):
            _, _, direct = kernels.gru_backward(d[0], state[0], *cache, out_x=out_x, out_h=out_h)
        else:
            _, _, direct = cells.gru_backward(xp, d[0], state[0], *cache, out_x=out_x, out_h=out_h)
        if not need_dprev:
            return None
        direct += ops.product_backward(ALL)
        return (direct,)


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
    gates = 4
    gate_names = ("i", "f", "o", "g")
    parts = 2
    sums_projections = True
    separate_dhproj = False
    fused = "lstm"
    export = ExportForm("LSTM", ("i_hx", "f_hx", "g_hx", "o_hx"), ("i_hh", "f_hh", "g_hh", "o_hh"),
                        ("i_b", "f_b", "g_b", "o_b"), onnx_order=(0, 3, 1, 2))

    def _bias_default(self, key):
        if key == "f_b":
            return ("constant", float(self.conf.lstm_conf.forget_bias))
        return ("constant", 0.0)

    def state_from_source(self, y):
        return (y, self.xp.zeros_like(y))

    def source_grad_from_state(self, dstate):
        return dstate[0]

    def formula(self, f, x, state, U):
        h, c = state
        i = f.sigmoid(x[0] + U(0, h))
        fg = f.sigmoid(x[1] + U(1, h))
        o = f.sigmoid(x[2] + U(2, h))
        g = f.tanh(x[3] + U(3, h))
        c_new = fg * c + i * g
        return (o * f.tanh(c_new), c_new)

    def step_forward(self, xp, ops, x, state):
        pre = ops.product(ALL, state[0], with_input=True)
        if kernels.usable(state[1], inplace=pre):
            h, c, cache = kernels.lstm_forward(pre, state[1])
        else:
            h, c, cache = cells.lstm_forward(xp, pre, state[1])
        return (h, c), cache

    def step_backward(self, xp, ops, d, state, cache, need_dprev):
        out = ops.d_input()
        if kernels.usable(d[0], d[1], state[1], *cache, out):
            _, dc_prev = kernels.lstm_backward(d[0], d[1], state[1], *cache, out=out)
        else:
            _, dc_prev = cells.lstm_backward(xp, d[0], d[1], state[1], *cache, out=out)
        return (ops.product_backward(ALL), dc_prev) if need_dprev else None


@register(pb.kMGU)
class MGULayer(Recurrent):
    """Minimal gated unit (kMGU, mgu_conf: dim_hidden, bias_term, direction; Zhou et al.
    2016): one forget gate, which also gates h before the candidate's recurrent product.

    f = σ(x W_fx^T + h W_fh^T + b_f)
    c = tanh(x W_cx^T + (f ⊙ h) W_ch^T + b_c)
    h' = (1 − f) ⊙ h + f ⊙ c
    Output y = h'; state h (B, H), copy i−1's (or copy i+1's with direction: kBackward).
    Params in order: f_hx, c_hx (H×D), f_hh, c_hh (H×H), then f_b, c_b (H) if bias_term.
    Only the formula is written: the step's backward is derived from it (engine/layers/tape.py).
    """

    CONF_FIELD = "mgu_conf"
    required = (("mgu_conf", "dim_hidden"),)
    gates = 2
    gate_names = ("f", "c")

    def formula(self, f, x, state, U):
        h = state[0]
        fg = f.sigmoid(x[0] + U(0, h))
        c = f.tanh(x[1] + U(1, fg * h))
        return (h + fg * (c - h),)


def describe_cells(layers) -> str:
    """What the recurrent layers among ``layers`` run, per cell type (``kGRU: gru kernel``),
    one part of the training banner; "" when there are none."""
    seen = {}
    for lay in layers:
        if isinstance(lay, Recurrent):
            seen.setdefault(f"{pb.LayerType.Name(lay.conf.type)}: {lay.describe_maths()}", None)
    return ", ".join(seen)


def cell_classes() -> dict:
    """LayerType -> class of every registered recurrent cell (derived from the registry)."""
    from engine.layers.base import REGISTRY
    return {t: c for t, c in REGISTRY.items() if isinstance(c, type) and issubclass(c, Recurrent)}
