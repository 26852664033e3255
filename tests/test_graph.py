"""engine.draw (graph -> DOT text) and the tools/graph.py CLI.

The DOT-text tests always run; the ones that render need Graphviz's ``dot``
and are skipped without it. Graphs come from small job texts through
parse_job + normalise + validate + unroll, in SINGA's char-rnn shape:
data (kCharRNN, one copy) -> onehot and label (one-to-all) -> gru1
(recurrent) -> ip1 -> loss.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import networkx as nx
import pytest

from engine import draw
from engine.config import Phase, normalise, parse_job, validate
from engine.layers import REGISTRY, Layer
from engine.proto import job_pb2 as pb
from engine.unroll import graph_from_json, graph_to_json, unroll, write_graph_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "graph.py"
HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz's dot is not installed")

sys.path.insert(0, str(ROOT))
from tools import graph as graph_cli  # noqa: E402


# ------------------------------------------------------------ layer classes
class _StandIn(Layer):
    """Placeholder for a layer family not registered yet: unrolling needs only the
    class declarations (recurrent, has_params), never a built layer."""


class _StandInRecurrent(_StandIn):
    recurrent = True
    has_params = True


class _StandInParams(_StandIn):
    has_params = True


_NEEDED = {pb.kCharRNN: _StandIn, pb.kOneHot: _StandIn, pb.kRNNLabel: _StandIn,
           pb.kGRU: _StandInRecurrent, pb.kInnerProduct: _StandInParams,
           pb.kSoftmaxLoss: _StandIn}


@pytest.fixture(scope="module", autouse=True)
def layer_classes():
    """Use the registered layer classes; stand in (for this module only) for missing ones."""
    added = [t for t in _NEEDED if t not in REGISTRY]
    for t in added:
        REGISTRY[t] = _NEEDED[t]
    try:
        yield
    finally:
        for t in added:
            REGISTRY.pop(t, None)


# ------------------------------------------------------------------ graphs
def char_rnn_text(T: int) -> str:
    gru_params = "".join(f' param {{ name: "{p}" }}' for p in
                         ("z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b"))
    return f"""
name: "char-rnn-shape"
neuralnet {{
  unroll_len: {T}
  layer {{ name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf {{ path: "train.txt" }} }}
  layer {{ name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
  layer {{ name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
  layer {{ name: "gru1" type: kGRU srclayers: "onehot" gru_conf {{ dim_hidden: 8 }}{gru_params} }}
  layer {{ name: "ip1" type: kInnerProduct srclayers: "gru1" innerproduct_conf {{ num_output: 5 }}
          param {{ name: "w" }} param {{ name: "b" }} }}
  layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }}
}}
"""


MULTI = ("onehot", "label", "gru1", "ip1", "loss")   # the layers with one copy per step


def char_rnn_graph(T: int = 5) -> nx.DiGraph:
    job = parse_job(char_rnn_text(T), "char-rnn.conf")
    normalise(job, "char-rnn.conf")
    validate(job, "char-rnn.conf")
    return unroll(job.neuralnet, Phase.TRAIN, job.name, where="char-rnn.conf").graph


# --------------------------------------------------------- DOT text parsing
NODE_RE = re.compile(r"^\s*(\w+) \[label=(.*)\];$", re.M)
EDGE_RE = re.compile(r"^\s*(\w+) -> (\w+)(?: \[(.*)\])?;$", re.M)


def dot_nodes(src: str) -> dict[str, str]:
    """DOT id -> its attribute text."""
    return {m.group(1): m.group(2) for m in NODE_RE.finditer(src)}


def dot_edges(src: str) -> dict[tuple[str, str], str]:
    """Drawn (visible) edges -> attribute text."""
    return {(m.group(1), m.group(2)): m.group(3) or "" for m in EDGE_RE.finditer(src)
            if "style=invis" not in (m.group(3) or "")}


def fill(attrs: str) -> str:
    return re.search(r'fillcolor="([^"]+)"', attrs).group(1)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)


def assert_one_error_line(proc, code=2):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("graph: ")
    return lines[0]


# ================================================================ DOT text
def test_unrolled_dot_groups_steps_and_labels_copies():
    g = char_rnn_graph(5)
    src = draw.to_dot(g)
    clusters = re.findall(r"subgraph (cluster_step_\d+) \{", src)
    assert clusters == [f"cluster_step_{i}" for i in range(5)]
    for i in range(5):
        assert f'label="step {i}"' in src
    nodes = dot_nodes(src)
    assert len(nodes) == 1 + 5 * len(MULTI) == g.number_of_nodes()
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in nodes)   # no '#', ':' in ids
    assert nodes["n_3_gru1"].startswith('"3#gru1\\nkGRU"')
    assert nodes["n_4_loss"].startswith('"4#loss\\nkSoftmaxLoss"')
    # the data layer (one copy) stands outside every step cluster
    outside = src.split("subgraph cluster_step_0")[0]
    assert "n_0_data [" in outside and "n_0_gru1 [" not in outside
    # it says what it feeds: every copy of onehot and of label
    assert "→ onehot: every step\\n→ label: every step" in nodes["n_0_data"]
    assert "all steps" not in src


def test_context_edges_are_drawn_differently_from_data_edges():
    g = char_rnn_graph(5)
    edges = dot_edges(draw.to_dot(g))
    assert len(edges) == g.number_of_edges() == 5 * 6 + 4
    context = {(u, v) for u, v, d in g.edges(data=True) if d["recurrent"]}
    assert context == {(f"{i}#gru1", f"{i + 1}#gru1") for i in range(4)}
    for u, v, d in g.edges(data=True):
        attrs = edges[(draw.dot_id(g.nodes[u]["layer"], g.nodes[u]["step"]),
                       draw.dot_id(g.nodes[v]["layer"], g.nodes[v]["step"]))]
        if d["recurrent"]:
            assert "style=dashed" in attrs and "constraint=false" in attrs
            assert draw.CONTEXT_COLOUR in attrs
        else:
            assert "dashed" not in attrs and "constraint=false" not in attrs
            assert draw.CONTEXT_COLOUR not in attrs


BIDIR_TEXT = """
name: "bidir"
neuralnet {
  unroll_len: 4
  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "train.txt" } }
  layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "fwd" type: kLSTM srclayers: "onehot" lstm_conf { dim_hidden: 3 } }
  layer { name: "bwd" type: kLSTM srclayers: "onehot" lstm_conf { dim_hidden: 3 direction: kBackward } }
  layer { name: "cat" type: kConcate srclayers: "fwd" srclayers: "bwd" concate_conf { concate_dim: 1 } }
  layer { name: "ip" type: kInnerProduct srclayers: "cat" innerproduct_conf { num_output: 5 } }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "label" }
}
"""


def bidir_graph() -> nx.DiGraph:
    job = parse_job(BIDIR_TEXT, "bidir.conf")
    normalise(job, "bidir.conf")
    validate(job, "bidir.conf")
    return unroll(job.neuralnet, Phase.TRAIN, job.name, where="bidir.conf").graph


def test_backward_context_edges_have_a_style_of_their_own():
    """A kBackward layer's context edges ((i+1)#bwd -> i#bwd) are dotted purple, the forward
    layer's dashed red, data edges neither; the legend names both kinds; so does the
    folded view, with a "t+1" self-loop."""
    g = bidir_graph()
    src = draw.to_dot(g)
    edges = dot_edges(src)
    for i in range(3):
        back = edges[(f"n_{i + 1}_bwd", f"n_{i}_bwd")]
        assert "style=dotted" in back and draw.BACKWARD_CONTEXT_COLOUR in back
        assert "constraint=false" in back and draw.CONTEXT_COLOUR not in back
        fwd = edges[(f"n_{i}_fwd", f"n_{i + 1}_fwd")]
        assert "style=dashed" in fwd and draw.CONTEXT_COLOUR in fwd
        assert draw.BACKWARD_CONTEXT_COLOUR not in fwd
    assert ("n_0_bwd", "n_1_bwd") not in edges
    ids = {n: draw.dot_id(d["layer"], d["step"]) for n, d in g.nodes(data=True)}
    data = [edges[ids[u], ids[v]] for u, v, d in g.edges(data=True) if not d["recurrent"]]
    assert len(data) > 20 and all("dotted" not in a and "dashed" not in a for a in data)
    assert "state of a later step: a kBackward layer" in src and "state of an earlier step" in src
    # the legend line appears only when such an edge is drawn
    assert "later step" not in draw.to_dot(char_rnn_graph(3))

    folded = draw.to_dot_folded(g)
    fe = dot_edges(folded)
    assert fe[("L_bwd", "L_bwd")].startswith('label="t+1"') and "dotted" in fe[("L_bwd", "L_bwd")]
    assert draw.BACKWARD_CONTEXT_COLOUR in fe[("L_bwd", "L_bwd")]
    assert fe[("L_fwd", "L_fwd")].startswith('label="t-1"') and "dashed" in fe[("L_fwd", "L_fwd")]
    assert "state of a later step" in folded
    assert ("bwd", "bwd", "t+1", -1) in draw.folded_edges(g)
    # a one-copy backward layer still gets its "t+1" loop, from the configured layers
    one = graph_from_json(graph_to_json(g))
    one.remove_edges_from([(u, v) for u, v, d in list(one.edges(data=True)) if d["recurrent"]])
    assert ("bwd", "bwd", "t+1", -1) in draw.folded_edges(one)


def test_readme_picture_job_and_first_to_last_beside_a_placed_edge():
    """docs/bidirectional.conf (the README's picture) unrolls; its first-to-last edge from
    the last step into "cat", which the backward layer's copy 0 already places, does not
    constrain the layout (it pulled step 3 next to step 0); the many-to-one read-out of
    ip, placed by nothing else, still does."""
    from engine.config import load_job
    job = load_job(ROOT / "docs" / "bidirectional.conf")
    g = unroll(job.neuralnet, Phase.TRAIN, job.name).graph
    edges = dot_edges(draw.to_dot(g))
    assert "constraint=false" in edges[("n_3_fwd", "n_0_cat")]
    assert "constraint=false" in edges[("n_3_data", "n_0_loss")]
    assert "constraint=false" not in edges[("n_0_bwd", "n_0_cat")]
    assert "style=dotted" in edges[("n_1_bwd", "n_0_bwd")]
    lstm = unroll(load_job(ROOT / "configs" / "addition-lstm.conf").neuralnet, Phase.TRAIN).graph
    assert "constraint=false" not in dot_edges(draw.to_dot(lstm))[("n_24_lstm", "n_0_ip")]


def test_shared_param_groups_get_one_colour_each():
    g = char_rnn_graph(5)
    nodes = dot_nodes(draw.to_dot(g))
    gru = {fill(nodes[f"n_{i}_gru1"]) for i in range(5)}
    ip = {fill(nodes[f"n_{i}_ip1"]) for i in range(5)}
    assert len(gru) == 1 and len(ip) == 1 and gru != ip
    # sorted group names take the palette in order: "w" (ip1) before "z_hx" (gru1)
    assert ip == {draw.PALETTE[0]} and gru == {draw.PALETTE[1]}
    assert fill(nodes["n_2_loss"]) == draw.NO_GROUP_FILL
    assert draw.group_colours(["b", "a", "", "b"]) == {"a": draw.PALETTE[0],
                                                      "b": draw.PALETTE[1],
                                                      "": draw.NO_GROUP_FILL}


def test_dot_text_is_deterministic_and_survives_json():
    g = char_rnn_graph(5)
    src = draw.to_dot(g)
    assert draw.to_dot(g) == src
    back = graph_from_json(json.loads(json.dumps(graph_to_json(g))))
    assert draw.to_dot(back) == src
    assert draw.to_dot_folded(back) == draw.to_dot_folded(g)
    # node insertion order does not matter
    shuffled = nx.DiGraph(**g.graph)
    shuffled.add_nodes_from(sorted(g.nodes(data=True), reverse=True))
    shuffled.add_edges_from(sorted(g.edges(data=True), reverse=True))
    assert draw.to_dot(shuffled) == src


def test_folded_view_one_node_per_layer():
    g = char_rnn_graph(5)
    src = draw.to_dot_folded(g)
    nodes = dot_nodes(src)
    assert sorted(nodes) == sorted(draw.dot_id(n) for n in ("data", *MULTI))
    assert nodes["L_gru1"].startswith('"gru1\\nkGRU\\n×5"')
    assert nodes["L_data"].startswith('"data\\nkCharRNN\\n×1"')
    edges = dot_edges(src)
    assert edges[("L_data", "L_onehot")].startswith('label="1:all"')
    assert edges[("L_data", "L_label")].startswith('label="1:all"')
    assert edges[("L_onehot", "L_gru1")].startswith('label="1:1"')
    assert edges[("L_gru1", "L_gru1")].startswith('label="t-1"')     # recurrence
    assert "dashed" in edges[("L_gru1", "L_gru1")]
    assert len(edges) == 7
    assert fill(nodes["L_gru1"]) == draw.PALETTE[1] and fill(nodes["L_ip1"]) == draw.PALETTE[0]


def test_short_connection_labels():
    assert draw.short_conn("kUnrollOneToOne", 0) == "1:1"
    assert draw.short_conn("kUnrollOneToOne", 2) == "1:1 shift 2"
    assert draw.short_conn("kUnrollOneToAll") == "1:all"
    assert draw.short_conn("kUnrollFirstToLast") == "first\u2192last"


def test_steps_window_keeps_those_steps_and_the_data_node():
    g = char_rnn_graph(50)
    src = draw.to_dot(g, steps=(0, 4))
    want = {"n_0_data"} | {f"n_{i}_{L}" for i in range(4) for L in MULTI}
    assert set(dot_nodes(src)) == want
    edges = dot_edges(src)
    assert all(u in want and v in want for u, v in edges)
    assert ("n_2_gru1", "n_3_gru1") in edges and ("n_3_gru1", "n_4_gru1") not in edges
    assert re.findall(r"subgraph (cluster_step_\d+)", src) == [f"cluster_step_{i}"
                                                             for i in range(4)]
    # a later window keeps the data node (step 0) but no other step-0 copy
    later = set(dot_nodes(draw.to_dot(g, steps=(10, 13))))
    assert later == {"n_0_data"} | {f"n_{i}_{L}" for i in range(10, 13) for L in MULTI}
    # colours stay those of the full picture
    assert fill(dot_nodes(src)["n_0_gru1"]) == fill(dot_nodes(draw.to_dot(g))["n_0_gru1"])


@pytest.mark.parametrize("steps", [(4, 2), (3, 3), (-1, 2), (50, 60)])
def test_bad_steps_window_is_a_value_error(steps):
    with pytest.raises(ValueError, match="steps"):
        draw.to_dot(char_rnn_graph(50), steps=steps)


def test_stats_are_appended_in_small_text():
    g = char_rnn_graph(5)
    stats = {"1#gru1": {"out": {"mean": 0.5, "std": 0.25, "max": 2.0},
                        "grad": {"mean": -1.5e-05, "std": 0.001, "max": 0.01}},
             "9#nothing": {"out": {"mean": 1}}}
    src = draw.to_dot(g, stats=stats)
    label = dot_nodes(src)["n_1_gru1"]
    assert label.startswith("<1#gru1<BR/>kGRU<BR/><FONT POINT-SIZE=")
    assert "out: mean 0.5 std 0.25 max 2" in label
    assert "grad: mean -1.5e-05 std 0.001 max 0.01" in label
    assert label.index("out:") < label.index("grad:")
    assert dot_nodes(src)["n_0_gru1"].startswith('"0#gru1\\nkGRU"')   # no stats: plain label


def test_ids_are_sanitised_and_unique():
    g = nx.DiGraph(unroll_len=2, phase="train", name="odd names")
    names = ["a-b", "a_b", "a.b", 'q"x', "a:b"]
    for name in names:
        for i in range(2):
            g.add_node(f"{i}#{name}", layer=name, step=i, type="kDummy", unroll_len=2,
                       share_group="")
    g.add_edge("0#a-b", "0#a_b", conn="kUnrollOneToOne", shift=0, recurrent=False, src_index=0)
    g.add_edge("0#a:b", "1#a:b", conn="context", shift=1, recurrent=True, src_index=-1)
    ids = {draw.dot_id(n, i) for n in names for i in range(2)}
    assert len(ids) == 10 and all(re.fullmatch(r"n_\d+_[A-Za-z0-9_]+", x) for x in ids)
    src = draw.to_dot(g)
    nodes = dot_nodes(src)
    assert set(nodes) == ids
    assert nodes[draw.dot_id('q"x', 1)].startswith(r'"1#q\"x\nkDummy"')
    if HAVE_DOT:
        import graphviz
        svg = graphviz.Source(src).pipe(format="svg").decode()
        for text in (">0#a:b<", ">1#a&#45;b<", ">1#q&quot;x<"):   # dot escapes '-' and '"'
            assert text in svg


def test_graph_without_unroll_attributes_is_refused():
    g = nx.DiGraph()
    g.add_node("0#x", layer="x")
    with pytest.raises(ValueError, match="step"):
        draw.to_dot(g)
    with pytest.raises(ValueError, match="layers"):
        draw.to_dot_folded(g)


# =============================================================== rendering
@needs_dot
def test_svg_shows_copies_types_and_five_step_clusters():
    import graphviz

    svg = graphviz.Source(draw.to_dot(char_rnn_graph(5))).pipe(format="svg").decode()
    for text in ("0#gru1", "4#loss", "kGRU", "kCharRNN", "step 4"):
        assert text in svg
    assert svg.count('class="cluster"') == 5
    assert svg.count('class="node"') == 26


def cluster_lefts(src: str) -> list[tuple[float, int]]:
    """(left x, step) of every step cluster in dot's layout, left to right."""
    import graphviz

    layout = json.loads(graphviz.Source(src).pipe(format="json"))
    found = []
    for obj in layout.get("objects", []):
        m = re.fullmatch(r"cluster_step_(\d+)", obj.get("name", ""))
        if m:
            x0, _, x1, _ = map(float, obj["bb"].split(","))
            found.append((x0, x1, int(m.group(1))))
    found.sort()
    assert all(a[1] <= b[0] for a, b in zip(found, found[1:])), "step clusters overlap"
    return [(x0, step) for x0, _, step in found]


@needs_dot
@pytest.mark.parametrize("T, steps", [(5, None), (50, (0, 4)), (50, (10, 13)), (12, None)])
def test_step_clusters_are_laid_out_left_to_right_in_order(T, steps):
    g = char_rnn_graph(T)
    lefts = cluster_lefts(draw.to_dot(g, steps=steps))
    a, b = steps or (0, T)
    assert [step for _, step in lefts] == list(range(a, b))
    # the data node sits above every step cluster
    import graphviz

    layout = json.loads(graphviz.Source(draw.to_dot(g, steps=steps)).pipe(format="json"))
    y = {o["name"]: float(o["pos"].split(",")[1]) for o in layout["objects"] if "pos" in o}
    assert all(y["n_0_data"] > y[f"n_{i}_onehot"] for i in range(a, b))


MIXED = """
name: "mixed"
neuralnet {
  unroll_len: 4
  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "t.txt" } }
  layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "enc" type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 8 }
          param { name: "wz" } }
  layer { name: "dec" type: kGRU srclayers: "enc" unroll_conn_type: kUnrollFirstToLast
          gru_conf { dim_hidden: 8 } param { name: "wz2" share_from: "wz" } }
  layer { name: "ip1" type: kInnerProduct srclayers: "dec" srclayers: "onehot"
          unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollOneToOne shift: 0 shift: 1
          innerproduct_conf { num_output: 5 } param { name: "w" } }
  layer { name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }
}
"""


def mixed_graph() -> nx.DiGraph:
    job = parse_job(MIXED, "mixed.conf")
    normalise(job, "mixed.conf")
    validate(job, "mixed.conf")
    return unroll(job.neuralnet, Phase.TRAIN, job.name, where="mixed.conf").graph


def test_cross_step_edges_tied_params_and_folded_labels():
    g = mixed_graph()
    src = draw.to_dot(g)
    edges, nodes = dot_edges(src), dot_nodes(src)
    back = edges[("n_3_enc", "n_0_dec")]          # last copy of enc -> first copy of dec
    assert 'label="first→last"' in back and "constraint=false" in back
    assert 'label="shift 1"' in edges[("n_0_onehot", "n_1_ip1")]
    assert "constraint=false" not in edges[("n_0_onehot", "n_1_ip1")]
    # dec ties its param to enc's: one group, one colour
    assert fill(nodes["n_2_dec"]) == fill(nodes["n_0_enc"]) != fill(nodes["n_0_ip1"])
    assert "wz: enc, dec" in src                   # the legend names the users
    folded = dot_edges(draw.to_dot_folded(g))
    assert folded[("L_enc", "L_dec")].startswith('label="first→last"')
    assert folded[("L_onehot", "L_ip1")].startswith('label="1:1 shift 1"')
    assert folded[("L_dec", "L_dec")].startswith('label="t-1"')


@needs_dot
@pytest.mark.parametrize("steps", [None, (0, 2), (1, 3), (2, 4)])
def test_step_clusters_in_order_with_cross_step_edges(steps):
    lefts = cluster_lefts(draw.to_dot(mixed_graph(), steps=steps))
    a, b = steps or (0, 4)
    assert [step for _, step in lefts] == list(range(a, b))


@needs_dot
def test_folded_svg():
    import graphviz

    svg = graphviz.Source(draw.to_dot_folded(char_rnn_graph(5))).pipe(format="svg").decode()
    assert svg.count('class="node"') == 6
    assert svg.count(">1:all<") == 2
    assert ">t&#45;1<" in svg or ">t-1<" in svg


# ===================================================================== CLI
def test_cli_job_file_long_unroll_with_steps(tmp_path):
    job = tmp_path / "job.conf"
    job.write_text(char_rnn_text(50))
    out = tmp_path / "window.dot"
    assert graph_cli.main([str(job), str(out), "--steps", "0:4"]) == 0
    src = out.read_text()
    want = {"n_0_data"} | {f"n_{i}_{L}" for i in range(4) for L in MULTI}
    assert set(dot_nodes(src)) == want
    assert len(dot_edges(src)) == 4 * 6 + 3


def test_cli_job_file_prints_counts(tmp_path, capsys):
    job = tmp_path / "job.conf"
    job.write_text(char_rnn_text(5))
    out = tmp_path / "net.dot"
    assert graph_cli.main([str(job), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (26 nodes, 34 edges)"
    assert graph_cli.main([str(job), str(tmp_path / "f.dot"), "--fold"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'f.dot'} (6 nodes, 7 edges)"


def test_cli_dot_output_is_the_source_only(tmp_path):
    g = char_rnn_graph(5)
    js = tmp_path / "train_net.json"
    write_graph_json(g, js)
    out = tmp_path / "net.dot"
    proc = run_cli(js, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == draw.to_dot(g)


@needs_dot
@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("png", b"\x89PNG"),
                                        ("pdf", b"%PDF")])
def test_cli_json_input_renders(tmp_path, fmt, magic):
    js = tmp_path / "train_net.json"
    write_graph_json(char_rnn_graph(5), js)
    out = tmp_path / f"net.{fmt}"
    proc = run_cli(js, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (26 nodes, 34 edges)"
    data = out.read_bytes()
    assert data.startswith(magic)
    if fmt == "svg":
        assert b"0#gru1" in data and b"kGRU" in data


@needs_dot
def test_cli_stats_file(tmp_path):
    js, stats, out = tmp_path / "g.json", tmp_path / "stats.json", tmp_path / "g.svg"
    write_graph_json(char_rnn_graph(5), js)
    stats.write_text(json.dumps({"2#ip1": {"out": {"mean": 0.125, "std": 1, "max": 3}}}))
    proc = run_cli(js, out, "--stats", stats)
    assert proc.returncode == 0, proc.stderr
    assert "out: mean 0.125 std 1 max 3" in out.read_text()


@pytest.mark.parametrize("steps, says", [("4:2", "A must be less than B"),
                                         ("abc", "is not A:B"),
                                         ("0:4:8", "is not A:B"),
                                         ("60:70", "the net has 5 steps")])
def test_cli_bad_steps(tmp_path, steps, says):
    js = tmp_path / "g.json"
    write_graph_json(char_rnn_graph(5), js)
    line = assert_one_error_line(run_cli(js, tmp_path / "g.svg", "--steps", steps))
    assert says in line
    assert not (tmp_path / "g.svg").exists()


def test_cli_input_errors(tmp_path):
    line = assert_one_error_line(run_cli(tmp_path / "missing.json", tmp_path / "x.svg"))
    assert "missing.json: no such file" in line
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    assert "not valid JSON (line 1" in assert_one_error_line(run_cli(bad, tmp_path / "x.svg"))
    notgraph = tmp_path / "list.json"
    notgraph.write_text("[1, 2]")
    assert "not a node-link graph" in assert_one_error_line(run_cli(notgraph, tmp_path / "x.svg"))
    js = tmp_path / "g.json"
    write_graph_json(char_rnn_graph(5), js)
    assert ".gif" in assert_one_error_line(run_cli(js, tmp_path / "x.gif"))
    assert "unknown phase" in assert_one_error_line(run_cli(js, tmp_path / "x.svg",
                                                            "--phase", "dev"))
    assert "holds the train net" in assert_one_error_line(run_cli(js, tmp_path / "x.svg",
                                                                  "--phase", "val"))
    assert "required" in assert_one_error_line(run_cli(js))


def test_cli_config_error_is_one_line(tmp_path, capsys):
    job = tmp_path / "job.conf"
    job.write_text(char_rnn_text(5).replace('srclayers: "ip1"', 'srclayers: "ip9"'))
    assert graph_cli.main([str(job), str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graph: ") and '"ip9"' in err[0]
    job.write_text("neuralnet { layer { name: \"a\" typ: kDummy } }")
    assert graph_cli.main([str(job), str(tmp_path / "x.svg")]) == 2
    assert re.match(r"graph: .*job\.conf:1:\d+: ", capsys.readouterr().err)


def test_cli_without_dot_writes_dot_and_exits_3(tmp_path):
    js = tmp_path / "g.json"
    g = char_rnn_graph(5)
    write_graph_json(g, js)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    out = tmp_path / "net.svg"
    # sys.executable as it is: in a virtualenv its symlink leads out of the venv, to a
    # Python without the venv's packages; PATH is not needed to start it
    proc = run_cli(js, out, env={"PATH": str(empty)})
    line = assert_one_error_line(proc, code=3)
    dot_file = tmp_path / "net.dot"
    assert not out.exists() and dot_file.read_text(encoding="utf-8") == draw.to_dot(g)
    assert "dot" in line and "missing" in line and str(dot_file) in line
    assert "apt-get install graphviz" in line and "brew install graphviz" in line


def test_main_without_dot_in_process(tmp_path, monkeypatch, capsys):
    js = tmp_path / "g.json"
    write_graph_json(char_rnn_graph(5), js)
    monkeypatch.setattr(graph_cli.shutil, "which", lambda name: None)
    assert graph_cli.main([str(js), str(tmp_path / "net.png"), "--fold"]) == 3
    assert (tmp_path / "net.dot").read_text().startswith("digraph folded {")
    assert not (tmp_path / "net.png").exists()
    assert "brew install graphviz" in capsys.readouterr().err


SHIPPED = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.conf"))


@pytest.mark.parametrize("conf", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_renders(tmp_path, conf):
    """Each shipped job, unrolled (first steps) and folded, through the CLI."""
    from engine.config import load_job
    from engine.workspace import phases_of

    phase = phases_of(load_job(conf))[0].label
    for extra, name in (([], "unrolled"), (["--fold"], "folded")):
        suffix = ".svg" if shutil.which("dot") else ".dot"
        out = tmp_path / f"{name}{suffix}"
        args = [str(conf), str(out), "--phase", phase] + extra
        if not extra:
            args += ["--steps", "0:3"]
        r = subprocess.run([sys.executable, "tools/graph.py", *args], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        text = out.read_text()
        for layer in load_job(conf).neuralnet.layer:
            if extra:  # folded: every configured layer once
                assert layer.name in text
            elif layer.unroll_len > 1:  # steps 0..2 of every unrolled layer
                assert f"0#{layer.name}" in text and f"2#{layer.name}" in text


# ================================================= issue 21: patterns drawn as documented
BRIDGE = """
name: "bridge"
neuralnet {
  unroll_len: 5
  layer { name: "src" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "s.txt" } }
  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "t.txt" } }
  layer { name: "onehot" type: kOneHot unroll_len: 6 srclayers: "src" unroll_conn_type: kUnrollOneToAll }
  layer { name: "enc" type: kGRU unroll_len: 6 srclayers: "onehot" gru_conf { dim_hidden: 8 } }
  layer { name: "bridge" type: kInnerProduct unroll_len: 1 srclayers: "enc"
          unroll_conn_type: kUnrollFirstToLast innerproduct_conf { num_output: 8 } }
  layer { name: "dec" type: kGRU srclayers: "bridge" unroll_conn_type: kUnrollOneToAll
          gru_conf { dim_hidden: 8 } }
  layer { name: "ip" type: kInnerProduct srclayers: "dec" innerproduct_conf { num_output: 5 } }
  layer { name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "label" }
}
"""


def graph_of(text: str, name: str = "t.conf") -> nx.DiGraph:
    job = parse_job(text, name)
    normalise(job, name)
    validate(job, name)
    return unroll(job.neuralnet, Phase.TRAIN, job.name, where=name).graph


def shipped_graph(conf: str, phase=Phase.TRAIN) -> nx.DiGraph:
    from engine.config import load_job
    job = load_job(ROOT / "configs" / conf)
    return unroll(job.neuralnet, phase, job.name).graph


def test_a_decoder_runs_after_the_encoder_it_reads():
    """Its step t is column T_enc + t, directly (first-to-last) or through a one-copy bridge;
    the first→last edge then runs left to right and constrains the layout like any other."""
    g = shipped_graph("encoder-decoder.conf")
    col = draw.columns(g)
    assert [col[f"{t}#encoder"] for t in range(6)] == list(range(6))
    assert [col[f"{t}#decoder"] for t in range(6)] == list(range(6, 12))
    assert col["0#dec_data"] == col["0#loss"] == 6       # the decoder's inputs and outputs too
    edges = dot_edges(draw.to_dot(g))
    assert "constraint=false" not in edges[("n_5_encoder", "n_0_decoder")]
    col = draw.columns(graph_of(BRIDGE))
    assert [col[f"{t}#dec"] for t in range(5)] == list(range(6, 11))
    assert col["0#onehot"] == 0 and col["5#enc"] == 5
    # a synced net keeps one column per step
    assert set(draw.columns(char_rnn_graph(5)).values()) == set(range(5))


@needs_dot
@pytest.mark.parametrize("conf,steps", [
    ("addition-bilstm.conf", (50, 55)), ("addition-bilstm.conf", (15, 20)),
    ("encoder-decoder.conf", None), ("many-to-one.conf", None), ("one-to-many.conf", None),
    ("count-ones.conf", None)])
def test_shipped_pictures_put_their_columns_in_time_order(conf, steps):
    g = shipped_graph(conf)
    found = [step for _, step in cluster_lefts(draw.to_dot(g, steps=steps))]
    assert found == sorted(found) and len(found) == len(set(found))
    if steps is None:
        assert found == sorted(set(draw.columns(g).values()))


@needs_dot
def test_bridge_picture_columns_in_time_order():
    found = [step for _, step in cluster_lefts(draw.to_dot(graph_of(BRIDGE)))]
    assert found == list(range(11))


def test_one_copy_nodes_say_what_their_edges_do():
    g = shipped_graph("one-to-many.conf")
    src = draw.to_dot(g)
    nodes, edges = dot_nodes(src), dot_edges(src)
    assert "→ gru: step 0\\n→ loss: every step" in nodes["n_0_data"]
    assert "all steps" not in src
    assert 'label="first step only"' in edges[("n_0_data", "n_0_gru")]
    # the label edges to every loss copy are kept, routed quietly
    for t in range(5):
        quiet = edges[("n_0_data", f"n_{t}_loss")]
        assert "weight=0" in quiet and "penwidth=0.6" in quiet and "label" not in quiet
    m2o = dot_nodes(draw.to_dot(shipped_graph("many-to-one.conf")))
    assert "← gru: step 23" in m2o["n_0_ip"]


def test_the_sampling_net_draws_its_feedback_edge_and_no_false_self_loop():
    g = shipped_graph("char-rnn-sample.conf", Phase.TEST)
    dummy = next(lay for lay in g.graph["layers"] if lay["type"] == "kRNNDummy")
    argsort = next(lay for lay in g.graph["layers"] if lay["type"] == "kArgSort")
    edges = {(a, b): (label, off) for a, b, label, off in draw.folded_edges(g)}
    assert (dummy["name"], dummy["name"]) not in edges
    assert edges[(argsort["name"], dummy["name"])] == ("t-1", 1)
    folded = dot_edges(draw.to_dot_folded(g))
    assert (draw.dot_id(argsort["name"]), draw.dot_id(dummy["name"])) in folded
