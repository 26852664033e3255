"""The benchmarks run and report what they claim (tiny settings; no timing is checked)."""
from __future__ import annotations

import json

from bench import charrnn, gemm_layout


def test_charrnn_bench_smallest_case(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert charrnn.main(["--case", "gru128", "--steps", "2", "--warmup", "1", "--no-memory",
                         "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["gemm_peak_gflops"] > 0 and "NumPy BLAS" in capsys.readouterr().out
    (case,) = res["cases"]
    assert case["case"] == "gru128" and "planned" in case["engine_executor"]
    eng = case["engine"]
    assert eng["median_step_s"] > 0 and eng["chars_per_s"] > 0
    assert 0 < eng["last_loss"] < 10  # a cross-entropy over 101 symbols, not NaN
    assert ("ratio_speed" in case) == ("pytorch" in case)


def test_model_flops_counts_every_gemm():
    # GRU 512 over one-hot 101: input fwd + dW, recurrent fwd + dW + dh, output fwd + dW + dX
    rows, G, H, V = 50 * 50, 3, 512, 101
    expect = 2 * rows * (V * G * H * 2 + H * G * H * 3 + H * V * 3)
    assert charrnn.model_flops("GRU", H, 50, 50, V, 1) == expect


def test_gemm_layout_bench_runs(capsys):
    assert gemm_layout.main(["--hidden", "32", "--batch", "4", "--gates", "3", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "feature-major" in text and "x the speed of row-major" in text


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform

    from engine.backend import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
