"""Interop: a built net's params in PyTorch's layout and as an ONNX graph, and back.

The exportable net (``chain_of``) is one chain from one data layer to a head:

    ids -> kOneHot | kEmbedding -> L levels -> kInnerProduct     (char / id nets)
    float features [F]          -> L levels -> kInnerProduct     (record nets)

with any number of kDropout / kDummy between (identities at inference); data, label,
loss and output layers are not part of the model. A level is one kRNN, kGRU or kLSTM
layer, or a bidirectional level: a forward and a ``direction: kBackward`` layer reading
the same source, joined by one kConcate (features, concate_dim 1; forward first). All
levels are of one kind (all bidirectional or none) and their layers share one cell type
and hidden size H (and, for kRNN, one activation); each link is one-to-one without a
shift (the data layer may feed the first level one-to-all).

PyTorch's layout: the keys a module with ``rnn = nn.GRU|nn.LSTM|nn.RNN(D, H, L)``
(``bidirectional=True`` for bidirectional levels), ``head = nn.Linear(N·H, V)`` with N
directions (and ``embed = nn.Embedding(V, E)`` for a kEmbedding net) loads with
``load_state_dict(strict=True)``:

    rnn.weight_ih_l{k}  (G·H, D_k)   gate blocks stacked in PyTorch's order
    rnn.weight_hh_l{k}  (G·H, H)     GRU r, z, n (engine r, z, c); LSTM i, f, g, o; RNN one
    rnn.bias_ih_l{k}    (G·H,)
    rnn.bias_hh_l{k}    (G·H,)
    rnn.*_l{k}_reverse               the same for level k's backward layer
    head.weight (V, N·H), head.bias (V,), embed.weight (V, E)

D_k is the input width for k = 0 and N·H above. A one-hot net has no extra key:
nn.GRU(V, H, L) takes the one-hot rows as they are.

Engine -> PyTorch: W_ih, W_hh are the engine's ``<gate>_hx`` / ``<gate>_hh`` blocks in
PyTorch's gate order; b_ih the ``<gate>_b`` blocks (zeros without bias_term); b_hh zeros,
except a GRU's b_hn rows, which hold its ``c_hb`` (``gru_conf { recurrent_bias: true }``).
The maths agree: PyTorch's GRU n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),
h' = (1 − z) ⊙ n + z ⊙ h is SINGA's c and h' with b_hn = c_hb (0 without it). PyTorch's
reverse direction starts at step T−1 from h0 and its output at step t is its state
there, which is the engine's kBackward layer starting each window from zeros or h0
(it never carries state across batches).

PyTorch -> engine: the same blocks, with b = b_ih + b_hh for every gate whose recurrent
part enters the sum unscaled (all gates of kRNN and kLSTM, the GRU's r and z); the
GRU's b_hn sits inside r ⊙ (...) and cannot join b_in: it goes into ``c_hb``, and into a
GRU without recurrent_bias a nonzero b_hn is refused.

ONNX (``onnx_model``): one ONNX RNN / GRU (``linear_before_reset=1``) / LSTM node per
level (``direction="bidirectional"`` for a bidirectional one, W, R, B stacked forward
first), W = [W_ih], R = [W_hh], B = [b_ih, b_hh] with the gate blocks reordered to ONNX's
(GRU z, r, h; LSTM i, o, f, c); inputs ``ids`` int64 [T, B] or ``x`` float32 [T, B, F],
``h0`` [N·L, B, H] (and ``c0``; level k's directions in rows N·k .. N·k+N−1, PyTorch's
order); outputs ``logits`` [T, B, V], ``hT`` (and ``cT``); T, B dynamic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from engine.backend import to_host
from engine import safetensors_io
from engine.common import ConfigError, type_name
from engine.layers import layer_class
from engine.layers.base import InputLayer
from engine.layers.recurrent import ExportForm, cell_classes
from engine.proto import job_pb2 as pb


class InteropError(ConfigError):
    """A net or a file that cannot cross to or from the exchange layouts (one line)."""


# ----------------------------------------------------------------- the cells
#: LayerType -> the export form its cell class declares (engine/layers/recurrent.py), for
#: every registered cell that has one
CELLS = {t: cls.export for t, cls in cell_classes().items() if cls.export is not None}

ENCODERS = {pb.kOneHot, pb.kEmbedding}
#: joins the two directions of a bidirectional level
JOIN = pb.kConcate
#: the types with a place in the exchange formats (besides identities at inference)
MODEL = set(CELLS) | ENCODERS | {pb.kInnerProduct, JOIN}


# What a layer is to the model, from its class's declarations (engine/layers/base.py):
def is_source(c) -> bool:
    """A layer that gives the model its input: one with no srclayers (a data layer, or a
    kRNNDummy placeholder)."""
    return not c.srclayers


def is_text_input(c) -> bool:
    """A data layer that reads a text (kCharRNN): its model input is token ids."""
    cls = layer_class(c.type)
    return issubclass(cls, InputLayer) and cls.text


def is_outside(c) -> bool:
    """Not part of the model: labels, losses, outputs (what a sampling net drops too)."""
    return not layer_class(c.type).in_sampling_net


def is_identity(c) -> bool:
    """An identity at inference (kDropout, kDummy): left out of the exported model."""
    return layer_class(c.type).identity_at_inference

HEAD_W, HEAD_B, EMBED_W = "head.weight", "head.bias", "embed.weight"


def rnn_keys(k: int, reverse: bool = False) -> tuple[str, str, str, str]:
    """PyTorch's keys of recurrent level k (its backward layer's with ``reverse``):
    weight_ih, weight_hh, bias_ih, bias_hh."""
    r = "_reverse" if reverse else ""
    return (f"rnn.weight_ih_l{k}{r}", f"rnn.weight_hh_l{k}{r}", f"rnn.bias_ih_l{k}{r}",
            f"rnn.bias_hh_l{k}{r}")


# ----------------------------------------------------------------- the chain
@dataclass
class Chain:
    """The exportable part of a net, bottom to top."""

    source: object          # the data layer (Layer)
    encoder: object         # kOneHot or kEmbedding layer, None for float features
    levels: list            # per level: (recurrent layer,) or (forward, backward) layers
    head: object            # the kInnerProduct layer

    @property
    def cells(self) -> list:
        """Every recurrent layer, level by level, forward first (PyTorch's order)."""
        return [lay for level in self.levels for lay in level]

    @property
    def directions(self) -> int:
        """1, or 2 for bidirectional levels."""
        return len(self.levels[0])

    @property
    def kind(self) -> int:
        return self.cells[0].conf.type

    @property
    def spec(self) -> ExportForm:
        return CELLS[self.kind]

    @property
    def hidden(self) -> int:
        return int(self.cells[0].H)

    @property
    def input_size(self) -> int:
        return int(self.cells[0].D)

    @property
    def output_size(self) -> int:
        return int(self.head.out_shape[0])

    @property
    def relu(self) -> bool:
        return self.kind == pb.kRNN and self.cells[0].conf.rnn_conf.activation == pb.RELU

    def describe(self) -> dict[str, str]:
        """The model's shape as strings (safetensors metadata, ONNX metadata_props)."""
        out = {"rnn": self.spec.torch_name, "input_size": str(self.input_size),
               "hidden_size": str(self.hidden), "num_layers": str(len(self.levels)),
               "bidirectional": "true" if self.directions == 2 else "false",
               "output_size": str(self.output_size),
               "input": ("features" if self.encoder is None else
                         "embedding" if self.encoder.conf.type == pb.kEmbedding else "onehot")}
        if self.kind == pb.kRNN:
            out["nonlinearity"] = "relu" if self.relu else "tanh"
        return out


def _conn(conf, k: int = 0) -> tuple[int, int]:
    conn = conf.unroll_conn_type[k] if k < len(conf.unroll_conn_type) else pb.kUnrollOneToOne
    shift = conf.shift[k] if k < len(conf.shift) else 0
    return conn, shift


def _backward(conf) -> bool:
    """The layer's pass runs from its last copy to its first (direction: kBackward)."""
    return layer_class(conf.type).reverse_pass(conf)


def chain_of(net, where: str) -> Chain:
    """The net's exportable chain; InteropError naming the first layer that does not fit."""
    confs = list(net.unrolled.layers)
    by_name = {c.name: c for c in confs}

    def err(c, why: str) -> InteropError:
        return InteropError(f'{where}: layer "{c.name}" ({type_name(c.type)}) {why}')

    model = [c for c in confs if not (is_source(c) or is_outside(c))]
    if not model:
        raise InteropError(f"{where}: the net has no model layers to export")

    def consumers(name):
        return [c for c in model if name in c.srclayers]

    for c in model:
        if c.type not in MODEL and not is_identity(c):
            raise err(c, "cannot be exported: an exported model is one chain of kOneHot or "
                         "kEmbedding, kRNN, kGRU or kLSTM layers and a kInnerProduct head, with "
                         "only kDropout or kDummy between them")
        if c.type == JOIN:
            srcs = [by_name[s] for s in c.srclayers]
            if not (len(srcs) == 2 and all(s.type in CELLS for s in srcs)
                    and not _backward(srcs[0]) and _backward(srcs[1])
                    and srcs[0].srclayers[:1] == srcs[1].srclayers[:1]
                    and c.concate_conf.concate_dim == 1):
                raise err(c, "cannot be exported: a kConcate is exported only as the join of a "
                             "bidirectional level, a forward and a kBackward recurrent layer "
                             "reading the same source, listed in that order, concate_dim 1")
        elif len(c.srclayers) != 1:
            raise err(c, f"reads {len(c.srclayers)} srclayers ({', '.join(c.srclayers)}); an "
                         f"exported model is one chain in which each layer reads one source")
        if c.type == pb.kRNN and c.rnn_conf.activation not in (pb.TANH, pb.RELU):
            raise err(c, f"has rnn_conf.activation {pb.ActivationType.Name(c.rnn_conf.activation)}; "
                         f"PyTorch's nn.RNN (and so the exported model) knows tanh and relu only")
        for k, sname in enumerate(c.srclayers):
            src = by_name[sname]
            conn, shift = _conn(c, k)
            if is_outside(src):
                raise err(c, f'reads "{src.name}" ({type_name(src.type)}), which is not part of '
                             f"the model; only data layers may feed it")
            if conn == pb.kUnrollFirstToLast:
                raise err(c, f'reads "{src.name}" kUnrollFirstToLast (a many-to-one or '
                             f"encoder-decoder link); the exported model maps each step to its "
                             f"output, so every link must be one-to-one")
            if conn in (pb.kUnrollOneToFirst, pb.kUnrollAllToOne):
                raise err(c, f'reads "{src.name}" {pb.UnrollConnType.Name(conn)} (a one-to-many '
                             f"or all-to-one link); the exported model maps each step to its "
                             f"output, so every link must be one-to-one")
            if conn == pb.kUnrollOneToAll and not is_source(src):
                raise err(c, f'reads "{src.name}" kUnrollOneToAll; between model layers every '
                             f"link must be one-to-one")
            if shift:
                raise err(c, f'reads "{src.name}" with shift {shift}; the exported model reads '
                             f"step t at step t, so remove the shift")
        if c.unroll_len != model[0].unroll_len:
            raise err(c, f'has unroll_len {c.unroll_len} but "{model[0].name}" has '
                         f"{model[0].unroll_len}; the exported model runs every layer at every step")

    def level_at(layers):
        """(forward, backward, join) when ``layers`` are a bidirectional level, else None;
        InteropError when they are a forward and a backward layer not joined as one."""
        if len(layers) != 2 or any(c.type not in CELLS for c in layers):
            return None
        fwd, bwd = sorted(layers, key=_backward)
        if not _backward(bwd) or _backward(fwd):
            return None
        for c in (fwd, bwd):
            joins = consumers(c.name)
            if len(joins) != 1 or joins[0].type != JOIN or \
                    list(joins[0].srclayers) != [fwd.name, bwd.name]:
                raise err(c, f"feeds {', '.join(j.name for j in joins) or 'no layer'}; the "
                             f'two directions of a bidirectional level ("{fwd.name}", '
                             f'"{bwd.name}") feed one kConcate and nothing else, forward first')
        return fwd, bwd, consumers(fwd.name)[0]

    starts = [c for c in model if is_source(by_name[c.srclayers[0]])]
    first = level_at(starts)
    if not (len(starts) == 1 or (first is not None and len({c.srclayers[0] for c in starts}) == 1)):
        names = ", ".join(f'"{c.name}"' for c in starts) or "none"
        raise InteropError(f"{where}: {len(starts)} model layers read a data layer ({names}); the "
                           f"export takes one chain from one data layer")
    # the chain, bottom up: layer confs, and (forward, backward) for a bidirectional level
    chain = [first[:2]] if first else [starts[0]]
    end = first[2] if first else starts[0]
    while True:
        nxt = consumers(end.name)
        level = level_at(nxt)
        if level is not None:
            chain.append(level[:2])
            end = level[2]
            continue
        if len(nxt) > 1:
            raise err(end, f"feeds {len(nxt)} layers ({', '.join(c.name for c in nxt)}); an "
                           f"exported model is one chain")
        if not nxt:
            break
        chain.append(nxt[0])
        end = nxt[0]
    on_chain = {c.name for item in chain for c in (item if isinstance(item, tuple) else (item,))}
    on_chain |= {c.name for c in model if c.type == JOIN and set(c.srclayers) <= on_chain}
    off = [c for c in model if c.name not in on_chain]
    if off:
        raise err(off[0], f'is not on the chain from "{starts[0].srclayers[0]}" to the head; '
                          f"the export takes one chain of layers")
    core = [c for c in chain if isinstance(c, tuple) or not is_identity(c)]
    encoder = core.pop(0) if core and not isinstance(core[0], tuple) and \
        core[0].type in ENCODERS else None
    n = 0
    while n < len(core) and (isinstance(core[n], tuple) or core[n].type in CELLS):
        n += 1
    levels = [c if isinstance(c, tuple) else (c,) for c in core[:n]]
    rest = core[n:]
    if not levels:
        if rest:
            raise err(rest[0], "comes before any recurrent layer; the export takes kRNN, kGRU or "
                               "kLSTM layers then one kInnerProduct head")
        raise InteropError(f"{where}: the net has no recurrent layer (kRNN, kGRU or kLSTM) to export")
    if not rest:
        raise err(levels[-1][-1], "is the last model layer; the export needs a kInnerProduct head "
                                  "after the recurrent layers")
    if rest[0].type != pb.kInnerProduct:
        raise err(rest[0], "comes after the recurrent layers; only one kInnerProduct head may "
                           "follow them")
    if len(rest) > 1:
        raise err(rest[1], f'comes after the head "{rest[0].name}"; the exported model ends at '
                           f"one kInnerProduct head")
    for level in levels:
        if len(level) == 1 and _backward(level[0]):
            raise err(level[0], "runs backwards (direction: kBackward) alone; the export takes a "
                                "kBackward layer only beside a forward one reading the same "
                                "source, both joined by one kConcate (forward first)")
        if len(level) != len(levels[0]):
            bi, uni = (level, levels[0]) if len(level) == 2 else (levels[0], level)
            raise err(level[0], f'differs from "{levels[0][0].name}" in direction ("{bi[0].name}" '
                                f'and "{bi[1].name}" are a bidirectional level, "{uni[0].name}" '
                                f"is not); the exported stack (one PyTorch module) is "
                                f"bidirectional in every level or in none")
    layers = [net.layers[c.name] for level in levels for c in level]
    first_cell = layers[0]
    for lay in layers[1:]:
        what = None
        if lay.conf.type != first_cell.conf.type:
            what = f"cell type ({type_name(first_cell.conf.type)})"
        elif lay.H != first_cell.H:
            what = f"hidden size ({first_cell.H} against {lay.H})"
        elif lay.conf.type == pb.kRNN and \
                lay.conf.rnn_conf.activation != first_cell.conf.rnn_conf.activation:
            what = "activation"
        if what is not None:
            raise err(lay.conf, f'differs from "{first_cell.name}" in {what}; the exported stack '
                                f"(one PyTorch nn.{CELLS[first_cell.conf.type].torch_name}) needs "
                                f"one cell type, hidden size and activation")
    return Chain(source=net.layers[(first[0] if first else starts[0]).srclayers[0]],
                 encoder=None if encoder is None else net.layers[encoder.name],
                 levels=[tuple(net.layers[c.name] for c in level) for level in levels],
                 head=net.layers[rest[0].name])


# --------------------------------------------------------- engine <-> PyTorch
def _host(net, role_param) -> np.ndarray:
    return to_host(role_param.data)


def _head_weight(net, head) -> np.ndarray:
    """head.weight (V, H): the kInnerProduct's w, transposed back when ``transpose``."""
    w = _host(net, head.params["w"])
    return w.T if head.conf.innerproduct_conf.transpose else w


def torch_state(net, where: str) -> dict[str, np.ndarray]:
    """The net's params in PyTorch's layout (module docstring), in the params' dtype."""
    chain = chain_of(net, where)
    spec = chain.spec
    H = chain.hidden
    out = {}
    for k, level in enumerate(chain.levels):
        for d, lay in enumerate(level):
            w_ih = np.concatenate([_host(net, lay.params[r]) for r in spec.hx], axis=0)
            w_hh = np.concatenate([_host(net, lay.params[r]) for r in spec.hh], axis=0)
            if all(r in lay.params for r in spec.b):
                b_ih = np.concatenate([_host(net, lay.params[r]) for r in spec.b], axis=0)
            else:  # bias_term: false
                b_ih = np.zeros(w_ih.shape[0], w_ih.dtype)
            b_hh = np.zeros_like(b_ih)
            if spec.hb is not None and spec.hb in lay.params:   # the GRU's b_hn
                g = spec.reset_gated
                b_hh[g * H:(g + 1) * H] = _host(net, lay.params[spec.hb])
            for key, a in zip(rnn_keys(k, d == 1), (w_ih, w_hh, b_ih, b_hh)):
                out[key] = a
    head = chain.head
    out[HEAD_W] = _head_weight(net, head)
    out[HEAD_B] = (_host(net, head.params["b"]) if "b" in head.params
                   else np.zeros(chain.output_size, out[HEAD_W].dtype))
    if chain.encoder is not None and chain.encoder.conf.type == pb.kEmbedding:
        out[EMBED_W] = _host(net, chain.encoder.params["w"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def expected_shapes(chain: Chain) -> dict[str, tuple]:
    """Every PyTorch key the chain takes, with its shape."""
    G, H = chain.spec.gates, chain.hidden
    out = {}
    for k, level in enumerate(chain.levels):
        for d, lay in enumerate(level):
            w_ih, w_hh, b_ih, b_hh = rnn_keys(k, d == 1)
            out[w_ih] = (G * H, int(lay.D))
            out[w_hh] = (G * H, H)
            out[b_ih] = out[b_hh] = (G * H,)
    out[HEAD_W] = (chain.output_size, int(chain.head.in_dim))
    out[HEAD_B] = (chain.output_size,)
    if chain.encoder is not None and chain.encoder.conf.type == pb.kEmbedding:
        enc = chain.encoder
        out[EMBED_W] = (int(enc.vocab_size), int(enc.feature_dim))
    return out


def _describe_net(chain: Chain) -> str:
    d = chain.describe()
    bi = "bidirectional " if chain.directions == 2 else ""
    return (f"the net is {d['num_layers']} x {bi}{d['rnn']} {d['hidden_size']} over "
            f"{d['input_size']} inputs, head {d['output_size']}")


def params_from_torch(net, tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """PyTorch-layout tensors -> ``param/<name>`` arrays of the built net (float64; the
    net casts them), by layer order: recurrent layer k <- ``rnn.*_l{k}``, the head <-
    ``head.*``, a kEmbedding <- ``embed.weight``. Every key must be there and no other
    (strict), with the net's shapes; InteropError (one line naming ``where``) otherwise."""
    chain = chain_of(net, where)
    spec = chain.spec
    expect = expected_shapes(chain)
    missing = [k for k in expect if k not in tensors]
    extra = sorted(k for k in tensors if k not in expect)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise InteropError(f"{where}: the tensors do not match the net ({'; '.join(parts)}); "
                           f"{_describe_net(chain)}, which takes {', '.join(expect)}")
    wrong = [f"{k} {list(tensors[k].shape)} (needs {list(s)})" for k, s in expect.items()
             if tuple(tensors[k].shape) != s]
    if wrong:
        raise InteropError(f"{where}: tensor shapes differ from the net: {', '.join(wrong)}; "
                           f"{_describe_net(chain)}")
    notfloat = [k for k in expect if tensors[k].dtype.kind != "f"]
    if notfloat:
        raise InteropError(f"{where}: tensors {', '.join(notfloat)} are not floating point")
    t = {k: np.asarray(tensors[k], dtype=np.float64) for k in expect}
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}

    def put(param, value, key):
        name = f"param/{param.name}"
        if name in out and not np.array_equal(out[name], value):
            raise InteropError(f"{where}: {source[name]} and {key} both give param "
                               f'"{param.name}" (one param in the net) but differ')
        out[name], source[name] = value, key

    if EMBED_W in expect:
        put(chain.encoder.params["w"], t[EMBED_W], EMBED_W)
    H, G = chain.hidden, spec.gates
    for lay, (k_ih, k_hh, kb_ih, kb_hh) in [(lay, rnn_keys(k, d == 1))
                                            for k, level in enumerate(chain.levels)
                                            for d, lay in enumerate(level)]:
        for g in range(G):
            rows = slice(g * H, (g + 1) * H)
            put(lay.params[spec.hx[g]], t[k_ih][rows], k_ih)
            put(lay.params[spec.hh[g]], t[k_hh][rows], k_hh)
        b_ih, b_hh = t[kb_ih], t[kb_hh]
        b = b_ih + b_hh
        if spec.reset_gated is not None:
            rows = slice(spec.reset_gated * H, (spec.reset_gated + 1) * H)
            if spec.hb in lay.params:
                put(lay.params[spec.hb], b_hh[rows], f"{kb_hh}[{rows.start}:{rows.stop}]")
            elif np.any(b_hh[rows] != 0):
                raise InteropError(
                    f'{where}: layer "{lay.name}" (kGRU): {kb_hh}[{rows.start}:{rows.stop}], the '
                    f"b_hn inside r * (W_hn h + b_hn), is not zero; SINGA's GRU has no such bias, "
                    f"so importing it needs gru_conf {{ recurrent_bias: true }}")
            b[rows] = b_ih[rows]
        if all(r in lay.params for r in spec.b):
            for g in range(G):
                put(lay.params[spec.b[g]], b[g * H:(g + 1) * H], f"{kb_ih} + {kb_hh}")
        elif np.any(b != 0):
            raise InteropError(f'{where}: layer "{lay.name}" has bias_term: false but {kb_ih} + '
                               f"{kb_hh} is not zero; set bias_term: true in its "
                               f"{lay.CONF_FIELD}")
    head = chain.head
    w = t[HEAD_W]
    put(head.params["w"], w.T if head.conf.innerproduct_conf.transpose else w, HEAD_W)
    if "b" in head.params:
        put(head.params["b"], t[HEAD_B], HEAD_B)
    elif np.any(t[HEAD_B] != 0):
        raise InteropError(f'{where}: layer "{head.name}" has bias_term: false but {HEAD_B} is '
                           f"not zero; set innerproduct_conf {{ bias_term: true }}")
    return out


# ---------------------------------------------------------------------- ONNX
#: the ONNX opset and IR version the models declare (onnxruntime >= 1.12 runs them)
OPSET, IR_VERSION = 17, 8


def onnx_model(net, where: str, vocab=None, encoding=None):
    """The net's inference model as an ``onnx.ModelProto`` (module docstring) with
    ``metadata(chain, vocab, encoding)`` as its metadata_props, checked with ``onnx.checker``.
    Needs the ``onnx`` package (the ``export`` extra)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise InteropError("ONNX export needs the onnx package: pip install "
                           "'rnn-engine[export]' (or pip install onnx)") from None
    chain = chain_of(net, where)
    spec = chain.spec
    state = {k: v.astype(np.float32) for k, v in torch_state(net, where).items()}
    L, H, N = len(chain.levels), chain.hidden, chain.directions
    lstm = chain.kind == pb.kLSTM
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def gates_onnx(a):
        """Gate blocks (rows) from PyTorch's order to ONNX's."""
        return np.concatenate([a[g * H:(g + 1) * H] for g in spec.onnx_order], axis=0)

    T, B = "T", "B"
    x = "x"   # the first recurrent layer's input [T, B, D]: the model's input, or made from ids
    if chain.encoder is None:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, chain.input_size])]
    else:
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [T, B])]
        if chain.encoder.conf.type == pb.kEmbedding:
            nodes.append(helper.make_node("Gather", [const("embed.weight", state[EMBED_W]), "ids"],
                                          ["x"], name="embed"))
        else:
            nodes.append(helper.make_node(
                "OneHot", ["ids", const("depth", np.array(chain.input_size, np.int64)),
                           const("onehot_values", np.array([0.0, 1.0], np.float32))],
                ["x"], axis=-1, name="onehot"))
    inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [N * L, B, H]))
    if lstm:
        inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [N * L, B, H]))
    const("axis0", np.array([0], np.int64))
    const("axis1", np.array([1], np.int64))
    if N == 2:
        const("seq_shape", np.array([0, 0, 2 * H], np.int64))   # [T, B, 2, H] -> [T, B, 2H]
    op = spec.torch_name
    attrs = {"hidden_size": H}
    if N == 2:
        attrs["direction"] = "bidirectional"
    if chain.kind == pb.kGRU:
        attrs["linear_before_reset"] = 1
    if chain.kind == pb.kRNN:
        attrs["activations"] = ["Relu" if chain.relu else "Tanh"] * N
    h_outs, c_outs = [], []
    bounds = [const(f"layer{k}", np.array([k], np.int64)) for k in range(0, N * L + 1, N)]
    for k in range(L):
        ws, rs, bs = [], [], []
        for d in range(N):
            w_ih, w_hh, b_ih, b_hh = (state[key] for key in rnn_keys(k, d == 1))
            ws.append(gates_onnx(w_ih))
            rs.append(gates_onnx(w_hh))
            bs.append(np.concatenate([gates_onnx(b_ih), gates_onnx(b_hh)]))
        W = const(f"W{k}", np.stack(ws))          # [N, G·H, D_k], forward first
        R = const(f"R{k}", np.stack(rs))
        Bk = const(f"B{k}", np.stack(bs))
        lo, hi = bounds[k], bounds[k + 1]
        nodes.append(helper.make_node("Slice", ["h0", lo, hi, "axis0"], [f"h0_{k}"]))
        ins = [x, W, R, Bk, "", f"h0_{k}"]
        outs = [f"y{k}", f"hT{k}"]
        if lstm:
            nodes.append(helper.make_node("Slice", ["c0", lo, hi, "axis0"], [f"c0_{k}"]))
            ins.append(f"c0_{k}")
            outs.append(f"cT{k}")
        nodes.append(helper.make_node(op, ins, outs, name=chain.levels[k][0].name, **attrs))
        if N == 1:   # Y is [T, num_directions = 1, B, H]
            nodes.append(helper.make_node("Squeeze", [f"y{k}", "axis1"], [f"seq{k}"]))
        else:        # [T, 2, B, H] -> [T, B, 2, H] -> [T, B, 2H]: forward, then backward
            nodes.append(helper.make_node("Transpose", [f"y{k}"], [f"yt{k}"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [f"yt{k}", "seq_shape"], [f"seq{k}"]))
        x = f"seq{k}"
        h_outs.append(f"hT{k}")
        c_outs.append(f"cT{k}")
    nodes.append(helper.make_node("Concat", h_outs, ["hT"], axis=0))
    if lstm:
        nodes.append(helper.make_node("Concat", c_outs, ["cT"], axis=0))
    hw = const("head.weight_t", np.ascontiguousarray(state[HEAD_W].T))
    nodes.append(helper.make_node("MatMul", [x, hw], ["scores"], name=chain.head.name))
    nodes.append(helper.make_node("Add", ["scores", const("head.bias", state[HEAD_B])], ["logits"]))
    V = chain.output_size
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, B, V]),
               helper.make_tensor_value_info("hT", TensorProto.FLOAT, [N * L, B, H])]
    if lstm:
        outputs.append(helper.make_tensor_value_info("cT", TensorProto.FLOAT, [N * L, B, H]))
    graph = helper.make_graph(nodes, "rnn_engine", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="rnn-engine")
    for key, value in metadata(chain, vocab, encoding).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def metadata(chain: Chain, vocab=None, encoding=None) -> dict[str, str]:
    """The strings both formats carry: the model's shape and, for char nets, the vocabulary
    (a JSON list of symbols, id order) and its unit, ``vocab_unit``: "utf-8" (each symbol a
    character) or "bytes" (each symbol one byte, written as the character of that code
    point, as engine/text.py holds them)."""
    out = chain.describe()
    if vocab:
        out["vocab"] = json.dumps(list(vocab), ensure_ascii=False)
        out["vocab_unit"] = encoding or "utf-8"
    return out


# ------------------------------------------------------------------ import
def is_torch_file(path) -> bool:
    """A ``checkpoint_path`` entry in PyTorch's layout (a ``.safetensors`` file) rather than
    one of the engine's checkpoints."""
    return str(path).lower().endswith(".safetensors")


def load_torch_file(net, path) -> dict[str, np.ndarray]:
    """``param/<name>`` arrays for the built net from a safetensors file in PyTorch's
    layout (``params_from_torch``); SafetensorsError or InteropError naming the file."""
    tensors, _ = safetensors_io.read(path)
    return params_from_torch(net, tensors, str(path))
