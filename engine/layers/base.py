"""Layer base class, Param, per-call Context and the type registry.

The contract every layer follows (the reference executor in engine/worker.py
relies on it, and so does every layer test):

* One ``Layer`` object per *configured* layer. All unrolled copies ``i#L``
  of it share that object and hence its params; per-copy data lives in the
  ``cache`` the layer returns from ``forward`` and gets back in ``backward``.
* ``setup(srcs)`` receives the set-up source layer objects (in srclayer
  order) and must set ``self.out_shape``: the shape of one copy's output
  *without* the leading batch dimension (``()`` for a vector of ids). It
  creates params with ``self.add_param``.
* ``forward(ctx, xs, state) -> (y, new_state, cache)``. ``xs`` is aligned
  with the layer's data srclayers: ``xs[k]`` is the output of the copy of
  source k this copy reads, ``None`` when this copy gets nothing from it
  (one-to-one with a shift at early copies), or a Python list of arrays
  for one-to-all from a source with several copies. ``state`` is the
  previous recurrent state for recurrent layers (``None`` otherwise).
* ``backward(ctx, dy, dstate, cache) -> (dxs, dprev_state)``. ``dy`` has
  ``y``'s shape (zeros when nothing consumed ``y``); ``dstate`` is the
  gradient arriving at ``new_state`` from the next copy (zeros at the last
  copy). ``dxs`` is aligned with ``xs`` (``None`` for integer inputs or
  absent sources). Param gradients are *accumulated* (``+=``) into
  ``param.grad``; the worker zeroes them once per batch.
* Layers never import cupy: they use ``self.xp`` (numpy or cupy) and
  ``self.dtype`` (float32 for training, float64 for gradient checks).

Recurrence is declared by the class, never tested by type name elsewhere:
``context_sources(conf)`` lists (layer name, offset) pairs; copy i reads copy
i - offset of that layer as its context. Recurrent layers return
``[(conf.name, 1)]``; a later bidirectional layer would return -1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

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

    ``data`` and ``grad`` are arrays of the net's array module and dtype.
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

    def add_metric(self, name: str, total: float, count: float) -> None:
        """Accumulate a metric as a (sum, count) pair; its value is sum / count."""
        slot = self.metrics.setdefault(name, [0.0, 0.0])
        slot[0] += float(total)
        slot[1] += float(count)

    def label(self, xs: list, pos: int):
        """Labels carried by data source ``pos``: its aux output if any, else its data."""
        if pos < len(self.aux) and self.aux[pos] is not None:
            return self.aux[pos]
        return xs[pos]


class Layer:
    """Base class. Subclasses set the class attributes below and override methods."""

    #: the layer reads its own previous copy as context (adds (i-1)#L -> i#L)
    recurrent: bool = False
    #: the type creates params (used to colour shared-param groups before any layer is built)
    has_params: bool = False
    #: loss layers: backward ignores dy; their output is not differentiated further
    is_loss: bool = False
    #: input layers: the worker calls load_batch once per batch
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
        #: net-wide facts set before setup: "vocab" (list of str or None),
        #: "workspace" (str), "job_dir" (str: relative paths are resolved against it)
        self.info: dict = {}

    # ----------------------------------------------------------- declarations
    @classmethod
    def context_sources(cls, conf) -> list[tuple[str, int]]:
        """(layer name, offset) pairs: copy i reads copy i-offset of that layer as context."""
        return [(conf.name, 1)] if cls.recurrent else []

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

    # ---------------------------------------------------------------- compute
    def load_batch(self, phase_ctx) -> None:  # input layers only
        pass

    def forward(self, ctx: Context, xs: list, state):
        raise NotImplementedError

    def backward(self, ctx: Context, dy, dstate, cache):
        raise NotImplementedError

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
