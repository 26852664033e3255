"""Plot a workspace's metrics.jsonl: one panel per metric, train and val/test lines.

    plot_metrics(workspace, out=None) -> path written (default <workspace>/metrics.png)

Uses matplotlib's headless Agg backend; matplotlib is an optional dependency
(``pip install 'rnn-engine[plot]'``): without it, PlotUnavailable is raised.
Every other reason the picture cannot be made (no metrics yet, a line of
metrics.jsonl that is not a record, an output folder that does not exist, an
extension matplotlib cannot write) is also a PlotUnavailable whose message is
one line naming the file.
"""
from __future__ import annotations

import json
import os
import pathlib

from engine.common import read_text

SKIP = {"step", "phase", "seconds", "elapsed", "chars_per_s", "samples_per_s"}


class PlotUnavailable(Exception):
    """The plot cannot be made; str(err) is one line naming the file and why."""


def read_metrics(ws) -> list[dict]:
    """The records of <ws>/metrics.jsonl. A line that is not JSON (one cut by a crash) is
    skipped; a JSON line that is not an object with an integer "step" (and, when given, a
    text "phase") is an error naming its line."""
    path = pathlib.Path(ws) / "metrics.jsonl"
    if not path.exists():
        raise PlotUnavailable(f"{path}: no metrics yet (train first)")
    text = read_text(path, "metrics file", PlotUnavailable)
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if not isinstance(r, dict):
            raise PlotUnavailable(f"{path}:{no}: not a metrics record (a JSON object with "
                                  f"\"step\"), but {type(r).__name__} {line.strip()[:40]}; remove "
                                  f"the line")
        step = r.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise PlotUnavailable(f"{path}:{no}: the record has no integer \"step\" (it has "
                                  f"{json.dumps(step)}); remove the line or fix its step")
        if not isinstance(r.get("phase", "train"), str):
            raise PlotUnavailable(f"{path}:{no}: \"phase\" is {json.dumps(r['phase'])}, not a "
                                  f"name such as \"train\"; remove the line or fix its phase")
        out.append(r)
    return out


def series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """{metric: {phase: (steps, values)}} for every numeric metric."""
    out: dict = {}
    for r in records:
        for k, v in r.items():
            if k in SKIP or not isinstance(v, (int, float)):
                continue
            steps, vals = out.setdefault(k, {}).setdefault(r.get("phase", "train"), ([], []))
            steps.append(r["step"])
            vals.append(v)
    return out


def output_path(ws, out=None) -> pathlib.Path:
    """Where the picture goes: ``out`` (".png" added when it has no extension), else
    <ws>/metrics.png. PlotUnavailable when its folder does not exist or matplotlib cannot
    write its extension."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = pathlib.Path(out) if out else pathlib.Path(ws) / "metrics.png"
    if not path.suffix:
        path = path.with_name(path.name + ".png")  # what savefig would write
    kinds = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise PlotUnavailable(f"{path}: cannot write a {path.suffix} picture; use one of "
                              f"{', '.join('.' + k for k in sorted(kinds))}")
    if out and not path.parent.is_dir():
        raise PlotUnavailable(f"{path}: the folder {path.parent} does not exist; create it "
                              f"or choose another output")
    return path


def _pyplot():
    """matplotlib.pyplot on the Agg backend. The engine draws files only, so the user's
    MPLBACKEND (which matplotlib validates on import: a bogus value is a ValueError) is set
    aside while matplotlib loads."""
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib); "
                              "metrics.jsonl has the numbers") from None
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved
    return plt


def plot_metrics(ws, out=None) -> pathlib.Path:
    plt = _pyplot()
    path = output_path(ws, out)
    data = series(read_metrics(ws))
    if not data:
        raise PlotUnavailable(f"{ws}: metrics.jsonl holds no numbers yet")
    names = [k for k in ("loss", "accuracy", "perplexity", "bpc", "mse", "lr") if k in data]
    names += sorted(k for k in data if k not in names)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for phase, (steps, vals) in sorted(data[name].items()):
            ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, ms=3, label=phase)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise PlotUnavailable(f"{path}: cannot write the picture ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path
