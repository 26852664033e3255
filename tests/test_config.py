"""engine.config: job files, their one-line errors, defaults and phases.

The table below runs every malformed job through the real CLI
(``python -m engine.train JOB --graph-only``) and checks the exact line it
prints: exit status 2, ``error: <path>...`` on stderr, no traceback. The
positive tests load SINGA's own char-rnn job.conf unchanged and a file with
one "data" layer per phase (SINGA's way of giving train and val their data).
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from engine.config import (ConfigError, Phase, layer_phases, layers_in_phase, load_job, normalise,
                           parse_job, validate)
from engine.layers import REGISTRY
from engine.proto import job_pb2 as pb
from engine.workspace import phases_of
from engine.unroll import unroll

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small valid job in SINGA's char-rnn shape. One layer a line, so that the
# syntax cases below point at predictable line:col positions.
BASE = """\
name: "t"
train_steps: 10
neuralnet {
  unroll_len: 3
  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "train.txt" } }
  layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "gru1" type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 8 } }
  layer { name: "ip1" type: kInnerProduct srclayers: "gru1" innerproduct_conf { num_output: 5 } }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }
}
"""

IP1 = 'layer { name: "ip1" type: kInnerProduct srclayers: "gru1" innerproduct_conf { num_output: 5 } }'
GRU1 = 'layer { name: "gru1" type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 8 } }'
LOSS = 'layer { name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }'


def edit(*pairs: str) -> str:
    """BASE with each (old, new) replaced; every ``old`` must occur exactly once."""
    text = BASE
    for old, new in zip(pairs[::2], pairs[1::2]):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def before_loss(extra: str) -> str:
    """BASE with one more layer line before the loss layer."""
    return edit("  " + LOSS, f"  {extra}\n  {LOSS}")


def with_ip1(new_ip1: str) -> str:
    return edit(IP1, new_ip1)


NOT_SUPPORTED = ("type {t} is not supported by this engine (it trains recurrent and fully "
                 "connected nets; supported types: "
                 + ", ".join(pb.LayerType.Name(t) for t in sorted(REGISTRY)) + ")")

# (id, job text, expected stderr after "error: <path>"). ``None`` text: no file at all.
MALFORMED = [
    # ------------------------------------------------------------ syntax
    ("unknown field (typo)",
     edit('srclayers: "gru1"', 'srclayer: "gru1"'),
     ':9:43: Message type "rnnengine.LayerProto" has no field named "srclayer"; '
     'did you mean "srclayers"?'),
    ("SINGA's documentation spelling net",
     edit('neuralnet {', 'net {'),
     ':3:1: Message type "rnnengine.JobProto" has no field named "net"; did you mean "neuralnet"?'),
    ("unknown top-level field",
     edit('name: "t"', 'nmae: "t"'),
     ':1:1: Message type "rnnengine.JobProto" has no field named "nmae"; did you mean "name"?'),
    ("missing brace inside a layer",
     edit("dim_hidden: 8 } }", "dim_hidden: 8 }"),
     ':9:3: Message type "rnnengine.LayerProto" has no field named "layer"; "layer" is a field '
     'of NetProto, LayerGroupProto, not of LayerProto: check the nesting (a missing or extra "}" above?)'),
    ("missing brace at the end",
     BASE[:-2],
     ':10:79: Expected "}" (the file ends before every "{" is closed; add the missing "}")'),
    ("extra closing brace",
     BASE + "}\n",
     ':12:1: Expected identifier or number, got } (an extra "}"?)'),
    ("bad LayerType value",
     edit("type: kGRU", "type: kGRUU"),
     ':8:30: Enum type "rnnengine.LayerType" has no value named kGRUU; did you mean kGRU?'),
    ("bad UnrollConnType value",
     edit('"data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
          '"data" unroll_conn_type: kOneToMany }\n  layer { name: "label"'),
     ':6:76: Enum type "rnnengine.UnrollConnType" has no value named kOneToMany; '
     'did you mean kOneToOne?'),
    ("bad Phase value",
     edit('name: "ip1"', 'name: "ip1" include: kValidate'),
     ':9:32: Enum type "rnnengine.Phase" has no value named kValidate; did you mean kVal?'),
    ("Phase value far from any",
     edit('name: "ip1"', 'name: "ip1" include: kDevelopment'),
     ':9:32: Enum type "rnnengine.Phase" has no value named kDevelopment; '
     'use one of kTrain, kVal, kTest'),
    ("duplicated scalar (job)",
     edit("train_steps: 10\n", "train_steps: 10\ntrain_steps: 20\n"),
     ':3:14: Message type "rnnengine.JobProto" should not have multiple "train_steps" fields; '
     'keep one "train_steps" (only repeated fields may be given more than once)'),
    ("duplicated scalar (layer)",
     edit('name: "ip1"', 'name: "ip1" name: "ip2"'),
     ':9:29: Message type "rnnengine.LayerProto" should not have multiple "name" fields; '
     'keep one "name" (only repeated fields may be given more than once)'),
    ("unquoted string",
     edit('name: "ip1"', "name: ip1"),
     ':9:17: Expected string but found: \'ip1\'; write text values in double quotes ("...")'),
    ("word for a number",
     edit("dim_hidden: 8", "dim_hidden: eight"),
     ":8:78: Couldn't parse integer: eight"),
    # -------------------------------------------------------------- names
    ("two layers of one name in one phase",
     before_loss('layer { name: "ip1" type: kDummy srclayers: "gru1" }'),
     ': layer "ip1": two layers have this name in the train phase; rename one, or put them in '
     'different phases with include'),
    ("two layers of one name, both include kTrain",
     edit('name: "data" type: kCharRNN', 'name: "data" include: kTrain type: kCharRNN',
          '  ' + LOSS, '  layer { name: "data" include: kTrain type: kCharRNN unroll_len: 1 '
                       'char_rnn_conf { path: "b.txt" } }\n  ' + LOSS),
     ': layer "data": two layers have this name in the train phase; rename one, or put them in '
     'different phases with include'),
    ("unknown srclayer",
     edit('srclayers: "gru1"', 'srclayers: "gru2"'),
     ': layer "ip1": srclayer "gru2" is not a layer of this net; check the spelling'),
    ("'#' in a layer name",
     edit('name: "ip1"', 'name: "ip#1"', 'srclayers: "ip1"', 'srclayers: "ip#1"'),
     ': layer "ip#1": the name contains \'#\', which unrolling reserves; rename it'),
    ("'@' in a layer name",
     edit('name: "ip1"', 'name: "ip@1"', 'srclayers: "ip1"', 'srclayers: "ip@1"'),
     ': layer "ip@1": the name contains \'@\', which unrolling reserves; rename it'),
    ("a layer without a name",
     edit('name: "ip1" ', ''),
     ': a layer of type kInnerProduct has no name; add name: "..."'),
    ("a layer listing itself as srclayer",
     edit('srclayers: "gru1"', 'srclayers: "ip1"'),
     ': layer "ip1": lists itself as a srclayer; recurrent layers read their previous step by '
     'themselves, and any layer may read its own earlier copy one-to-one with a shift >= 1'),
    ("a srclayer listed twice",
     edit('srclayers: "gru1"', 'srclayers: "gru1" srclayers: "gru1"'),
     ': layer "ip1": srclayer "gru1" is listed twice; list it once'),
    # ------------------------------------------------------------- params
    ("one param name in two layers without share_from",
     edit("dim_hidden: 8 }", 'dim_hidden: 8 } param { name: "w" }',
          "num_output: 5 }", 'num_output: 5 } param { name: "w" }'),
     ': layer "ip1": param "w" is also declared by layer "gru1"; rename it, or tie it with '
     'share_from: "w"'),
    ("one param name twice in one layer",
     edit("num_output: 5 }", 'num_output: 5 } param { name: "w" } param { name: "w" }'),
     ': layer "ip1": param "w" is declared twice in this layer; rename one'),
    ("share_from naming no param",
     edit("num_output: 5 }", 'num_output: 5 } param { name: "w" share_from: "z_hx" }'),
     ': layer "ip1": param "w": share_from "z_hx" names no param; name a param declared '
     '(without share_from) by another layer'),
    ("'#' in a param name",
     edit("num_output: 5 }", 'num_output: 5 } param { name: "1#w" }'),
     ': layer "ip1": param "1#w": the name contains \'#\' or \'@\'; rename it'),
    # ---------------------------------------------------------- unrolling
    ("more unroll_conn_type entries than srclayers",
     edit('srclayers: "gru1"',
          'srclayers: "gru1" unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollOneToAll'),
     ': layer "ip1": 2 unroll_conn_type entries for 1 srclayer; give at most one per srclayer, '
     'in srclayer order'),
    ("more shift entries than srclayers",
     edit('srclayers: "ip1" srclayers: "label"',
          'srclayers: "ip1" srclayers: "label" shift: 0 shift: 0 shift: 1'),
     ': layer "loss": 3 shift entries for 2 srclayers; give at most one per srclayer, '
     'in srclayer order'),
    ("negative shift",
     edit('srclayers: "gru1"', 'srclayers: "gru1" shift: -1'),
     ': layer "ip1": shift -1 for srclayer "gru1" is outside 0..2 (the layer\'s unroll_len is 3); '
     'copy i reads source copy i - shift, so use a shift from 0 to 2'),
    ("shift on a one-to-all source",
     edit('kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }',
          'kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll shift: 1 }'),
     ': layer "onehot": shift 1 for srclayer "data", which is connected kUnrollOneToAll; a shift '
     'applies only to kUnrollOneToOne, so remove it or set it to 0'),
    ("shift not below unroll_len",
     edit('srclayers: "gru1"', 'srclayers: "gru1" shift: 3'),
     ': layer "ip1": shift 3 for srclayer "gru1" is outside 0..2 (the layer\'s unroll_len is 3); '
     'copy i reads source copy i - shift, so use a shift from 0 to 2'),
    ("layer unroll_len 0",
     edit('srclayers: "gru1"', 'srclayers: "gru1" unroll_len: 0'),
     ': layer "ip1": unroll_len is 0; it must be at least 1'),
    ("net unroll_len 0",
     edit("unroll_len: 3", "unroll_len: 0"),
     ": neuralnet.unroll_len is 0; it must be at least 1"),
    ("net unroll_len negative",
     edit("unroll_len: 3", "unroll_len: -4"),
     ": neuralnet.unroll_len is -4; it must be at least 1"),
    ("unroll_conn_type and connection_type both set",
     edit('"data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
          '"data" unroll_conn_type: kUnrollOneToAll connection_type: kOneToAll }\n'
          '  layer { name: "label"'),
     ': layer "onehot": both unroll_conn_type and its synonym connection_type are set; keep one'),
    ("a cycle after unrolling (two layers read each other one-to-one)",
     edit('srclayers: "gru1"', 'srclayers: "gru1" srclayers: "ip2"',
          "  " + LOSS, '  layer { name: "ip2" type: kDummy srclayers: "ip1" }\n  ' + LOSS),
     ": the unrolled train net has a cycle: 2#ip1 -> 2#ip2 -> 2#ip1; break it (a layer cannot "
     "read its own output at the same step)"),
    ("one-to-one from a source with too few copies",
     edit('"data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
          '"data" }\n  layer { name: "label"'),
     ': layer "onehot": copy 2 reads copy 2 of "data" one-to-one, but "data" has only 1 copy; '
     'use unroll_conn_type kUnrollOneToAll or kUnrollFirstToLast, or match the unroll_len'),
    ("one-to-one from a 2-copy source into 3 copies",
     edit('name: "gru1" type: kGRU', 'name: "gru1" unroll_len: 2 type: kGRU'),
     ': layer "ip1": copy 2 reads copy 2 of "gru1" one-to-one, but "gru1" has only 2 copies; '
     'use unroll_conn_type kUnrollOneToAll or kUnrollFirstToLast, or match the unroll_len'),
    # -------------------------------------------------------------- phases
    ("include and exclude mixed",
     edit('name: "ip1"', 'name: "ip1" exclude: kTest', 'name: "loss"', 'name: "loss" include: kTrain'),
     ': include (layer "loss") and exclude (layer "ip1") are mixed in one file; use only '
     'include or only exclude'),
    ("a source excluded from a phase its reader runs in",
     edit("train_steps: 10\n", "train_steps: 10\nvalidate_steps: 2\n",
          'name: "gru1"', 'name: "gru1" exclude: kVal'),
     ': layer "ip1": srclayer "gru1" does not take part in the val phase; include it in that '
     'phase or exclude this layer from it'),
    ("include kUnknown",
     edit('name: "ip1"', 'name: "ip1" include: kUnknown'),
     ': layer "ip1": include kUnknown is not a phase (the layer would silently drop out); use '
     'kTrain, kVal or kTest'),
    # ------------------------------------------------------ per-type settings
    ("kGRU without dim_hidden",
     edit(" gru_conf { dim_hidden: 8 }", ""),
     ': layer "gru1": kGRU needs gru_conf.dim_hidden; add gru_conf { dim_hidden: ... }'),
    ("kGRU with an empty gru_conf",
     edit("gru_conf { dim_hidden: 8 }", "gru_conf { }"),
     ': layer "gru1": kGRU needs gru_conf.dim_hidden; add gru_conf { dim_hidden: ... }'),
    ("kGRU with dim_hidden 0",
     edit("dim_hidden: 8", "dim_hidden: 0"),
     ': layer "gru1": gru_conf.dim_hidden is 0; it must be positive'),
    ("kLSTM without dim_hidden",
     edit(GRU1, 'layer { name: "gru1" type: kLSTM srclayers: "onehot" }'),
     ': layer "gru1": kLSTM needs lstm_conf.dim_hidden; add lstm_conf { dim_hidden: ... }'),
    ("kRNN without dim_hidden (gru_conf given instead)",
     edit("type: kGRU", "type: kRNN"),
     ': layer "gru1": kRNN needs rnn_conf.dim_hidden; add rnn_conf { dim_hidden: ... }'),
    ("kInnerProduct without num_output",
     edit(" innerproduct_conf { num_output: 5 }", ""),
     ': layer "ip1": kInnerProduct needs innerproduct_conf.num_output; add '
     'innerproduct_conf { num_output: ... }'),
    ("kEmbedding without vocab_size",
     edit("type: kOneHot", "type: kEmbedding"),
     ': layer "onehot": kEmbedding needs embedding_conf.vocab_size; add '
     'embedding_conf { vocab_size: ... }'),
    ("kCharRNN without path",
     edit(' char_rnn_conf { path: "train.txt" }', ""),
     ': layer "data": kCharRNN needs char_rnn_conf.path; add char_rnn_conf { path: ... }'),
    ("kRNNDummy feeding back an unknown layer",
     before_loss('layer { name: "fb" type: kRNNDummy rnn_dummy_conf { dynamic_srclayer: "ip9" } }'),
     ': layer "fb": it reads layer "ip9" as its context (for kRNNDummy: '
     'rnn_dummy_conf.dynamic_srclayer), and that is not a layer of this net'),
    # ------------------------------------------------------------- types
    *[(f"SINGA type {t}", edit("type: kInnerProduct", f"type: {t}"),
       ':9: layer "ip1": ' + NOT_SUPPORTED.format(t=t))
      for t in ("kConvolution", "kPooling", "kLRN", "kRBMHid", "kCudnnConv", "kUserLayer")],
    ("a layer without a type",
     edit("type: kInnerProduct ", ""),
     ': layer "ip1": has no type; add type: kXxx (see the layer table in docs/config.md)'),
    # -------------------------------------------------------------- the job
    ("a job without layers",
     'name: "t"\ntrain_steps: 10\n',
     ": the job has no layers; add neuralnet { layer { ... } }"),
    ("contrastive divergence",
     BASE + "train_one_batch { alg: kCD }\n",
     ": train_one_batch.alg kCD is not supported; use kBP or kBPTT"),
    ("a missing job file",
     None,
     ": no such job file"),
    # ------------------------------------------ silent nonsense (issue 16, items 13 and 16)
    ("char streams advance by another length than their readers read",
     edit('char_rnn_conf { path: "train.txt" }', 'char_rnn_conf { path: "train.txt" unroll_len: 30 }'),
     ': layer "data": char_rnn_conf.unroll_len is 30 but "onehot" and "label", which read it, '
     "have unroll_len 3: each batch would read 4 characters per stream and move on by 30, "
     "skipping text while the carried state jumps the gap; make them equal, or leave "
     "char_rnn_conf.unroll_len out (it then follows theirs)"),
    ("the readers of the char streams disagree on unroll_len",
     edit('srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
          'srclayers: "data" unroll_conn_type: kUnrollOneToAll unroll_len: 2 }\n  '
          'layer { name: "label"'),
     ': layer "data": the layers reading it have different unroll_len ("onehot" 2, "label" 3); '
     "give them one value, the characters each batch reads per stream"),
    ("a job that trains without a loss layer",
     edit("  " + LOSS + "\n", ""),
     ": the job trains (train_steps: 10) but its train phase has no loss layer (kSoftmaxLoss, "
     "kEuclideanLoss), so no step would learn anything; add one, or set train_steps: 0 for a "
     "job that only tests"),
]


def run_graph_only(path: pathlib.Path, ws: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.train", str(path), "--graph-only",
                           "--workspace", str(ws)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_table_is_large_and_ids_unique():
    ids = [case[0] for case in MALFORMED]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("text,expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_job_prints_one_exact_line(tmp_path, text, expected):
    path = tmp_path / ("missing.conf" if text is None else "job.conf")
    if text is not None:
        path.write_text(text)
    r = run_graph_only(path, tmp_path / "ws")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == f"error: {path}{expected}\n"
    assert r.stdout == ""


def test_malformed_jobs_raise_the_same_config_error_in_process(tmp_path):
    """load_job (then unrolling, for the graph errors) raises ConfigError with the same line."""
    for name, text, expected in MALFORMED:
        path = tmp_path / ("missing.conf" if text is None else "job.conf")
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as e:
            job = load_job(path)
            for ph in phases_of(job):
                unroll(job.neuralnet, ph, job.name, where=str(path))
        assert str(e.value) == f"{path}{expected}", name


def test_base_job_is_valid(tmp_path):
    path = tmp_path / "job.conf"
    path.write_text(BASE)
    r = run_graph_only(path, tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (tmp_path / "ws" / "visualization" / "train_net.json").is_file()
    assert "(16 nodes, 20 edges)" in r.stdout


def test_a_job_folder_is_not_a_job_file(tmp_path):
    r = run_graph_only(tmp_path, tmp_path / "ws")
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path}: is a folder; give the job file (e.g. job.conf)\n"


# ---------------------------------------------------------------- positive
TRAIN_VAL_DATA = edit(
    "train_steps: 10\n", "train_steps: 10\nvalidate_steps: 2\n",
    '  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "train.txt" } }',
    '  layer { name: "data" type: kCharRNN unroll_len: 1 include: kTrain\n'
    '          char_rnn_conf { path: "train.txt" } }\n'
    '  layer { name: "data" type: kCharRNN unroll_len: 1 include: kVal\n'
    '          char_rnn_conf { path: "val.txt" } }')


def test_train_and_val_data_layers_of_one_name_load(tmp_path):
    """SINGA's way: a "data" layer per phase, told apart by include."""
    path = tmp_path / "job.conf"
    path.write_text(TRAIN_VAL_DATA)
    job = load_job(path)
    datas = [layer for layer in job.neuralnet.layer if layer.name == "data"]
    assert [list(d.include) for d in datas] == [[pb.kTrain], [pb.kVal]]
    r = run_graph_only(path, tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for ph in ("train", "val"):
        assert (tmp_path / "ws" / "visualization" / f"{ph}_net.json").is_file()
    assert r.stdout.count("(16 nodes, 20 edges)") == 2


# --------------------------------------------------------------- normalise
def parsed(text: str) -> pb.JobProto:
    job = parse_job(text, "job.conf")
    normalise(job, "job.conf")
    validate(job, "job.conf")
    return job


def layer(job: pb.JobProto, name: str) -> pb.LayerProto:
    (found,) = [lay for lay in job.neuralnet.layer if lay.name == name]
    return found


def test_connection_type_is_a_synonym_of_unroll_conn_type():
    text = edit('"data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
                '"data" connection_type: kUnrollOneToAll }\n  layer { name: "label"')
    raw = parse_job(text, "job.conf")
    assert list(layer(raw, "onehot").connection_type) == [pb.kUnrollOneToAll]
    job = parsed(text)
    onehot = layer(job, "onehot")
    assert list(onehot.unroll_conn_type) == [pb.kUnrollOneToAll]
    assert list(onehot.connection_type) == []


def test_singa_doc_aliases_parse_to_the_same_values():
    text = edit('srclayers: "ip1" srclayers: "label"',
                'srclayers: "ip1" srclayers: "label" unroll_conn_type: kOneToOne '
                'unroll_conn_type: kOneToOne',
                '"data" unroll_conn_type: kUnrollOneToAll }\n  layer { name: "label"',
                '"data" connection_type: kOneToAll }\n  layer { name: "label"')
    job = parsed(text)
    assert pb.kOneToOne == pb.kUnrollOneToOne == 1 and pb.kOneToAll == pb.kUnrollOneToAll == 2
    assert list(layer(job, "loss").unroll_conn_type) == [pb.kUnrollOneToOne] * 2
    assert list(layer(job, "onehot").unroll_conn_type) == [pb.kUnrollOneToAll]


def test_a_layer_without_unroll_len_takes_the_nets():
    job = parsed(edit('name: "ip1"', 'name: "ip1" unroll_len: 2', 'srclayers: "gru1"',
                      'srclayers: "gru1" unroll_conn_type: kUnrollOneToAll'))
    got = {lay.name: lay.unroll_len for lay in job.neuralnet.layer}
    assert got == {"data": 1, "onehot": 3, "label": 3, "gru1": 3, "ip1": 2, "loss": 3}
    # without neuralnet.unroll_len the default is 1 for the net and every layer
    job = parsed(edit("  unroll_len: 3\n", ""))
    assert job.neuralnet.unroll_len == 1
    assert {lay.unroll_len for lay in job.neuralnet.layer} == {1}


# ------------------------------------------------------------------ phases
def test_phase_filtering_with_include():
    job = parsed(TRAIN_VAL_DATA.replace('name: "loss"', 'name: "loss" include: kTrain include: kVal'))
    net = job.neuralnet
    train = layers_in_phase(net, Phase.TRAIN)
    val = layers_in_phase(net, Phase.VAL)
    test = layers_in_phase(net, Phase.TEST)
    assert [lay.name for lay in train] == ["data", "onehot", "label", "gru1", "ip1", "loss"]
    assert [lay.name for lay in val] == ["data", "onehot", "label", "gru1", "ip1", "loss"]
    assert train[0].char_rnn_conf.path == "train.txt"
    assert val[0].char_rnn_conf.path == "val.txt"
    assert [lay.name for lay in test] == ["onehot", "label", "gru1", "ip1"]
    assert layer_phases(layer(job, "loss")) == Phase.TRAIN | Phase.VAL
    assert layer_phases(layer(job, "gru1")) == Phase.TRAIN | Phase.VAL | Phase.TEST


def test_phase_filtering_with_exclude():
    job = parsed(edit('name: "ip1"', 'name: "ip1" exclude: kTest exclude: kVal'))
    assert layer_phases(layer(job, "ip1")) == Phase.TRAIN
    assert "ip1" not in [lay.name for lay in layers_in_phase(job.neuralnet, Phase.VAL)]
    assert "ip1" in [lay.name for lay in layers_in_phase(job.neuralnet, Phase.TRAIN)]


def test_phase_parse_and_label():
    assert Phase.parse("train") is Phase.TRAIN
    assert Phase.parse(" Validation ") is Phase.VAL
    assert Phase.parse("TEST") is Phase.TEST
    assert [p.value for p in (Phase.TRAIN, Phase.VAL, Phase.TEST)] == [pb.kTrain, pb.kVal, pb.kTest]
    assert Phase.VAL.label == "val"
    with pytest.raises(ConfigError, match="unknown phase 'dev'; use train, val or test"):
        Phase.parse("dev")


# ---------------------------------------------------- SINGA's char-rnn job
def _singa_param(name: str) -> str:
    return f"""    param {{
      name: "{name}"
      init {{
        type: kUniform
        low: -0.08
        high: 0.08
      }}
    }}
"""


def _singa_gru(name: str, src: str, suffix: str) -> str:
    params = "".join(_singa_param(p + suffix) for p in
                     ("z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b"))
    return f"""  layer {{
    name: "{name}"
    type: kGRU
    srclayers: "{src}"
    gru_conf {{
      dim_hidden: 512
    }}
{params}  }}
"""


# examples/char-rnn/job.conf as Apache SINGA v0.3 shipped it (param blocks
# expanded by the helpers above, in SINGA's own layout).
SINGA_CHAR_RNN_JOB = """name:"char-rnn"
train_steps: 100000
disp_freq: 100
#debug: true
gpu: 0
train_one_batch {
  alg: kBPTT
}

updater {
  type: kRMSProp
  rmsprop_conf {
    rho: 0.95
  }
  learning_rate {
    type: kStep
    base_lr: 0.002
    step_conf {
      gamma: 0.97
      change_freq: 2000
    }
  }
  clip_low: -5
  clip_high: 5
}

neuralnet {
  unroll_len: 50
  layer {
    name: "data"
    type: kCharRNN
    unroll_len: 1
    char_rnn_conf {
      path: "examples/char-rnn/linux_input.txt"
      vocab_path:"examples/char-rnn/vocab.txt"
      batchsize: 50
      unroll_len: 50
    }
  }

  layer {
    name: "onehot"
    type: kOneHot
    srclayers: "data"
    unroll_conn_type: kUnrollOneToAll
  }

  layer {
    name: "label"
    type: kRNNLabel
    srclayers: "data"
    unroll_conn_type: kUnrollOneToAll
  }

""" + _singa_gru("gru1", "onehot", "") + _singa_gru("gru2", "gru1", "2") + """  layer {
    name: "ip1"
    type: kInnerProduct
    srclayers: "gru2"
    innerproduct_conf {
      num_output: 101
    }
""" + _singa_param("w") + _singa_param("b") + """  }
  layer {
    name: "loss"
    type: kSoftmaxLoss
    srclayers: "ip1"
    srclayers: "label"
  }
}

cluster {
  workspace: "examples/char-rnn/"
}
"""


def test_singa_char_rnn_job_parses_unchanged():
    job = parse_job(SINGA_CHAR_RNN_JOB, "job.conf")
    normalise(job, "job.conf")
    validate(job, "job.conf")
    assert job.name == "char-rnn" and job.train_steps == 100000 and job.disp_freq == 100
    assert list(job.gpu) == [0]
    assert job.train_one_batch.alg == pb.kBPTT
    u = job.updater
    assert u.type == pb.kRMSProp and u.rmsprop_conf.rho == pytest.approx(0.95)
    assert u.learning_rate.type == pb.kStep and u.learning_rate.base_lr == pytest.approx(0.002)
    assert u.learning_rate.step_conf.gamma == pytest.approx(0.97)
    assert u.learning_rate.step_conf.change_freq == 2000
    assert (u.clip_low, u.clip_high) == (-5, 5)
    assert job.cluster.workspace == "examples/char-rnn/"
    net = job.neuralnet
    assert net.unroll_len == 50
    assert [(lay.name, lay.unroll_len) for lay in net.layer] == [
        ("data", 1), ("onehot", 50), ("label", 50), ("gru1", 50), ("gru2", 50), ("ip1", 50),
        ("loss", 50)]
    data = layer(job, "data")
    assert (data.char_rnn_conf.batchsize, data.char_rnn_conf.unroll_len) == (50, 50)
    gru2 = layer(job, "gru2")
    assert gru2.gru_conf.dim_hidden == 512
    assert [p.name for p in gru2.param][:3] == ["z_hx2", "r_hx2", "c_hx2"] and len(gru2.param) == 9
    assert all(p.init.type == pb.kUniform and p.init.low == pytest.approx(-0.08)
               and p.init.high == pytest.approx(0.08) for lay in net.layer for p in lay.param)
    assert [p.name for p in layer(job, "ip1").param] == ["w", "b"]
    assert list(layer(job, "loss").srclayers) == ["ip1", "label"]


def test_char_stream_length_follows_its_readers_when_left_out(tmp_path):
    """char_rnn_conf.unroll_len (SINGA's default 50) follows the layers reading the
    streams when the file leaves it out (issue 16, item 13)."""
    path = tmp_path / "job.conf"
    path.write_text(BASE)
    data = layer(load_job(path), "data")
    assert data.char_rnn_conf.HasField("unroll_len") and data.char_rnn_conf.unroll_len == 3


def test_steps_on_the_command_line_make_a_job_without_loss_train(tmp_path):
    """A test-only job without a loss layer is fine; --steps makes it train: refused."""
    path = tmp_path / "job.conf"
    path.write_text(edit("train_steps: 10", "train_steps: 0 test_steps: 1", "  " + LOSS + "\n", ""))
    load_job(path)  # valid as it is
    r = subprocess.run([sys.executable, "-m", "engine.train", str(path), "--steps", "5",
                        "--workspace", str(tmp_path / "ws")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (f"error: {path}: the job trains (--steps 5) but its train phase has no "
                        f"loss layer (kSoftmaxLoss, kEuclideanLoss), so no step would learn "
                        f"anything; add one, or set train_steps: 0 for a job that only tests\n")
    assert not (tmp_path / "ws").exists()
