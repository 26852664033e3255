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
import warnings

import numpy as np

from engine.checkpoint import write_atomic
from engine.config import read_text
from engine.layers.base import InputLayer, Layer, LayerError, register, step_ids
from engine.proto import job_pb2 as pb

#: Token ids a store may hold: 0 .. MAX_TOKEN_ID. The vocabulary is the largest id + 1, and
#: a one-hot row of 2**24 float32 values is already 64 MiB; 2**24 is also the last integer
#: float32 holds exactly.
MAX_TOKEN_ID = 2 ** 24 - 1


def resolve_path(path: str, info: dict) -> pathlib.Path:
    """A job's relative path: against the working folder first (as SINGA did), then the job file's."""
    p = pathlib.Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    alt = pathlib.Path(info.get("job_dir", ".")) / p
    return alt if alt.exists() else p


def read_vocab(path: pathlib.Path) -> list[str]:
    """A vocabulary file: UTF-8 text whose characters, in order, are the ids 0..V-1. A
    folder, an unreadable or a non-UTF-8 file is a LayerError naming it."""
    text = read_text(path, "vocabulary file", LayerError)
    if not text:
        raise LayerError(f"vocabulary {path} is empty; list each character once")
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

    @classmethod
    def fit_readers(cls, conf, readers):
        """The characters a batch moves on by, T = char_rnn_conf.unroll_len, must be the
        unroll_len of the layers that read the streams (their copies 0..T-1 take columns
        0..T of the T + 1 emitted). Left out, T follows theirs (rather than SINGA's
        default 50); given and different, it is an error."""
        lens = {r.name: r.unroll_len for r in readers}
        values = sorted(set(lens.values()))
        if not values or values[0] < 1:
            return None  # no readers, or a bad unroll_len that validate names
        names = " and ".join(f'"{n}"' for n in lens)
        if len(values) > 1:
            each = ", ".join(f'"{n}" {v}' for n, v in lens.items())
            return (f"the layers reading it have different unroll_len ({each}); give them one "
                    f"value, the characters each batch reads per stream")
        c = conf.char_rnn_conf
        if not c.HasField("unroll_len"):
            c.unroll_len = values[0]
        elif c.unroll_len != values[0]:
            return (f"char_rnn_conf.unroll_len is {c.unroll_len} but {names}, which read it, "
                    f"have unroll_len {values[0]}: each batch would read {values[0] + 1} "
                    f"characters per stream and move on by {c.unroll_len}, skipping text while "
                    f"the carried state jumps the gap; make them equal, or leave "
                    f"char_rnn_conf.unroll_len out (it then follows theirs)")
        return None

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
            write_atomic(out, "".join(vocab).encode("utf-8"), "vocabulary", LayerError)
            self.info.setdefault("notes", []).append(f"vocabulary of {len(vocab)} characters "
                                                     f"built from the text, saved to {out}")
        return vocab

    def load_batch(self):
        T = self.steps
        if self.cursor + T + 1 > self.stream_len:
            self.cursor = 0
            self.epoch += 1
            self.new_sequence = True
        self.stream_starts = self.cursor + np.arange(self.batchsize, dtype=np.int64) * self.stream_len
        window = self.streams[:, self.cursor:self.cursor + T + 1]
        self.batch = self.xp.asarray(window)
        self._cursor_used = self.cursor
        self.cursor += T

    def end_batch(self):
        """Called by the worker after a batch: the next batch continues these rows."""
        self.new_sequence = False

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
        self._check_backend(backend)
        try:
            x, y, lengths = (self._load_npz(path) if backend == "npz" else self._load_csv(path, s))
        except LayerError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is one clear line
            raise self.error(f'cannot read {s.path} as {backend}: {e}') from None
        self._check_dtypes(x, y, lengths, s.path)
        self._check(x, y, lengths, s.path)
        x = self._check_ids(x, s.path)
        lengths = self._check_lengths(lengths, s.path)
        self._check_finite(x, "x", s.path)
        if y is not None:
            self._check_finite(y, "y", s.path)
        self._check_rows(x, s.path)
        self.x, self.y, self.lengths = x, y, lengths
        self.n = x.shape[0]
        self.is_ids = np.issubdtype(x.dtype, np.integer)
        self.vocab_size = int(x.max()) + 1 if self.is_ids else None
        self.out_shape = () if self.is_ids else tuple(x.shape[2:])
        # with shuffle, every epoch (the first included) walks its own permutation
        self.order = self._epoch_order(0)
        self.cursor = 0
        self.epoch = 0
        self.new_sequence = True
        self.stream_starts = None

    # ------------------------------------------------ checks of the loaded store
    # Each names the file and, for a bad value, its first position: one line, exit 2.

    def _check_backend(self, backend: str) -> None:
        if backend not in ("npz", "csv"):
            raise self.error(f'store_conf.backend "{backend}" is not one this layer reads; use '
                             f'"npz" or "csv" (or leave it out: a .csv file is csv, anything '
                             f"else npz)")

    def _check_npz_file(self, path) -> None:
        """An .npz is a zip archive; anything else would reach numpy's pickle refusal."""
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK":
            what = "a single .npy array" if head == b"\x93NUM" else "not a zip archive"
            raise self.error(f"{path} is not an .npz file ({what}); write the store with "
                             f"numpy.savez(path, x=..., y=...)")

    def _check_dtypes(self, x, y, lengths, where) -> None:
        """x and y hold numbers (ints or floats: no text, no complex, no objects);
        lengths holds whole numbers."""
        for name, a in (("x", x), ("y", y), ("lengths", lengths)):
            if a is None or a.dtype.kind in "iuf":
                continue
            kind = {"c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects",
                    "b": "booleans"}.get(a.dtype.kind, f"values of type {a.dtype}")
            raise self.error(f"{where}: {name} holds {kind} ({a.dtype}); store real numbers "
                             f"(int token ids or float features)")

    def _check_ids(self, x, where):
        """Token ids (an integer x) lie in 0..MAX_TOKEN_ID; returned as int64."""
        if x.dtype.kind not in "iu" or x.size == 0:
            return x
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > MAX_TOKEN_ID:
            pos = tuple(int(i) for i in np.argwhere((x < 0) | (x > MAX_TOKEN_ID))[0])
            raise self.error(f"{where}: x{list(pos)} is {x[pos]} (sequence {pos[0]}, step "
                             f"{pos[1]}); token ids must lie in 0..{MAX_TOKEN_ID} (the "
                             f"vocabulary is the largest id + 1)")
        return x.astype(np.int64, copy=False)

    def _check_lengths(self, lengths, where):
        """Sequence lengths are whole numbers (3.0 is 3; 3.5 is an error); int64."""
        if lengths is None or lengths.dtype.kind in "iu":
            return lengths
        bad = np.flatnonzero(~np.isfinite(lengths) | (lengths != np.round(lengths)))
        if bad.size:
            i = int(bad[0])
            raise self.error(f"{where}: lengths[{i}] is {lengths[i]}; a length is a whole "
                             f"number of steps")
        return lengths.astype(np.int64)

    def _check_finite(self, a, name, where) -> None:
        """No NaN or infinity in float data (it would poison every step it reaches)."""
        if a.dtype.kind != "f" or bool(np.isfinite(a).all()):
            return
        pos = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        seq = f"sequence {pos[0]}" + (f", step {pos[1]}" if name == "x" and len(pos) > 1 else "")
        raise self.error(f"{where}: {name}{list(pos)} is {a[pos]} ({seq}); the data must hold "
                         f"finite numbers")

    def _check_rows(self, x, where) -> None:
        """At least one batch of distinct sequences (a smaller store would repeat rows in
        every batch)."""
        if x.shape[0] < self.batchsize:
            raise self.error(f"{where}: x holds {x.shape[0]} sequences, fewer than "
                             f"store_conf.batchsize {self.batchsize}, so every batch would "
                             f"repeat sequences; lower batchsize to {x.shape[0]} or add data")

    def _load_npz(self, path):
        self._check_npz_file(path)
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
        with warnings.catch_warnings():  # an empty file is our error below, not numpy's warning
            warnings.simplefilter("ignore")
            rows = np.loadtxt(path, delimiter=s.separator or ",", ndmin=2)
        if rows.size == 0:
            raise self.error(f"{path} holds no rows; write one sequence per line")
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

    def load_batch(self):
        B = self.batchsize
        if self.cursor + B > self.n:
            self.cursor = 0
            self.epoch += 1
            self.order = self._epoch_order(self.epoch)
        idx = self.order[np.arange(self.cursor, self.cursor + B) % self.n]
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
