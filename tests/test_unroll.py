"""engine.unroll: config in, graph out, tested on edge sets and the sharing map.

No layer object is built here (an autouse fixture makes building one fail):
unrolling needs only the configs and what each layer class declares.
Edges are compared as sets of (source copy, copy, conn, shift) tuples.
"""
from __future__ import annotations

import json
import time

import networkx as nx
import pytest

from engine.config import ConfigError, Phase, normalise, parse_job, validate
from engine.layers import REGISTRY, Layer
from engine.proto import job_pb2 as pb
from engine.unroll import graph_from_json, graph_to_json, share_map, unroll
from test_config import SINGA_CHAR_RNN_JOB

O2O, O2A, F2L, CTX = "kUnrollOneToOne", "kUnrollOneToAll", "kUnrollFirstToLast", "context"


@pytest.fixture(autouse=True)
def no_layer_objects(monkeypatch):
    """Unrolling is a pure function of the config: building a layer is a test failure."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("unrolling built a layer object")

    monkeypatch.setattr(Layer, "__init__", refuse)


# ------------------------------------------------------------------ helpers
def lay(name, type_="kDummy", srcs=(), conn=(), shift=(), T=None, extra=""):
    """One layer line: ``lay("b", srcs=["a"], conn=["kUnrollOneToAll"], T=2)``."""
    parts = [f'name: "{name}"', f"type: {type_}"]
    parts += [f'srclayers: "{s}"' for s in srcs]
    parts += [f"unroll_conn_type: {c}" for c in conn]
    parts += [f"shift: {s}" for s in shift]
    if T is not None:
        parts.append(f"unroll_len: {T}")
    if extra:
        parts.append(extra)
    return "layer { " + " ".join(parts) + " }"


def job_of(*layers, T=4, head=""):
    text = f'name: "t"\n{head}\nneuralnet {{\n  unroll_len: {T}\n' + \
        "".join(f"  {x}\n" for x in layers) + "}\n"
    job = parse_job(text, "job.conf")
    normalise(job, "job.conf")
    validate(job, "job.conf")
    return job


def unrolled(*layers, T=4, phase=Phase.TRAIN, head=""):
    job = job_of(*layers, T=T, head=head)
    return unroll(job.neuralnet, phase, job.name, where="job.conf")


def edges(g: nx.DiGraph, into: str | None = None) -> set:
    """(u, v, conn, shift) of every edge (only those into copies of layer ``into``)."""
    return {(u, v, d["conn"], d["shift"]) for u, v, d in g.edges(data=True)
            if into is None or g.nodes[v]["layer"] == into}


def copies(g: nx.DiGraph, layer: str) -> list[str]:
    return sorted((n for n, d in g.nodes(data=True) if d["layer"] == layer),
                  key=lambda n: g.nodes[n]["step"])


GRU_PARAMS = ("z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b")


def char_rnn_layers(data_include=""):
    """SINGA's char-rnn net (one GRU): data -> onehot, label -> gru1 -> ip1 -> loss."""
    gru_params = " ".join(f'param {{ name: "{p}" }}' for p in GRU_PARAMS)
    if data_include:
        data = [lay("data", "kCharRNN", T=1,
                    extra=f'include: {ph} char_rnn_conf {{ path: "{ph}.txt" }}')
                for ph in data_include]
    else:
        data = [lay("data", "kCharRNN", T=1, extra='char_rnn_conf { path: "train.txt" }')]
    return data + [
        lay("onehot", "kOneHot", ["data"], [O2A]),
        lay("label", "kRNNLabel", ["data"], [O2A]),
        lay("gru1", "kGRU", ["onehot"], extra="gru_conf { dim_hidden: 16 } " + gru_params),
        lay("ip1", "kInnerProduct", ["gru1"],
            extra='innerproduct_conf { num_output: 10 } param { name: "w" } param { name: "b" }'),
        lay("loss", "kSoftmaxLoss", ["ip1", "label"]),
    ]


def char_rnn_edges(T):
    e = set()
    for i in range(T):
        e |= {("0#data", f"{i}#onehot", O2A, 0), ("0#data", f"{i}#label", O2A, 0),
              (f"{i}#onehot", f"{i}#gru1", O2O, 0), (f"{i}#gru1", f"{i}#ip1", O2O, 0),
              (f"{i}#ip1", f"{i}#loss", O2O, 0), (f"{i}#label", f"{i}#loss", O2O, 0)}
        if i > 0:
            e.add((f"{i - 1}#gru1", f"{i}#gru1", CTX, 1))
    return e


# ------------------------------------------------------- connection types
def test_one_to_one_shift_0():
    g = unrolled(lay("a"), lay("b", srcs=["a"])).graph
    assert edges(g) == {(f"{i}#a", f"{i}#b", O2O, 0) for i in range(4)}


def test_one_to_one_shift_2_leaves_early_copies_without_source():
    g = unrolled(lay("a"), lay("b", srcs=["a"], shift=[2]), T=5).graph
    assert edges(g) == {(f"{i - 2}#a", f"{i}#b", O2O, 2) for i in (2, 3, 4)}
    assert [g.in_degree(f"{i}#b") for i in range(5)] == [0, 0, 1, 1, 1]


def test_conn_type_and_shift_are_per_srclayer():
    g = unrolled(lay("a"), lay("c", T=1), lay("b", srcs=["a", "c"], conn=[O2O, O2A], shift=[1]),
                 T=3).graph
    assert edges(g, "b") == {("0#a", "1#b", O2O, 1), ("1#a", "2#b", O2O, 1),
                             ("0#c", "0#b", O2A, 0), ("0#c", "1#b", O2A, 0), ("0#c", "2#b", O2A, 0)}
    assert {d["src_index"] for u, v, d in g.edges(data=True) if u.endswith("#a")} == {0}
    assert {d["src_index"] for u, v, d in g.edges(data=True) if u.endswith("#c")} == {1}


def test_one_to_all_from_a_one_copy_source():
    g = unrolled(lay("a", T=1), lay("b", srcs=["a"], conn=[O2A], T=3)).graph
    assert edges(g) == {("0#a", f"{i}#b", O2A, 0) for i in range(3)}


def test_one_to_all_from_a_three_copy_source():
    u = unrolled(lay("a", T=3), lay("b", srcs=["a"], conn=[O2A], T=2))
    assert edges(u.graph) == {(f"{j}#a", f"{i}#b", O2A, 0) for i in range(2) for j in range(3)}
    by_name = {x.name: x for x in u.netproto.layer}
    assert list(by_name["1#b"].srclayers) == ["0#a", "1#a", "2#a"]


def test_first_to_last_reads_the_last_copy_into_copy_0():
    g = unrolled(lay("a", T=5), lay("b", srcs=["a"], conn=[F2L], T=3)).graph
    assert edges(g) == {("4#a", "0#b", F2L, 0)}
    assert [g.in_degree(n) for n in copies(g, "b")] == [1, 0, 0]


def test_one_to_first_feeds_copy_0_and_marks_the_other_copies_zeros():
    g = unrolled(lay("a", T=1), lay("c", T=1), lay("b", srcs=["c", "a"], conn=[O2A, "kUnrollOneToFirst"],
                                                    T=4)).graph
    assert edges(g, "b") == {("0#a", "0#b", "kUnrollOneToFirst", 0)} | \
        {("0#c", f"{i}#b", O2A, 0) for i in range(4)}
    assert "zeros" not in g.nodes["0#b"]
    assert [g.nodes[f"{i}#b"]["zeros"] for i in range(1, 4)] == [[1], [1], [1]]
    # from a source of several copies: its last copy, as first-to-last, but as data
    g = unrolled(lay("a", T=3), lay("b", srcs=["a"], conn=["kUnrollOneToFirst"], T=2)).graph
    assert edges(g) == {("2#a", "0#b", "kUnrollOneToFirst", 0)}


def test_a_layer_whose_unroll_len_differs_from_the_nets():
    u = unrolled(lay("a"), lay("b", srcs=["a"], T=2), T=4)
    g = u.graph
    assert copies(g, "a") == ["0#a", "1#a", "2#a", "3#a"]
    assert copies(g, "b") == ["0#b", "1#b"]
    assert {g.nodes[n]["unroll_len"] for n in copies(g, "b")} == {2}
    assert g.graph["unroll_len"] == 4
    assert edges(g) == {("0#a", "0#b", O2O, 0), ("1#a", "1#b", O2O, 0)}
    # the other way round copy 3 would read a copy that does not exist
    with pytest.raises(ConfigError, match=r'^job.conf: layer "b": copy 3 reads copy 3 of "a" '
                                          r'one-to-one, but "a" has only 2 copies; '):
        unrolled(lay("a", T=2), lay("b", srcs=["a"]), T=4)


# -------------------------------------------------------- SINGA's char-rnn
def test_char_rnn_at_50_nodes_and_exact_edges():
    g = unrolled(*char_rnn_layers(), T=50).graph
    count = {}
    for _, d in g.nodes(data=True):
        count[d["layer"]] = count.get(d["layer"], 0) + 1
    assert count == {"data": 1, "onehot": 50, "label": 50, "gru1": 50, "ip1": 50, "loss": 50}
    assert edges(g) == char_rnn_edges(50)
    assert g.number_of_edges() == 6 * 50 + 49
    assert nx.is_directed_acyclic_graph(g)


def test_singa_char_rnn_job_unrolls():
    """SINGA's shipped job.conf (two stacked GRUs): 1 data copy, 50 of everything else."""
    job = parse_job(SINGA_CHAR_RNN_JOB, "job.conf")
    normalise(job, "job.conf")
    validate(job, "job.conf")
    g = unroll(job.neuralnet, Phase.TRAIN, job.name).graph
    assert g.number_of_nodes() == 1 + 6 * 50
    assert copies(g, "data") == ["0#data"]
    assert edges(g, "gru2") == ({(f"{i}#gru1", f"{i}#gru2", O2O, 0) for i in range(50)}
                                | {(f"{i - 1}#gru2", f"{i}#gru2", CTX, 1) for i in range(1, 50)})
    assert g.graph["name"] == "char-rnn"


def test_node_attributes():
    g = unrolled(*char_rnn_layers(), T=5).graph
    assert g.nodes["3#gru1"] == {"layer": "gru1", "step": 3, "type": "kGRU", "unroll_len": 5,
                                 "share_group": "z_hx"}
    assert g.nodes["0#data"] == {"layer": "data", "step": 0, "type": "kCharRNN", "unroll_len": 1,
                                 "share_group": ""}
    assert g.nodes["4#loss"]["type"] == "kSoftmaxLoss" and g.nodes["4#loss"]["share_group"] == ""
    assert g.nodes["2#ip1"]["share_group"] == "w"
    for n, d in g.nodes(data=True):
        assert n == f"{d['step']}#{d['layer']}"


def test_edge_attributes():
    g = unrolled(*char_rnn_layers(), T=5).graph
    for u, v, d in g.edges(data=True):
        assert d["recurrent"] is (d["conn"] == CTX)
        if d["conn"] == CTX:
            assert d["src_index"] == -1 and g.nodes[u]["step"] == g.nodes[v]["step"] - 1
    assert g.edges["2#ip1", "2#loss"]["src_index"] == 0
    assert g.edges["2#label", "2#loss"]["src_index"] == 1
    assert g.edges["0#data", "4#onehot"] == {"conn": O2A, "shift": 0, "recurrent": False,
                                             "src_index": 0}
    assert g.edges["1#gru1", "2#gru1"] == {"conn": CTX, "shift": 1, "recurrent": True,
                                           "src_index": -1}


def test_graph_attributes_hold_the_folded_net():
    g = unrolled(*char_rnn_layers(), T=5).graph
    assert g.graph["phase"] == "train" and g.graph["unroll_len"] == 5 and g.graph["name"] == "t"
    folded = {x["name"]: x for x in g.graph["layers"]}
    assert list(folded) == ["data", "onehot", "label", "gru1", "ip1", "loss"]
    assert folded["gru1"]["recurrent"] is True and folded["ip1"]["recurrent"] is False
    assert folded["loss"]["srclayers"] == [["ip1", O2O, 0], ["label", O2O, 0]]
    assert folded["onehot"]["srclayers"] == [["data", O2A, 0]]
    assert folded["data"]["unroll_len"] == 1 and folded["gru1"]["unroll_len"] == 5


# --------------------------------------------------------------- sharing
def test_share_map_every_copy_shares_copy_0():
    u = unrolled(*char_rnn_layers(), T=50)
    m = share_map(u)
    params = GRU_PARAMS + ("w", "b")
    assert m == {f"{i}#{p}": f"0#{p}" for i in range(50) for p in params}


def test_share_map_tied_params_map_to_the_owner():
    u = unrolled(lay("a"),
                 lay("enc", "kInnerProduct", ["a"], extra='innerproduct_conf { num_output: 3 } '
                     'param { name: "w" } param { name: "b" }'),
                 lay("dec", "kInnerProduct", ["enc"], T=2, extra='innerproduct_conf { num_output: 3 } '
                     'param { name: "w_tied" share_from: "w" } param { name: "b2" }'),
                 T=3)
    m = share_map(u)
    assert m == {**{f"{i}#w": "0#w" for i in range(3)}, **{f"{i}#b": "0#b" for i in range(3)},
                 "0#w_tied": "0#w", "1#w_tied": "0#w", "0#b2": "0#b2", "1#b2": "0#b2"}
    assert u.graph.nodes["1#dec"]["share_group"] == "w"


def test_unnamed_params_get_distinct_names_per_role():
    u = unrolled(lay("a"), lay("ip", "kInnerProduct", ["a"],
                               extra="innerproduct_conf { num_output: 3 } "
                                     "param { lr_scale: 2 } param { lr_scale: 0.5 }"), T=2)
    by_name = {x.name: x for x in u.netproto.layer}
    assert [p.name for p in by_name["0#ip"].param] == ["0#ip/w", "0#ip/b"]
    assert [(p.name, p.share_from) for p in by_name["1#ip"].param] == [
        ("1#ip/w", "0#ip/w"), ("1#ip/b", "0#ip/b")]
    assert share_map(u) == {"0#ip/w": "0#ip/w", "0#ip/b": "0#ip/b",
                            "1#ip/w": "0#ip/w", "1#ip/b": "0#ip/b"}


# --------------------------------------------------------- unrolled proto
def test_unrolled_netproto_names_indices_and_rewired_sources():
    u = unrolled(*char_rnn_layers(), T=3)
    out = u.netproto
    assert [x.name for x in out.layer] == ["0#data"] + [
        f"{i}#{name}" for name in ("onehot", "label", "gru1", "ip1", "loss") for i in range(3)]
    by_name = {x.name: x for x in out.layer}
    assert [by_name[f"{i}#gru1"].unroll_index for i in range(3)] == [0, 1, 2]
    assert {x.unroll_len for x in out.layer} == {1}
    assert all(not x.unroll_conn_type and not x.shift for x in out.layer)
    assert list(by_name["0#gru1"].srclayers) == ["0#onehot"]
    assert list(by_name["2#gru1"].srclayers) == ["2#onehot", "1#gru1"]   # data, then context
    assert list(by_name["1#loss"].srclayers) == ["1#ip1", "1#label"]     # srclayer order
    assert list(by_name["2#onehot"].srclayers) == ["0#data"]
    assert [(p.name, p.share_from) for p in by_name["0#ip1"].param] == [("0#w", ""), ("0#b", "")]
    assert [(p.name, p.share_from) for p in by_name["2#ip1"].param] == [("2#w", "0#w"),
                                                                        ("2#b", "0#b")]
    assert by_name["1#gru1"].gru_conf.dim_hidden == 16
    # the input config is left alone
    assert [x.name for x in u.net.layer] == ["data", "onehot", "label", "gru1", "ip1", "loss"]


def test_context_comes_after_every_data_source():
    u = unrolled(lay("x"), lay("y"),
                 lay("r", "kRNN", ["x", "y"], shift=[0, 1], extra="rnn_conf { dim_hidden: 4 }"),
                 T=3)
    by_name = {x.name: x for x in u.netproto.layer}
    assert list(by_name["0#r"].srclayers) == ["0#x"]
    assert list(by_name["1#r"].srclayers) == ["1#x", "0#y", "0#r"]
    assert list(by_name["2#r"].srclayers) == ["2#x", "1#y", "1#r"]


# ------------------------------------------------------------------ phases
def test_phase_filtering_gives_each_phase_its_data_layer():
    layers = char_rnn_layers(data_include=("kTrain", "kVal"))
    layers.append(lay("top", "kArgSort", ["ip1"], extra="include: kVal"))
    job = job_of(*layers, T=4)
    train = unroll(job.neuralnet, Phase.TRAIN, job.name)
    val = unroll(job.neuralnet, Phase.VAL, job.name)
    assert train.graph.graph["phase"] == "train" and val.graph.graph["phase"] == "val"
    assert train.conf("data").char_rnn_conf.path == "kTrain.txt"
    assert val.conf("data").char_rnn_conf.path == "kVal.txt"
    assert edges(train.graph) == char_rnn_edges(4)
    assert edges(val.graph) == char_rnn_edges(4) | {(f"{i}#ip1", f"{i}#top", O2O, 0)
                                                    for i in range(4)}
    assert "0#top" not in train.graph
    # the test phase has no data layer, and "onehot" reads one
    with pytest.raises(ConfigError, match=r'^job.conf: layer "onehot": srclayer "data" does not '
                                          r'take part in the test phase; '):
        unroll(job.neuralnet, Phase.TEST, job.name, where="job.conf")


# ---------------------------------------------------- shapes of recurrence
def test_many_to_one():
    g = unrolled(lay("x", T=10), lay("rnn", "kRNN", ["x"], extra="rnn_conf { dim_hidden: 4 }"),
                 lay("out", "kInnerProduct", ["rnn"], [F2L], T=1,
                     extra="innerproduct_conf { num_output: 2 }"),
                 T=10).graph
    assert edges(g, "out") == {("9#rnn", "0#out", F2L, 0)}
    assert edges(g) == ({(f"{i}#x", f"{i}#rnn", O2O, 0) for i in range(10)}
                        | {(f"{i - 1}#rnn", f"{i}#rnn", CTX, 1) for i in range(1, 10)}
                        | {("9#rnn", "0#out", F2L, 0)})


def test_encoder_decoder():
    u = unrolled(lay("enc_in", T=5),
                 lay("encoder", "kGRU", ["enc_in"], T=5, extra="gru_conf { dim_hidden: 4 }"),
                 lay("dec_in", T=4),
                 lay("decoder", "kGRU", ["dec_in", "encoder"], [O2O, F2L], T=4,
                     extra="gru_conf { dim_hidden: 4 }"),
                 T=5)
    g = u.graph
    assert edges(g, "decoder") == ({(f"{i}#dec_in", f"{i}#decoder", O2O, 0) for i in range(4)}
                                   | {("4#encoder", "0#decoder", F2L, 0)}
                                   | {(f"{i - 1}#decoder", f"{i}#decoder", CTX, 1)
                                      for i in range(1, 4)})
    assert edges(g, "encoder") == ({(f"{i}#enc_in", f"{i}#encoder", O2O, 0) for i in range(5)}
                                   | {(f"{i - 1}#encoder", f"{i}#encoder", CTX, 1)
                                      for i in range(1, 5)})
    by_name = {x.name: x for x in u.netproto.layer}
    assert list(by_name["0#decoder"].srclayers) == ["0#dec_in", "4#encoder"]
    assert list(by_name["1#decoder"].srclayers) == ["1#dec_in", "0#decoder"]


@pytest.mark.parametrize("type_, conf", [("kRNN", "rnn_conf"), ("kGRU", "gru_conf"),
                                         ("kLSTM", "lstm_conf")])
def test_backward_layer_reads_its_next_copy(type_, conf):
    """direction: kBackward: (i+1)#L -> i#L context edges (offset -1); a first-to-last
    source feeds the last copy, where the pass starts."""
    g = unrolled(lay("x", T=4), lay("enc", type_, ["x"], extra=f"{conf} {{ dim_hidden: 4 }}"),
                 lay("bwd", type_, ["x", "enc"], [O2O, F2L],
                     extra=f"{conf} {{ dim_hidden: 4 direction: kBackward }}")).graph
    assert edges(g, "bwd") == ({(f"{i}#x", f"{i}#bwd", O2O, 0) for i in range(4)}
                               | {(f"{i + 1}#bwd", f"{i}#bwd", CTX, -1) for i in range(3)}
                               | {("3#enc", "3#bwd", F2L, 0)})
    assert all(g.edges[f"{i + 1}#bwd", f"{i}#bwd"]["recurrent"] for i in range(3))
    layers = {x["name"]: x for x in g.graph["layers"]}
    assert layers["bwd"]["context"] == [["bwd", -1]] and layers["enc"]["context"] == [["enc", 1]]
    assert layers["bwd"]["recurrent"] is True and layers["x"]["context"] == []


def test_bidirectional_level_unrolls_to_a_dag():
    g = unrolled(lay("x", T=3), lay("f", "kLSTM", ["x"], extra="lstm_conf { dim_hidden: 4 }"),
                 lay("b", "kLSTM", ["x"], extra="lstm_conf { dim_hidden: 4 direction: kBackward }"),
                 lay("cat", "kConcate", ["f", "b"], extra="concate_conf { concate_dim: 1 }"),
                 T=3).graph
    assert nx.is_directed_acyclic_graph(g)
    assert edges(g, "cat") == {(f"{i}#{s}", f"{i}#cat", O2O, 0) for i in range(3) for s in "fb"}
    assert {(u, v) for u, v, _, _ in edges(g) if u.endswith("#b") and v.endswith("#b")} == \
        {("2#b", "1#b"), ("1#b", "0#b")}


def test_rnn_dummy_feeds_back_the_previous_steps_output():
    g = unrolled(lay("dummy", "kRNNDummy",
                     extra='rnn_dummy_conf { dynamic_srclayer: "argsort" integer: true shape: 1 }'),
                 lay("onehot", "kOneHot", ["dummy"], extra="onehot_conf { vocab_size: 10 }"),
                 lay("gru", "kGRU", ["onehot"], extra="gru_conf { dim_hidden: 4 }"),
                 lay("ip", "kInnerProduct", ["gru"], extra="innerproduct_conf { num_output: 10 }"),
                 lay("argsort", "kArgSort", ["ip"]),
                 T=5).graph
    assert edges(g, "dummy") == {(f"{i - 1}#argsort", f"{i}#dummy", CTX, 1) for i in range(1, 5)}
    assert all(g.edges[f"{i - 1}#argsort", f"{i}#dummy"]["recurrent"] for i in range(1, 5))
    assert g.in_degree("0#dummy") == 0
    assert nx.is_directed_acyclic_graph(g)


def test_recurrence_is_declared_by_the_layer_class(monkeypatch):
    """A class reading its *next* copy (offset -1) gets (i+1)#L -> i#L; no type name is tested."""

    class Backward(Layer):
        @classmethod
        def context_sources(cls, conf):
            return [(conf.name, -1)]

    monkeypatch.setitem(REGISTRY, pb.kCConvolution, Backward)
    g = unrolled(lay("x"), lay("back", "kCConvolution", ["x"]), T=3).graph
    assert edges(g, "back") == ({(f"{i}#x", f"{i}#back", O2O, 0) for i in range(3)}
                                | {("1#back", "0#back", CTX, -1), ("2#back", "1#back", CTX, -1)})
    assert g.graph["layers"][1]["recurrent"] is True


def test_reading_each_other_across_steps_is_no_cycle_but_at_one_step_is():
    g = unrolled(lay("a", srcs=["b"], shift=[1]), lay("b", srcs=["a"]), T=3).graph
    assert edges(g) == {("0#b", "1#a", O2O, 1), ("1#b", "2#a", O2O, 1),
                        ("0#a", "0#b", O2O, 0), ("1#a", "1#b", O2O, 0), ("2#a", "2#b", O2O, 0)}
    with pytest.raises(ConfigError, match=r"^job.conf: the unrolled train net has a cycle: "
                                          r"(\d)#(a|b) -> \1#(a|b) -> \1#\2; break it"):
        unrolled(lay("a", srcs=["b"]), lay("b", srcs=["a"]), T=3)


# -------------------------------------------------------------------- JSON
def test_json_round_trip_keeps_nodes_edges_and_attributes():
    g = unrolled(*char_rnn_layers(), T=4).graph
    data = json.loads(json.dumps(graph_to_json(g)))
    h = graph_from_json(data)
    assert h.is_directed() and not h.is_multigraph()
    assert dict(h.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(u, v): d for u, v, d in h.edges(data=True)} == \
        {(u, v): d for u, v, d in g.edges(data=True)}
    assert h.graph == g.graph
    assert list(h.nodes) == list(g.nodes)


# ------------------------------------------------------------------- scale
def test_unrolling_1000_steps_is_fast():
    job = job_of(lay("data", "kCharRNN", T=1, extra='char_rnn_conf { path: "train.txt" }'),
                 lay("onehot", "kOneHot", ["data"], [O2A]),
                 lay("gru", "kGRU", ["onehot"], extra="gru_conf { dim_hidden: 8 } "
                     + " ".join(f'param {{ name: "{p}" }}' for p in GRU_PARAMS)),
                 lay("ip", "kInnerProduct", ["gru"], extra='innerproduct_conf { num_output: 4 }'),
                 T=1000)
    t0 = time.perf_counter()
    u = unroll(job.neuralnet, Phase.TRAIN, job.name)
    took = time.perf_counter() - t0
    print(f"\nunrolling 4 layers x 1000 steps: {took:.3f} s "
          f"({u.graph.number_of_nodes()} nodes, {u.graph.number_of_edges()} edges)")
    assert u.graph.number_of_nodes() == 1 + 3 * 1000
    assert u.graph.number_of_edges() == 3 * 1000 + 999
    assert took < 2.0
