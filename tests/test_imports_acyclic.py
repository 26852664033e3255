"""The engine's modules import each other without a cycle: every ``import engine.x`` or
``from engine.x import ...``, at the top of a module or inside a function, is an edge, and
the graph of those edges has no cycle (a dependency-free base, ``engine.common``, under the
validator, under the layers)."""
from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> nx.DiGraph:
    files = {module_name(p): p for p in (ROOT / "engine").rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith("engine"):
                    continue
                dst = owner(t)
                # a package's __init__ importing its own submodules is how a package is built
                if dst and dst != mod and not (path.name == "__init__.py" and dst.startswith(mod + ".")):
                    if dst == "engine" or (mod.startswith(dst + ".") and files[dst].name == "__init__.py"):
                        continue  # a module importing its parent package's names
                    g.add_edge(mod, dst)
    return g


def test_engine_imports_form_no_cycle():
    g = import_graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_the_base_imports_nothing_of_the_engine_but_the_schema():
    g = import_graph()
    assert set(g.successors("engine.common")) <= {"engine.proto.job_pb2", "engine.proto"}
    assert "engine.layers" in nx.descendants(g, "engine.config")
