"""tools/plot.py and engine/plot.py: the picture of a metrics.jsonl, and one error line for bad input.

The workspaces are written by hand (a few metrics records), so no training runs here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from charjobs import ROOT
from tools import plot as plot_cli

pytest.importorskip("matplotlib")

RECORDS = [{"step": 5, "phase": "train", "loss": 3.1, "accuracy": 0.1, "lr": 0.01},
           {"step": 10, "phase": "train", "loss": 2.7, "accuracy": 0.2, "lr": 0.01},
           {"step": 10, "phase": "val", "loss": 2.9, "accuracy": 0.15}]


def workspace(tmp_path, lines=None):
    ws = tmp_path / "ws"
    ws.mkdir()
    lines = [json.dumps(r) for r in RECORDS] if lines is None else lines
    (ws / "metrics.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return ws


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_writes_a_png_by_default_and_where_asked(tmp_path, capsys):
    ws = workspace(tmp_path)
    assert plot_cli.main([str(ws)]) == 0
    assert (ws / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_cli.main([str(ws), str(tmp_path / "curve.svg")]) == 0
    assert (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")


def test_output_in_a_missing_folder(tmp_path, capsys):
    ws = workspace(tmp_path)
    out = tmp_path / "no" / "such" / "m.png"
    assert plot_cli.main([str(ws), str(out)]) == 2
    line = one_error(capsys)
    assert str(out.parent) in line and "does not exist" in line
    assert not out.parent.exists()


def test_unknown_extension(tmp_path, capsys):
    ws = workspace(tmp_path)
    out = tmp_path / "m.xyz"
    assert plot_cli.main([str(ws), str(out)]) == 2
    line = one_error(capsys)
    assert str(out) in line and ".xyz" in line and ".png" in line and ".svg" in line
    assert not out.exists()


def test_output_that_is_a_folder(tmp_path, capsys):
    ws = workspace(tmp_path)
    (tmp_path / "d.png").mkdir()
    assert plot_cli.main([str(ws), str(tmp_path / "d.png")]) == 2
    assert "d.png" in one_error(capsys)


@pytest.mark.parametrize("bad", ["[1, 2]", '"text"', "3", "null", '{"loss": 2.0}',
                                 '{"step": "ten", "loss": 2.0}'])
def test_a_line_that_is_not_a_record(tmp_path, capsys, bad):
    lines = [json.dumps(RECORDS[0]), bad, json.dumps(RECORDS[1])]
    ws = workspace(tmp_path, lines)
    assert plot_cli.main([str(ws)]) == 2
    line = one_error(capsys)
    assert f"{ws / 'metrics.jsonl'}:2:" in line
    assert not (ws / "metrics.png").exists()


def test_a_line_cut_by_a_crash_is_skipped(tmp_path, capsys):
    lines = [json.dumps(r) for r in RECORDS] + ['{"step": 15, "phase": "tr']
    ws = workspace(tmp_path, lines)
    assert plot_cli.main([str(ws)]) == 0
    assert (ws / "metrics.png").exists()


def test_metrics_file_that_is_not_text(tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "metrics.jsonl").write_bytes(b"\xff\xfe\x00binary")
    assert plot_cli.main([str(ws)]) == 2
    assert "metrics.jsonl" in one_error(capsys)


def test_cli_subprocess_one_line_exit_2(tmp_path):
    ws = workspace(tmp_path, ["[1,2]"])
    for args in ([str(ws)], [str(ws), str(tmp_path / "m.xyz")],
                 [str(ws), str(tmp_path / "missing" / "m.png")]):
        r = subprocess.run([sys.executable, "tools/plot.py", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), r.stderr


def test_usage(tmp_path, capsys):
    assert plot_cli.main([]) == 2
    assert "usage" in one_error(capsys)
    assert plot_cli.main(["a", "b", "c"]) == 2
    assert "usage" in one_error(capsys)
    assert plot_cli.main(["--help"]) == 0
    assert "OUTPUT" in capsys.readouterr().out
