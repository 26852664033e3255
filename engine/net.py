"""Build: an unrolled graph -> a Net of set-up layer objects, shared Params and a schedule.

One Layer object per configured layer (its copies share it and its params);
layers are set up in the order of their data sources, params are initialised
from a seeded stream and tied (share_from) in one place. The schedule lists
every node ``i#L`` in topological order of the unrolled graph with, per node,
where each input comes from, so the worker only walks lists.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from engine.backend import INIT, Backend, rng_stream
from engine.common import ConfigError, type_name
from engine.layers import Layer, LayerError, layer_class
from engine.params import GradBuffer, ParamError, init_param, resolve_sharing
from engine.proto import job_pb2 as pb
from engine.unroll import Unrolled


@dataclass(frozen=True)
class Link:
    """How the copies of a layer read one of its srclayers, as the unrolled graph's edges
    say (the unroller decided the meaning of the connection types; this only reads it)."""

    src: str        # the source layer
    index: int      # its position among the layer's srclayers
    conn: int       # UnrollConnType value
    shift: int      # one-to-one: copy i reads source copy i - shift


@dataclass(frozen=True)
class Joined:
    """In a Node's ``srcs``: every copy of a source (kUnrollAllToOne), read as one array
    joined along axis 1 (the first feature axis) in time order."""

    ids: tuple


class _JoinedShape:
    """A source read kUnrollAllToOne, as its reader's setup sees it: T copies joined along
    the first feature axis; every other declaration is the source's."""

    def __init__(self, layer, copies: int):
        self._layer = layer
        shape = tuple(layer.out_shape)
        self.out_shape = (copies * shape[0],) + shape[1:] if shape else (copies,)

    def __getattr__(self, attr):
        return getattr(self._layer, attr)


class _Pending:
    """A source not set up yet (read with a delay): its assumed output shape; every other
    declaration is the Layer base class's default."""

    def __init__(self, name: str, out_shape: tuple):
        self.name, self.out_shape = name, out_shape

    def __getattr__(self, attr):
        return getattr(Layer, attr)


@dataclass(frozen=True)
class Zeros:
    """In a Node's ``srcs``: this copy reads zeros shaped like ``src``'s output in place of
    a source copy (the unroller's ``zeros`` node attribute: kUnrollOneToFirst)."""

    src: str


@dataclass
class Node:
    """One copy ``i#L`` of a layer and where its inputs come from."""

    id: str
    index: int                 # position in the schedule
    layer: Layer
    step: int
    # per data srclayer: None, a node id, a list of node ids (one-to-all), Zeros, with
    # the piece index when the source is multi-output
    srcs: list = field(default_factory=list)
    pieces: list = field(default_factory=list)
    ctx_src: str | None = None      # node whose state (or output) is this copy's context
    ctx_is_state: bool = True       # True: the context node's new state; False: its output
    init_src: str | None = None     # first-to-last source giving the copy that starts a pass its state
    mask_srcs: list = field(default_factory=list)  # one-to-one sources to inherit a mask from
    needs_grad: bool = False


#: copies of each param's size a training run holds: the values, the gradient buffer, and
#: up to two updater histories (Adam's m and v)
PARAM_COPIES = 4


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(params, dtype, where: str) -> None:
    """ConfigError, before anything is allocated, when the params alone (with their
    gradients and updater histories, ``PARAM_COPIES``) need more memory than the machine
    has; it names the largest param, its layer and the figures."""
    have = available_memory()
    if have is None or not params:
        return
    size = np.dtype(dtype).itemsize
    need = sum(math.prod(p.shape) for p in params) * size * PARAM_COPIES
    if need <= have:
        return
    big = max(params, key=lambda p: math.prod(p.shape))
    raise ConfigError(
        f'{where}: layer "{big.owner_layer}": its param "{big.name}" {list(big.shape)} alone is '
        f"{_gib(math.prod(big.shape) * size)}; the net's params need about {_gib(need)} with "
        f"their gradients and updater state, and this machine has {_gib(have)} free; make the "
        f"layer smaller")


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.3g} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.3g} MiB"


class Net:
    """Set-up layers, owner params and the node schedule of one phase."""

    def __init__(self, unrolled: Unrolled, backend: Backend, info: dict, seed: int = 0,
                 where: str = "<job>"):
        self.unrolled = unrolled
        self.backend = backend
        self.xp = backend.xp
        self.dtype = backend.dtype
        self.info = info
        self.where = where
        self.phase = unrolled.phase
        g = unrolled.graph
        confs = {c.name: c for c in unrolled.layers}
        self.confs = confs
        #: per layer, how it reads each srclayer (from the graph's edges)
        self.links: dict[str, list[Link]] = self._links(g)
        #: configured layers, each after its data sources (the set-up order; a source read
        #: with a delay, one-to-one with shift >= 1, may come after: see _setup_layers)
        self.order: list[str] = self._setup_order(unrolled, self.links)
        self.layers: dict[str, Layer] = self._setup_layers()
        try:
            self.params = resolve_sharing([self.layers[c.name] for c in unrolled.layers])
        except ParamError as e:
            raise ConfigError(f"{where}: {e}") from None
        check_memory(self.params, self.dtype, where)
        rng = rng_stream(seed, INIT)
        for p in self.params:
            init_param(p, self.xp, self.dtype, rng)
        #: every param's gradient, one contiguous buffer (see engine/params.py)
        self.grads = GradBuffer([self.layers[c.name] for c in unrolled.layers], self.params,
                                self.xp, self.dtype)
        for layer in self.layers.values():
            layer.params_ready()
        self.inputs = [lay for lay in self.layers.values() if lay.is_input]
        self.losses = [lay for lay in self.layers.values() if lay.is_loss]
        self.nodes = self._schedule(g)
        self.by_id = {n.id: n for n in self.nodes}

    # ------------------------------------------------------------------ setup
    def _links(self, g: nx.DiGraph) -> dict[str, list[Link]]:
        found: dict[str, dict[int, Link]] = {c.name: {} for c in self.unrolled.layers}
        for u, v, a in g.edges(data=True):
            k = a["src_index"]
            if k >= 0:
                found[g.nodes[v]["layer"]][k] = Link(g.nodes[u]["layer"], k,
                                                     pb.UnrollConnType.Value(a["conn"]), a["shift"])
        out = {}
        for c in self.unrolled.layers:
            missing = [s for k, s in enumerate(c.srclayers) if k not in found[c.name]]
            if missing:
                raise ConfigError(f'{self.where}: layer "{c.name}": no copy reads srclayer '
                                  f'"{missing[0]}" (check its shift and unroll_len)')
            out[c.name] = [found[c.name][k] for k in range(len(c.srclayers))]
        return out

    def _new_layer(self, name: str, srcs: list) -> Layer:
        conf = self.confs[name]
        layer = layer_class(conf.type)(conf, self.xp, self.dtype)
        layer.info = self.info
        layer.src_conn = [link.conn for link in self.links[name]]
        try:
            layer.setup(srcs)
        except LayerError as e:
            msg = str(e)
            if f'"{name}"' not in msg:
                msg = f'layer "{name}": {msg}'
            raise ConfigError(f"{self.where}: {msg}") from None
        if layer.vocab is not None and "vocab" not in self.info:
            self.info["vocab"] = layer.vocab
            self.info["encoding"] = layer.encoding
        return layer

    def _setup_layers(self) -> dict[str, Layer]:
        """Set every layer up in ``self.order``. A source read with a delay that comes later
        in that order (a layer fed back from its own output at an earlier step: a
        recurrence built from ordinary layers) is not set up yet when its reader is; the
        reader sees its output shape as assumed ((1,) at first), and when the assumption
        was wrong every layer with sources is set up again with the shapes found, until
        they agree (a cycle whose shapes do not settle is one error line)."""
        assumed: dict[str, tuple] = {}
        layers: dict[str, Layer] = {}
        for _ in range(4):
            used: dict[str, tuple] = {}
            for name in self.order:
                if name in layers:
                    continue
                srcs = []
                for k, s in enumerate(self.confs[name].srclayers):
                    if s in layers and self.links[name][k].conn == pb.kUnrollAllToOne:
                        srcs.append(_JoinedShape(layers[s], self.confs[s].unroll_len))
                    elif s in layers:
                        srcs.append(layers[s])
                    else:
                        used[s] = assumed.get(s, (1,))
                        srcs.append(_Pending(s, used[s]))
                layers[name] = self._new_layer(name, srcs)
            wrong = {s: tuple(layers[s].out_shape) for s, shape in used.items()
                     if tuple(layers[s].out_shape) != shape}
            if not wrong:
                return layers
            assumed.update(wrong)
            layers = {n: lay for n, lay in layers.items() if not self.confs[n].srclayers}
        s, shape = next(iter(wrong.items()))
        raise ConfigError(f'{self.where}: layer "{s}" is read with a delay (shift) by a layer it '
                          f"depends on, and its output shape does not settle ({shape} now); put "
                          f"a layer whose width is set in its config (kInnerProduct, a recurrent "
                          f"layer) on that loop")

    @staticmethod
    def _setup_order(u: Unrolled, links: dict | None = None) -> list[str]:
        """Configured layers ordered so each comes after its data sources (context ignored,
        and sources read one-to-one with a shift >= 1: a delay, so such a loop is no cycle;
        the unrolled graph is a DAG)."""
        lg = nx.DiGraph()
        index = {c.name: k for k, c in enumerate(u.layers)}
        lg.add_nodes_from(index)
        for c in u.layers:
            for k, s in enumerate(c.srclayers):
                link = links[c.name][k] if links else None
                if link is not None and link.conn == pb.kUnrollOneToOne and link.shift > 0:
                    continue
                lg.add_edge(s, c.name)
        try:
            return list(nx.lexicographical_topological_sort(lg, key=index.__getitem__))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(lg)
            path = " -> ".join([a for a, _ in cycle] + [cycle[-1][1]])
            raise ConfigError(f"{u.graph.graph.get('name') or 'job'}: the layers form a cycle "
                              f"through their srclayers: {path}; to read an earlier step, connect "
                              f"one of them one-to-one with a shift >= 1") from None

    def _schedule(self, g: nx.DiGraph) -> list[Node]:
        """Every copy in a topological order of the graph, with its inputs read off its
        incoming edges: data edges by source index, the context edge, and a first-to-last
        edge into a recurrent layer as that layer's initial state."""
        order = {c.name: k for k, c in enumerate(self.unrolled.layers)}
        topo = list(nx.lexicographical_topological_sort(
            g, key=lambda n: (g.nodes[n]["step"], order[g.nodes[n]["layer"]])))
        # consumers of multi-output layers, in file order -> piece index
        piece_of: dict[tuple[str, str], int] = {}
        for name, layer in self.layers.items():
            if layer.multi_output:
                consumers = [c.name for c in self.unrolled.layers if name in c.srclayers]
                for j, cname in enumerate(consumers):
                    piece_of[(name, cname)] = j
        nodes = []
        for idx, nid in enumerate(topo):
            a = g.nodes[nid]
            layer = self.layers[a["layer"]]
            node = Node(id=nid, index=idx, layer=layer, step=a["step"])
            feeds: dict[int, list] = {}
            for u, _, e in g.in_edges(nid, data=True):
                if e["src_index"] < 0:
                    node.ctx_src = u
                    node.ctx_is_state = g.nodes[u]["layer"] == layer.name
                else:
                    feeds.setdefault(e["src_index"], []).append((g.nodes[u]["step"], u))
            zeros = a.get("zeros", ())
            for link in self.links[layer.name]:
                got = [u for _, u in sorted(feeds.get(link.index, []))]
                s = Zeros(link.src) if link.index in zeros else None
                if link.conn == pb.kUnrollAllToOne:
                    s = Joined(tuple(got))
                elif len(got) > 1 or (got and link.conn == pb.kUnrollOneToAll
                                    and self.confs[link.src].unroll_len > 1):
                    s = got
                elif got:
                    s = got[0]
                    if link.conn == pb.kUnrollOneToOne:
                        node.mask_srcs.append(s)
                    elif link.conn == pb.kUnrollFirstToLast and layer.recurrent:
                        node.init_src, s = s, None
                node.srcs.append(s)
                node.pieces.append(piece_of.get((link.src, layer.name)))
            nodes.append(node)
        by_id = {n.id: n for n in nodes}
        for n in nodes:
            lay = n.layer
            feeds = [s for s in n.srcs if isinstance(s, str)]
            feeds += [x for s in n.srcs if isinstance(s, list) for x in s]
            feeds += [x for s in n.srcs if isinstance(s, Joined) for x in s.ids]
            feeds += [s for s in (n.ctx_src, n.init_src) if s is not None]
            n.needs_grad = lay.differentiable and (bool(lay.params) or any(
                by_id[s].needs_grad for s in feeds))
        return nodes

    # ------------------------------------------------------------- utilities
    def describe(self) -> list[str]:
        """One line per configured layer: name, type, copies, output shape, params."""
        lines = []
        for c in self.unrolled.layers:
            lay = self.layers[c.name]
            ps = ", ".join(f"{p.name}{list(p.shape)}" for p in lay.params.values())
            lines.append(f"  {c.name:<12} {type_name(c.type):<15} x{c.unroll_len:<4} "
                         f"out {list(lay.out_shape)}" + (f"  params {ps}" if ps else ""))
        return lines

    def param_count(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params))

    def share_params_from(self, other: "Net") -> None:
        """Use ``other``'s Param objects (same names, same shapes): a val/test net that
        evaluates the training net's weights."""
        theirs = {p.name: p for p in other.params}
        for layer in self.layers.values():
            for key, p in list(layer.params.items()):
                q = theirs.get(p.name)
                if q is None:
                    raise ConfigError(f'{self.where}: layer "{layer.name}" of the {self.phase.label} '
                                      f'net has param "{p.name}", which the train net lacks')
                if tuple(q.shape) != tuple(p.shape):
                    raise ConfigError(f'{self.where}: param "{p.name}" has shape {p.shape} in the '
                                      f"{self.phase.label} net but {q.shape} in the train net")
                layer.params[key] = q
            layer.params_ready(other.layers.get(layer.name))
        self.grads = other.grads
        seen, owners = set(), []
        for layer in self.layers.values():
            for p in layer.params.values():
                if id(p) not in seen:
                    seen.add(id(p))
                    owners.append(p)
        self.params = owners
