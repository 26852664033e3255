"""Output layers: accuracy, top-k ids / sampling, and writers (characters, CSV).

Output layers are not differentiated (``differentiable = False``): the worker
skips their backward; calling it anyway returns no gradients.
"""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from engine import text as tx
from engine.layers.base import Layer, register
from engine.layers.loss import Supervised, topk_correct
from engine.backend import to_host
from engine.proto import job_pb2 as pb


class OutputLayer(Layer):
    """Base of the output layers: no gradient flows back through them."""

    differentiable = False
    in_sampling_net = False

    def backward(self, ctx, dy, dstate, cache):
        return [None] * self.n_srcs, None

    def resolve(self, path: str) -> str:
        """``path`` resolved against the job's folder when relative."""
        return path if os.path.isabs(path) else os.path.join(self.info.get("job_dir", "."), path)


@register(pb.kAccuracy)
class Accuracy(OutputLayer, Supervised):
    """Top-k accuracy of scores against integer labels.

    correct_r = 1 when label_r is among the k largest scores of row r (ties
    ordered by id, as a stable argsort), k = argsort_conf.topk [1].
    Output y = correct_r * m_r, shape (B,) float (m: row mask, 1 if none).
    Metric "accuracy" = sum of correct_r over valid rows / valid rows. No params.
    """

    def setup(self, srcs):
        self.check_sources(srcs)
        self.n_srcs = len(srcs)
        self.topk = int(self.conf.argsort_conf.topk) if self.conf.HasField("argsort_conf") else 1
        v = int(srcs[0].out_shape[0])
        if not 1 <= self.topk <= v:
            raise self.error(f"argsort_conf.topk must be in [1, {v}] (got {self.topk})")
        self.out_shape = ()

    def forward(self, ctx, xs, state):
        s = self.scores(xs)
        b = s.shape[0]
        m = self.mask_or_ones(ctx, b)
        lab = self.class_labels(ctx, xs, b, s.shape[1], m)
        correct = topk_correct(self.xp, s, lab, self.topk).astype(self.dtype) * m
        ctx.add_metric("accuracy", correct.sum(), m.sum())
        return correct, None, None


@register(pb.kArgSort)
class ArgSort(OutputLayer):
    """The best ids of each row of scores, or one id drawn from them.

    Temperature T = 0 (default): ids of the k = argsort_conf.topk largest scores,
    best first (ties by lower id); (B,) int64 when k == 1 (argmax), else (B, k).
    T > 0 (argsort_conf.temperature, or ``self.temperature`` set by a sampler):
    one id per row drawn from softmax(s / T) with ctx.rng, (B,) int64; when
    ``self.sample_topk`` > 0 the draw is restricted to the sample_topk best
    scores. When source 0's outputs are probabilities (kSoftmax, kSoftmaxLoss),
    s = log p. ``self.limit`` (set by a sampler) keeps only the
    ids below it. No params.
    """

    rowwise = True

    def __init__(self, conf, xp=np, dtype=np.float32):
        super().__init__(conf, xp, dtype)
        self.temperature = float(conf.argsort_conf.temperature)
        self.sample_topk = 0
        #: when set (by a sampler), only ids below it are chosen (e.g. a
        #: 101-way output over a 96-character vocabulary)
        self.limit = None

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        self.n_srcs = 1
        if len(srcs[0].out_shape) != 1:
            raise self.error(f"source 0 must give one score vector per row (out_shape (V,)), "
                             f"got {tuple(srcs[0].out_shape)}")
        v = int(srcs[0].out_shape[0])
        self.topk = int(self.conf.argsort_conf.topk)
        if not 1 <= self.topk <= v:
            raise self.error(f"argsort_conf.topk must be in [1, {v}] (got {self.topk})")
        if self.temperature < 0:
            raise self.error(f"argsort_conf.temperature must be >= 0 (got {self.temperature}); "
                             f"0 takes the argmax")
        self.probabilities = bool(srcs[0].outputs_probabilities)
        self.out_shape = () if self.topk == 1 or self.temperature > 0 else (self.topk,)

    def forward(self, ctx, xs, state):
        xp = self.xp
        s = self.src_input(xs, 0)
        if s is None:
            raise self.error("source 0 gives nothing at this step")
        if self.limit is not None:
            s = s[:, :self.limit]
        if self.temperature > 0:
            return xp.asarray(self.draw(ctx, s)), None, None
        if self.topk == 1:
            return xp.argmax(s, axis=1).astype(xp.int64), None, None
        order = xp.argsort(-s, axis=1, kind="stable")[:, :self.topk]
        return order.astype(xp.int64), None, None

    def draw(self, ctx, s) -> np.ndarray:
        """One id per row from softmax(s / T) (restricted to the sample_topk best)."""
        if ctx.rng is None:
            raise self.error("sampling (temperature > 0) needs ctx.rng")
        s = to_host(s).astype(np.float64)
        if self.probabilities:
            s = np.log(np.maximum(s, np.finfo(np.float64).tiny))
        z = s / self.temperature
        b, v = z.shape
        k = int(self.sample_topk)
        if 0 < k < v:
            best = np.argsort(-z, axis=1, kind="stable")[:, :k]
            kept = np.full_like(z, -np.inf)
            np.put_along_axis(kept, best, np.take_along_axis(z, best, axis=1), axis=1)
            z = kept
        p = np.exp(z - z.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        u = 1.0 - ctx.random((b,))  # in (0, 1]: a zero-probability id is never chosen
        target = u[:, None] * cdf[:, -1:]
        ids = (cdf < target).sum(axis=1)
        return np.minimum(ids, v - 1).astype(np.int64)


@register(pb.kCharRNNOutput)
class CharRNNOutput(OutputLayer):
    """Characters (or bytes) of generated ids.

    Input: ids (B,) (a (B, k) top-k input uses its best column). Vocabulary: the
    file ``vocab_path`` of char_rnn_output_conf or, where SINGA's sample job puts
    it, of char_rnn_conf (read as engine/text.py reads vocabularies: one symbol
    per position; bytes when the file is not UTF-8 or char_rnn_conf.encoding
    says "bytes"), else ``self.info["vocab"]`` (the net's kCharRNN vocabulary).
    Each call appends row r's symbol to ``self.texts[r]`` (lists of str), and
    row 0's to ``self.text`` (a list of str); ``report()`` is row 0's text for
    printing (bytes decoded as UTF-8, U+FFFD where they do not decode). When
    char_rnn_output_conf.path is set, row 0's symbol is also appended to that
    file (raw bytes for a byte vocabulary). Output y = the ids (B,). No params.
    """

    def setup(self, srcs):
        from engine.layers.input import resolve_path  # noqa: PLC0415 - one path rule

        self.need_srcs(srcs, 1)
        self.n_srcs = 1
        c = self.conf.char_rnn_output_conf
        singa = self.conf.char_rnn_conf  # SINGA's sample.conf: char_rnn_conf { vocab_path }
        if c.vocab_path and singa.vocab_path and c.vocab_path != singa.vocab_path:
            raise self.error(f"char_rnn_output_conf.vocab_path {c.vocab_path!r} and "
                             f"char_rnn_conf.vocab_path {singa.vocab_path!r} differ; keep one")
        vocab_path = c.vocab_path or singa.vocab_path
        try:
            setting = tx.check_encoding(singa.encoding, "char_rnn_conf.encoding")
            if vocab_path:
                path = resolve_path(vocab_path, self.info)
                self.vocab, self.encoding = tx.read_vocab(path, setting)
            elif self.info.get("vocab"):
                self.vocab = list(self.info["vocab"])
                self.encoding = setting or self.info.get("encoding") or tx.UTF8
            else:
                raise self.error("no vocabulary: set char_rnn_output_conf.vocab_path (or, as "
                                 "SINGA, char_rnn_conf.vocab_path) or add a kCharRNN input "
                                 "layer to the net")
        except tx.TextError as e:
            raise self.error(f"{'vocab_path: ' if vocab_path else ''}{e}") from None
        if isinstance(srcs[0], ArgSort):
            # a kArgSort over a wider output (num_output 101, vocabulary 96) must only
            # choose ids that name characters
            srcs[0].limit = len(self.vocab)
        self.path = self.resolve(c.path) if c.path else ""
        self.text: list[str] = []
        self.texts: list[list[str]] = []
        self.out_shape = ()

    def report(self) -> str:
        return tx.for_display("".join(self.text), self.encoding)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            raise self.error("source 0 gives nothing at this step")
        ids = self.as_ids(x[:, 0] if x.ndim == 2 else x, "source 0")
        host = to_host(ids).reshape(-1)
        v = len(self.vocab)
        bad = (host < 0) | (host >= v)
        if bad.any():
            raise self.error(f"id {int(host[bad][0])} is outside the vocabulary of {v} "
                             f"characters; the vocabulary does not match the model")
        chars = [self.vocab[i] for i in host]
        while len(self.texts) < len(chars):
            self.texts.append([])
        for row, ch in zip(self.texts, chars):
            row.append(ch)
        if chars:
            self.text.append(chars[0])
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                with open(self.path, "ab") as f:
                    f.write(tx.to_bytes(chars[0], self.encoding))
        return ids, None, None


@register(pb.kCSVOutput)
class CSVOutput(OutputLayer):
    """Writes its input to a CSV file: one line per batch row (flattened), per call.

    csvoutput_conf.path or, as SINGA, store_conf.path (relative to the job's
    folder), default ``<workspace>/<layer name>.csv``. The file is opened lazily for appending
    and flushed after every call; ``close()`` closes it. Output y = x. No params.
    """

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        self.n_srcs = 1
        p = self.conf.csvoutput_conf.path
        store = self.conf.store_conf  # SINGA's kCSVOutput: store_conf { path backend }
        if store.backend and store.backend not in ("textfile", "csv"):
            raise self.error(f'store_conf.backend "{store.backend}": kCSVOutput writes a '
                             f'textfile (CSV lines); set backend: "textfile" or remove it')
        if p and store.path and p != store.path:
            raise self.error(f"csvoutput_conf.path {p!r} and store_conf.path {store.path!r} "
                             f"differ; keep one")
        p = p or store.path
        self.path = (self.resolve(p) if p else
                     os.path.join(self.info.get("workspace", "."), f"{self.name}.csv"))
        self._file = None
        self.out_shape = tuple(srcs[0].out_shape)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            raise self.error("source 0 gives nothing at this step")
        host = to_host(x)
        rows = host.reshape(host.shape[0], -1)
        fmt = (lambda a: str(int(a))) if rows.dtype.kind in "iub" else (lambda a: repr(float(a)))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for r in rows:
            writer.writerow([fmt(a) for a in r])
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", newline="")
        self._file.write(buf.getvalue())
        self._file.flush()
        return x, None, None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
