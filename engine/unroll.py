"""Unrolling: a pure function from a validated NetProto and a phase to an explicit graph.

    u = unroll(net, Phase.TRAIN)
    u.graph      networkx.DiGraph, one node per copy ``i#name``
    u.netproto   the unrolled NetProto (built on first access)

Node attributes: ``layer`` (origin layer name), ``step`` (copy index i),
``type`` (LayerType name, e.g. "kGRU"), ``unroll_len`` (copies of the origin
layer), ``share_group`` (name of the param that owns the node's first param,
"" for layers without params).

Node attribute ``zeros`` (only where non-empty): the source indices this copy reads
as zeros (no edge: the other copies of a kUnrollOneToFirst reader).

Edge attributes: ``conn`` ("kUnrollOneToOne", "kUnrollOneToAll",
"kUnrollFirstToLast", "kUnrollOneToFirst", "kUnrollAllToOne", or "context" for a layer's
own recurrence),
``shift`` (one-to-one offset; the context offset for context edges),
``recurrent`` (True for context edges, which cross time steps),
``src_index`` (position of the source among the layer's srclayers; -1 for
context edges).

Graph attributes: ``phase`` ("train", "val", "test"), ``unroll_len`` (the
net's), ``name`` (job name, when given) and ``layers``: the configured layers
as written (name, type, unroll_len, srclayers with their connection type and
shift, recurrent flag, ``context``: the [layer, offset] pairs of its
context), for the folded picture.

Semantics (JOBCONF.md, "Unrolling"): for srclayer S of L at position k,
kUnrollOneToOne with shift s connects (i-s)#S -> i#L; kUnrollOneToAll connects
every copy of S to every copy of L; kUnrollFirstToLast connects the last copy
of S to 0#L, or to (T-1)#L when L's pass runs backwards (``reverse_pass``: a
kBackward recurrent layer starts at its last copy, which takes the initial
state); kUnrollOneToFirst (an extension: Karpathy's one-to-many, one input then a
sequence of outputs) connects the last copy of S to 0#L as a data input (never
an initial state), and copies 1.. of L read zeros in its place (node attribute
``zeros``); kUnrollAllToOne (an extension: "flatten the time steps into one dense
layer") connects every copy of S to the one copy of L, which reads them as one input,
joined along the first feature axis in time order (copy 0's features first). A layer class whose ``context_sources(conf)`` lists (M, d) reads
(i-d)#M as context (recurrent layers: (L, 1); kBackward ones (L, -1), i.e.
(i+1)#L -> i#L). The unroller never tests a layer's type name: recurrence is
the class's declaration.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import networkx as nx

from engine.config import ConfigError, Phase, layers_in_phase, type_name
from engine.layers import layer_class
from engine.proto import job_pb2 as pb

CONN_NAMES = {pb.kUnrollOneToOne: "kUnrollOneToOne", pb.kUnrollOneToAll: "kUnrollOneToAll",
              pb.kUnrollFirstToLast: "kUnrollFirstToLast", pb.kUnrollOneToFirst: "kUnrollOneToFirst",
              pb.kUnrollAllToOne: "kUnrollAllToOne"}


def node_id(step: int, layer: str) -> str:
    """The id (and label) of copy ``step`` of ``layer``: ``step#layer``."""
    return f"{step}#{layer}"


def _conn_of(layer: pb.LayerProto, k: int) -> tuple[int, int]:
    """(connection type, shift) of srclayer k, as ``config.normalise`` filled them."""
    return layer.unroll_conn_type[k], layer.shift[k]


def _check_normalised(layer: pb.LayerProto) -> None:
    n = len(layer.srclayers)
    if len(layer.unroll_conn_type) != n or len(layer.shift) != n:
        raise ConfigError(f'layer "{layer.name}": {n} srclayers but {len(layer.unroll_conn_type)} '
                          f"unroll_conn_type and {len(layer.shift)} shift entries; pass the job "
                          f"through engine.config.normalise before unrolling")


def _share_owner(layer: pb.LayerProto, has_params: bool) -> str:
    if layer.param:
        p = layer.param[0]
        return p.share_from or p.name or f"{layer.name}/0"
    return layer.name if has_params else ""


@dataclass
class Unrolled:
    """The result of unrolling one phase of a net."""

    net: pb.NetProto
    phase: Phase
    graph: nx.DiGraph
    layers: list = field(default_factory=list)  # LayerProtos of the phase, file order
    _netproto: pb.NetProto | None = None

    @property
    def netproto(self) -> pb.NetProto:
        if self._netproto is None:
            self._netproto = unrolled_netproto(self)
        return self._netproto

    def conf(self, name: str) -> pb.LayerProto:
        """The one configured LayerProto a node's ``layer`` attribute refers to."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def unroll(net: pb.NetProto, phase: Phase = Phase.TRAIN, job_name: str = "",
           where: str = "<job>") -> Unrolled:
    """Unroll the layers of ``phase``. Raises ConfigError for sources missing in the
    phase, impossible one-to-one links and cycles (the cycle is printed)."""


    layers = layers_in_phase(net, phase)
    by_name = {layer.name: layer for layer in layers}
    g = nx.DiGraph(phase=phase.label, unroll_len=net.unroll_len, name=job_name)
    folded = []

    for layer in layers:
        _check_normalised(layer)
        cls = layer_class(layer.type)
        T = layer.unroll_len
        tname = type_name(layer.type)
        group = _share_owner(layer, cls is not None and cls.has_params)
        g.add_nodes_from(
            (node_id(i, layer.name),
             {"layer": layer.name, "step": i, "type": tname, "unroll_len": T, "share_group": group})
            for i in range(T))
        folded.append({
            "name": layer.name, "type": tname, "unroll_len": T, "share_group": group,
            "recurrent": bool(cls is not None and cls.context_sources(layer)),
            "context": [[c, int(off)] for c, off in
                        (cls.context_sources(layer) if cls is not None else [])],
            "srclayers": [[s, CONN_NAMES[_conn_of(layer, k)[0]], _conn_of(layer, k)[1]]
                          for k, s in enumerate(layer.srclayers)],
        })

    for layer in layers:
        T = layer.unroll_len
        cls = layer_class(layer.type)
        for k, sname in enumerate(layer.srclayers):
            src = by_name.get(sname)
            if src is None:
                raise ConfigError(f'{where}: layer "{layer.name}": srclayer "{sname}" does not take '
                                  f"part in the {phase.label} phase; include it in that phase or "
                                  f"exclude this layer from it")
            TS = src.unroll_len
            conn, shift = _conn_of(layer, k)
            attrs = {"conn": CONN_NAMES[conn], "shift": shift, "recurrent": False, "src_index": k}
            if conn == pb.kUnrollOneToOne:
                if T - 1 - shift >= TS:
                    raise ConfigError(
                        f'{where}: layer "{layer.name}": copy {T - 1} reads copy {T - 1 - shift} of '
                        f'"{sname}" one-to-one, but "{sname}" has only {TS} '
                        f'{"copy" if TS == 1 else "copies"}; use '
                        f"unroll_conn_type kUnrollOneToAll or kUnrollFirstToLast, or match the "
                        f"unroll_len")
                g.add_edges_from((node_id(i - shift, sname), node_id(i, layer.name), attrs)
                                 for i in range(shift, T))
            elif conn == pb.kUnrollOneToAll:
                g.add_edges_from((node_id(j, sname), node_id(i, layer.name), attrs)
                                 for i in range(T) for j in range(TS))
            elif conn == pb.kUnrollFirstToLast:
                start = T - 1 if cls is not None and cls.reverse_pass(layer) else 0
                g.add_edge(node_id(TS - 1, sname), node_id(start, layer.name), **attrs)
            elif conn == pb.kUnrollAllToOne:
                if T != 1:
                    raise ConfigError(
                        f'{where}: layer "{layer.name}": it reads "{sname}" kUnrollAllToOne (every '
                        f"copy joined into one input), which feeds a layer of one copy, but it has "
                        f"{T}; set its unroll_len: 1")
                g.add_edges_from((node_id(j, sname), node_id(0, layer.name), attrs)
                                 for j in range(TS))
            elif conn == pb.kUnrollOneToFirst:
                g.add_edge(node_id(TS - 1, sname), node_id(0, layer.name), **attrs)
                for i in range(1, T):
                    g.nodes[node_id(i, layer.name)].setdefault("zeros", []).append(k)
        for cname, off in (cls.context_sources(layer) if cls is not None else []):
            ctx_layer = by_name.get(cname)
            if ctx_layer is None:
                raise ConfigError(f'{where}: layer "{layer.name}": its context layer "{cname}" does '
                                  f"not take part in the {phase.label} phase")
            TC = ctx_layer.unroll_len
            attrs = {"conn": "context", "shift": off, "recurrent": True, "src_index": -1}
            g.add_edges_from((node_id(i - off, cname), node_id(i, layer.name), attrs)
                             for i in range(T) if 0 <= i - off < TC)

    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        path = " -> ".join([u for u, _ in cycle] + [cycle[-1][1]])
        raise ConfigError(f"{where}: the unrolled {phase.label} net has a cycle: {path}; "
                          f"break it (a layer cannot read its own output at the same step)")
    g.graph["layers"] = folded
    return Unrolled(net=net, phase=phase, graph=g, layers=layers)


def unrolled_netproto(u: Unrolled) -> pb.NetProto:
    """The unrolled net as a NetProto: copies ``i#L`` with unroll_index i, their
    srclayers rewired to source copies (data sources in srclayer order, then the
    context source), params ``i#p`` sharing ``0#p``."""


    out = pb.NetProto()
    out.CopyFrom(u.net)
    del out.layer[:]
    g = u.graph
    for layer in u.layers:
        cls = layer_class(layer.type)
        roles = cls.default_param_names(layer) if cls is not None else []
        # an unnamed param takes the name the layer gives it at run time: <layer>/<role>
        bases = [p.name or f"{layer.name}/{roles[k] if k < len(roles) else k}"
                 for k, p in enumerate(layer.param)]
        for i in range(layer.unroll_len):
            nid = node_id(i, layer.name)
            copy = out.layer.add()
            copy.CopyFrom(layer)
            copy.name = nid
            copy.unroll_index = i
            copy.unroll_len = 1
            del copy.srclayers[:]
            del copy.unroll_conn_type[:]
            del copy.shift[:]
            preds = sorted(g.in_edges(nid, data=True),
                           key=lambda e: (e[2]["src_index"] < 0, e[2]["src_index"],
                                          g.nodes[e[0]]["step"]))
            copy.srclayers.extend(u_ for u_, _, _ in preds)
            for p, base in zip(copy.param, bases):
                p.name = node_id(i, base)
                if p.share_from:
                    p.share_from = node_id(0, p.share_from)
                elif i > 0:
                    p.share_from = node_id(0, base)
    return out


def share_map(u: Unrolled) -> dict[str, str]:
    """Every unrolled param name -> the name of the param that owns its storage."""
    m = {}
    for layer in u.netproto.layer:
        for p in layer.param:
            m[p.name] = p.share_from or p.name
    # resolve chains (i#p -> 0#p -> 0#q)
    for k in m:
        seen = set()
        while m[k] in m and m[m[k]] != m[k] and m[k] not in seen:
            seen.add(m[k])
            m[k] = m[m[k]]
    return m


def graph_to_json(g: nx.DiGraph) -> dict:
    """networkx node-link data (``nodes``/``edges``) of an unrolled graph."""
    return nx.node_link_data(g, edges="edges")


def graph_from_json(data: dict) -> nx.DiGraph:
    """Inverse of graph_to_json."""
    return nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")


def write_graph_json(g: nx.DiGraph, path) -> None:
    """Write the node-link JSON of ``g`` to ``path`` (its folder must exist)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(graph_to_json(g), f, indent=1)
