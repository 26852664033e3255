"""``python tools/plot.py WORKSPACE [OUTPUT]``: plot loss and metrics against steps.

OUTPUT defaults to WORKSPACE/metrics.png; its extension picks the format (.png, .svg,
.pdf, ...). Bad input (no metrics, a metrics line that is not a record, a missing
output folder, an unknown extension) is one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from engine.stopping import StopSignals  # noqa: E402

# Before the imports below: a Ctrl-C while they load (or while this short command runs)
# is one line on stderr and exit 130, not a traceback.
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None


from engine.plot import PlotUnavailable, plot_metrics  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or len(argv) > 2 or argv[0].startswith("-"):
        print("error: usage: python tools/plot.py WORKSPACE [OUTPUT] (--help for more)",
              file=sys.stderr)
        return 2
    try:
        path = plot_metrics(argv[0], argv[1] if len(argv) > 1 else None)
    except PlotUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
