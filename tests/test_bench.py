"""The benchmarks run and report what they claim (tiny settings; no timing value is checked)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench import charrnn, gemm_layout

TINY = ["--case", "gru128", "--steps", "2", "--pairs", "1", "--warmup", "1"]


def _check_run(run: dict, steps: int) -> None:
    assert len(run["step_s"]) == steps and all(t > 0 for t in run["step_s"])
    assert 0 < run["setup_rss_mib"] <= run["peak_rss_mib"]
    assert 0 < run["last_loss"] < 10  # a cross-entropy over 101 symbols, not NaN
    assert run["process_s"] > sum(run["step_s"])  # start-up lies outside the step times


def test_charrnn_bench_smallest_case(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert charrnn.main([*TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["gemm_peak_gflops"] > 0 and "NumPy BLAS" in text and res["numpy_blas"] in text
    assert res["cores"] == os.cpu_count() and res["cpu"] and f"CPU: {res['cpu']}" in text
    assert res["settings"]["pairs"] == 1
    (case,) = res["cases"]
    assert case["case"] == "gru128" and "planned" in case["engine_executor"]
    assert case["engine_kernels"].startswith("cell ") and f"engine {case['engine_kernels']}" in text
    eng = case["engine"]
    assert eng["processes"] == 1 and eng["malloc"] in ("keeps freed memory", "default (no glibc)")
    _check_run(eng["runs"][0], 2)
    assert eng["median_step_s"] == eng["min_step_s"] == eng["max_step_s"] > 0
    assert eng["chars_per_s"] > 0 and eng["gflops"] > 0
    if len(os.sched_getaffinity(0)) >= 2:      # how far apart the cores were, before and after
        ((before, after),) = eng["core_round_trip_ns"]
        assert before > 0 and after > 0 and "cache-line round trip" in text
    if charrnn.have_torch():
        pt = case["pytorch"]
        _check_run(pt["runs"][0], 2)
        assert pt["malloc"] == "default"  # measured as PyTorch users run it
        assert res["pytorch"] in text and res["pytorch_threads"] >= 1
        assert len(case["ratio_speed_pairs"]) == 1 and case["ratio_memory"] > 0
        assert "engine/PyTorch speed" in text
    else:
        assert "pytorch" not in case and "ratio_speed" not in case
        assert "the engine is measured alone" in text


def test_charrnn_bench_without_pytorch_measures_the_engine_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(charrnn, "have_torch", lambda: False)
    out = tmp_path / "b.json"
    assert charrnn.main([*TINY, "--json", str(out)]) == 0
    assert "PyTorch is not installed: the engine is measured alone" in capsys.readouterr().out
    res = json.loads(out.read_text())
    (case,) = res["cases"]
    assert "pytorch" not in case and "ratio_speed" not in case
    assert res["settings"]["engine_alone_without_pytorch"] is True
    with pytest.raises(SystemExit) as e:
        charrnn.main([*TINY, "--framework", "pytorch"])
    assert e.value.code == 2 and "PyTorch is not installed" in capsys.readouterr().err


def test_a_failed_child_is_reported_with_its_last_stderr_line(capsys, monkeypatch):
    argv = charrnn.child_argv

    def broken(kind, *rest):  # the engine's child gets an argument it rejects
        return argv(kind, *rest) + (["--executor", "bogus"] if kind == "engine" else [])

    monkeypatch.setattr(charrnn, "child_argv", broken)
    assert charrnn.main([*TINY, "--framework", "engine"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: engine process 1 of 1 (gru128) failed (exit 2): ")
    assert "invalid choice: 'bogus'" in err


def test_child_environment_drops_the_openblas_kernel_choice_for_the_engine_only():
    # a made-up environment: the tests never change the machine's own OPENBLAS_* settings
    parent = {"OPENBLAS_CORETYPE": "FakeCore", "OPENBLAS_L2_SIZE": "12345", "OPENBLAS_NUM_THREADS": "2"}
    for kind in ("engine", "gemm"):
        env, removed = charrnn.child_env(kind, parent)
        assert env == {"OPENBLAS_NUM_THREADS": "2"}
        assert removed == {"OPENBLAS_CORETYPE": "FakeCore", "OPENBLAS_L2_SIZE": "12345"}
    assert charrnn.child_env("pytorch", parent) == (parent, {})
    assert charrnn.child_env("engine", {"PATH": "/bin"}) == ({"PATH": "/bin"}, {})
    assert parent["OPENBLAS_CORETYPE"] == "FakeCore"  # the caller's mapping is left alone
    assert charrnn.unset_note(removed) == ("unset OPENBLAS_CORETYPE=FakeCore, OPENBLAS_L2_SIZE=12345 "
                                           "for the engine's processes (see docs/speed.md)")


def test_emulated_avx2_limits_each_frameworks_library(monkeypatch):
    """--emulate-avx2: the engine (and the GEMM peak) on OpenBLAS's Haswell kernel even
    where the parent pinned another, PyTorch's ATen and MKL on AVX2."""
    monkeypatch.setattr(charrnn, "EMULATE_AVX2", [True])
    parent = {"PATH": "/bin", "OPENBLAS_CORETYPE": "Sandybridge"}
    for kind in ("engine", "gemm"):
        env, removed = charrnn.child_env(kind, parent)
        assert env["OPENBLAS_CORETYPE"] == "Haswell" and removed == {"OPENBLAS_CORETYPE": "Sandybridge"}
    env, _ = charrnn.child_env("pytorch", parent)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    env, _ = charrnn.child_env("engine", parent)
    assert env["RNN_ENGINE_STEP_GEMM"] == "avx2"      # the engine's own GEMM on AVX2 too
    assert env["RNN_ENGINE_CELL_ISA"] == "avx2"       # and its cell kernels
    # NumPy's own loops: in a child with this environment no target above AVX2 is on
    code = ("import numpy, json\n"
            "try:\n    from numpy._core import _multiarray_umath as u\n"
            "except ImportError:\n    from numpy.core import _multiarray_umath as u\n"
            "print(json.dumps([t for t in u.__cpu_dispatch__ if u.__cpu_features__.get(t)]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "NPY_DISABLE_CPU_FEATURES": env["NPY_DISABLE_CPU_FEATURES"]},
                       timeout=60)
    on = json.loads(r.stdout)
    assert not [t for t in on if "512" in t or t == "X86_V4"], on


def _run(meds, train, rss):
    # a process whose median step time is meds (its other steps around it)
    return {"step_s": [meds * 0.5, meds, meds * 3], "train_mib": train, "peak_rss_mib": rss,
            "setup_rss_mib": 10.0, "last_loss": 4.6, "blas": "b", "malloc": "m"}


def test_summary_is_the_median_of_per_process_medians_and_ratios_are_per_pair():
    eng = charrnn.summarise([_run(0.1, 20, 100), _run(0.3, 22, 104), _run(0.2, 21, 102)],
                            flops=4e9, chars=1000, peak=100.0)
    assert eng["median_step_s"] == 0.2 and (eng["min_step_s"], eng["max_step_s"]) == (0.1, 0.3)
    assert eng["chars_per_s"] == 5000 and eng["chars_per_s_range"] == [3333.3, 10000]
    assert eng["gflops"] == 20 and eng["peak_fraction"] == 0.2
    assert eng["train_mib"] == 21 and eng["train_mib_range"] == [20, 22] and eng["peak_rss_mib"] == 102
    pt = charrnn.summarise([_run(0.2, 40, 200), _run(0.9, 44, 200), _run(0.1, 42, 200)],
                           flops=4e9, chars=1000, peak=100.0)
    r = charrnn.ratios(eng, pt)
    assert r["ratio_speed_pairs"] == [2.0, 3.0, 0.5]  # PyTorch's time / the engine's, pair by pair
    assert (r["ratio_speed"], r["ratio_speed_min"], r["ratio_speed_max"]) == (2.0, 0.5, 3.0)
    assert r["ratio_memory"] == 0.5 and r["ratio_peak_rss"] == 0.51


def test_each_engine_process_is_measured_against_its_own_peak():
    """The share of the GEMM peak per process (its median step against the peak it measured
    itself), median and min-max over the processes; absent when a process measured none."""
    runs = [_run(0.1, 20, 100), _run(0.3, 22, 104), _run(0.2, 21, 102)]
    for r, p in zip(runs, (50.0, 20.0, 40.0)):
        r["gemm_peak_gflops"] = p
    eng = charrnn.summarise(runs, flops=4e9, chars=1000, peak=100.0)
    assert eng["peak_fraction"] == 0.2                       # against the peak of the start
    assert eng["process_peaks_gflops"] == [50.0, 20.0, 40.0]
    assert eng["own_peak_fraction"] == 0.667                 # 40/50 -> 0.8, 13.3/20, 20/40
    assert eng["own_peak_fraction_range"] == [0.5, 0.8]
    del runs[1]["gemm_peak_gflops"]
    assert "own_peak_fraction" not in charrnn.summarise(runs, flops=4e9, chars=1000, peak=100.0)


def test_each_window_is_measured_against_the_higher_probe_around_it():
    """--probe-every: a window's median step against max(probe before, probe after); the
    median over a process's windows, then median and min-max over the processes."""
    steps = [0.1, 0.3, 0.2, 0.2, 0.5]                 # windows of 2: [.1 .3] [.2 .2] [.5]
    shares = charrnn.window_shares(steps, [50.0, 40.0, 100.0, 20.0], 2, flops=4e9)
    assert [round(x, 3) for x in shares] == [0.4, 0.2, 0.08]   # 20/50, 20/100, 8/100
    runs = [_run(0.1, 20, 100), _run(0.2, 22, 104)]
    runs[0].update(window_peaks_gflops=[80.0, 100.0], probe_every=3)   # one window: 40/100
    runs[1].update(window_peaks_gflops=[20.0, 40.0], probe_every=3)    # 20/40
    eng = charrnn.summarise(runs, flops=4e9, chars=1000, peak=100.0)
    assert eng["window_peak_fraction"] == 0.45 and eng["window_peak_fraction_range"] == [0.4, 0.5]
    assert eng["window_peaks_range_gflops"] == [20.0, 100.0] and eng["probe_every"] == 3
    del runs[1]["window_peaks_gflops"]
    assert "window_peak_fraction" not in charrnn.summarise(runs, flops=4e9, chars=1000, peak=100.0)


def test_probed_windows_are_reported_by_the_engine_process(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert charrnn.main([*TINY, "--framework", "engine", "--probe-every", "1",
                         "--json", str(out)]) == 0
    text = capsys.readouterr().out
    eng = json.loads(out.read_text())["cases"][0]["engine"]
    run = eng["runs"][0]
    assert run["probe_every"] == 1 and len(run["window_peaks_gflops"]) == 3   # 2 steps: 3 probes
    assert all(p > 0 for p in run["window_peaks_gflops"]) and eng["window_peak_fraction"] > 0
    assert "of the peak probed around each 1 step (" in text


def test_bench_counts_must_be_positive(capsys):
    for bad in (["--pairs", "0"], ["--steps", "0"], ["--warmup", "-1"], ["--pairs", "x"]):
        with pytest.raises(SystemExit) as e:
            charrnn.main(["--case", "gru128", *bad])
        assert e.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_model_flops_counts_every_gemm():
    # GRU 512 over one-hot 101: input fwd + dW, recurrent fwd + dW + dh, output fwd + dW + dX
    rows, G, H, V = 50 * 50, 3, 512, 101
    expect = 2 * rows * (V * G * H * 2 + H * G * H * 3 + H * V * 3)
    assert charrnn.model_flops("GRU", H, 50, 50, V, 1) == expect


def test_gemm_layout_bench_runs(capsys):
    assert gemm_layout.main(["--hidden", "32", "--batch", "4", "--gates", "3", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "feature-major" in text and "x the speed of row-major" in text


def test_step_gemm_bench_runs(capsys):
    from bench import stepgemm
    from engine.layers import kernels
    if kernels.step_mode()["isa"] == "blas":
        pytest.skip("the packed step GEMM is off here: " + kernels.step_mode()["why"])
    stepgemm.main(["--hidden", "32", "--gates", "3", "--batch", "5", "--steps", "3",
                   "--rounds", "1"])
    text = capsys.readouterr().out
    assert "step GEMM: packed" in text and "fwd: packed is" in text and "bwd: packed is" in text


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform

    from engine.backend import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_profile_reports_every_part_of_a_step(tmp_path, capsys):
    from bench import profile
    out = tmp_path / "p.json"
    assert profile.main(["--case", "gru128", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    parts = res["parts_s"]
    assert set(parts) == {k for k, _ in profile.PARTS}
    for key in ("step_gemm_fwd", "gates_fwd", "proj_gemm", "step_gemm_bwd", "gates_bwd", "grads",
                "output", "updater"):
        assert parts[key] > 0, key            # the GRU projects its input in one GEMM
    assert sum(v for k, v in parts.items() if k != "rest") <= res["probed_step_s"] * 1.5
    assert res["plain_step_s"] > 0 and "planned" in res["executor"]
    for _, label in profile.PARTS:
        assert label in text
    assert res["kernels"] in text and "cell kernels" in res["kernels"]


def test_profile_on_the_standin_prints_the_device_traffic(tmp_path, capsys, standin):
    """bench.profile --gpu 0 on the CuPy stand-in: the step's parts and its host<->device
    traffic, one batch copy in and one small read out per step."""
    from bench import profile
    out = tmp_path / "p.json"
    assert profile.main(["--case", "gru128", "--gpu", "0", "--steps", "2", "--warmup", "1",
                         "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["device"].startswith("cupy GPU 0")
    t = res["traffic_per_step"]
    assert (t["h2d"], t["d2h"], t["sync"]) == (1, 1, 0), t
    assert "host<->device per step (plain steps): 1 copies to the device" in text


def test_gpu_check_script_is_ready():
    """tools/gpu_check.sh parses, and every command line it runs takes the flags it gives."""
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    script = root / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for module, flags in (("engine.train", ["--steps", "--gpu", "--cpu", "--workspace"]),
                          ("bench.charrnn", ["--gpu", "--case", "--pairs", "--steps", "--warmup",
                                             "--json"])):
        assert f"python -m {module}" in text
        helptext = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root,
                                  capture_output=True, text=True).stdout
        for f in flags:
            assert f in helptext, (module, f)
    for path in ("tests/test_backends.py", "tests/test_standin.py", "tests/test_device_path.py",
                 "tools/make_corpus.py", "configs/char-rnn.conf"):
        assert path in text and (root / path).exists(), path


def test_addition_bench_runs_the_shipped_bilstm_job(tmp_path, capsys):
    """bench.addition: the engine's process trains configs/addition-bilstm.conf's net (one
    step here) and reports its step time."""
    from bench import addition
    out = tmp_path / "a.json"
    assert addition.main(["--framework", "engine", "--pairs", "1", "--steps", "1", "--warmup", "0",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["engine"]["median_step_s"] > 0 and "planned" in res["about"]["engine"]
    assert "bi-LSTM 100, addition problem" in text
