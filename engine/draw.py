"""DOT source of an unrolled net: pure functions, no rendering, no files.

    to_dot(g, steps=None, title=None, stats=None) -> str   one node per copy ``i#name``
    to_dot_folded(g, title=None) -> str                    one node per configured layer

``g`` is the networkx DiGraph built by ``engine.unroll.unroll`` (or read back
with ``engine.unroll.graph_from_json``); its node, edge and graph attributes
are described in that module's docstring. Rendering (``graphviz.Source``) and
writing belong to the caller (``tools/graph.py``).

The unrolled picture (top to bottom, steps side by side from left to right):

* every time column c is a cluster ``cluster_step_<c>`` labelled "step c"
  holding the copies of the layers with more than one copy that run at time c
  (``columns``): copy i#L sits in column offset(L) + i, where a layer that
  starts from another one's last copy (first-to-last, directly or through
  single-copy layers: encoder → decoder, the delayed many-to-many) runs after
  it, so a decoder's step t is drawn in column T_enc + t. Copies of
  single-copy layers (``unroll_len`` 1, e.g. the data layer) stand outside
  the clusters, drawn with a double border and a line per layer they feed
  saying which steps ("→ gru: step 0", "→ loss: every step");
* data edges are solid black (one-to-all edges thin and grey, routed
  quietly; first-to-last, one-to-first and all-to-one edges blue and
  labelled); context edges (``recurrent`` True: a copy reading an
  earlier copy's state) are dashed red with ``constraint=false``, so they
  run sideways between steps instead of pushing ranks down; context edges
  from a later copy (offset < 0: a ``direction: kBackward`` layer reading
  copy i+1) are dotted purple and thicker, so the two directions of a
  bidirectional layer tell apart at a glance;
* every shared-param group (node attribute ``share_group``, "" = none) gets
  one fill colour from ``PALETTE``: colour k goes to the k-th group in sorted
  order among all groups of ``g``, so a step window keeps the colours of the
  full picture; layers without params are white. The graph label carries the
  title and a legend of the groups.

Layout: top to bottom along the data flow, the data layer on the top rank,
the copies of a layer on one row, and the step clusters kept in step order
from left to right by a chain of invisible anchors under them (dot does not
order clusters by itself) and a second chain of anchors on the top rank,
each pointing at its step's first node. Data edges that run backwards in time
(first-to-last) get ``constraint=false`` too, and so does a first-to-last edge
from a step into a single-copy layer that another data edge already places
(the last step's state read beside the first step's, as a bidirectional read-out
does), which would otherwise pull the last step's cluster out of order.

Node ids are sanitised (``n_3_gru1``; names with other characters than
letters, digits and ``_`` get a hash suffix so ids stay unique) and the
display name ``3#gru1`` goes into ``label=``. All output is sorted, so equal
graphs give equal text.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re

import networkx as nx

__all__ = ["PALETTE", "CONN_SHORT", "to_dot", "to_dot_folded", "visible_subgraph",
           "folded_edges", "group_colours", "dot_id", "short_conn", "columns"]

#: fill colours of the shared-param groups (ColorBrewer Set3, then Pastel1), in order
PALETTE = (
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462",
    "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f", "#decbe4",
)
NO_GROUP_FILL = "#ffffff"
CONTEXT_COLOUR = "#d62728"
BACKWARD_CONTEXT_COLOUR = "#9467bd"
ONE_TO_ALL_COLOUR = "#7f7f7f"
FIRST_TO_LAST_COLOUR = "#1f77b4"
QUIET_COLOUR = "#c7c7c7"

#: short edge labels of the connection types
CONN_SHORT = {"kUnrollOneToOne": "1:1", "kUnrollOneToAll": "1:all",
              "kUnrollFirstToLast": "first\u2192last", "kUnrollOneToFirst": "first step only",
              "kUnrollAllToOne": "all\u2192one"}

_NODE_KEYS = ("layer", "step", "type", "unroll_len")
_SAFE = re.compile(r"[A-Za-z0-9_]+")


# ------------------------------------------------------------------ helpers
def _safe(name: str) -> str:
    """``name`` if it is a plain identifier part, else a sanitised form with a hash suffix."""
    if _SAFE.fullmatch(name):
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + "_x" + digest


def dot_id(layer: str, step: int | None = None) -> str:
    """DOT id of copy ``step`` of ``layer`` (``n_3_gru1``), or of the folded layer (``L_gru1``)."""
    if step is None:
        return f"L_{_safe(layer)}"
    return f"n_{int(step)}_{_safe(layer)}"


def _q(text: str) -> str:
    """A double-quoted DOT string showing ``text`` literally."""
    text = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _lines(*parts: str) -> str:
    """A quoted DOT label of several centred lines."""
    return _q("\n".join(parts))


def _h(text) -> str:
    """Escape text for a Graphviz HTML-like label."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("\n", "<BR/>"))


def _attrs(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def short_conn(conn: str, shift: int = 0) -> str:
    """Short label of a connection type: "1:1", "1:1 shift 2", "1:all", "first→last"."""
    label = CONN_SHORT.get(conn, conn)
    if conn == "kUnrollOneToOne" and shift:
        label += f" shift {shift}"
    return label


def _offset_label(off: int) -> str:
    return f"t-{off}" if off >= 0 else f"t+{-off}"


def group_colours(groups) -> dict[str, str]:
    """Shared-param group -> fill colour: the k-th group in sorted order gets PALETTE[k]
    (cycling); "" (no params) is white."""
    named = sorted({grp for grp in groups if grp})
    colours = {grp: PALETTE[k % len(PALETTE)] for k, grp in enumerate(named)}
    colours[""] = NO_GROUP_FILL
    return colours


def _check_nodes(g: nx.DiGraph) -> None:
    for n, d in g.nodes(data=True):
        missing = [k for k in _NODE_KEYS if k not in d]
        if missing:
            raise ValueError(f'node "{n}" has no {", ".join(missing)} attribute; the graph must '
                             f"come from engine.unroll.unroll or write_graph_json")


def _layer_order(g: nx.DiGraph) -> dict[str, int]:
    """Layer name -> its position in the configured layers (file order), else after them."""
    order = {}
    for k, lay in enumerate(g.graph.get("layers") or []):
        order.setdefault(lay["name"], k)
    return order


def _node_key(g: nx.DiGraph, order: dict[str, int]):
    def key(n):
        d = g.nodes[n]
        return (int(d["step"]), order.get(d["layer"], len(order)), d["layer"])
    return key


def _net_len(g: nx.DiGraph) -> int:
    lens = [int(d["unroll_len"]) for _, d in g.nodes(data=True)]
    return max(lens, default=int(g.graph.get("unroll_len") or 1))


# ----------------------------------------------------------------- columns
def columns(g: nx.DiGraph) -> dict[str, int]:
    """The time column of every copy of a multi-copy layer: offset(L) + step.

    Layers joined by data edges other than first-to-last (one-to-one, one-to-all,
    ...) run in step and share an offset. A layer reached from another layer's copy
    through a first-to-last edge, directly or through single-copy layers (a bridge),
    runs after that copy: its offset is at least that copy's column + 1 (the decoder of
    an encoder of T steps starts in column T). A constraint of a layer on itself is
    ignored (nets that mix both directions stay in step)."""
    multi = {n for n, d in g.nodes(data=True) if int(d["unroll_len"]) > 1}
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    data_edges = [(u, v, d) for u, v, d in g.edges(data=True) if not d.get("recurrent")]
    for u, v, d in data_edges:
        if u in multi and v in multi and d.get("conn") != "kUnrollFirstToLast":
            parent[find(g.nodes[u]["layer"])] = find(g.nodes[v]["layer"])
    comp = {n: find(g.nodes[n]["layer"]) for n in multi}
    offset = dict.fromkeys(comp.values(), 0)
    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes)
    dag.add_edges_from((u, v) for u, v, _ in data_edges)
    topo = list(nx.topological_sort(dag))
    for _ in range(len(offset) + 2):
        ready: dict[str, int] = {}
        changed = False
        for n in topo:
            if n in multi:
                c = comp[n]
                for p in g.predecessors(n):
                    d = g.edges[p, n]
                    if d.get("recurrent"):
                        continue
                    need = 0
                    if p in multi and comp[p] != c and d.get("conn") == "kUnrollFirstToLast":
                        need = offset[comp[p]] + int(g.nodes[p]["step"]) + 1
                    elif p not in multi and ready.get(p, 0) > 0 and \
                            not any(comp.get(q) == c for q in nx.ancestors(dag, p)):
                        need = ready[p]
                    if need > offset[c]:
                        offset[c], changed = need, True
            else:
                r = 0
                for p in dag.predecessors(n):
                    r = max(r, offset[comp[p]] + int(g.nodes[p]["step"]) + 1 if p in multi
                            else ready.get(p, 0))
                ready[n] = r
        if not changed:
            break
    return {n: offset[comp[n]] + int(g.nodes[n]["step"]) for n in multi}


def _single_lines(g: nx.DiGraph, n: str, order: dict[str, int]) -> list[str]:
    """What a single-copy node does, one line per multi-copy layer it feeds or reads:
    "→ gru: step 0", "→ loss: every step", "← lstm: step 24"."""
    def describe(arrow, nodes):
        lines = []
        by_layer: dict[str, set] = {}
        for m in nodes:
            d = g.nodes[m]
            if int(d["unroll_len"]) > 1:
                by_layer.setdefault(d["layer"], set()).add(int(d["step"]))
        for layer in sorted(by_layer, key=lambda x: (order.get(x, len(order)), x)):
            steps = sorted(by_layer[layer])
            T = next(int(g.nodes[m]["unroll_len"]) for m in nodes if g.nodes[m]["layer"] == layer)
            what = ("every step" if len(steps) == T else
                    "step " + ", ".join(map(str, steps)) if len(steps) <= 3 else
                    f"steps {steps[0]}..{steps[-1]}")
            lines.append(f"{arrow} {layer}: {what}")
        return lines

    data = [(u, v) for u, v, d in g.in_edges(n, data=True) if not d.get("recurrent")]
    outs = [(u, v) for u, v, d in g.out_edges(n, data=True) if not d.get("recurrent")]
    return describe("\u2190", [u for u, _ in data]) + describe("\u2192", [v for _, v in outs])


# ----------------------------------------------------------- node selection
def visible_subgraph(g: nx.DiGraph, steps: tuple[int, int] | None = None) -> nx.DiGraph:
    """The part of ``g`` that ``to_dot(g, steps)`` draws (a subgraph view).

    Without ``steps``: all of ``g``. With ``steps=(a, b)``: the copies of
    multi-copy layers whose step is in [a, b), plus the copies of single-copy
    layers (``unroll_len`` 1) connected to them, directly or through other
    single-copy layers; edges between kept nodes only. Raises ValueError for
    an empty or negative window or one past the last step.
    """
    _check_nodes(g)
    if steps is None:
        return g.subgraph(g.nodes)
    try:
        a, b = (int(s) for s in steps)
    except (TypeError, ValueError):
        raise ValueError(f"steps must be a pair of integers (a, b), got {steps!r}") from None
    T = _net_len(g)
    if a < 0 or b <= a:
        raise ValueError(f"steps {a}:{b} select nothing; use A:B with 0 <= A < B "
                         f"(steps A..B-1 are drawn)")
    if a >= T:
        raise ValueError(f"steps {a}:{b} start after the last step; the net has {T} "
                         f"step{'s' if T != 1 else ''} (0..{T - 1})")
    single = {n for n, d in g.nodes(data=True) if int(d["unroll_len"]) == 1}
    if len(single) == g.number_of_nodes():      # no multi-copy layer: everything is step 0
        return g.subgraph(n for n in g.nodes if a <= int(g.nodes[n]["step"]) < b)
    core = {n for n, d in g.nodes(data=True)
            if n not in single and a <= int(d["step"]) < b}
    kept = set(core)
    frontier = list(core)
    while frontier:        # single-copy nodes connected to kept nodes, transitively
        n = frontier.pop()
        for m in list(g.predecessors(n)) + list(g.successors(n)):
            if m in single and m not in kept:
                kept.add(m)
                frontier.append(m)
    return g.subgraph(kept)


# --------------------------------------------------------------- unrolled
def _fmt(v) -> str:
    """A statistic in 3 significant digits (numpy scalars too); anything else as str."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return str(v)
    v = float(v)
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _stats_lines(entry: dict) -> list[str]:
    """``{"out": {"mean": .., "std": .., "max": ..}, "grad": {...}}`` -> text lines."""
    lines = []
    first = [k for k in ("out", "grad") if k in entry]
    for kind in first + sorted(k for k in entry if k not in ("out", "grad")):
        vals = entry[kind]
        if isinstance(vals, dict):
            keys = [k for k in ("mean", "std", "max") if k in vals]
            keys += sorted(k for k in vals if k not in ("mean", "std", "max"))
            body = " ".join(f"{k} {_fmt(vals[k])}" for k in keys)
        else:
            body = _fmt(vals)
        lines.append(f"{kind}: {body}")
    return lines


def _node_label(nid: str, d: dict, single, stats_entry) -> str:
    """``single``: None for a copy in a step column, else the lines saying what the one copy
    of a single-copy layer reads and feeds."""
    lines = [nid, d["type"]]
    if single is not None:
        lines += single or ["one copy"]
    if not stats_entry:
        return _lines(*lines)
    small = "<BR/>".join(_h(s) for s in _stats_lines(stats_entry))
    return ("<" + "<BR/>".join(_h(s) for s in lines)
            + f'<BR/><FONT POINT-SIZE="8">{small}</FONT>>')


def _graph_label(title: str, colours: dict[str, str], users: dict[str, list],
                 context: bool, backward_context: bool = False) -> str:
    """HTML graph label: the title, then the shared-param legend (each group's
    colour, name and the layers using it) and the edge legend (a line per kind of
    context edge drawn: from an earlier step, from a later step)."""
    rows = [f'<TR><TD COLSPAN="2"><B>{_h(title)}</B></TD></TR>']
    named = [grp for grp in sorted(colours) if grp]
    if named:
        cells = "".join(f'<TD BGCOLOR="{colours[grp]}" BORDER="1">{_h(grp)}: '
                        f'{_h(", ".join(users.get(grp, [])))}</TD>' for grp in named)
        rows.append(f'<TR><TD ALIGN="RIGHT">shared params:</TD><TD><TABLE BORDER="0" '
                    f'CELLSPACING="2" CELLPADDING="2"><TR>{cells}</TR></TABLE></TD></TR>')
    if context:
        rows.append(f'<TR><TD COLSPAN="2"><FONT COLOR="{CONTEXT_COLOUR}">- - -&gt; context '
                    f'(state of an earlier step)</FONT></TD></TR>')
    if backward_context:
        rows.append(f'<TR><TD COLSPAN="2"><FONT COLOR="{BACKWARD_CONTEXT_COLOUR}">&#183; &#183; '
                    f'&#183;&gt; context (state of a later step: a kBackward layer)</FONT>'
                    f'</TD></TR>')
    return '<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"


def _group_users(layers, order: dict[str, int]) -> dict[str, list]:
    """Shared-param group -> names of the layers using it, in file order."""
    users: dict[str, set] = {}
    for name, grp in layers:
        if grp:
            users.setdefault(grp, set()).add(name)
    return {grp: sorted(names, key=lambda n: (order.get(n, len(order)), n))
            for grp, names in users.items()}


def _default_title(g: nx.DiGraph, steps) -> str:
    name = g.graph.get("name") or "net"
    phase = g.graph.get("phase")
    title = f"{name}: {phase + ' net, ' if phase else ''}unroll_len {_net_len(g)}"
    if steps is not None:
        title += f", steps {int(steps[0])}..{min(int(steps[1]), _net_len(g)) - 1}"
    return title


def _is_backward_context(d: dict) -> bool:
    """A context edge from a later copy (offset < 0: a kBackward layer)."""
    return bool(d.get("recurrent")) and int(d.get("shift", 1)) < 0


def _edge_attrs(d: dict, backwards: bool, quiet: bool = False) -> dict:
    """Style of one edge; ``backwards``: a data edge from a later step to an earlier one
    (first-to-last), which must not pull the later step's cluster to the left; ``quiet``:
    a one-to-all edge into a loss (labels), drawn thin and without pull on the layout."""
    if _is_backward_context(d):
        return {"style": "dotted", "color": _q(BACKWARD_CONTEXT_COLOUR), "penwidth": "2",
                "constraint": "false"}
    if d.get("recurrent"):
        return {"style": "dashed", "color": _q(CONTEXT_COLOUR), "penwidth": "1.5",
                "constraint": "false"}
    conn = d.get("conn", "kUnrollOneToOne")
    a = {}
    if conn == "kUnrollOneToAll":
        a = {"color": _q(ONE_TO_ALL_COLOUR)}
        if quiet:
            a.update({"color": _q(QUIET_COLOUR), "penwidth": "0.6", "arrowsize": "0.4",
                      "weight": "0"})
    elif conn in ("kUnrollFirstToLast", "kUnrollOneToFirst", "kUnrollAllToOne"):
        a = {"color": _q(FIRST_TO_LAST_COLOUR), "fontcolor": _q(FIRST_TO_LAST_COLOUR),
             "label": _q(short_conn(conn)), "fontsize": "9"}
    elif conn == "kUnrollOneToOne" and d.get("shift"):
        a = {"label": _q(f"shift {int(d['shift'])}"), "fontsize": "9"}
    if backwards:
        a["constraint"] = "false"
    return a


def _data_depth(sub: nx.DiGraph) -> dict:
    """Longest path from a source to each node over data (non-context) edges."""
    data = nx.DiGraph()
    data.add_nodes_from(sub.nodes)
    data.add_edges_from((u, v) for u, v, d in sub.edges(data=True) if not d.get("recurrent"))
    depth = {}
    for n in nx.topological_sort(data):
        depth[n] = max((depth[p] + 1 for p in data.predecessors(n)), default=0)
    return depth


def _top_anchor_lines(by_step: dict, ids: dict) -> list[str]:
    """A second chain of invisible anchors on the top rank, each pointing at the first
    node of its column: with the bottom chain of ``_row_lines`` it holds every column
    between two ordered anchors (one chain alone let dot swap columns next to
    cross-step edges: 54 before 53 in a bidirectional net's last steps)."""
    if len(by_step) < 2:
        return []
    steps = sorted(by_step)
    tops = [f"step_top_{i}" for i in steps]
    lines = [f'  {a} [shape=point, style=invis, width=0, height=0, label=""];' for a in tops]
    lines.append("  { rank=min; " + " ".join(f"{a};" for a in tops) + " }")
    lines += [f"  {a} -> {b} [style=invis];" for a, b in zip(tops, tops[1:])]
    lines += [f"  {a} -> {ids[by_step[i][0]]} [style=invis, weight=10];"
              for i, a in zip(steps, tops)]
    return lines


def _row_lines(sub: nx.DiGraph, by_step: dict, ids: dict, order: dict,
               top: list) -> list[str]:
    """Layout hints that put the step clusters side by side in step order.

    dot keeps flat edges in order only between nodes outside clusters, so each
    step gets an invisible anchor on a bottom row, the anchors are chained
    left to right, and the last node of each step points (invisibly) at its
    anchor: swapping two clusters would cross those edges. The single-copy
    sources ``top`` go on the top rank. The copies of a layer share a rank
    when they sit at the same depth of the data flow (true for nets without
    cross-step data edges), so the steps line up row by row.
    """
    lines = [("  { rank=min; " + " ".join(f"{ids[n]};" for n in top) + " }")] if top else []
    if not by_step:
        return lines
    steps = sorted(by_step)
    anchors = [f"step_anchor_{i}" for i in steps]
    lines += [f'  {a} [shape=point, style=invis, width=0, height=0, label=""];' for a in anchors]
    lines.append("  { rank=max; " + " ".join(f"{a};" for a in anchors) + " }")
    lines += [f"  {a} -> {b} [style=invis];" for a, b in zip(anchors, anchors[1:])]
    lines += [f"  {ids[by_step[i][-1]]} -> {a} [style=invis, weight=0];"
              for i, a in zip(steps, anchors)]
    depth = _data_depth(sub)
    copies: dict[str, list] = {}
    for i in steps:
        for n in by_step[i]:
            copies.setdefault(sub.nodes[n]["layer"], []).append(n)
    aligned = [name for name, ns in copies.items() if len(ns) > 1
               and len({depth[n] for n in ns}) == 1]
    aligned.sort(key=lambda name: (order.get(name, len(order)), name))
    lines += ["  { rank=same; " + " ".join(f"{ids[n]};" for n in copies[name]) + " }"
              for name in aligned]
    return lines


def to_dot(g: nx.DiGraph, steps: tuple[int, int] | None = None, title: str | None = None,
           stats: dict | None = None) -> str:
    """DOT source of the unrolled net ``g``, one node per copy ``i#name``.

    steps: ``(a, b)`` draws only steps a..b-1 (see ``visible_subgraph``).
    title: graph label; by default "<job>: <phase> net, unroll_len T[, steps a..b-1]".
    stats: node id (``i#name``) -> ``{"out": {"mean", "std", "max"}, "grad": {...}}``,
        appended to the node's label in small text.
    Raises ValueError for nodes without the unroll attributes or a bad ``steps``.
    """
    sub = visible_subgraph(g, steps)
    colours = group_colours(d.get("share_group", "") for _, d in g.nodes(data=True))
    order = _layer_order(g)
    key = _node_key(g, order)
    stats = stats or {}
    if title is None:
        title = _default_title(g, steps)
    ids = {n: dot_id(d["layer"], d["step"]) for n, d in sub.nodes(data=True)}
    users = _group_users(((d["layer"], d.get("share_group", "")) for _, d in g.nodes(data=True)),
                         order)

    has_context = any(d.get("recurrent") and not _is_backward_context(d)
                      for _, _, d in sub.edges(data=True))
    has_backward = any(_is_backward_context(d) for _, _, d in sub.edges(data=True))
    graph_attrs = {"rankdir": "TB", "newrank": "true", "labelloc": "t", "fontname": "Helvetica",
                   "nodesep": "0.25", "ranksep": "0.45",
                   "label": _graph_label(title, colours, users, has_context, has_backward)}
    out = [
        "digraph unrolled {",
        f"  graph [{_attrs(graph_attrs)}];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, '
        'height=0.4];',
        '  edge [fontname="Helvetica", arrowsize=0.7];',
    ]

    T = _net_len(g)
    col = columns(g)
    nodes = sorted(sub.nodes, key=lambda n: (col.get(n, int(sub.nodes[n]["step"])),) + key(n))
    # copies of single-copy layers stand outside the step clusters
    singles = {n for n in nodes if int(sub.nodes[n]["unroll_len"]) == 1 and T > 1}

    def node_line(n, indent):
        d = sub.nodes[n]
        single = n in singles
        a = {"label": _node_label(n, d, _single_lines(g, n, order) if single else None,
                                  stats.get(n)),
             "fillcolor": _q(colours.get(d.get("share_group", ""), NO_GROUP_FILL)),
             "tooltip": _q(f"{n}: {d['type']}, share group "
                           f"{d.get('share_group') or '(none)'}")}
        if single:
            a["peripheries"] = "2"
        return f"{indent}{ids[n]} [{_attrs(a)}];"

    by_step: dict[int, list] = {}
    for n in nodes:
        if n not in singles:
            by_step.setdefault(col.get(n, int(sub.nodes[n]["step"])), []).append(n)
    for n in nodes:
        if n in singles:
            out.append(node_line(n, "  "))
    for i in sorted(by_step):
        out.append(f"  subgraph cluster_step_{i} {{")
        out.append(f'    label="step {i}"; labeljust=l; style="rounded,dashed"; '
                   f'color="#999999"; fontsize=10;')
        for n in by_step[i]:
            out.append(node_line(n, "    "))
        out.append("  }")
    # single-copy sources (data layers) go on the top rank
    out.extend(_row_lines(sub, by_step, ids, order,
                          top=[n for n in nodes if n in singles and sub.in_degree(n) == 0]))
    out.extend(_top_anchor_lines(by_step, ids))
    def placed(v, u):
        """``v`` has a constraining data edge besides the one from ``u``."""
        return any(w != u and not d.get("recurrent") and d.get("conn") != "kUnrollFirstToLast"
                   for w, _, d in sub.in_edges(v, data=True))

    for u, v in sorted(sub.edges, key=lambda e: (key(e[0]), key(e[1]))):
        du, dv = sub.nodes[u], sub.nodes[v]
        backwards = (u not in singles and v not in singles
                     and col.get(u, int(du["step"])) > col.get(v, int(dv["step"])))
        if u not in singles and v in singles and \
                sub.edges[u, v].get("conn") == "kUnrollFirstToLast" and placed(v, u):
            backwards = True
        if u not in singles and v in singles and any(
                w not in singles and col.get(w, 0) > col.get(u, 0) for w in sub.successors(v)):
            backwards = True  # into a bridge that feeds later columns: it hangs from those
        d = sub.edges[u, v]
        quiet = u in singles and v not in singles and dv["type"].endswith("Loss")
        a = _edge_attrs(d, backwards, quiet)
        if d.get("conn") == "kUnrollAllToOne" and int(du["step"]) != 0:
            a.pop("label", None)  # one label for the bundle
        out.append(f"  {ids[u]} -> {ids[v]}" + (f" [{_attrs(a)}]" if a else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- folded
def folded_edges(g: nx.DiGraph) -> list[tuple[str, str, str, int]]:
    """Edges of the folded picture, sorted: (src layer, layer, label, context), where
    ``context`` is 0 for a data edge and the context offset d for a context edge (truthy).

    Data edges come from ``g.graph["layers"]`` (label: ``short_conn``); context
    edges from the recurrent edges of ``g`` (label "t-d", or "t+1" for d = -1), plus, for
    every layer flagged recurrent, an edge from each (layer, offset) its ``context`` lists
    that the copies do not show (e.g. one copy): a self-loop for its own state, the
    feedback edge for a kRNNDummy fed from another layer (kArgSort -> kRNNDummy, "t-1");
    graphs written before that attribute: a "t-1" self-loop.
    """
    layers = g.graph.get("layers")
    if not layers:
        raise ValueError('the graph has no "layers" attribute (the configured layers); '
                         "unroll the job again with engine.unroll.unroll")
    names = {lay["name"] for lay in layers}
    edges = set()
    for lay in layers:
        for src in lay.get("srclayers", []):
            sname, conn, shift = src[0], src[1], int(src[2]) if len(src) > 2 else 0
            if sname not in names:
                raise ValueError(f'layer "{lay["name"]}" reads "{sname}", which is not one of '
                                 f"the graph's layers")
            edges.add((sname, lay["name"], short_conn(conn, shift), 0))
    context = {}
    for u, v, d in g.edges(data=True):
        if d.get("recurrent"):
            lu, lv = g.nodes[u].get("layer", u), g.nodes[v].get("layer", v)
            context.setdefault((lu, lv), set()).add(int(d.get("shift", 1)))
    for lay in layers:
        if not lay.get("recurrent"):
            continue
        listed = lay.get("context")
        if listed is None:  # written before the attribute existed
            listed = [[lay["name"], 1]]
        for name, off in listed:
            if (name, lay["name"]) not in context and name in names:
                context[(name, lay["name"])] = {int(off)}
    for (lu, lv), offs in context.items():
        for off in offs:
            edges.add((lu, lv, _offset_label(off), int(off)))
    order = {lay["name"]: k for k, lay in enumerate(layers)}
    return sorted(edges, key=lambda e: (order.get(e[0], len(order)), order.get(e[1], len(order)),
                                        e[2], e[3]))


def to_dot_folded(g: nx.DiGraph, title: str | None = None) -> str:
    """DOT source of the net as configured: one node per layer ("name", type, "×T"),
    edges labelled with their connection type, recurrent layers with a "t-1" self-loop
    (dashed red), kBackward ones with a "t+1" self-loop (dotted purple)."""
    edges = folded_edges(g)
    layers = g.graph["layers"]
    colours = group_colours(lay.get("share_group", "") for lay in layers)
    users = _group_users(((lay["name"], lay.get("share_group", "")) for lay in layers),
                         _layer_order(g))
    if title is None:
        name = g.graph.get("name") or "net"
        phase = g.graph.get("phase")
        title = f"{name}: {phase + ' net' if phase else 'net'} as configured"
    graph_attrs = {"rankdir": "TB", "labelloc": "t", "fontname": "Helvetica",
                   "label": _graph_label(title, colours, users, any(e[3] > 0 for e in edges),
                                         any(e[3] < 0 for e in edges))}
    out = [
        "digraph folded {",
        f"  graph [{_attrs(graph_attrs)}];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.7];',
    ]
    for lay in layers:
        grp = lay.get("share_group", "")
        a = {"label": _lines(lay["name"], lay["type"], f"\u00d7{int(lay['unroll_len'])}"),
             "fillcolor": _q(colours.get(grp, NO_GROUP_FILL)),
             "tooltip": _q(f"{lay['name']}: {lay['type']}, share group {grp or '(none)'}")}
        out.append(f"  {dot_id(lay['name'])} [{_attrs(a)}];")
    for src, dst, label, off in edges:
        a = {"label": _q(label)}
        if off < 0:
            a.update({"style": "dotted", "color": _q(BACKWARD_CONTEXT_COLOUR), "penwidth": "2",
                      "fontcolor": _q(BACKWARD_CONTEXT_COLOUR), "constraint": "false"})
        elif off:
            a.update({"style": "dashed", "color": _q(CONTEXT_COLOUR),
                      "fontcolor": _q(CONTEXT_COLOUR), "constraint": "false"})
        out.append(f"  {dot_id(src)} -> {dot_id(dst)} [{_attrs(a)}];")
    out.append("}")
    return "\n".join(out) + "\n"
