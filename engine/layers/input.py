"""Input layers: character streams, their labels, one-hot codes, sequence stores, feedback.

The data layers (kCharRNN, kRecordInput/kCSVInput) follow the input-layer protocol
of ``engine/layers/base.py`` (``InputLayer``): the worker calls ``load_batch()``
once per batch, then ``forward`` once per copy (or ``forward_block`` for all
copies), then ``end_batch()``; they publish their batch size, whether rows are
streams, where each row starts, and their cursors for checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np

from engine import stores
from engine import text as tx
from engine.checkpoint import write_atomic
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


@register(pb.kCharRNN)
class CharRNNInput(InputLayer):
    """Character (or byte) streams from a text file (SINGA's kCharRNN).

    The file is read as it is (no newline translation) and decoded in the
    vocabulary's unit (engine/text.py: UTF-8 characters, or bytes as SINGA read
    them; char_rnn_conf.encoding, or bytes when the vocabulary file is not
    UTF-8). The text is encoded with the vocabulary and cut into ``batchsize``
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

    @classmethod
    def configured_batch(cls, conf):
        return int(conf.char_rnn_conf.batchsize)

    @classmethod
    def precheck(cls, conf, info):
        """A text shorter than one batch in BYTES is shorter in characters too: said before
        an unroll of 100000 copies is built for it."""
        c = conf.char_rnn_conf
        need = int(c.batchsize) * (int(c.unroll_len) + 1)
        try:
            size = resolve_path(c.path, info).stat().st_size
        except OSError:
            return None     # setup says what is wrong with the path
        if 0 < size < need:
            return (f"{c.path} has {size} bytes, fewer than batchsize x (unroll_len + 1) = "
                    f"{need} characters; use a longer text, a smaller batch or a shorter "
                    f"unroll_len")
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
            setting = tx.check_encoding(c.encoding, "char_rnn_conf.encoding")
            raw = tx.read_bytes(path, "data file")
            self.vocab, self.encoding = self._vocab(raw, c, setting)
            text = tx.decode(raw, self.encoding, str(c.path))
        except tx.TextError as e:
            raise self.error(str(e)) from None
        if not text:
            raise self.error(f'data file {c.path} is empty')
        #: which text this is (a checkpoint's cursor belongs to one text)
        self.text_id = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()[:32]}
        self.vocab_size = len(self.vocab)
        need = self.batchsize * (self.steps + 1)
        unit = "bytes" if self.encoding == tx.BYTES else "characters"
        if len(text) < need:
            raise self.error(f'{c.path} has {len(text)} {unit}, fewer than '
                             f"batchsize x (unroll_len + 1) = {need}; use a longer text or a "
                             f"smaller batch")
        try:
            ids = tx.encode_text(text, self.vocab, str(c.path), self.encoding)
        except tx.TextError as e:
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

    def _vocab(self, raw: bytes, c, setting: str) -> tuple[list[str], str]:
        """(vocabulary, unit): from vocab_path, else the net's (the training net's or the
        checkpoint's), else built from the text (sorted) and saved to the workspace."""
        if c.vocab_path:
            vp = resolve_path(c.vocab_path, self.info)
            if not vp.exists():
                raise self.error(f'vocab_path {c.vocab_path} not found; fix the '
                                 f"path, or remove vocab_path to build the vocabulary from the text")
            vocab, unit = tx.read_vocab(vp, setting)
            stored = self.info.get("vocab")     # a checkpoint's (resume, checkpoint_path)
            if stored and list(stored) != list(vocab):
                first = next((k for k, (a, b) in enumerate(zip(stored, vocab)) if a != b),
                             min(len(stored), len(vocab)))
                raise self.error(f"vocab_path {c.vocab_path} is not the vocabulary the checkpoint "
                                 f"was trained with ({len(vocab)} symbols now, {len(stored)} then; "
                                 f"they differ from id {first} on), so every id after it would "
                                 f"mean another character; restore the file, or train a new "
                                 f"model in another --workspace")
            return vocab, unit
        if self.info.get("vocab"):  # the training net's (or the checkpoint's)
            return list(self.info["vocab"]), setting or self.info.get("encoding") or tx.UTF8
        encoding = tx.pick_encoding(setting, raw)
        vocab = sorted(set(tx.decode(raw, encoding, str(c.path))))
        ws = self.info.get("workspace")
        if ws:
            os.makedirs(ws, exist_ok=True)
            out = pathlib.Path(ws) / "vocab.txt"
            write_atomic(out, tx.to_bytes("".join(vocab), encoding), "vocabulary", LayerError)
            unit = "bytes" if encoding == tx.BYTES else "characters"
            self.info.setdefault("notes", []).append(f"vocabulary of {len(vocab)} {unit} "
                                                     f"built from the text, saved to {out}")
        return vocab, encoding

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
                "new_sequence": bool(self.new_sequence), "text": self.text_id}

    def load_cursor_state(self, d: dict) -> None:
        """Continue where a checkpoint's cursor was; a text that is not the one the cursor
        was in (another size or digest: changed, shrunk or replaced) is a LayerError, as
        the cursor would continue its streams at offsets of another text."""
        was = d.get("text")
        if was is not None and was != self.text_id:
            raise self.error(f"data file {self.conf.char_rnn_conf.path} is not the text the "
                             f"checkpoint was trained on ({was.get('bytes')} bytes then, "
                             f"{self.text_id['bytes']} now; the contents differ), so its streams "
                             f"would continue in another text; restore the file, or start over "
                             f"in another --workspace (checkpoint_path keeps the weights)")
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
    one_hot_rows = True

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
    """Records from a store (store_conf): SINGA's kvfile or textfile, or this engine's .npz.

    The store (``engine.stores.read_store``, by store_conf.backend) gives x [N, *S],
    labels y and, from an .npz only, ``lengths``. kRecordInput parses a kvfile's values
    as RecordProto records, kCSVInput as CSV lines (a textfile is CSV lines); S is the
    records' shape: store_conf.shape, or the store's own.

    Feed-forward nets (``alg: kBP``, as SINGA): each record is one example; the layer
    has one copy, which emits (B, *S) floats. Nets over steps (kBPTT): each record is a
    sequence, S = [T, F] float features or [T] token ids (an .npz of integers, or a
    SINGA store whose [T] records hold whole numbers); copy i emits step i:
    x[:, i] ((B, F) floats or (B,) ids). Labels (aux output): y[:] for per-sequence
    targets ([N] or [N, K]), y[:, i] for per-step ones ([N, T]). With ``lengths``, copy i
    also publishes the mask (i < length) so later layers skip padding.

    Records longer than unroll_len (S > T steps) are walked window by window, nothing
    dropped: a batch of rows is read in ceil(S / T) consecutive batches, steps w·T ..
    w·T + T - 1 in batch w, and the recurrent state is carried from window to window
    (the layer is a stream: ``new_sequence`` only at the first window; the last window's
    steps past S are masked). Labels must then be per step (y [N, S]); per-sequence
    labels with long records are one error line.

    Features are normalised as SINGA's record layers do: x' = (x - mean) / std, mean and
    std per value from store_conf.mean_file / std_file (the first record of a store of
    the same backend) or one number mean_value / std_value. Batches walk the store in
    order (reshuffled each epoch when store_conf.shuffle) and wrap around, starting at
    record k, k drawn once from 0..random_skip (seeded); every batch starts new sequences.
    """

    required = (("store_conf", "path"),)

    @classmethod
    def configured_batch(cls, conf):
        s = conf.store_conf
        return int(s.batchsize[0]) if s.batchsize else None

    def setup(self, srcs):
        s = self.conf.store_conf
        self.batchsize = int(s.batchsize[0]) if s.batchsize else 0  # repeated: SINGA's layers take the first
        if self.batchsize < 1:
            raise self.error('store_conf.batchsize must be at least 1')
        path = resolve_path(s.path, self.info)
        if not path.exists():
            raise self.error(f'data file {s.path} not found')
        self.records = self.info.get("alg") == pb.kBP  # feed-forward: a record is one example
        self._check_singa_settings(s)
        values = "csv" if self.conf.type == pb.kCSVInput else "record"
        try:
            backend = stores.backend_of(s.backend, path)
            x, y, lengths = stores.read_store(backend, path, values=values, shape=s.shape,
                                              has_label=s.has_label, separator=s.separator)
            ids = not self.records and self._ids(x, backend)
            self.mean, self.std = (None, None) if ids else self._normalisation(
                s, backend, values, x.shape[1:])
        except stores.StoreError as e:
            raise self.error(str(e)) from None
        self._check_dtypes(x, y, lengths, s.path)
        if self.records:
            self._check_records(x, lengths, s.path)
            x = x[:, None]  # one step: copy 0 emits whole records
        else:
            if ids:
                if s.mean_file or s.std_file or s.HasField("mean_value") or s.HasField("std_value"):
                    raise self.error(f"{s.path} holds token ids; mean and std normalise "
                                     f"features: remove mean_value/std_value/mean_file/std_file")
                self._check_finite(x, "x", s.path)
                # whole numbers of a SINGA store are token ids too
                x = self._check_ids(x if x.dtype.kind in "iu" else x.astype(np.int64), s.path)
            self._check(x, y, lengths, s.path)
            lengths = self._check_lengths(lengths, s.path)
        self._check_finite(x, "x", s.path)
        if y is not None:
            self._check_finite(y, "y", s.path)
        self._check_rows(x, s.path)
        if y is not None and y.dtype == np.int32:
            y = y.astype(np.int64)
        self.x, self.y, self.lengths = x, y, lengths
        self.n = x.shape[0]
        self.is_ids = ids
        self.vocab_size = int(x.max()) + 1 if self.is_ids else None
        self.out_shape = () if self.is_ids else tuple(x.shape[2:])
        self.skip = self._skip(int(s.random_skip))
        # with shuffle, every epoch (the first included) walks its own permutation
        self.order = self._epoch_order(0)
        # take_share: each batch takes rows[...] of the whole_batch rows one worker reads
        self.whole_batch, self.rows = self.batchsize, slice(0, self.batchsize)
        self.cursor = 0
        self.epoch = 0
        self.new_sequence = True
        self.stream_starts = None
        T = int(self.conf.unroll_len)
        steps = 1 if self.records else int(x.shape[1])
        #: windows of T steps per record (1: the record fits the copies)
        self.windows = -(-steps // T)
        self.is_stream = self.windows > 1
        self.window, self.idx = 0, None
        if self.windows > 1 and y is not None and not self._y_per_step:
            raise self.error(f"{s.path}: records have {steps} steps but unroll_len is {T}, so "
                             f"they are read in {self.windows} windows of {T} steps with the "
                             f"state carried, and that needs per-step labels y [N, {steps}] "
                             f"(y has shape {list(y.shape)}); set unroll_len to {steps}, or "
                             f"give per-step labels")

    @staticmethod
    def _ids(x, backend: str) -> bool:
        """A kBPTT store of token ids: integers in an .npz; in a SINGA store, [N, T]
        records of whole numbers (SINGA's stores hold floats or bytes)."""
        if backend == "npz":
            return bool(np.issubdtype(x.dtype, np.integer))
        return x.ndim == 2 and bool(np.all(x == np.round(x)))

    def _check_singa_settings(self, s) -> None:
        """SINGA's store settings this engine reads differently or not at all."""
        if s.encoded:
            raise self.error("store_conf.encoded: SINGA decodes such records (compressed "
                             "images) with OpenCV, which this engine does not; store the "
                             "decoded pixels (encoded: false)")
        if s.random_skip < 0:
            raise self.error(f"store_conf.random_skip is {s.random_skip}; it must be >= 0")
        if self.records and self.conf.unroll_len != 1:
            raise self.error(f"unroll_len is {self.conf.unroll_len}, but in a feed-forward "
                             f"net (alg: kBP) a data layer emits whole records once per batch; "
                             f"set unroll_len: 1, or alg: kBPTT to read records as sequences")

    def _check_records(self, x, lengths, where) -> None:
        if lengths is not None:
            raise self.error(f'{where}: has "lengths", which masks the steps of sequences; in '
                             f"a feed-forward net (alg: kBP) a record is one example: drop "
                             f"lengths, or use alg: kBPTT")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise self.error(f"{where}: x has dtype {x.dtype}; records hold numbers")
        if x.ndim < 2 or x.shape[0] < 1:
            raise self.error(f"{where}: x has shape {list(x.shape)}; it must be [N, ...] with "
                             f"at least one record")

    def _normalisation(self, s, backend, values, rshape):
        """(mean, std) arrays of the record shape in self.dtype, or None each; see the
        class docstring. StoreError for a file that cannot be read."""
        out = []
        size = int(np.prod(rshape))
        for what in ("mean", "std"):
            file, has_value = getattr(s, f"{what}_file"), s.HasField(f"{what}_value")
            if file:
                fpath = resolve_path(file, self.info)
                a = stores.read_first_record(backend, fpath, values=values, separator=s.separator)
                if a.size != size:
                    raise self.error(f"store_conf.{what}_file {file} holds {a.size} values, but "
                                     f"a record of {s.path} has {size}; they must match")
                a = a.reshape(rshape)
            elif has_value:
                a = np.full(rshape, getattr(s, f"{what}_value"), np.float32)
            else:
                out.append(None)
                continue
            src = f"store_conf.{what}_{'file' if file else 'value'}"
            if not np.isfinite(a).all():
                raise self.error(f"{src} is not a finite number")
            if what == "std" and (a == 0).any():
                raise self.error(f"{src} holds 0, and features are divided by it; give a "
                                 f"nonzero std")
            out.append(a.astype(self.dtype))
        return tuple(out)

    def _skip(self, most: int) -> int:
        """Records skipped at the start: SINGA draws 0..random_skip; seeded here."""
        if most <= 0:
            return 0
        rng = np.random.default_rng([self.info.get("seed", 0), 3, 0x5C1B])
        return int(rng.integers(0, most + 1))

    # ------------------------------------------------ checks of the loaded store
    # Each names the file and, for a bad value, its first position: one line, exit 2.

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
        """No NaN or infinity in float data (it would poison every step it reaches), also
        once cast to the training dtype: a float64 1e300 is infinite in float32."""
        if a.dtype.kind != "f":
            return
        narrow = np.dtype(self.dtype).itemsize < a.dtype.itemsize
        with np.errstate(over="ignore"):
            ok = np.isfinite(a.astype(self.dtype) if narrow else a)
        if bool(ok.all()):
            return
        pos = tuple(int(i) for i in np.argwhere(~ok)[0])
        seq = f"sequence {pos[0]}" + (f", step {pos[1]}" if name == "x" and len(pos) > 1 else "")
        if np.isfinite(a[pos]):
            top = float(np.finfo(self.dtype).max)
            raise self.error(f"{where}: {name}{list(pos)} is {a[pos]:g} ({seq}), beyond what "
                             f"{np.dtype(self.dtype).name} holds (±{top:.3g}); scale the data")
        raise self.error(f"{where}: {name}{list(pos)} is {a[pos]} ({seq}); the data must hold "
                         f"finite numbers")

    def _check_rows(self, x, where) -> None:
        """At least one batch of distinct sequences (a smaller store would repeat rows in
        every batch)."""
        if x.shape[0] < self.batchsize:
            raise self.error(f"{where}: x holds {x.shape[0]} sequences, fewer than "
                             f"store_conf.batchsize {self.batchsize}, so every batch would "
                             f"repeat sequences; lower batchsize to {x.shape[0]} or add data")

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
        self.window, self.idx = 0, None
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
        if self.idx is not None and self.window + 1 < self.windows:
            self.window += 1  # the next window of the same rows, state carried
            self._load_rows(self.idx, self.window)
            self.new_sequence = False
            return
        if self.cursor + B > self.n:
            self.cursor = 0
            self.epoch += 1
            self.order = self._epoch_order(self.epoch)
        idx = self.order[(self.skip + np.arange(self.cursor, self.cursor + B)) % self.n][self.rows]
        self.cursor += B
        self.idx, self.window = idx, 0
        self._load_rows(idx, 0)
        self.new_sequence = True

    def _window(self, a, w: int):
        """Steps w·T .. w·T + T - 1 of a [rows, S, ...] array, zero-padded to T steps."""
        if self.windows == 1:
            return a
        T = int(self.conf.unroll_len)
        part = a[:, w * T:(w + 1) * T]
        if part.shape[1] < T:
            pad = np.zeros((part.shape[0], T - part.shape[1]) + part.shape[2:], dtype=part.dtype)
            part = np.concatenate([part, pad], axis=1)
        return part

    def _load_rows(self, idx, w: int) -> None:
        xp = self.xp
        xb = self._window(self.x[idx], w)
        if not self.is_ids:
            xb = xb.astype(self.dtype)
            if self.mean is not None:
                xb -= self.mean
            if self.std is not None:
                xb /= self.std
        self.xb = xp.asarray(xb)
        self.yb = None
        if self.y is not None:
            yb = self._window(self.y[idx], w) if self._y_per_step else self.y[idx]
            if not np.issubdtype(yb.dtype, np.integer):
                yb = yb.astype(self.dtype)
            self.yb = xp.asarray(yb)
        self.maskb = None
        if self.lengths is not None or (self.windows > 1 and
                                        self.windows * self.conf.unroll_len > self.x.shape[1]):
            T = self.conf.unroll_len
            lengths = self.lengths[idx] if self.lengths is not None else \
                np.full(len(idx), self.x.shape[1])
            m = (w * T + np.arange(T)[None, :] < lengths[:, None]).astype(self.dtype)
            self.maskb = xp.asarray(m)

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
        d = {"cursor": int(self.cursor), "epoch": int(self.epoch),
             "order": self.order.tolist() if self.conf.store_conf.shuffle else None}
        if self.windows > 1 and self.idx is not None:  # inside a record: its rows and window
            d["window"], d["rows"] = int(self.window), [int(i) for i in self.idx]
        return d

    def snapshot(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "order": self.order,
                "window": self.window, "idx": self.idx}

    def restore(self, snap: dict) -> None:
        self.cursor, self.epoch, self.order = snap["cursor"], snap["epoch"], snap["order"]
        self.window, self.idx = snap["window"], snap["idx"]

    def load_cursor_state(self, d: dict) -> None:
        self.cursor = int(d["cursor"])
        self.epoch = int(d["epoch"])
        if d.get("order") is not None:
            self.order = np.asarray(d["order"], dtype=np.int64)
        self.window, self.idx = 0, None
        if d.get("rows") is not None:
            self.window, self.idx = int(d["window"]), np.asarray(d["rows"], dtype=np.int64)


@register(pb.kRNNDummy)
class RNNDummy(Layer):
    """Placeholder fed back from another layer of the previous step (sampling).

    Copy i outputs what ``dynamic_srclayer`` output at step i-1; copy 0 takes
    the value carried from the previous batch or, at the very start, the
    initial value: ``low`` when low == high, else a draw from [low, high)
    (integers when ``integer``). Output shape: rnn_dummy_conf.shape (ids: ()).
    Integer ids range over [0, high) when high > low (SINGA's sample job: low 0,
    high 101), else over the net's vocabulary: that is the ``vocab_size`` a kOneHot
    reading them takes.
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
        self.vocab_size = None
        if c.integer and c.high > c.low:
            self.vocab_size = int(np.ceil(c.high))  # ids are drawn from [low, high)
        elif c.integer and vocab:
            self.vocab_size = len(vocab)

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
