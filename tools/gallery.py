"""Render the gallery of Karpathy's five patterns (docs/jobs.md): one PNG per pattern,
each the unrolled train net of its shipped job, drawn by tools/graph.py.

    python tools/gallery.py [--out docs/gallery] [--steps 4]

Long jobs are drawn at ``--steps`` copies per layer (the pattern is the same at any
length): a copy of the job with every unroll_len above 1 set to that many (an encoder
and its decoder both), so first-to-last edges and one-copy layers stay in the picture.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf import text_format  # noqa: E402

from engine.config import load_job  # noqa: E402
from tools import graph  # noqa: E402

#: (picture name, job) in Karpathy's order
PATTERNS = (("one-to-one", "one-to-one.conf"), ("one-to-many", "one-to-many.conf"),
            ("many-to-one", "many-to-one.conf"), ("many-to-many-delayed", "encoder-decoder.conf"),
            ("many-to-many-synced", "many-to-many.conf"))


def shortened(conf: pathlib.Path, steps: int) -> str:
    """The job's text with every unroll_len above ``steps`` set to ``steps``."""
    job = load_job(conf)
    net = job.neuralnet
    if net.unroll_len > steps:
        net.unroll_len = steps
    for layer in net.layer:
        if layer.unroll_len > steps:
            layer.unroll_len = steps
        if layer.HasField("char_rnn_conf") and layer.char_rnn_conf.unroll_len > steps:
            layer.char_rnn_conf.unroll_len = steps
    return text_format.MessageToString(job)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/gallery.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "gallery")
    ap.add_argument("--steps", type=int, default=4, help="copies per layer drawn (default 4)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, conf in PATTERNS:
            job = pathlib.Path(tmp) / conf
            job.write_text(shortened(ROOT / "configs" / conf, a.steps), encoding="utf-8")
            code = graph.main([str(job), str(a.out / f"{name}.png")])
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
