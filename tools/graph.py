"""Draw an unrolled net (or the net as configured) with Graphviz.

    python tools/graph.py INPUT OUTPUT [--fold] [--steps A:B] [--phase train|val|test]
                          [--stats FILE]

INPUT is a node-link JSON file written by engine.unroll.write_graph_json
(e.g. <workspace>/visualization/train_net.json) or a job file (job.conf),
which is loaded, validated and unrolled for --phase (default train).
OUTPUT's extension picks the format: .svg, .png, .pdf, or .dot (the DOT
source only, no Graphviz needed).

  --fold         one node per configured layer instead of one per copy
  --steps A:B    draw only steps A..B-1 (plus the single-copy layers they use)
  --stats FILE   JSON: node id ("3#gru1") -> {"out": {"mean", "std", "max"}, "grad": {...}},
                 shown under each node's name

Exit status: 0 written; 2 bad input or arguments (one line "graph: ..." on
stderr); 3 Graphviz's dot program is missing: the DOT source was written
next to OUTPUT with the extension .dot instead.
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.stopping import StopSignals  # noqa: E402

# Before the imports below: a Ctrl-C while they load (or while this short command runs)
# is one line on stderr and exit 130, not a traceback.
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None


import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import networkx as nx  # noqa: E402

from engine import draw  # noqa: E402
from engine.config import ConfigError, Phase, read_text  # noqa: E402

FORMATS = ("svg", "png", "pdf", "dot")
INSTALL_HINT = "apt-get install graphviz on Debian/Ubuntu, brew install graphviz on macOS"


class UsageError(Exception):
    """Bad arguments or input; str(err) is the line printed after "graph: "."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (see python tools/graph.py --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="graph.py", description=__doc__.splitlines()[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="\n".join(__doc__.splitlines()[5:]))
    ap.add_argument("input", help="node-link JSON (write_graph_json) or a job file")
    ap.add_argument("output", help="picture to write: .svg, .png, .pdf or .dot")
    ap.add_argument("--fold", action="store_true", help="one node per configured layer")
    ap.add_argument("--steps", metavar="A:B", help="draw only steps A..B-1")
    ap.add_argument("--phase", help="phase to unroll a job file for: train, val or test "
                                    "(default train)")
    ap.add_argument("--stats", metavar="FILE", help="JSON of per-node statistics")
    return ap


def parse_steps(text: str) -> tuple[int, int]:
    """"A:B" -> (A, B) with 0 <= A < B; UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--steps {text!r} is not A:B with whole numbers "
                         f"(e.g. --steps 0:4 draws steps 0..3)")
    a, b = int(m.group(1)), int(m.group(2))
    if b <= a:
        raise UsageError(f"--steps {text} selects no step; A must be less than B "
                         f"(steps A..B-1 are drawn)")
    return a, b


def output_format(path: pathlib.Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        shown = path.suffix or "no extension"
        raise UsageError(f"{path}: cannot tell the format from {shown}; end OUTPUT with "
                         f".svg, .png, .pdf or .dot")
    return fmt


def _read_json(path: pathlib.Path, what: str):
    text = read_text(path, what, UsageError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: "
                         f"{e.msg})") from None


def _is_json(path: pathlib.Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")   # protobuf text format never starts with "{"


def load_graph(path: pathlib.Path, phase: Phase | None) -> nx.DiGraph:
    """The unrolled graph of INPUT (node-link JSON or job file; ``phase`` defaults to train)."""
    from engine.unroll import graph_from_json, unroll

    if not path.exists():
        raise UsageError(f"{path}: no such file; give a node-link JSON "
                         f"(visualization/train_net.json) or a job file")
    if _is_json(path):
        data = _read_json(path, "graph JSON file")
        try:
            g = graph_from_json(data)
        except (KeyError, TypeError, AttributeError, ValueError, nx.NetworkXError) as e:
            raise UsageError(f"{path}: not a node-link graph written by write_graph_json "
                             f"({type(e).__name__}: {e})") from None
        if phase is not None:
            want = phase.label
            have = g.graph.get("phase")
            if have and have != want:
                raise UsageError(f"{path} holds the {have} net, not the {want} net; "
                                 f"--phase only chooses the phase of a job file")
        return g
    from engine.config import load_job

    job = load_job(path)
    return unroll(job.neuralnet, phase or Phase.TRAIN, job.name, where=str(path)).graph


def load_stats(path: pathlib.Path) -> dict:
    data = _read_json(path, "stats file")
    if isinstance(data, dict) and isinstance(data.get("nodes"), dict):
        data = data["nodes"]  # a debug dump of engine.train (debug: true / --debug)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f'{path}: stats must be a JSON object: node id ("3#gru1") -> '
                         f'{{"out": {{...}}, "grad": {{...}}}}')
    return data


def render(source: str, fmt: str) -> bytes:
    """DOT source -> bytes of the picture (raises graphviz.ExecutableNotFound without dot)."""
    import graphviz

    return graphviz.Source(source).pipe(format=fmt)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        out = pathlib.Path(args.output)
        fmt = output_format(out)
        steps = parse_steps(args.steps) if args.steps is not None else None
        phase = Phase.parse(args.phase) if args.phase is not None else None
        if args.fold and (steps is not None or args.stats):
            raise UsageError("--fold draws each layer once; --steps and --stats apply to the "
                             "unrolled picture only")
        stats = load_stats(pathlib.Path(args.stats)) if args.stats else None
        g = load_graph(pathlib.Path(args.input), phase)
        if args.fold:
            n_nodes = len(g.graph.get("layers") or [])
            n_edges = len(draw.folded_edges(g))
            source = draw.to_dot_folded(g)
        else:
            shown = draw.visible_subgraph(g, steps)
            n_nodes, n_edges = shown.number_of_nodes(), shown.number_of_edges()
            source = draw.to_dot(g, steps=steps, stats=stats)
    except (UsageError, ConfigError, ValueError) as e:
        print(f"graph: {e}", file=sys.stderr)
        return 2

    data = source.encode("utf-8")
    if fmt != "dot":
        missing = shutil.which("dot") is None
        if not missing:
            import graphviz

            try:
                data = render(source, fmt)
            except graphviz.ExecutableNotFound:
                missing = True
            except graphviz.CalledProcessError as e:
                err = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
                print(f"graph: Graphviz's dot failed on {out}: {err[0] if err else e}",
                      file=sys.stderr)
                return 2
        if missing:
            dot_path = out.with_suffix(".dot")
            try:
                dot_path.write_bytes(data)
            except OSError as e:
                print(f"graph: cannot write {dot_path} ({e.strerror})", file=sys.stderr)
                return 2
            print(f"graph: Graphviz's dot program is missing, so {out} was not rendered; "
                  f"wrote the DOT source to {dot_path} instead (install Graphviz: "
                  f"{INSTALL_HINT}; then run dot -T{fmt} {dot_path} -o {out})",
                  file=sys.stderr)
            return 3
    try:
        out.write_bytes(data)
    except OSError as e:
        print(f"graph: cannot write {out} ({e.strerror})", file=sys.stderr)
        return 2
    print(f"wrote {out} ({n_nodes} nodes, {n_edges} edges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
