"""Workers: the reference executor of an unrolled net (kBP and kBPTT).

Forward walks the schedule (a topological order of the unrolled graph), one
node ``i#L`` at a time; backward walks it in reverse, adding each node's input
gradients into its sources' output gradients and the state gradient into the
previous copy. Param gradients accumulate in the shared Params over all
copies; ``run_batch`` zeroes them once per batch, the updater then applies
each owner param once.

Truncated BPTT: the state of a recurrent layer's last copy is carried into
copy 0 of the next batch (no gradient flows across the batch boundary). The
policy (AlgProto.state_carry):
  kCarryAuto      kResetBoundary for stream input (kCharRNN), kResetBatch otherwise
  kCarry          always carry
  kResetBoundary  carry, but start from zeros when the data starts new sequences
                  (a stream wrapped around, or a store batch of new sequences)
  kResetBatch     start every batch from zeros
When carrying over stream input, the worker checks that row b of this batch
starts where row b of the previous batch ended, so a carried state never
meets the wrong text.

A layer whose pass runs backwards (``direction: kBackward``, context offset −1)
never carries, under every policy: its pass starts at copy T−1 of every batch
from zeros (or its first-to-last source). Its state after copy 0 sums up this
window's steps, which come *before* the next window in time, so it is no
initial state for the next window's backward pass (that would need the steps
after the next window, which truncated BPTT has not read yet).
"""
from __future__ import annotations

import numpy as np

from engine.backend import DROPOUT, LazyRNG, host_floats, to_host
from engine.layers import Context
from engine.layers.base import add_grads
from engine.net import Joined, Net, Zeros
from engine.proto import job_pb2 as pb
from engine.unroll import node_id


def summarize(xp, a) -> dict | None:
    """mean, std and largest magnitude of a float array (or list of arrays), as floats."""
    if isinstance(a, (list, tuple)):
        parts = [x for x in a if x is not None]
        if not parts:
            return None
        a = xp.concatenate([x.reshape(-1) for x in parts])
    if a is None or not hasattr(a, "dtype") or not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return None
    return {"mean": float(a.mean()), "std": float(a.std()), "max": float(xp.abs(a).max())}


class ContinuityError(RuntimeError):
    """Carried state would meet data that does not continue the previous batch."""


class CarriedState:
    """The state carried from one batch into the next, keyed by layer name: an array, or a
    tuple of arrays (an LSTM's (h, c)). The one owner of its checkpoint form: ``arrays()``
    gives host arrays named ``<layer>/<part>/<parts>``, ``load`` reads them back."""

    def __init__(self, values: dict | None = None):
        self._values: dict = dict(values or {})

    def __getitem__(self, layer: str):
        return self._values[layer]

    def __setitem__(self, layer: str, value) -> None:
        self._values[layer] = value

    def __contains__(self, layer: str) -> bool:
        return layer in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def get(self, layer: str, default=None):
        return self._values.get(layer, default)

    def items(self):
        return self._values.items()

    def clear(self, keep=()) -> None:
        """Forget every carried value but those of the layers in ``keep``."""
        for name in [n for n in self._values if n not in keep]:
            del self._values[name]

    def copy(self) -> "CarriedState":
        """A shallow copy (the arrays are replaced between batches, never written in place)."""
        return CarriedState(self._values)

    def arrays(self) -> dict:
        """Host arrays for a checkpoint: ``<layer>/<part>/<parts>`` -> array."""
        out = {}
        for name, st in self._values.items():
            parts = st if isinstance(st, tuple) else (st,)
            for k, a in enumerate(parts):
                out[f"{name}/{k}/{len(parts)}"] = to_host(a)
        return out

    @classmethod
    def load(cls, arrays: dict, xp) -> "CarriedState":
        """The inverse of ``arrays`` (the arrays moved to ``xp``)."""
        groups: dict[str, dict[int, object]] = {}
        sizes: dict[str, int] = {}
        for key, a in arrays.items():
            name, k, n = key.rsplit("/", 2)
            groups.setdefault(name, {})[int(k)] = xp.asarray(a)
            sizes[name] = int(n)
        out = cls()
        for name, parts in groups.items():
            vals = tuple(parts[k] for k in range(sizes[name]))
            out[name] = vals if sizes[name] > 1 else vals[0]
        return out


def _zeros_like(xp, a):
    if isinstance(a, tuple):
        return tuple(xp.zeros_like(x) for x in a)
    return xp.zeros_like(a)


class Worker:
    """Runs batches of one Net: forward, backward, state carry. BP is BPTT with one step."""

    def __init__(self, net: Net, seed: int = 0, carry: int = pb.kCarryAuto):
        self.net = net
        self.xp = net.xp
        self.seed = seed
        # stream input, or a net driven only by its own feedback (sampling), carries state
        streams = any(lay.is_stream for lay in net.inputs) or not net.inputs
        if carry == pb.kCarryAuto:
            carry = pb.kResetBoundary if streams else pb.kResetBatch
        self.policy = carry
        self.carry = CarriedState()
        self._prev_starts: dict[str, np.ndarray] = {}
        # layers whose first copy (copy 0) takes a context from the previous batch: (layer,
        # the context layer, whether that is the layer itself: its state, else its output)
        self.ctx_layers = []
        #: layers with context: the copy that starts their pass gets ``initial_state``
        self.starts_from_state: set[str] = set()
        for layer in net.layers.values():
            for cname, off in type(layer).context_sources(layer.conf):
                self.starts_from_state.add(layer.name)
                if off < 0:   # a backward pass: nothing is carried (module docstring)
                    continue
                self.ctx_layers.append((layer, cname, cname == layer.name))
        #: layers fed back from ANOTHER layer's last output (a sampler's kRNNDummy): what
        #: they carry is the last symbol drawn, not a recurrent state, so no state_carry
        #: policy resets it (kResetBatch would feed the first symbol forever)
        self.feedback = {layer.name for layer, _, is_state in self.ctx_layers if not is_state}
        self.batch_index = 0
        self.outs: dict = {}
        #: when True, the next batch records per-node and per-param statistics in
        #: ``node_stats`` / ``param_stats`` (debug mode)
        self.record = False
        self.node_stats: dict = {}
        self.param_stats: dict = {}
        #: when True, backward notes in ``first_bad_grad`` the first node (in backward
        #: order) whose incoming gradient is not finite (diagnosing a bad batch)
        self.probe = False
        self.first_bad_grad: str | None = None
        #: the layers' checks of device values not read yet (Context.check)
        self.checks: list = []

    # ------------------------------------------------------------ batches
    @property
    def batchsize(self) -> int:
        for lay in self.net.inputs:
            if lay.batchsize:
                return int(lay.batchsize)
        return int(self.net.info.get("batchsize", 1))

    def reset(self) -> None:
        """Start over: every input layer back at its first batch, no carried state (each
        evaluation reads the same batches from the same zero state)."""
        for lay in self.net.inputs:
            lay.rewind()
        self.carry.clear()
        self._prev_starts.clear()

    def drop_carry(self) -> None:
        """Forget the state carried into the next batch (it starts from zeros): after a
        batch whose numbers went non-finite, its state must not reach the next one."""
        self.carry.clear()

    def load(self) -> None:
        """Load the next batch into every input layer and decide about carried state."""
        new_seq = False
        for lay in self.net.inputs:
            lay.load_batch()
            new_seq = new_seq or bool(lay.new_sequence)
        if self.policy == pb.kResetBatch or (self.policy == pb.kResetBoundary and new_seq):
            self.carry.clear(keep=self.feedback)
        elif self.carry:
            self._check_continuity()
        for lay in self.net.inputs:
            if lay.stream_starts is not None:
                self._prev_starts[lay.name] = (np.array(lay.stream_starts), int(lay.stream_advance))

    def _check_continuity(self) -> None:
        for lay in self.net.inputs:
            prev = self._prev_starts.get(lay.name)
            starts = lay.stream_starts
            if prev is None or starts is None:
                continue
            before, step = prev
            if not np.array_equal(np.asarray(starts), before + step):
                bad = int(np.flatnonzero(np.asarray(starts) != before + step)[0])
                raise ContinuityError(
                    f'layer "{lay.name}": row {bad} starts at offset {int(starts[bad])}, not at '
                    f"{int(before[bad] + step)} where the previous batch ended, so the carried "
                    f"state would meet unrelated text; set train_one_batch {{ state_carry: "
                    f"kResetBatch }} or fix the data order")

    #: checks kept unread at most for this many batches (a loop that never reads a
    #: number, e.g. a benchmark, still reads them now and then)
    MAX_PENDING = 64

    def host_values(self, *values) -> list[float]:
        """``values`` (Python or NumPy numbers, or 0-d device arrays) as Python floats, read
        from the device in one copy together with the layers' pending checks; the first
        failed check raises its error. The one place a training step waits for a GPU."""
        checks, self.checks[:] = list(self.checks), []
        flat = [v for failed, value, _ in checks for v in (failed, value)]
        got = host_floats(self.xp, [*flat, *values])
        for k, (_, value, error) in enumerate(checks):
            if got[2 * k]:
                raise error(None if value is None else got[2 * k + 1])
        return got[len(flat):]

    def run_batch(self, train: bool = True, load: bool = True) -> dict:
        """One batch: load, forward, (train: zero grads, backward). Returns metrics
        {name: [sum, count]}; on a GPU the sums are device scalars (``host_values``)."""
        if len(self.checks) > self.MAX_PENDING:
            self.host_values()
        if load:
            self.load()
        metrics: dict = {}
        if self.record:
            self.node_stats, self.param_stats = {}, {}
        self.forward(train, metrics)
        if train:
            self.net.grads.zero()
            self.backward()
            self.net.grads.settle()
        if self.record:
            self.param_stats = {p.name: {"data": summarize(self.xp, p.data),
                                         "grad": summarize(self.xp, p.grad)}
                                for p in self.net.params}
        self._end_batch()
        self.batch_index += 1
        return metrics

    def _end_batch(self) -> None:
        for layer, cname, is_state in self.ctx_layers:
            val = self.end_state(cname) if is_state else self.output(cname)
            if val is not None and (self.policy != pb.kResetBatch or not is_state):
                self.carry[layer.name] = val
        for lay in self.net.inputs:
            lay.end_batch()
        self.caches = {}
        self.ctxs = {}

    # ------------------------------------------------------- what a batch left
    def output(self, layer: str, copy: int | None = None):
        """The output of copy ``copy`` (default: the last) of ``layer`` in the last forward,
        or None."""
        T = self.net.layers[layer].conf.unroll_len
        return self.outs.get(node_id(T - 1 if copy is None else copy, layer))

    def end_state(self, layer: str):
        """The state of ``layer`` where its pass ended in the last forward (after copy T−1,
        or after copy 0 for a backward pass), or None."""
        lay = self.net.layers[layer]
        end = 0 if lay.reverse_pass(lay.conf) else lay.conf.unroll_len - 1
        return self.states.get(node_id(end, layer))

    # ------------------------------------------------------------ forward
    def initial_state(self, layer):
        st = self.carry.get(layer.name)
        return st if st is not None else layer.zero_state(self.batchsize)

    def forward(self, train: bool, metrics: dict) -> None:
        outs, states, caches, ctxs, masks, auxs = {}, {}, {}, {}, {}, {}
        seed, bi = self.seed, self.batch_index
        has_ctx = self.starts_from_state
        for n in self.net.nodes:
            lay = n.layer
            xs, aux = [], []
            for s, piece in zip(n.srcs, n.pieces):
                if s is None:
                    xs.append(None)
                    aux.append(None)
                elif isinstance(s, Joined):
                    xs.append(self.xp.concatenate([outs[x] for x in s.ids], axis=1))
                    aux.append(None)
                elif isinstance(s, Zeros):
                    xs.append(self.xp.zeros((self.batchsize,) + tuple(self.net.layers[s.src].out_shape),
                                            dtype=self.net.dtype))
                    aux.append(None)
                elif isinstance(s, list):
                    xs.append([outs[x] for x in s])
                    aux.append(auxs.get(s[0]))
                else:
                    y = outs[s]
                    xs.append(y[piece] if piece is not None else y)
                    aux.append(auxs.get(s))
            mask = None
            for s in n.mask_srcs:
                if masks.get(s) is not None:
                    mask = masks[s]
                    break
            state = None
            if n.ctx_src is not None:
                state = states[n.ctx_src] if n.ctx_is_state else outs[n.ctx_src]
            elif n.init_src is not None:
                state = lay.state_from_source(outs[n.init_src])
            elif lay.name in has_ctx:
                state = self.initial_state(lay)
            ctx = Context(step=n.step, unroll_len=lay.conf.unroll_len, train=train, mask=mask,
                          aux=aux, rng=LazyRNG(seed, DROPOUT, bi, n.index), metrics=metrics,
                          checks=self.checks)
            y, st, cache = lay.forward(ctx, xs, state)
            if ctx.mask_out is not None:
                ctx.mask = ctx.mask_out
            masks[n.id] = ctx.mask
            auxs[n.id] = ctx.aux_out
            outs[n.id] = y
            states[n.id] = st
            if self.record:
                st_y = summarize(self.xp, y)
                if st_y is not None:
                    self.node_stats.setdefault(n.id, {})["out"] = st_y
            if n.needs_grad:
                caches[n.id] = cache
                ctxs[n.id] = ctx
        self.outs, self.states, self.caches, self.ctxs = outs, states, caches, ctxs

    def first_nonfinite_output(self) -> str | None:
        """The first unrolled node (schedule order) whose last output is not finite."""
        xp = self.xp
        for n in self.net.nodes:
            y = self.outs.get(n.id)
            for a in (y if isinstance(y, list) else [y]):
                if a is not None and np.issubdtype(a.dtype, np.floating) and \
                        not bool(xp.isfinite(a).all()):
                    return n.id
        return None

    # ----------------------------------------------------------- backward
    def backward(self) -> None:
        xp = self.xp
        by_id = self.net.by_id
        dout: dict = {}
        dstate: dict = {}

        def acc(target, key, val, piece=None):
            if not by_id[key].needs_grad:
                return
            if piece is None:
                target[key] = add_grads(target.get(key), val)
            else:
                slots = target.setdefault(key, {})
                slots[piece] = add_grads(slots.get(piece), val)

        for n in reversed(self.net.nodes):
            if not n.needs_grad:
                continue
            lay = n.layer
            y = self.outs[n.id]
            dy = dout.pop(n.id, None)
            if lay.multi_output:
                got = dy or {}
                dy = [got.get(j, None) if got.get(j, None) is not None else xp.zeros_like(piece)
                      for j, piece in enumerate(y)]
            elif dy is None and not lay.is_loss:
                dy = xp.zeros_like(y)
            st = self.states[n.id]
            ds = dstate.pop(n.id, None)
            if ds is None and st is not None:
                ds = _zeros_like(xp, st)
            if self.record and dy is not None:
                self.node_stats.setdefault(n.id, {})["grad"] = summarize(xp, dy)
            if self.probe and self.first_bad_grad is None and dy is not None and \
                    not all(bool(xp.isfinite(d).all()) for d in (dy if isinstance(dy, list) else [dy])):
                self.first_bad_grad = n.id
            dxs, dprev = lay.backward(self.ctxs[n.id], dy, ds, self.caches[n.id])
            for s, piece, dx in zip(n.srcs, n.pieces, dxs):
                if dx is None or s is None or isinstance(s, Zeros):
                    continue
                if isinstance(s, Joined):
                    for sid, d in zip(s.ids, self.xp.split(dx, len(s.ids), axis=1)):
                        acc(dout, sid, d)
                elif isinstance(s, list):
                    for sid, d in zip(s, dx):
                        if d is not None:
                            acc(dout, sid, d)
                else:
                    acc(dout, s, dx, piece)
            if dprev is not None:
                if n.ctx_src is not None:
                    acc(dstate if n.ctx_is_state else dout, n.ctx_src, dprev)
                elif n.init_src is not None:
                    acc(dout, n.init_src, lay.source_grad_from_state(dprev))

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> dict:
        """What the next batch changes in the worker and its input layers (cheap: no
        array copies; the arrays involved are replaced, never written in place)."""
        inputs = {lay.name: lay.snapshot() for lay in self.net.inputs}
        return {"carry": self.carry.copy(), "prev": dict(self._prev_starts),
                "batch_index": self.batch_index, "inputs": inputs}

    def restore(self, snap: dict) -> None:
        """Back to a ``snapshot``: the next run_batch reads the same batch again."""
        self.carry = snap["carry"].copy()
        self._prev_starts = dict(snap["prev"])
        self.batch_index = snap["batch_index"]
        for lay in self.net.inputs:
            lay.restore(snap["inputs"][lay.name])

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Carried states (host arrays, named by ``CarriedState.arrays``) and input cursors,
        for exact resume: {"arrays": {"carry/<layer>/<part>/<parts>": array}, "meta": ...}."""
        arrays = {f"carry/{k}": a for k, a in self.carry.arrays().items()}
        meta = {"batch_index": self.batch_index,
                "cursors": {lay.name: lay.cursor_state() for lay in self.net.inputs},
                "prev_starts": {k: [v[0].tolist(), v[1]] for k, v in self._prev_starts.items()}}
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        self.batch_index = int(meta.get("batch_index", 0))
        for lay in self.net.inputs:
            cur = meta.get("cursors", {}).get(lay.name)
            if cur is not None:
                lay.load_cursor_state(cur)
        self._prev_starts = {k: (np.asarray(v[0], dtype=np.int64), int(v[1]))
                             for k, v in meta.get("prev_starts", {}).items()}
        carried = {k.split("/", 1)[1]: a for k, a in arrays.items() if k.startswith("carry/")}
        self.carry = CarriedState.load(carried, self.xp)
