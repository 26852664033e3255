"""Loss layers: softmax cross-entropy and Euclidean (squared error).

A loss layer reads two sources: the prediction (source 0) and the labels
(source 1: ``ctx.label(xs, 1)``, i.e. that source's aux output when it
publishes one, else its data); kEuclideanLoss's target is source 1's output,
or its labels with ``euclideanloss_conf { target: kLabels }``. Its backward ignores ``dy`` and returns the
gradient of its own objective.

Objective and scaling (SINGA's convention): each copy contributes
``scale * (1/B) * sum_r m_r * loss_r`` where B is the number of batch rows
(a constant, masked rows included) and m_r the row mask (1 when
``ctx.mask`` is None). The net's objective is the *sum over copies* of these
per-copy batch means. The reported metrics are unscaled and averaged over the
valid rows only: a metric is a (sum, count) pair added with ``ctx.add_metric``.
Both losses also add "objective" (scale x sum of valid row losses / B, count 0):
the exact scalar whose gradient backward returns, used by the gradient checker.
"""
from __future__ import annotations

import math

from engine.layers import kernels
from engine.layers.base import Layer, LossLayer, register
from engine.layers.neuron import log_softmax
from engine.proto import job_pb2 as pb


def topk_correct(xp, scores, labels, k: int):
    """Boolean (B,): label r is among the k best scores of row r.

    The rank of the label is the number of scores above it plus the number of
    equal scores at lower ids (the order of a stable descending argsort), so
    ties never make every row count as correct.
    """
    if k == 1:  # rank 0: the label is the first index of the row's maximum
        return xp.argmax(scores, axis=1) == labels
    b, v = scores.shape
    s_lab = scores[xp.arange(b), labels][:, None]
    ids = xp.arange(v)[None, :]
    rank = (scores > s_lab).sum(axis=1) + ((scores == s_lab) & (ids < labels[:, None])).sum(axis=1)
    return rank < k


class Supervised(Layer):
    """Shared set-up of layers comparing source 0 with the labels of source 1.

    ``ctx.batch`` (rows of one copy) normalises a block call over several copies
    exactly as the copies one by one would be.

    Per-step labels from one copy (the same rule for every loss): when source 1 is
    connected kUnrollOneToAll and has a single copy, its labels hold every step, one
    column per copy (y [N, T], or [N, T, K]), and copy t reads column t (a block call:
    the columns of ``ctx.steps``, step-major); labels y [N] (one per sequence) serve
    every copy."""

    rowwise = True
    step_select = True

    def labels_per_step(self) -> bool:
        """Source 1 is read one-to-all: its labels hold a column per copy."""
        return len(self.src_conn) > 1 and self.src_conn[1] == pb.kUnrollOneToAll

    def step_columns(self, a, ctx, what: str):
        """Column ctx.step of per-step labels ``a`` (B, S, ...) (block: ctx.steps)."""
        if a.ndim == 1:  # one label per sequence: the same for every copy
            return a if ctx.steps is None else self.xp.concatenate([a] * len(ctx.steps))
        steps = ctx.steps if ctx.steps is not None else [ctx.step]
        last = int(max(steps)) if len(steps) else 0
        if a.shape[1] <= last:
            raise self.error(f"{what} have shape {tuple(a.shape)}, but source 1 is read "
                             f"one-to-all, so copy {last} reads column {last} of them; give "
                             f"the data layer y [N, {last + 1}] (a column per copy) or connect "
                             f"source 1 one-to-one")
        if ctx.steps is None:
            return a[:, ctx.step]
        cols = self.xp.swapaxes(a[:, ctx.steps], 0, 1)
        return cols.reshape((-1,) + a.shape[2:])

    def check_sources(self, srcs):
        self.need_srcs(srcs, 2, "the prediction, then the labels")
        if len(srcs[0].out_shape) != 1:
            raise self.error(f"source 0 must give one vector per row (out_shape (V,)), got "
                             f"out_shape {tuple(srcs[0].out_shape)}; put a kInnerProduct before it")

    def scores(self, xs):
        x = self.src_input(xs, 0)
        if x is None:
            raise self.error("source 0 gives nothing at this step; a loss needs a prediction "
                             "at every copy (check the shift of its srclayers)")
        return self.float_input(x)

    def mask_or_ones(self, ctx, batch: int):
        m = self.row_mask(ctx, batch)
        return self.xp.ones((batch,), dtype=self.dtype) if m is None else m

    def class_labels(self, ctx, xs, batch: int, n_classes: int, m):
        """Label ids (B,) for this copy; ids of masked rows are not checked (set to 0)."""
        xp = self.xp
        lab = ctx.label(xs, 1)
        if lab is None:
            raise self.error("source 1 gives no labels at this step; connect the label source "
                             "to every copy")
        if self.labels_per_step() and not isinstance(xs[1], list):
            lab = self.as_ids(self.step_columns(self.xp.asarray(lab), ctx, "labels"), "labels")
        else:
            lab = self.ids_at_step(lab, ctx, "labels")
        if lab.ndim != 1 or lab.shape[0] != batch:
            raise self.error(f"labels have shape {tuple(lab.shape)}, expected ({batch},) for a "
                             f"batch of {batch} rows")
        in_range = (lab >= 0) & (lab < n_classes)
        bad = (~in_range) & (m > 0)
        ctx.check(bad.any(), lambda first: self.error(
            f"label {int(first)} is outside [0, {n_classes}) (the width of source 0); widen "
            f"the layer before the loss or fix the labels"), lab[xp.argmax(bad)])
        return xp.where(in_range, lab, 0)


@register(pb.kSoftmaxLoss)
class SoftmaxLoss(Supervised, LossLayer):
    """Softmax cross-entropy with integer labels.

    p = softmax(s) over the V scores of a row (the layer's output y = p, (B, V));
    loss_r = -log p[r, label_r]. Per-copy objective
    scale * (1/B) * sum_r m_r * loss_r, hence
    ds = scale * (p - onehot(label)) * m / B (B: batch rows, constant).
    softmaxloss_conf: topk [1] for the accuracy metric, scale [1].
    Metrics: "loss" = sum of loss_r over valid rows / valid rows (nats, unscaled);
    "accuracy" = rows whose label is in the top-k scores / valid rows.
    Labels: (B,) ids, or (B, S) from a one-to-all source (column ``step``);
    a label outside [0, V) in a valid row is an error. No params.
    Derived metrics: "perplexity" = exp(loss); "bpc" = loss / ln 2 when the net reads text.
    """

    classifies = True
    outputs_probabilities = True
    scale_conf = "softmaxloss_conf"

    def derived_metrics(self, values, text):
        if "loss" not in values:
            return {}
        out = {"perplexity": math.exp(min(values["loss"], 700.0))}
        if text:
            out["bpc"] = values["loss"] / math.log(2)
        return out

    def setup(self, srcs):
        self.check_sources(srcs)
        c = self.conf.softmaxloss_conf
        self.topk = int(c.topk)
        self.scale = float(c.scale)
        self.n_classes = int(srcs[0].out_shape[0])
        if not 1 <= self.topk <= self.n_classes:
            raise self.error(f"softmaxloss_conf.topk must be in [1, {self.n_classes}] "
                             f"(got {self.topk})")
        self.out_shape = (self.n_classes,)

    def forward(self, ctx, xs, state):
        xp = self.xp
        s = self.scores(xs)
        b = s.shape[0]
        m = self.mask_or_ones(ctx, b)
        lab = self.class_labels(ctx, xs, b, s.shape[1], m)
        correct = None
        if kernels.usable(s) and s.ndim == 2:   # one pass per row (kernels.softmax_xent)
            p, nll, hit = kernels.softmax_xent(s, lab)
            if self.topk == 1:
                correct = hit
        else:
            logp = log_softmax(xp, s)
            nll = -logp[xp.arange(b), lab]
            p = xp.exp(logp)
        valid = m.sum()
        total = (nll * m).sum()
        ctx.add_metric("loss", total, valid)
        ctx.add_metric("objective", self.scale * total / (ctx.batch or b), 0)
        if correct is None:
            correct = topk_correct(xp, s, lab, self.topk).astype(self.dtype)
        ctx.add_metric("accuracy", (correct * m).sum(), valid)
        return p, None, (p, lab, m, len(xs), ctx.batch or b)

    def backward(self, ctx, dy, dstate, cache):
        p, lab, m, nsrc, per_copy = cache
        c = (self.scale / per_copy) * m
        if kernels.usable(p, c):
            g = kernels.xent_grad(p, lab, c)      # the formulas below in one pass, same bits
        else:
            g = p.copy()
            g[self.xp.arange(p.shape[0]), lab] -= 1.0
            g *= c[:, None]
        return [g] + [None] * (nsrc - 1), None


@register(pb.kEuclideanLoss)
class EuclideanLoss(Supervised, LossLayer):
    """Half squared error between a prediction and a float target.

    loss_r = 0.5 * sum_k (p_rk - t_rk)^2 for prediction p (B, K) (source 0) and
    target t (B, K) (per step from a one-to-all single copy: see Supervised).
    euclideanloss_conf.target says what t is:
    kOutput (default, SINGA's meaning): source 1's output, flattened per row (the
    auto-encoder's data layer: the net reconstructs its input); kLabels: the labels
    that source 1 carries (a data layer's y: regression targets; a (B,) target is
    used as (B, 1) when K == 1). Per-copy objective
    scale * (1/B) * sum_r m_r * loss_r, hence dp = scale * (p - t) * m / B.
    euclideanloss_conf: scale [1], target [kOutput]. Output y = p.
    Metrics: "loss" = sum of loss_r over valid rows / valid rows (unscaled);
    "mse" = sum of (p - t)^2 over valid rows / (valid rows * K).
    The target gets no gradient. No params.
    """

    scale_conf = "euclideanloss_conf"

    def setup(self, srcs):
        self.check_sources(srcs)
        c = self.conf.euclideanloss_conf
        self.scale = float(c.scale)
        self.on_labels = c.target == pb.EuclideanLossProto.kLabels
        self.width = int(srcs[0].out_shape[0])
        self.out_shape = tuple(srcs[0].out_shape)
        src = srcs[1]
        if not self.on_labels:
            n = int(math.prod(src.out_shape))
            if n != self.width:
                what = f"{n} value{'s' if n != 1 else ''} per row"
                hint = (f'; to regress onto the labels that "{src.name}" carries, set '
                        f"euclideanloss_conf {{ target: kLabels }}" if src.is_input else "")
                raise self.error(f'the target is the output of source 1 ("{src.name}", as in '
                                 f"SINGA), which gives {what}, but the prediction has "
                                 f"{self.width}{hint}")

    def target(self, ctx, xs, b: int, k: int):
        """t (B, K) in self.dtype for this copy (see the class docstring)."""
        if self.on_labels:
            t = ctx.aux[1] if len(ctx.aux) > 1 else None
            if t is None:
                raise self.error("source 1 carries no labels at this step; target: kLabels "
                                 "needs a data layer with labels (y) as source 1")
            t = self.src_input([t], 0, "labels")
            if self.labels_per_step():
                t = self.step_columns(t, ctx, "the labels")
            if t.shape != (b, k) and not (t.shape == (b,) and k == 1):
                raise self.error(f"the labels have shape {tuple(t.shape)}, expected ({b}, {k}) "
                                 f"to match the prediction")
        else:
            t = self.src_input(xs, 1, "target")
            if t is None:
                raise self.error("source 1 gives nothing at this step; connect the target "
                                 "source to every copy")
            if t.shape[0] != b or t.size != b * k:
                raise self.error(f"target has shape {tuple(t.shape)} (source 1's output), "
                                 f"expected {b} rows of {k} values to match the prediction")
        return self.float_input(t).reshape(b, k)

    def forward(self, ctx, xs, state):
        p = self.scores(xs)
        b, k = p.shape
        t = self.target(ctx, xs, b, k)
        m = self.mask_or_ones(ctx, b)
        d = p - t
        sq = (d * d).sum(axis=1)
        valid = m.sum()
        total = 0.5 * (sq * m).sum()
        ctx.add_metric("loss", total, valid)
        ctx.add_metric("objective", self.scale * total / (ctx.batch or b), 0)
        ctx.add_metric("mse", (sq * m).sum(), valid * k)
        return p, None, (d, m, len(xs), ctx.batch or b)

    def backward(self, ctx, dy, dstate, cache):
        d, m, nsrc, per_copy = cache
        g = d * ((self.scale / per_copy) * m[:, None])
        return [g] + [None] * (nsrc - 1), None
