"""Layer base classes, Param, the per-call Context and the type registry: the contract.

Everything an executor, the unroller, the sampler or the config checks need from a
layer is declared here; nothing outside a layer module tests a layer's type.

Per copy (the reference executor, engine/worker.py, and every layer test):

* One ``Layer`` object per *configured* layer. All unrolled copies ``i#L``
  of it share that object and hence its params; per-copy data lives in the
  ``cache`` the layer returns from ``forward`` and gets back in ``backward``.
* ``setup(srcs)`` receives the set-up source layer objects (in srclayer
  order) and must set ``self.out_shape``: the shape of one copy's output
  *without* the leading batch dimension (``()`` for a vector of ids). It
  creates params with ``self.add_param``. ``self.src_conn`` holds the
  connection type of each srclayer (from the unrolled graph's edges).
* ``forward(ctx, xs, state) -> (y, new_state, cache)``. ``xs`` is aligned
  with the layer's srclayers: ``xs[k]`` is the output of the copy of
  source k this copy reads, ``None`` when this copy gets nothing from it
  (one-to-one with a shift at early copies), or a Python list of arrays
  for one-to-all from a source with several copies. ``state`` is the
  previous recurrent state for recurrent layers (``None`` otherwise).
* ``backward(ctx, dy, dstate, cache) -> (dxs, dprev_state)``. ``dy`` has
  ``y``'s shape (zeros when nothing consumed ``y``); ``dstate`` is the
  gradient arriving at ``new_state`` from the next copy (zeros at the last
  copy). ``dxs`` is aligned with ``xs`` (``None`` for integer inputs or
  absent sources). Param gradients are *accumulated* (``+=``) into
  ``param.grad``; the worker zeroes them once per batch. (A layer class that sets
  ``claims_grads`` instead adds every contribution through ``add_grad`` /
  ``overwrites`` below, and the net's gradient buffer then skips the zeroing of its
  params: each one's first contribution of a batch is written, not added.)
* Layers never import cupy: they use ``self.xp`` (numpy or cupy) and
  ``self.dtype`` (float32 for training, float64 for gradient checks).
* Errors name the layer one way: ``raise self.error(msg)`` gives
  ``layer "<name>": <msg>``.

All copies at once (the planned executor, engine/planner.py): a layer that
can compute its T copies in one call says so with ``supports_block()`` and
implements ``forward_block`` / ``backward_block`` (their docstrings give the
arrays they take and return). Rowwise layers get them from ``forward`` /
``backward``; recurrent layers run their step loop there. A layer without
them still runs: the planner refuses the net (``NotPlannable``) and the
reference executor takes over, saying why.

Declarations (class attributes and classmethods, read instead of type
switches): recurrence (``context_sources``: copy i reads copy i - offset of a
layer as its context; recurrent layers return ``[(conf.name, 1)]``, or
``[(conf.name, -1)]`` with ``direction: kBackward``: their pass then runs from
copy T-1 down to copy 0, ``reverse_pass``), the
settings a job must give (``required``), what the sampler keeps
(``in_sampling_net``), whether outputs are probabilities, vocabularies. The
input-layer protocol is ``InputLayer``, the loss-layer protocol ``LossLayer``.

Adding a layer type: give it a LayerType value in ``proto/job.proto`` (a number
SINGA never used) and its settings message, regenerate
``engine/proto/job_pb2.py`` (``python tools/gen_proto.py``), write the class in
the family module under ``engine/layers/`` with ``@register(pb.kYours)`` and its
formula in the docstring, add a row to the layer table in docs/config.md, and a test
(``tests/layercheck.py`` checks a layer's gradients by finite differences).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.proto import job_pb2 as pb
from engine.backend import host_or_device, on_device, rng_stream

REGISTRY: dict[int, type["Layer"]] = {}


def register(*layer_types: int) -> Callable[[type["Layer"]], type["Layer"]]:
    """Class decorator: register a Layer subclass under LayerType values."""

    def deco(cls: type["Layer"]) -> type["Layer"]:
        for t in layer_types:
            if t in REGISTRY:
                raise RuntimeError(f"layer type {t} registered twice")
            REGISTRY[t] = cls
        return cls

    return deco


class LayerError(Exception):
    """A configuration problem found while setting up a layer (message names the layer)."""


@dataclass
class Param:
    """One trainable array. Copies of a layer and tied layers share one object.

    ``data`` and ``grad`` are arrays of the net's array module and dtype. In a Net,
    ``grad`` is a view into the net's one gradient buffer (``grad_buffer``), so it must
    be written in place (``+=``, ``[...] =``), never rebound.
    ``init`` is the ParamGenProto used to fill it (may be None: the layer's
    default init is used). ``fan_in``/``fan_out`` feed the *SqrtFanIn* inits.
    """

    name: str
    shape: tuple
    init: Any = None
    lr_scale: float = 1.0
    wd_scale: float = 1.0
    share_from: str = ""
    fan_in: int = 1
    fan_out: int = 1
    data: Any = None
    grad: Any = None
    owner_layer: str = ""
    default_init: tuple = ("uniform", -0.08, 0.08)
    #: the net's gradient buffer (``engine.params.GradBuffer``) whose view ``grad`` is, or
    #: None for a param outside a Net (a layer tested alone)
    grad_buffer: Any = None


def overwrites(params) -> bool:
    """Whether the caller, about to add a contribution to the gradients of ``params`` (one
    array it writes whole: a param, or a gate group stacked in the buffer), must WRITE it
    instead: True when the net's gradient buffer left them unzeroed for this batch and
    nothing has added to them yet (``engine.params.GradBuffer.claim``), so writing is what
    adding to zeros would give. The caller must then write every element. False for a
    param outside a Net, and after the first contribution."""
    buffer = params[0].grad_buffer if params else None
    return buffer is not None and buffer.claim(params)


def add_grad(p: "Param", g) -> None:
    """p.grad += g, or p.grad = g for the batch's first contribution (``overwrites``)."""
    if overwrites((p,)):
        p.grad[...] = g
    else:
        p.grad += g


@dataclass
class Context:
    """What a layer gets to know about the copy it is computing.

    step:       this copy's unroll index i
    unroll_len: number of copies of this layer
    train:      True in the training phase (dropout on, etc.)
    mask:       (B,) array of 1/0 for this step, or None when all rows are valid
    aux:        per data source, its auxiliary output (labels) or None
    rng:        numpy.random.Generator for this layer (dropout, sampling)
    metrics:    dict name -> [sum, count] that loss/accuracy layers add to
    aux_out:    an input layer may set this to publish labels for this copy
    mask_out:   an input layer may set this to publish the step mask
    """

    step: int = 0
    unroll_len: int = 1
    train: bool = True
    mask: Any = None
    aux: list = field(default_factory=list)
    rng: Any = None
    metrics: dict = field(default_factory=dict)
    aux_out: Any = None
    mask_out: Any = None
    sampling: bool = False
    #: planned executor: the steps of a block call (rows are step-major T·B), else None
    steps: Any = None
    #: rows of one copy (the batch), when a call covers several copies; None = all rows
    batch: Any = None
    #: block calls: per source, whether its gradient is wanted (None: all are)
    need_input_grads: Any = None
    #: block calls: whether the gradient of the initial state is wanted
    need_state_grad: bool = True
    #: block calls (the planned executor): a layer may give its input's gradient as a
    #: ``ProductGrad``, left unmultiplied; the executor multiplies it out unless the
    #: source takes it (``Layer.takes_product_grad``)
    product_grads: bool = False

    #: checks of device values not yet read (see ``check``); the worker's list
    checks: Any = None
    #: a block call of several copies: the keys of each copy's random stream, in step
    #: order (``engine.backend.rng_stream``; made only when a layer draws)
    copy_streams: Any = None

    def random(self, shape) -> np.ndarray:
        """Uniform numbers in [0, 1) of ``shape``, on the host. A block call's rows
        (step-major T·B) come from each copy's own stream, so that the planned executor
        draws what the reference one draws copy by copy (dropout masks, samples)."""
        if self.copy_streams is None:
            return self.rng.random(shape)
        rows = shape[0] // len(self.copy_streams)
        return np.concatenate([rng_stream(*key).random((rows, *shape[1:]))
                               for key in self.copy_streams])

    def add_metric(self, name: str, total, count) -> None:
        """Accumulate a metric as a (sum, count) pair; its value is sum / count. A sum or
        count on the device (a 0-d array of a GPU array module) stays there: the trainer
        reads metrics at display steps only (``Worker.host_values``)."""
        slot = self.metrics.setdefault(name, [0.0, 0.0])
        slot[0] = slot[0] + host_or_device(total)
        slot[1] = slot[1] + host_or_device(count)

    def check(self, failed, error, value=None) -> None:
        """Raise ``error(value)`` (an exception) where ``failed`` holds. With NumPy at once;
        a device flag (and ``value``) is kept in ``checks`` and read with the next host
        read of the step (``Worker.host_values``), so a check costs no wait for the GPU."""
        if on_device(failed) and self.checks is not None:
            self.checks.append((failed, value, error))
        elif bool(failed):
            raise error(None if value is None else host_or_device(value))

    def label(self, xs: list, pos: int):
        """Labels carried by data source ``pos``: its aux output if any, else its data."""
        if pos < len(self.aux) and self.aux[pos] is not None:
            return self.aux[pos]
        return xs[pos]


class Layer:
    """Base class. Subclasses set the class attributes below and override methods.

    The class attributes are the layer type's declarations: the unroller, the executors,
    the sampler and the config checks read them instead of testing type names.
    """

    #: the layer reads its own previous copy as context (adds (i-1)#L -> i#L)
    recurrent: bool = False
    #: the type creates params (used to colour shared-param groups before any layer is built)
    has_params: bool = False
    #: every gradient contribution of the layer's backward goes through ``add_grad`` /
    #: ``overwrites`` (none through a bare ``+=``), so the net's gradient buffer need not
    #: zero its params before a batch (engine.params.GradBuffer.zero)
    claims_grads: bool = False
    #: loss layers (see LossLayer): backward ignores dy; their output is not differentiated further
    is_loss: bool = False
    #: backward_block takes its output's gradient as a ``ProductGrad`` (multiplying it out
    #: itself, or folding the product into its own)
    takes_product_grad: bool = False
    #: input layers (see InputLayer): the worker loads a batch into them before each forward
    is_input: bool = False
    #: False for output layers (kArgSort, kAccuracy, ...): the worker skips their backward
    differentiable: bool = True
    #: rows are independent and the step is not used (or only through step_ids): the
    #: planned executor may run all copies as one call over T·B rows
    rowwise: bool = False
    #: reads its step's column of a one-to-all source through step_ids
    step_select: bool = False
    #: True when forward returns a list (consumer j of a copy gets piece j) and
    #: backward receives a list of gradients (kSlice)
    multi_output: bool = False
    #: the settings a job must give, as (conf field, sub-field) pairs; ``config.validate``
    #: checks them once (present, and positive when numeric), so ``setup`` need not
    required: tuple = ()
    #: kept in the one-step net the sampler derives from a training job (label, loss and
    #: output layers are not: the sampler feeds its own draws back instead)
    in_sampling_net: bool = True
    #: the output holds probabilities (a softmax), not raw scores
    outputs_probabilities: bool = False
    #: every output row is a one-hot code (exactly one 1, the rest 0; kOneHot): a consumer
    #: may take W x as column argmax(x) of W instead of a product with the zeros
    one_hot_rows: bool = False
    #: the layer is the identity at inference (kDropout, kDummy): an exported model leaves
    #: it out
    identity_at_inference: bool = False
    #: for layers that read or emit token ids: the vocabulary (list of str), when known,
    #: and its size; a consumer (kOneHot, kRNNLabel) reads them from its source
    vocab: list | None = None
    vocab_size: int | None = None
    #: the unit of ``vocab``'s symbols: "utf-8" (characters) or "bytes" (engine/text.py)
    encoding: str = "utf-8"

    def __init__(self, conf, xp=np, dtype=np.float32):
        self.conf = conf
        self.name = conf.name
        self.xp = xp
        self.dtype = dtype
        self.params: dict[str, Param] = {}
        self.out_shape: tuple = ()
        self._next_param = 0
        #: connection type (UnrollConnType value) of each srclayer, set before setup
        self.src_conn: list[int] = []
        #: net-wide facts set before setup: "vocab" (list of str or None), "encoding"
        #: (its unit), "workspace" (str), "job_dir" (str: relative paths are resolved
        #: against it), "seed", "alg" (the job's AlgType when given)
        self.info: dict = {}

    # ----------------------------------------------------------- declarations
    @classmethod
    def context_sources(cls, conf) -> list[tuple[str, int]]:
        """(layer name, offset) pairs: copy i reads copy i-offset of that layer as context."""
        return [(conf.name, 1)] if cls.recurrent else []

    @classmethod
    def reverse_pass(cls, conf) -> bool:
        """The layer reads a later copy of itself as context (a negative offset): its pass
        starts at copy T-1, whose state is the initial state (zeros, or a first-to-last
        source's output), and ends at copy 0."""
        return any(name == conf.name and off < 0 for name, off in cls.context_sources(conf))

    @classmethod
    def fit_readers(cls, conf, readers: list) -> str | None:
        """Settle the settings of ``conf`` that must agree with the layers reading this
        one (``readers``: their LayerProtos, all in one phase): fill them in place when
        the file leaves them out, or return the disagreement (one line, without the
        layer's name). ``config.normalise`` calls it once per phase; most layers have
        no such setting."""
        return None

    @classmethod
    def default_param_names(cls, conf) -> list[str]:
        """Names of the params this layer type creates, in order (for docs and defaults)."""
        return []

    # ------------------------------------------------------------------ setup
    def setup(self, srcs: list["Layer"]) -> None:
        raise NotImplementedError

    def add_param(self, key: str, shape: tuple, default_init: tuple = ("uniform", -0.08, 0.08),
                  fan_in: int = 1, fan_out: int = 1) -> Param:
        """Declare the next param of this layer.

        ``key`` is the param's role in this layer (e.g. ``"w"``, ``"z_hx"``). The
        k-th call takes the k-th ``param`` entry of the config when present (its
        name, init, lr_scale, wd_scale, share_from); otherwise the param is named
        ``<layer>/<key>`` and initialised by ``default_init``, one of
        ``("uniform", low, high)``, ``("gaussian", mean, std)``, ``("constant", v)``.
        """
        k = self._next_param
        self._next_param += 1
        pconf = self.conf.param[k] if k < len(self.conf.param) else None
        name = pconf.name if pconf is not None and pconf.name else f"{self.name}/{key}"
        p = Param(name=name, shape=tuple(int(s) for s in shape), fan_in=fan_in, fan_out=fan_out,
                  owner_layer=self.name)
        if pconf is not None:
            p.init = pconf.init if pconf.HasField("init") else None
            p.lr_scale = pconf.lr_scale
            p.wd_scale = pconf.wd_scale
            p.share_from = pconf.share_from
        p.default_init = default_init
        self.params[key] = p
        return p

    def params_ready(self, like: "Layer | None" = None) -> None:
        """Called by the net once the params hold their values: after initialisation
        (``like`` None), or after they were replaced by the same-named params of ``like``,
        the training net's copy of this layer (a val/test net evaluating its weights). A
        layer may arrange its storage here (the recurrent layers stack their gate groups)."""

    # ---------------------------------------------------------------- compute
    def forward(self, ctx: Context, xs: list, state):
        raise NotImplementedError

    def backward(self, ctx: Context, dy, dstate, cache):
        raise NotImplementedError

    # ---------------------------------------------------------- block compute
    # The planned executor (engine/planner.py) runs the T copies of a layer as ONE call
    # when the layer supports it. Arrays of a block hold all copies, step-major: rows
    # t·B .. t·B+B-1 are copy t (ctx.steps = arange(T), ctx.batch = B). A source read
    # one-to-one arrives as its own block (T·B rows), a single-copy source as its B rows,
    # an absent source as None.
    def supports_block(self) -> bool:
        """Whether ``forward_block``/``backward_block`` may be called. Rowwise layers get
        them from ``forward``/``backward`` (rows are independent); a layer with context
        (recurrent) overrides all three; the planner runs no other layer with T > 1."""
        return bool(self.rowwise)

    def forward_block(self, ctx: Context, xs: list, state):
        """All copies at once: ``(y, final_state, cache)``. ``state`` is the initial state
        (the context of the copy where the pass starts, copy 0, or copy T-1 for a
        ``reverse_pass`` layer: carried, zeros or from a first-to-last source) for a layer
        with context, else None; ``final_state`` is the state after the pass's last copy
        (what the executor carries into the next batch), None for layers without context.
        ``ctx.mask`` is the (T·B,) row mask or None; ``ctx.need_input_grads`` says, per
        source, whether its gradient is wanted; ``ctx.need_state_grad`` whether the
        gradient of the initial state is."""
        return self.forward(ctx, xs, state)

    def backward_block(self, ctx: Context, dy, cache):
        """Reverse of ``forward_block``: ``(dxs, dstate0)`` with ``dxs`` aligned with xs
        (None where not wanted or not differentiable) and ``dstate0`` the gradient of the
        initial state (None when not wanted or when the layer has no context). Param
        gradients accumulate (+=) as in ``backward``."""
        dxs, _ = self.backward(ctx, dy, None, cache)
        return dxs, None

    # ---------------------------------------------------------- state helpers
    def zero_state(self, batch: int):
        """Initial recurrent state of ``batch`` rows (recurrent layers)."""
        return None

    def state_from_source(self, y):
        """Initial state taken from a first-to-last source's output (encoder -> decoder)."""
        return y

    def source_grad_from_state(self, dstate):
        """Gradient w.r.t. that source's output, given the gradient of the initial state."""
        return dstate

    # ---------------------------------------------------------------- results
    def report(self) -> str:
        """Text this layer produced during the last run of its phase, printed at the end of a
        test-only job (kCharRNNOutput's characters); "" when it produces none."""
        return ""

    # --------------------------------------------------- checks and messages
    def error(self, msg: str) -> LayerError:
        """A LayerError whose message names this layer: ``layer "<name>": <msg>``."""
        return LayerError(f'layer "{self.name}": {msg}')

    def need_srcs(self, srcs, n: int, what: str = "") -> None:
        """Raise unless there are exactly ``n`` sources (``what`` describes them)."""
        if len(srcs) != n:
            desc = f" ({what})" if what else ""
            raise self.error(f"{pb.LayerType.Name(self.conf.type)} takes {n} srclayer(s){desc}, "
                             f"got {len(srcs)}; fix its srclayers")

    def src_input(self, xs, k: int = 0, what: str = ""):
        """Source k's array for this copy (a single-copy one-to-all list is unwrapped)."""
        try:
            return one_array(xs[k])
        except LayerError as e:
            where = what or f"source {k}"
            raise self.error(f"{where}: {e}; a one-to-all source must have a single copy "
                             f"here, connect it one-to-one otherwise") from None

    def ids_at_step(self, a, ctx, what: str):
        """Integer ids for this copy from ``a`` (column ctx.step of a (B, S) array)."""
        try:
            ids = step_ids(a, ctx)
        except LayerError as e:
            raise self.error(f"{what}: {e}; a one-to-all source must have a single copy "
                             f"here, connect it one-to-one otherwise") from None
        return self.as_ids(ids, what)

    def as_ids(self, a, what: str):
        """``a`` as int64 ids; float arrays must hold whole numbers."""
        xp = self.xp
        a = xp.asarray(a)
        if a.dtype.kind in "iu":
            return a.astype(xp.int64, copy=False)
        r = xp.rint(a)
        if not bool(xp.all(r == a)):
            raise self.error(f"{what} must hold integer ids, got non-integer values; feed it "
                             f"from an integer data source")
        return r.astype(xp.int64)

    def row_mask(self, ctx, batch: int):
        """ctx.mask as a (B,) float array of self.dtype, or None when all rows count."""
        if ctx.mask is None:
            return None
        m = self.xp.asarray(ctx.mask, dtype=self.dtype).reshape(-1)
        if m.shape[0] != batch:
            raise self.error(f"mask has {m.shape[0]} rows but the batch has {batch}")
        return m

    def float_input(self, x):
        """``x`` in self.dtype (integer inputs are converted)."""
        return x.astype(self.dtype, copy=False)


class InputLayer(Layer):
    """Base of the data layers. The worker calls, per batch: ``load_batch()``, then
    ``forward`` of each copy (or ``forward_block``), then ``end_batch()``.

    What an input layer publishes (the defaults suit a store of independent sequences):

    * ``batchsize`` -- rows per batch.
    * ``is_stream`` -- consecutive batches continue each row, so the recurrent state may
      be carried from batch to batch (kCharRNN); ``new_sequence`` -- the rows of the
      batch just loaded start new sequences (carried state is reset);
      ``stream_starts`` -- (B,) offsets of the rows in their streams, or None, and
      ``stream_advance`` -- how far each row moves per batch: the worker checks that a
      carried state meets the text that continues it.
    * ``text`` -- the rows are characters of a text (metrics per character: bpc, chars/s).
    * ``rewind()`` -- back to the first batch (every evaluation reads the same batches).
    * ``cursor_state()`` / ``load_cursor_state(d)`` -- where the next batch starts, as a
      JSON-able dict, for checkpoints; ``snapshot()`` / ``restore(s)`` -- the same, cheap
      and in memory, to read one batch again (diagnosing a non-finite batch).
    * ``take_share(rank, workers)`` -- data parallelism (engine/distributed.py): from now
      on deliver only worker ``rank``'s share of each batch.
    """

    is_input = True
    batchsize: int | None = None
    is_stream: bool = False
    text: bool = False
    new_sequence: bool = True
    stream_starts = None
    stream_advance: int = 0

    @classmethod
    def configured_batch(cls, conf) -> int | None:
        """The batch size ``conf`` gives this input layer, read from the job alone (before
        any layer is built: a launcher checks that the batch splits over its workers), or
        None when the layer type does not say."""
        return None

    @classmethod
    def precheck(cls, conf, info: dict) -> str | None:
        """A problem with the layer's data that the job alone shows, found before the
        unrolled graph is built (cheap: file sizes, not contents), or None. ``info`` holds
        ``job_dir`` for relative paths."""
        return None

    def load_batch(self) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        """After a batch: the next one continues these rows (streams)."""

    def rewind(self) -> None:
        """Back to the first batch."""

    def cursor_state(self) -> dict:
        return {}

    def load_cursor_state(self, d: dict) -> None:
        pass

    def take_share(self, rank: int, workers: int) -> None:
        """Deliver only worker ``rank``'s share (of ``workers``) of every batch.

        With B the configured batch size and b = B / workers, the share is rows
        rank·b .. rank·b + b - 1 of the batch one worker would read, so the shares of
        all workers together are exactly that batch; ``batchsize`` becomes b. Cursors
        (``cursor_state``) stay those of the whole batch, equal on every worker.
        ``stream_starts`` gives the share's rows. B not divisible by ``workers`` is a
        LayerError naming the layer.

        Default: nothing to do for one worker; a LayerError for several (the layer does
        not know how to split its batches)."""
        if workers > 1:
            raise self.error(f"{pb.LayerType.Name(self.conf.type)} cannot split its batches "
                             f"over {workers} workers; train this job on one worker")

    def share_rows(self, batch: int, rank: int, workers: int) -> slice:
        """Rows rank·b .. (rank+1)·b - 1 of a batch of ``batch`` rows, b = batch / workers;
        a LayerError when ``batch`` is not divisible by ``workers``."""
        if batch % workers:
            raise self.error(f"batch size {batch} cannot be split evenly over {workers} workers; "
                             f"use a batch size divisible by {workers}")
        b = batch // workers
        return slice(rank * b, (rank + 1) * b)

    def snapshot(self) -> dict:
        return self.cursor_state()

    def restore(self, snap: dict) -> None:
        self.load_cursor_state(snap)

    def backward(self, ctx, dy, dstate, cache):
        return [None] * len(self.conf.srclayers), None


class LossLayer(Layer):
    """Base of the loss layers: their backward ignores ``dy`` and returns the gradient of
    their own objective; they add metrics (sum, count) with ``ctx.add_metric``, among them
    "objective" (the exact scalar whose gradient backward returns, count 0)."""

    is_loss = True
    in_sampling_net = False
    #: source 0 gives one score per class (a sampler may draw the next id from them)
    classifies: bool = False
    #: the conf holding the loss's ``scale`` (checked once by config.validate: finite, >= 0)
    scale_conf: str = ""

    def derived_metrics(self, values: dict, text: bool) -> dict:
        """Metrics computed from the averaged ones (``values``: name -> value), e.g.
        perplexity; ``text``: the net reads characters of a text."""
        return {}


def step_ids(x, ctx: "Context", offset: int = 0):
    """Token ids for this copy from an integer source.

    A one-to-all source (a single data copy holding all steps, shape (B, S))
    gives column ``ctx.step + offset``; in a block call (``ctx.steps`` set) the
    columns of all those steps, step-major as T·B rows. A per-step source
    (shape (B,)) is used as is.
    """
    x = one_array(x)
    if x.ndim == 2:
        if ctx.steps is not None:
            return x[:, ctx.steps + offset].T.reshape(-1)
        return x[:, ctx.step + offset]
    return x


def one_array(x):
    """A one-to-all source with a single copy arrives as [array]; return the array."""
    if isinstance(x, list):
        if len(x) != 1:
            raise LayerError("expects a single source copy, got %d" % len(x))
        return x[0]
    return x


class ProductGrad:
    """A gradient left as the product d w, not yet multiplied: d (R, n), w (n, D), the
    gradient (R, D). A dense layer gives its input's gradient so when the executor lets it
    (``Context.product_grads``); a recurrent layer above whose output it is then makes
    each step's dL/dh' in its backward step GEMM, [W_h^T w^T] [g; d_t^T] instead of
    W_h^T g plus a block the dense layer multiplied out, and anything else takes
    ``value()``."""

    __slots__ = ("d", "w")

    def __init__(self, d, w):
        self.d, self.w = d, w

    @property
    def shape(self) -> tuple:
        return (self.d.shape[0], self.w.shape[1])

    def value(self):
        """d w, made feature-major ((w^T d^T)^T: a recurrent layer reads dy^T as a view)."""
        return (self.w.T @ self.d.T).T


def dense_grad(g):
    """``g`` multiplied out if it is a ``ProductGrad``."""
    return g.value() if isinstance(g, ProductGrad) else g


def add_grads(a, b):
    """a + b for gradients where either may be None (absent); tuples (an LSTM's (h, c))
    add element-wise; a ``ProductGrad`` is multiplied out first."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(add_grads(x, y) for x, y in zip(a, b))
    return dense_grad(a) + dense_grad(b)
