"""Input layers: character streams, their labels, one-hot codes, sequence stores, feedback.

The data layers (kCharRNN, kRecordInput/kCSVInput) follow the input-layer protocol
of ``engine/layers/base.py`` (``InputLayer``): the worker calls ``load_batch()``
once per batch, then ``forward`` once per copy (or ``forward_block`` for all
copies), then ``end_batch()``; they publish their batch size, whether rows are
streams, where each row starts, and their cursors for checkpoints.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from engine.layers.base import InputLayer, Layer, LayerError, register, step_ids
from engine.proto import job_pb2 as pb


def resolve_path(path: str, info: dict) -> pathlib.Path:
    """A job's relative path: against the working folder first (as SINGA did), then the job file's."""
    p = pathlib.Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    alt = pathlib.Path(info.get("job_dir", ".")) / p
    return alt if alt.exists() else p


def read_vocab(path: pathlib.Path) -> list[str]:
    """A vocabulary file: UTF-8 text whose characters, in order, are the ids 0..V-1."""
    text = path.read_text(encoding="utf-8")
    chars = list(text)
    if len(set(chars)) != len(chars):
        dup = next(c for c in chars if chars.count(c) > 1)
        raise LayerError(f"vocabulary {path} lists {dup!r} twice; each character once")
    return chars


def encode_text(text: str, vocab: list[str], where: str) -> np.ndarray:
    """Characters -> int32 ids; a character outside the vocabulary is an error naming it."""
    index = {c: i for i, c in enumerate(vocab)}
    if all(len(c.encode("utf-8")) == 1 for c in vocab) and text.isascii():
        table = np.full(256, -1, np.int32)
        for c, i in index.items():
            table[ord(c)] = i
        ids = table[np.frombuffer(text.encode("ascii"), np.uint8)]
    else:
        ids = np.fromiter((index.get(c, -1) for c in text), np.int32, len(text))
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        off = int(bad[0])
        raise LayerError(f"{where}: character {text[off]!r} at offset {off} is not in the "
                         f"vocabulary; rebuild the vocabulary from this text or remove the character")
    return ids


@register(pb.kCharRNN)
class CharRNNInput(InputLayer):
    """Character streams from a text file (SINGA's kCharRNN).

    The text is encoded with the vocabulary and cut into ``batchsize``
    contiguous streams of equal length L. Each batch emits, per stream,
    ``unroll_len + 1`` successive characters starting at the stream's cursor,
    then advances the cursor by ``unroll_len``; so the last character of one
    batch is the first of the next, and batch k+1 continues batch k. When a
    stream cannot give another full window the cursors wrap to 0 and the batch
    is marked ``new_sequence`` (the carried recurrent state is reset).

    Output of its single copy: int32 ids, shape (batchsize, unroll_len + 1).
    """

    required = (("char_rnn_conf", "path"),)

    is_stream = True
    text = True

    def setup(self, srcs):
        c = self.conf.char_rnn_conf
        self.batchsize = int(c.batchsize)
        self.steps = int(c.unroll_len)
        if self.batchsize < 1 or self.steps < 1:
            raise self.error('char_rnn_conf batchsize and unroll_len must be '
                             "at least 1")
        path = resolve_path(c.path, self.info)
        if not path.exists():
            raise self.error(f'data file {c.path} not found; build the default '
                             f"corpus with: python tools/make_corpus.py")
        if path.is_dir():
            raise self.error(f'{c.path} is a folder; give a text file')
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f'{c.path} is not UTF-8 text (byte {e.start})') from None
        if not text:
            raise self.error(f'data file {c.path} is empty')
        self.vocab = self._vocab(text, c)
        self.vocab_size = len(self.vocab)
        need = self.batchsize * (self.steps + 1)
        if len(text) < need:
            raise self.error(f'{c.path} has {len(text)} characters, fewer than '
                             f"batchsize x (unroll_len + 1) = {need}; use a longer text or a "
                             f"smaller batch")
        try:
            ids = encode_text(text, self.vocab, str(c.path))
        except LayerError as e:
            raise self.error(str(e)) from None
        self.stream_len = len(ids) // self.batchsize
        self.streams = ids[: self.stream_len * self.batchsize].reshape(self.batchsize, self.stream_len)
        self.cursor = 0
        self.epoch = 0
        self.new_sequence = True
        self.stream_starts = np.zeros(self.batchsize, np.int64)
        self.stream_advance = self.steps
        self.first_stream = 0  # take_share: this worker's streams start here
        self.path = path
        self.out_shape = (self.steps + 1,)

    def _vocab(self, text, c):
        if c.vocab_path:
            vp = resolve_path(c.vocab_path, self.info)
            if not vp.exists():
                raise self.error(f'vocab_path {c.vocab_path} not found; fix the '
                                 f"path, or remove vocab_path to build the vocabulary from the text")
            try:
                return read_vocab(vp)
            except LayerError as e:
                raise self.error(str(e)) from None
        if self.info.get("vocab"):
            return list(self.info["vocab"])  # the training net's (or the checkpoint's)
        vocab = sorted(set(text))
        ws = self.info.get("workspace")
        if ws:
            os.makedirs(ws, exist_ok=True)
            out = pathlib.Path(ws) / "vocab.txt"
            out.write_text("".join(vocab), encoding="utf-8")
            self.info.setdefault("notes", []).append(f"vocabulary of {len(vocab)} characters "
                                                     f"built from the text, saved to {out}")
        return vocab

    def load_batch(self):
        T = self.steps
        if self.cursor + T + 1 > self.stream_len:
            self.cursor = 0
            self.epoch += 1
            self.new_sequence = True
        rows = np.arange(self.first_stream, self.first_stream + self.batchsize, dtype=np.int64)
        self.stream_starts = self.cursor + rows * self.stream_len
        window = self.streams[:, self.cursor:self.cursor + T + 1]
        self.batch = self.xp.asarray(window)
        self._cursor_used = self.cursor
        self.cursor += T

    def end_batch(self):
        """Called by the worker after a batch: the next batch continues these rows."""
        self.new_sequence = False

    def take_share(self, rank: int, workers: int) -> None:
        """Keep streams rank·b .. rank·b + b - 1 (b = batchsize / workers): the worker
        carries the state of its own contiguous group of streams. The cursor moves as
        before (all streams advance together), so it is the same on every worker."""
        rows = self.share_rows(self.batchsize, rank, workers)
        self.streams = self.streams[rows]
        self.first_stream = rows.start
        self.batchsize = rows.stop - rows.start

    def rewind(self) -> None:
        """Back to the first batch (every evaluation reads the same batches)."""
        self.cursor, self.epoch, self.new_sequence = 0, 0, True

    def forward(self, ctx, xs, state):
        return self.batch, None, None

    def cursor_state(self) -> dict:
        return {"cursor": int(self.cursor), "epoch": int(self.epoch),
                "new_sequence": bool(self.new_sequence)}

    def load_cursor_state(self, d: dict) -> None:
        self.cursor = int(d["cursor"])
        self.epoch = int(d["epoch"])
        self.new_sequence = bool(d["new_sequence"])


@register(pb.kRNNLabel)
class RNNLabel(Layer):
    """Labels of a kCharRNN stream: copy i emits the characters at position i + 1.

    y_i = data[:, i + 1] (int ids, shape (B,)): the next character after the one
    kOneHot copy i reads.
    """

    differentiable = False
    in_sampling_net = False
    rowwise = True
    step_select = True

    def setup(self, srcs):
        if len(srcs) != 1:
            raise self.error('kRNNLabel needs exactly one srclayer (the '
                             "kCharRNN data layer)")
        src = srcs[0]
        width = src.out_shape[0] if src.out_shape else 0
        if width < self.conf.unroll_len + 1:
            raise self.error(f'reads {width} characters per row from '
                             f'"{src.name}" but needs unroll_len + 1 = {self.conf.unroll_len + 1}')
        self.vocab_size = src.vocab_size
        self.out_shape = ()

    def forward(self, ctx, xs, state):
        return step_ids(xs[0], ctx, offset=1), None, None


@register(pb.kOneHot)
class OneHot(Layer):
    """One-hot codes of token ids: y[b, v] = 1 if id_b == v else 0, shape (B, V).

    V is onehot_conf.vocab_size, or the source's vocabulary size. A source that
    holds all steps (a kCharRNN copy read one-to-all) gives column ``step``.
    """

    rowwise = True
    step_select = True

    def setup(self, srcs):
        if len(srcs) != 1:
            raise self.error('kOneHot needs exactly one srclayer')
        v = self.conf.onehot_conf.vocab_size if self.conf.onehot_conf.HasField("vocab_size") else None
        src_v = srcs[0].vocab_size
        if v is None:
            if src_v is None:
                raise self.error('cannot tell the vocabulary size; set '
                                 "onehot_conf { vocab_size: N }")
            v = src_v
        elif src_v is not None and v < src_v:
            raise self.error(f'onehot_conf.vocab_size {v} is smaller than the '
                             f'vocabulary of "{srcs[0].name}" ({src_v}); raise it or remove it')
        self.vocab_size = int(v)
        self.out_shape = (self.vocab_size,)

    def forward(self, ctx, xs, state):
        ids = step_ids(xs[0], ctx)
        xp = self.xp
        y = xp.zeros((ids.shape[0], self.vocab_size), self.dtype)
        y[xp.arange(ids.shape[0]), ids.astype(xp.int64)] = 1
        return y, None, None

    def backward(self, ctx, dy, dstate, cache):
        return [None], None


@register(pb.kRecordInput, pb.kCSVInput)
class SequenceInput(InputLayer):
    """Sequence data from a store (store_conf): NumPy .npz (or a .csv for kCSVInput).

    An .npz holds ``x``: float features [N, T, F] or int token ids [N, T];
    ``y`` (when has_label): targets [N] (one per sequence), [N, K] or [N, T]
    (one per step); optional ``lengths`` [N] (valid steps of each sequence).
    A .csv holds one sequence per line: the label first (when has_label), then
    T*F numbers, with store_conf.shape = [T, F] (or [T]).

    Copy i of this layer emits step i of a batch of ``batchsize`` sequences:
    x[:, i] ((B, F) floats or (B,) ids). Its labels (aux output) are y[:] for
    per-sequence targets and y[:, i] for per-step targets. With ``lengths``,
    copy i also publishes the mask (i < length) so later layers skip padding.
    Batches walk the store in order (reshuffled each epoch when store_conf.shuffle)
    and wrap around; every batch starts new sequences.
    """

    required = (("store_conf", "path"),)

    def setup(self, srcs):
        s = self.conf.store_conf
        self.batchsize = int(s.batchsize[0]) if s.batchsize else 0  # repeated: SINGA's layers take the first
        if self.batchsize < 1:
            raise self.error('store_conf.batchsize must be at least 1')
        path = resolve_path(s.path, self.info)
        if not path.exists():
            raise self.error(f'data file {s.path} not found')
        backend = s.backend or ("csv" if path.suffix == ".csv" else "npz")
        try:
            x, y, lengths = (self._load_npz(path) if backend == "npz" else self._load_csv(path, s))
        except LayerError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is one clear line
            raise self.error(f'cannot read {s.path} as {backend}: {e}') from None
        self._check(x, y, lengths, s.path)
        self.x, self.y, self.lengths = x, y, lengths
        self.n = x.shape[0]
        self.is_ids = np.issubdtype(x.dtype, np.integer)
        self.vocab_size = int(x.max()) + 1 if self.is_ids else None
        self.out_shape = () if self.is_ids else tuple(x.shape[2:])
        # with shuffle, every epoch (the first included) walks its own permutation
        self.order = self._epoch_order(0)
        # take_share: each batch takes rows[...] of the whole_batch rows one worker reads
        self.whole_batch, self.rows = self.batchsize, slice(0, self.batchsize)
        self.cursor = 0
        self.epoch = 0
        self.new_sequence = True
        self.stream_starts = None

    def _load_npz(self, path):
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d:
                raise self.error(f'{path} has no array "x" (arrays: '
                                 f"{', '.join(d.files) or 'none'})")
            x = d["x"]
            y = d["y"] if "y" in d else None
            lengths = d["lengths"] if "lengths" in d else None
        return x, y, lengths

    def _load_csv(self, path, s):
        shape = tuple(s.shape)
        if not shape:
            raise self.error('a .csv store needs store_conf.shape [T, F] or [T]')
        rows = np.loadtxt(path, delimiter=s.separator or ",", ndmin=2)
        if s.has_label:
            y, feats = rows[:, 0], rows[:, 1:]
        else:
            y, feats = None, rows
        need = int(np.prod(shape))
        if feats.shape[1] != need:
            raise self.error(f'{path} rows have {feats.shape[1]} features, '
                             f"store_conf.shape {list(shape)} needs {need}")
        x = feats.reshape((-1,) + shape)
        if len(shape) == 1 and np.all(x == np.round(x)):
            x = x.astype(np.int64)  # shape [T]: one token id per step (np.loadtxt reads floats)
        if y is not None and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        return x, y, None

    def _check(self, x, y, lengths, where):
        T = self.conf.unroll_len
        if x.ndim not in (2, 3):
            raise self.error(f'{where}: x has shape {x.shape}; it must be [N, T, F] '
                             f"floats or [N, T] int ids")
        if x.ndim == 2 and not np.issubdtype(x.dtype, np.integer):
            raise self.error(f'{where}: x of shape [N, T] must hold int token ids; '
                             f"add a feature axis ([N, T, 1]) for float data")
        if x.shape[0] < 1:
            raise self.error(f'{where}: x holds no sequences')
        if x.shape[1] < T:
            raise self.error(f'{where}: x has {x.shape[1]} steps but the layer\'s '
                             f"unroll_len is {T}; pad the data or lower unroll_len")
        if self.conf.store_conf.has_label and y is None:
            raise self.error(f'{where}: no array "y"; add targets or set '
                             f"store_conf {{ has_label: false }}")
        if y is not None and y.shape[0] != x.shape[0]:
            raise self.error(f'{where}: y has {y.shape[0]} rows but x has '
                             f"{x.shape[0]}; they must match")
        if lengths is not None:
            if lengths.shape != (x.shape[0],):
                raise self.error(f'{where}: lengths has shape {lengths.shape}; it must '
                                 f"be [N] = [{x.shape[0]}]")
            if lengths.min() < 1 or lengths.max() > x.shape[1]:
                raise self.error(f'{where}: lengths must lie in 1..{x.shape[1]}')

    def supports_block(self) -> bool:
        return True

    def forward_block(self, ctx, xs, state):
        """All T copies at once: x, with the labels as ``ctx.aux_out`` and the mask as
        ``ctx.mask_out``, rows step-major (T·B); per-sequence labels repeat for every step."""
        xp = self.xp
        T = len(ctx.steps)
        B = self.xb.shape[0]

        def steps(a):
            return xp.ascontiguousarray(xp.swapaxes(a[:, :T], 0, 1)).reshape((T * B,) + a.shape[2:])

        if self.yb is not None:
            ctx.aux_out = steps(self.yb) if self._y_per_step else xp.concatenate([self.yb] * T, axis=0)
        if self.maskb is not None:
            ctx.mask_out = steps(self.maskb)
        return steps(self.xb), None, None

    def rewind(self) -> None:
        """Back to the first batch of the first epoch (every evaluation reads the same batches)."""
        self.cursor, self.epoch, self.new_sequence = 0, 0, True
        self.order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch: the store's order, or a seeded permutation with shuffle."""
        if not self.conf.store_conf.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.info.get("seed", 0), 3, epoch])
        return rng.permutation(self.n)

    def take_share(self, rank: int, workers: int) -> None:
        """Each batch: rows rank·b .. rank·b + b - 1 (b = batchsize / workers) of the rows
        of the (seeded, shared) epoch order one worker would read; the cursor still
        advances by the whole batch, the same on every worker."""
        self.rows = self.share_rows(self.whole_batch, rank, workers)
        self.batchsize = self.rows.stop - self.rows.start

    def load_batch(self):
        B = self.whole_batch
        if self.cursor + B > self.n:
            self.cursor = 0
            self.epoch += 1
            self.order = self._epoch_order(self.epoch)
        idx = self.order[np.arange(self.cursor, self.cursor + B) % self.n][self.rows]
        self.cursor += B
        xp = self.xp
        xb = self.x[idx]
        self.xb = xp.asarray(xb if self.is_ids else xb.astype(self.dtype))
        self.yb = None
        if self.y is not None:
            yb = self.y[idx]
            if not np.issubdtype(yb.dtype, np.integer):
                yb = yb.astype(self.dtype)
            self.yb = xp.asarray(yb)
        self.maskb = None
        if self.lengths is not None:
            T = self.conf.unroll_len
            m = (np.arange(T)[None, :] < self.lengths[idx][:, None]).astype(self.dtype)
            self.maskb = xp.asarray(m)
        self.new_sequence = True

    def forward(self, ctx, xs, state):
        i = ctx.step
        y = self.xb[:, i]
        if self.yb is not None:
            ctx.aux_out = self.yb[:, i] if self._y_per_step else self.yb
        if self.maskb is not None:
            ctx.mask_out = self.maskb[:, i]
        return y, None, None

    @property
    def _y_per_step(self):
        # [N, T] targets are per step; [N, K] with K != T are per sequence
        return self.y is not None and self.y.ndim == 2 and self.y.shape[1] == self.x.shape[1]

    def cursor_state(self) -> dict:
        return {"cursor": int(self.cursor), "epoch": int(self.epoch),
                "order": self.order.tolist() if self.conf.store_conf.shuffle else None}

    def snapshot(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "order": self.order}

    def restore(self, snap: dict) -> None:
        self.cursor, self.epoch, self.order = snap["cursor"], snap["epoch"], snap["order"]

    def load_cursor_state(self, d: dict) -> None:
        self.cursor = int(d["cursor"])
        self.epoch = int(d["epoch"])
        if d.get("order") is not None:
            self.order = np.asarray(d["order"], dtype=np.int64)


@register(pb.kRNNDummy)
class RNNDummy(Layer):
    """Placeholder fed back from another layer of the previous step (sampling).

    Copy i outputs what ``dynamic_srclayer`` output at step i-1; copy 0 takes
    the value carried from the previous batch or, at the very start, the
    initial value: ``low`` when low == high, else a draw from [low, high)
    (integers when ``integer``). Output shape: rnn_dummy_conf.shape (ids: ()).
    """

    differentiable = False
    required = (("rnn_dummy_conf", "dynamic_srclayer"),)

    @classmethod
    def context_sources(cls, conf):
        return [(conf.rnn_dummy_conf.dynamic_srclayer, 1)]

    def setup(self, srcs):
        c = self.conf.rnn_dummy_conf
        shape = tuple(int(s) for s in c.shape)
        if c.integer and shape in ((), (1,)):
            shape = ()
        self.out_shape = shape
        vocab = self.info.get("vocab")
        self.vocab_size = len(vocab) if (c.integer and vocab) else None

    def zero_state(self, batch):
        c = self.conf.rnn_dummy_conf
        shape = (batch,) + self.out_shape
        if c.low == c.high:
            host = np.full(shape, c.low)
        else:
            host = np.random.default_rng(0).uniform(c.low, c.high, shape)
        if c.integer:
            return self.xp.asarray(np.floor(host).astype(np.int64))
        return self.xp.asarray(host.astype(self.dtype))

    def forward(self, ctx, xs, state):
        if state is None:
            raise self.error('no value fed back yet')
        if self.conf.rnn_dummy_conf.integer:
            state = state.reshape(state.shape[0]) if state.ndim > 1 and state.shape[1] == 1 else state
        return state, None, None

    def backward(self, ctx, dy, dstate, cache):
        return [None] * len(self.conf.srclayers), None
