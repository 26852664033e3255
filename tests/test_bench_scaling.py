"""bench.scaling: the ring-Allreduce projection, the worker counts, and a tiny run (no
timing value is checked)."""
from __future__ import annotations

import json

import pytest

import mpijobs
from bench import scaling
from charjobs import char_job


def test_projection_follows_the_ring_formula():
    compute = {1: {"rows": 8, "seconds": 0.010, "preds": 80.0},
               4: {"rows": 2, "seconds": 0.004, "preds": 20.0}}
    rows = scaling.project(compute, 1_000_000, [(10.0, 50.0)])
    one, four = rows
    assert one["allreduce_ms"] == 0 and one["speedup"] == 1 and one["efficiency"] == 1
    # 2·3/4 · 1e6 B / (10e9/8 B/s) + 2·3 · 50 µs = 1.2 ms + 0.3 ms
    assert four["allreduce_ms"] == pytest.approx(1.5)
    assert four["step_ms"] == pytest.approx(5.5)
    assert four["throughput"] == pytest.approx(4 * 20 / 0.0055)
    assert four["speedup"] == pytest.approx((80 / 0.0055) / (80 / 0.010))
    assert four["efficiency"] == pytest.approx(four["speedup"] / 4)


def test_worker_counts():
    assert scaling.worker_counts(50, 64, "strong") == [1, 2, 5, 10, 25, 50]
    assert scaling.worker_counts(32, 8, "strong") == [1, 2, 4, 8]
    assert scaling.worker_counts(50, 64, "weak") == [1, 2, 4, 8, 16, 32, 64]


def test_scaling_bench_runs_on_a_tiny_job(tmp_path, capsys):
    job = char_job(tmp_path, batch=4, steps=5)
    out = tmp_path / "s.json"
    pic = tmp_path / "s.png"
    local = [] if mpijobs.mpi_ready() else ["--local-pairs", "1", "--local-steps", "4"]
    assert scaling.main([str(job), "--max-workers", "4", "--steps", "2", "--warmup", "1",
                         "--network", "10:50", "--plot", str(pic), "--json", str(out),
                         *local]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert sorted(res["compute"]) == ["1", "2", "4"]
    assert [res["compute"][k]["rows"] for k in ("1", "2", "4")] == [4, 2, 1]
    assert all(c["seconds"] > 0 for c in res["compute"].values())
    assert res["grad_bytes"] == 4 * 3080  # the tiny GRU's 3,080 float32 params
    assert [r["workers"] for r in res["projection"]] == [1, 2, 4]
    assert "projection, ring Allreduce over 10 Gb/s, 50 us" in text and "load average" in text
    if mpijobs.mpi_ready():
        assert res["allreduce_local"] is None and "not measured" in text
    else:
        assert res["allreduce_local"]["seconds"] > 0
        assert len(res["local"]["one_2threads"]) == len(res["local"]["two_1thread"]) == 1
        assert "2 workers x 1 BLAS thread" in text
    assert pic.exists() or "no plot" in text
