"""Neuron layers: inner product, embedding, dropout and element-wise activations.

Every layer here reads exactly one source. ``x`` is one copy's input of shape
``(B,) + src.out_shape``. When a copy gets nothing from its source (a
one-to-one connection with a shift, at the early copies) the layer passes the
absence on: ``y`` is ``None`` and so is the input gradient.

This module also holds the softmax helpers the loss and output families share
(``softmax``, ``log_softmax``): the array maths is written once, against ``xp``,
and works for NumPy and CuPy alike.
"""
from __future__ import annotations

import numpy as np

from engine.backend import scatter_add
from engine.layers.base import Layer, ProductGrad, add_grad, register
from engine.proto import job_pb2 as pb

# ------------------------------------------------------------------ helpers


def softmax(xp, x):
    """softmax(x)_j = exp(x_j - max x) / sum_k exp(x_k - max x), over the last dim."""
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(xp, x):
    """log softmax(x) over the last dim, computed without overflow."""
    z = x - x.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def _is_float(x) -> bool:
    return x.dtype.kind == "f"


# ----------------------------------------------------------- inner product


@register(pb.kInnerProduct)
class InnerProduct(Layer):
    """Fully connected layer.

    y = x W^T + b, with x of shape (B, D) (inputs with more dims are flattened
    per row to D = prod(src.out_shape)) and y of shape (B, num_output).

    Params, in order: ``w`` of shape (num_output, D) -- or (D, num_output) with
    ``transpose: true``, then y = x W + b -- default init U(-0.08, 0.08),
    fan_in D, fan_out num_output; ``b`` of shape (num_output,), default 0,
    present unless ``bias_term: false``.
    Backward: dW += dy^T x (transposed: x^T dy), db += sum_rows dy, dx = dy W.
    """

    required = (("innerproduct_conf", "num_output"),)

    rowwise = True

    has_params = True
    claims_grads = True

    @classmethod
    def default_param_names(cls, conf):
        return ["w", "b"] if conf.innerproduct_conf.bias_term else ["w"]

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        c = self.conf.innerproduct_conf
        n = int(c.num_output)
        if n <= 0:
            raise self.error("innerproduct_conf.num_output is required and must be > 0 "
                             f"(got {n}); set it to the output width")
        self.in_dim = int(np.prod(srcs[0].out_shape)) if srcs[0].out_shape else 1
        self.transpose = bool(c.transpose)
        self.bias_term = bool(c.bias_term)
        wshape = (self.in_dim, n) if self.transpose else (n, self.in_dim)
        self.add_param("w", wshape, ("uniform", -0.08, 0.08), fan_in=self.in_dim, fan_out=n)
        if self.bias_term:
            self.add_param("b", (n,), ("constant", 0.0), fan_in=self.in_dim, fan_out=n)
        self.out_shape = (n,)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        b = x.shape[0]
        x2 = self.float_input(x).reshape(b, -1)
        if x2.shape[1] != self.in_dim:
            raise self.error(f"input has {x2.shape[1]} features per row, expected {self.in_dim} "
                             f"(from the source's shape at setup)")
        w = self.params["w"].data
        y = x2 @ w if self.transpose else x2 @ w.T
        if self.bias_term:
            y += self.params["b"].data
        return y, None, (x2, x.shape, _is_float(x))

    def backward(self, ctx, dy, dstate, cache):
        if cache is None:
            return [None], None
        x2, xshape, was_float = cache
        w = self.params["w"]
        wx = w.data.T if self.transpose else w.data   # (n, in_dim): dx = dy @ wx
        # dW^T = x^T dy in both layouts: measured faster than dy^T x (char-rnn's output layer,
        # x a (T·B, H) view of a feature-major block: 1.26 against 1.56 ms with cold caches)
        g = x2.T @ dy
        add_grad(w, g if self.transpose else g.T)
        if self.bias_term:
            add_grad(self.params["b"], dy.sum(axis=0))
        if not was_float:
            return [None], None
        dx = ProductGrad(dy, wx)                       # dx = dy W
        if ctx.product_grads and len(xshape) == 2:   # left to the executor
            return [dx], None
        return [dx.value().reshape(xshape)], None


# --------------------------------------------------------------- embedding


@register(pb.kEmbedding)
class Embedding(Layer):
    """Row lookup of token ids.

    y[r] = W[id_r], ids of shape (B,) (a one-to-all data source of shape (B, S)
    gives column ``step``), y of shape (B, feature_dim).

    Params: ``w`` of shape (vocab_size, feature_dim), default init U(-0.08, 0.08),
    fan_in vocab_size, fan_out feature_dim.
    Backward: W.grad[id_r] += dy[r] (scatter-add: repeated ids add up); the
    integer input gets no gradient. An id outside [0, vocab_size) is an error.
    """

    required = (("embedding_conf", "vocab_size"),)

    rowwise = True
    step_select = True

    has_params = True

    @classmethod
    def default_param_names(cls, conf):
        return ["w"]

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        c = self.conf.embedding_conf
        self.vocab_size = int(c.vocab_size)
        self.feature_dim = int(c.feature_dim)
        if self.vocab_size <= 0:
            raise self.error(f"embedding_conf.vocab_size is required and must be > 0 "
                             f"(got {self.vocab_size}); set it to the number of token ids")
        if self.feature_dim <= 0:
            raise self.error(f"embedding_conf.feature_dim must be > 0 (got {self.feature_dim})")
        self.add_param("w", (self.vocab_size, self.feature_dim), ("uniform", -0.08, 0.08),
                       fan_in=self.vocab_size, fan_out=self.feature_dim)
        self.out_shape = (self.feature_dim,)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        ids = self.ids_at_step(x, ctx, "source 0")
        bad = (ids < 0) | (ids >= self.vocab_size)
        ctx.check(bad.any(), lambda first: self.error(
            f"id {int(first)} is outside [0, {self.vocab_size}) (embedding_conf.vocab_size); "
            f"raise vocab_size or fix the data"), ids.reshape(-1)[self.xp.argmax(bad.reshape(-1))])
        ids = self.xp.clip(ids, 0, self.vocab_size - 1)  # on a device the check is read later
        return self.params["w"].data[ids], None, ids

    def backward(self, ctx, dy, dstate, cache):
        if cache is None:
            return [None], None
        # repeated ids add up: numpy's add.at, or cupyx.scatter_add behind the backend switch
        # (a scatter adds into what is there: the buffer zeroes this layer's params)
        scatter_add(self.xp, self.params["w"].grad, cache, dy)
        return [None], None


# ----------------------------------------------------------------- dropout


@register(pb.kDropout)
class Dropout(Layer):
    """Inverted dropout.

    Training: y = x * m / (1 - p) with m_i ~ Bernoulli(1 - p), p = dropout_ratio,
    drawn from ctx.rng on the host; dx = dy * m / (1 - p). Otherwise y = x.
    The expectation of y equals x in both phases. No params.
    """

    rowwise = True
    identity_at_inference = True

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        self.ratio = float(self.conf.dropout_conf.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_conf.dropout_ratio must be in [0, 1) (got {self.ratio})")
        self.out_shape = tuple(srcs[0].out_shape)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        x = self.float_input(x)
        if not ctx.train or self.ratio == 0.0:
            return x, None, ("identity",)
        if ctx.rng is None:
            raise self.error("training needs ctx.rng to draw the dropout mask")
        keep = ctx.random(x.shape) >= self.ratio
        mask = self.xp.asarray((keep / (1.0 - self.ratio)).astype(self.dtype))
        return x * mask, None, ("mask", mask)

    def backward(self, ctx, dy, dstate, cache):
        if cache is None:
            return [None], None
        if cache[0] == "identity":
            return [dy], None
        return [dy * cache[1]], None


# --------------------------------------------------------- activations

_STANH_A = 1.7159047  # SINGA v0.3's constants (singa_op.h: 1.7159047 tanh(0.66666667 x))
_STANH_B = 2.0 / 3.0
IDENTITY = "identity"

#: One table of element-wise functions: key -> (f(xp, x, a), f'(xp, x, y, a)).
#: ``a`` is the function's parameter (the ReLU negative slope; unused otherwise).
ACTIVATIONS = {
    pb.RELU: (lambda xp, x, a: xp.where(x > 0, x, a * x),
              lambda xp, x, y, a: xp.where(x > 0, 1.0, a).astype(x.dtype)),
    pb.SIGMOID: (lambda xp, x, a: 0.5 * (1.0 + xp.tanh(0.5 * x)),  # overflow-free logistic
                 lambda xp, x, y, a: y * (1.0 - y)),
    pb.TANH: (lambda xp, x, a: xp.tanh(x),
              lambda xp, x, y, a: 1.0 - y * y),
    pb.STANH: (lambda xp, x, a: _STANH_A * xp.tanh(_STANH_B * x),
               lambda xp, x, y, a: _STANH_B * (_STANH_A - y * y / _STANH_A)),
    IDENTITY: (lambda xp, x, a: x,
               lambda xp, x, y, a: xp.ones_like(x)),
}
#: LINEAR (an extension, ActivationType 10) is the identity: the same functions
ACTIVATIONS[pb.LINEAR] = ACTIVATIONS[IDENTITY]


def activation_name(key) -> str:
    return key if key == IDENTITY else pb.ActivationType.Name(key)


class Elementwise(Layer):
    """y = f(x) element-wise, dx = dy * f'(x); f from ``ACTIVATIONS``. No params."""

    rowwise = True

    def function(self):
        """(ACTIVATIONS key, parameter) of this layer."""
        raise NotImplementedError

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        key, self.arg = self.function()
        if key not in ACTIVATIONS:
            raise self.error(f"activation type {key} is not supported; use RELU, SIGMOID, "
                             f"TANH, STANH or LINEAR")
        self.fn, self.dfn = ACTIVATIONS[key]
        self.out_shape = tuple(srcs[0].out_shape)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        xf = self.float_input(x)
        y = self.fn(self.xp, xf, self.arg)
        return y, None, (xf, y)

    def backward(self, ctx, dy, dstate, cache):
        if cache is None:
            return [None], None
        x, y = cache
        return [dy * self.dfn(self.xp, x, y, self.arg)], None


@register(pb.kActivation)
class Activation(Elementwise):
    """y = f(x) with f chosen by activation_conf.type:
    RELU max(x, 0), SIGMOID 1/(1+exp(-x)), TANH tanh(x), STANH 1.7159047 tanh(2x/3),
    LINEAR x (the identity, an extension). No params."""

    def function(self):
        return self.conf.activation_conf.type, 0.0


@register(pb.kReLU)
class ReLU(Elementwise):
    """y = x for x > 0, negative_slope * x otherwise (relu_conf.negative_slope, default 0).
    No params."""

    def function(self):
        return pb.RELU, float(self.conf.relu_conf.negative_slope)


@register(pb.kSigmoid)
class Sigmoid(Elementwise):
    """y = 1 / (1 + exp(-x)). No params."""

    def function(self):
        return pb.SIGMOID, 0.0


@register(pb.kSTanh)
class STanh(Elementwise):
    """y = 1.7159047 tanh(2x/3) (LeCun's scaled tanh, SINGA's constants). No params."""

    def function(self):
        return pb.STANH, 0.0


@register(pb.kDummy)
class Dummy(Elementwise):
    """y = x (identity; integer inputs pass unchanged and get no gradient). No params.

    SINGA's test modes of kDummy (dummy_conf ``input``: random data without a source;
    ``output``: random gradients) are refused; dummy_conf ``shape`` (input mode only)
    has no use here."""

    identity_at_inference = True

    def setup(self, srcs):
        c = self.conf.dummy_conf
        if c.input or c.output:
            raise self.error(f"dummy_conf {{ {'input' if c.input else 'output'}: true }} is "
                             f"SINGA's test mode (random {'data' if c.input else 'gradients'}), "
                             f"which this engine does not have; remove it (kDummy is the "
                             f"identity here)")
        super().setup(srcs)

    def function(self):
        return IDENTITY, 0.0

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        return x, None, _is_float(x)

    def backward(self, ctx, dy, dstate, cache):
        return [dy if cache else None], None


@register(pb.kSoftmax)
class Softmax(Layer):
    """y_j = exp(x_j) / sum_k exp(x_k) over the last dim (shifted by the max).

    dx = y * (dy - sum_k dy_k y_k). No params.
    """

    rowwise = True
    outputs_probabilities = True

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        n = int(self.conf.softmax_conf.num_softmax_per_instance)
        if n != 1:
            raise self.error(f"softmax_conf.num_softmax_per_instance must be 1 (got {n}); use "
                             f"a kSlice before the softmax to split the features")
        if len(srcs[0].out_shape) == 0:
            raise self.error("the source has no feature dimension to normalise over "
                             "(its out_shape is ()); feed it scores of shape (B, V)")
        self.out_shape = tuple(srcs[0].out_shape)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        y = softmax(self.xp, self.float_input(x))
        return y, None, y

    def backward(self, ctx, dy, dstate, cache):
        if cache is None:
            return [None], None
        y = cache
        return [y * (dy - (dy * y).sum(axis=-1, keepdims=True))], None
