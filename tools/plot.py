"""``python tools/plot.py WORKSPACE [OUTPUT.png]``: plot loss and metrics against steps."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from engine.plot import PlotUnavailable, plot_metrics  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        path = plot_metrics(argv[0], argv[1] if len(argv) > 1 else None)
    except PlotUnavailable as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
