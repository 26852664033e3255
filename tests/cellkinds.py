"""The recurrent cells the tests run, derived from the layer registry: a cell added to
engine/layers/recurrent.py is in every list here without naming it.

A *kind* is a cell's conf name without ``_conf`` (``gru`` for ``gru_conf``), or a variant
of it that changes its maths (``rnn-relu``, ``gru-hb``): ``VARIANTS`` maps each to the
settings it adds inside the cell's conf."""
from __future__ import annotations

from google.protobuf import text_format

from engine.layers.recurrent import cell_classes
from engine.proto import job_pb2 as pb

#: kind -> (LayerType value, class), every registered cell
CELLS = {cls.CONF_FIELD.removesuffix("_conf"): (t, cls)
         for t, cls in sorted(cell_classes().items())}
#: the settings that make a variant (inside its cell conf); every cell is a variant of itself
EXTRA = {"rnn-relu": "activation: RELU", "rnn-linear": "activation: LINEAR",
         "gru-hb": "recurrent_bias: true"}
VARIANTS = {**{k: "" for k in CELLS}, **EXTRA}
#: cells with hand-written steps (tested against the derived reference)
HAND_WRITTEN = [k for k, (_, cls) in CELLS.items() if cls.hand_written()]


def base(kind: str) -> str:
    return kind.split("-")[0]


def cls_of(kind: str):
    return CELLS[base(kind)][1]


def type_name(kind: str) -> str:
    return pb.LayerType.Name(CELLS[base(kind)][0])


def conf_field(kind: str) -> str:
    return cls_of(kind).CONF_FIELD


def conf_text(kind: str, hidden: int, extra: str = "") -> str:
    """The cell conf of ``kind`` as job-file text: ``gru_conf { dim_hidden: 4 ... }``."""
    return f"{conf_field(kind)} {{ dim_hidden: {hidden} {VARIANTS[kind]} {extra} }}"


def make_conf(kind: str, name: str = "rec", hidden: int = 5, bias: bool = True, **fields):
    """A LayerProto of ``kind`` (its variant's settings applied; ``fields`` set on the conf)."""
    conf = pb.LayerProto(name=name, type=CELLS[base(kind)][0])
    sub = getattr(conf, conf_field(kind))
    sub.dim_hidden = hidden
    sub.bias_term = bias
    text_format.Merge(VARIANTS[kind], sub)
    for k, v in fields.items():
        setattr(sub, k, v)
    return conf
