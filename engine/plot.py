"""Plot a workspace's metrics.jsonl: one panel per metric, train and val/test lines.

    plot_metrics(workspace) -> path of <workspace>/metrics.png

Uses matplotlib's headless Agg backend; matplotlib is an optional dependency
(``pip install 'rnn-engine[plot]'``): without it, PlotUnavailable is raised.
"""
from __future__ import annotations

import json
import pathlib

SKIP = {"step", "phase", "seconds", "elapsed", "chars_per_s", "samples_per_s"}


class PlotUnavailable(Exception):
    """matplotlib is not installed, or there is nothing to plot."""


def read_metrics(ws) -> list[dict]:
    path = pathlib.Path(ws) / "metrics.jsonl"
    if not path.exists():
        raise PlotUnavailable(f"{path}: no metrics yet (train first)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
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


def plot_metrics(ws, out=None) -> pathlib.Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib); "
                              "metrics.jsonl has the numbers") from None
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
    path = pathlib.Path(out) if out else pathlib.Path(ws) / "metrics.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
