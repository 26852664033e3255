"""Run an engine command with the CuPy stand-in installed as ``cupy``:

    python tests/standin/run.py [--traffic FILE] -m engine.train JOB --gpu 0 ...

so that a command line test (or ``bench.profile --device standin``) takes the GPU path on
the CPU. With ``--traffic`` the host<->device counts are written to FILE as JSON at exit.
"""
from __future__ import annotations

import atexit
import json
import pathlib
import runpy
import sys

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS.parent))   # the repository (engine, bench)
sys.path.insert(0, str(TESTS))          # the stand-in package

import standin  # noqa: E402


def main(argv: list[str]) -> None:
    traffic = None
    if argv[:1] == ["--traffic"]:
        traffic, argv = argv[1], argv[2:]
    if argv[:1] != ["-m"] or len(argv) < 2:
        sys.exit("usage: python tests/standin/run.py [--traffic FILE] -m MODULE [ARGS...]")
    standin.install()
    if traffic:
        atexit.register(lambda: pathlib.Path(traffic).write_text(
            json.dumps({**standin.TRAFFIC.snapshot(), "where": standin.TRAFFIC.where})))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
