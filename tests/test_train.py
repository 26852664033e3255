"""The job loop through its CLI: metrics, graphs, checkpoints, exact resume, signals, bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from charjobs import ROOT, char_job, run_cli
from engine import checkpoint as ckpt


def records(ws):
    return [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_graphs_and_checkpoints(tmp_path):
    job = char_job(tmp_path, steps=20)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    ws = tmp_path / "ws"
    assert (ws / "visualization" / "train_net.json").exists()
    assert (ws / "visualization" / "val_net.json").exists()
    recs = records(ws)
    train = [x for x in recs if x["phase"] == "train"]
    val = [x for x in recs if x["phase"] == "val"]
    assert [x["step"] for x in train] == [5, 10, 15, 20]
    assert [x["step"] for x in val] == [10, 20]
    for x in train:
        for key in ("loss", "accuracy", "perplexity", "bpc", "lr", "chars_per_s"):
            assert key in x
        assert x["perplexity"] == pytest.approx(np.exp(x["loss"]), rel=1e-9)
        assert x["bpc"] == pytest.approx(x["loss"] / np.log(2), rel=1e-9)
    assert train[-1]["loss"] < train[0]["loss"]
    # checkpoint_freq 5 with keep_checkpoints 3 (default): the newest three remain
    assert [s for s, _ in ckpt.list_checkpoints(ws / "checkpoints")] == [10, 15, 20]
    assert "step     20  train loss" in r.stdout


def test_steps_override_and_seed_reproducible(tmp_path):
    job = char_job(tmp_path, steps=50)
    a = run_cli("engine.train", job, "--steps", 6, "--workspace", tmp_path / "a")
    b = run_cli("engine.train", job, "--steps", 6, "--workspace", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, _ = ckpt.load(tmp_path / "a" / "checkpoints" / "step6.npz")
    pb_, _ = ckpt.load(tmp_path / "b" / "checkpoints" / "step6.npz")
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb_[k])


def _final_params(ws, step):
    arrays, meta = ckpt.load(ws / "checkpoints" / f"step{step}.npz")
    return {k: v for k, v in arrays.items() if k.startswith(("param/", "updater/"))}, meta


def test_resume_is_bitwise_exact(tmp_path):
    job = char_job(tmp_path, steps=20)
    straight = run_cli("engine.train", job, "--workspace", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    half = run_cli("engine.train", job, "--workspace", tmp_path / "split", "--steps", 10)
    assert half.returncode == 0, half.stderr
    resumed = run_cli("engine.train", job, "--workspace", tmp_path / "split", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 10" in resumed.stdout
    a, _ = _final_params(tmp_path / "straight", 20)
    b, _ = _final_params(tmp_path / "split", 20)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [(x["step"], x["phase"]) for x in records(tmp_path / "split")]
    assert steps == [(x["step"], x["phase"]) for x in records(tmp_path / "straight")]


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    job = char_job(tmp_path, steps=40, hidden=24)
    straight = run_cli("engine.train", job, "--workspace", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    ws = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", str(job), "--workspace", str(ws)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ws / "checkpoints" / "step20.npz").exists():
        assert proc.poll() is None, "training ended before the step-20 checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("engine.train", job, "--workspace", ws, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, _ = _final_params(tmp_path / "straight", 40)
    b, _ = _final_params(ws, 40)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [(x["step"], x["phase"]) for x in records(ws)]
    assert steps == [(x["step"], x["phase"]) for x in records(tmp_path / "straight")]
    assert len(steps) == len(set(steps))


def test_resume_skips_a_corrupted_checkpoint(tmp_path):
    job = char_job(tmp_path, steps=10)
    assert run_cli("engine.train", job).returncode == 0
    newest = tmp_path / "ws" / "checkpoints" / "step10.npz"
    data = bytearray(newest.read_bytes())
    newest.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    r = run_cli("engine.train", job, "--resume", "--steps", 12)
    assert r.returncode == 0, r.stderr
    assert "warning: skipping" in r.stdout and "step10.npz" in r.stdout
    assert "resumed from" in r.stdout and "at step 5" in r.stdout


def test_sigint_writes_a_checkpoint_and_exits_130(tmp_path):
    job = char_job(tmp_path, steps=100000, hidden=16)
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (ws / "checkpoints").exists() or not ckpt.list_checkpoints(ws / "checkpoints"):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in out and "--resume" in out
    step = int(out.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert (ws / "checkpoints" / f"step{step}.npz").exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("mutate, expect", [
    (lambda t, d: t.replace(str(d / "train.txt"), str(d / "missing.txt")),
     "missing.txt not found"),
    (lambda t, d: t.replace("batchsize: 4", "batchsize: 4000"),
     "fewer than batchsize x (unroll_len + 1)"),
    (lambda t, d: t.replace("name: \"tiny\"", "name: \"tiny\" gpu: 0"),
     "CuPy"),
    (lambda t, d: t.replace("train_steps: 20", "train_steps: 20 checkpoint_path: \"nowhere.npz\""),
     "nowhere.npz: no such checkpoint"),
])
def test_bad_input_is_one_line(tmp_path, mutate, expect):
    job = char_job(tmp_path)
    job.write_text(mutate(job.read_text(), tmp_path))
    r = run_cli("engine.train", job)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


def test_char_outside_vocabulary_is_named(tmp_path):
    job = char_job(tmp_path, val=False)
    (tmp_path / "vocab.txt").write_text("".join(sorted(set((tmp_path / "train.txt").read_text())
                                                       - {"P"})))
    job.write_text(job.read_text().replace(
        'batchsize: 4', f'vocab_path: "{tmp_path / "vocab.txt"}" batchsize: 4'))
    r = run_cli("engine.train", job)
    assert r.returncode == 2
    offset = (tmp_path / "train.txt").read_text().index("P")
    assert f"character 'P' at offset {offset} is not in the vocabulary" in r.stderr
    assert "Traceback" not in r.stderr


def test_workspace_that_cannot_be_written(tmp_path):
    job = char_job(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("engine.train", job, "--workspace", blocker / "ws")
    assert r.returncode == 2
    assert "the workspace cannot be written" in r.stderr and "Traceback" not in r.stderr


def test_graph_only(tmp_path):
    job = char_job(tmp_path, unroll=5)
    r = run_cli("engine.train", job, "--graph-only")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "ws" / "visualization" / "train_net.json").read_text())
    ids = {n["id"] for n in data["nodes"]}
    assert {"0#data", "4#rnn1", "4#loss"} <= ids and len(ids) == 1 + 5 * 5
    assert not (tmp_path / "ws" / "checkpoints").exists()


def test_debug_shows_traceback(tmp_path):
    job = char_job(tmp_path)
    job.write_text(job.read_text().replace(str(tmp_path / "train.txt"), "missing.txt"))
    r = run_cli("engine.train", job, "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    job = char_job(tmp_path, steps=50)
    text = job.read_text().replace("base_lr: 0.01", "base_lr: 1e38").replace(
        "clip_low: -5 clip_high: 5", "")
    text = text.replace("type: kRMSProp rmsprop_conf { rho: 0.95 }", "type: kSGD")
    job.write_text(text)
    r = run_cli("engine.train", job)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "step " in r.stderr and "non-finite loss or gradient" in r.stderr
    assert any(w in r.stderr for w in ("first non-finite output at", "non-finite gradient in param",
                                       "the loss overflowed"))
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    job = char_job(tmp_path, steps=5)
    assert run_cli("engine.train", job).returncode == 0
    before = (tmp_path / "ws" / "checkpoints" / "step5.npz").read_bytes()
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and "already holds checkpoints (newest: step 5)" in r.stderr
    assert (tmp_path / "ws" / "checkpoints" / "step5.npz").read_bytes() == before
    again = run_cli("engine.train", job, "--resume")  # finished job: nothing more to do
    assert again.returncode == 0 and "resumed from" in again.stdout


def test_plot_is_written_at_the_end_and_by_the_tool(tmp_path):
    pytest.importorskip("matplotlib")
    job = char_job(tmp_path, steps=10)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "ws" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    r = subprocess.run([sys.executable, "tools/plot.py", str(tmp_path / "ws")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and png.exists(), r.stderr
    r = subprocess.run([sys.executable, "tools/plot.py", str(tmp_path / "nothing")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no metrics yet" in r.stderr and "Traceback" not in r.stderr


def test_debug_dump_and_graph_with_stats(tmp_path):
    job = char_job(tmp_path, steps=10, unroll=4)
    r = run_cli("engine.train", job, "--debug")
    assert r.returncode == 0, r.stderr
    assert "executor: reference" in r.stdout
    vis = tmp_path / "ws" / "visualization"
    dumps = sorted(vis.glob("debug_step*.json"))
    assert [d.name for d in dumps] == ["debug_step10.json", "debug_step5.json"]
    data = json.loads(dumps[0].read_text())
    assert data["step"] == 10
    for nid in ("0#onehot", "3#rnn1", "3#ip1", "3#loss"):
        assert set(data["nodes"][nid]["out"]) == {"mean", "std", "max"}
    assert "grad" in data["nodes"]["0#rnn1"] and "grad" in data["nodes"]["3#ip1"]
    assert "grad" not in data["nodes"]["0#onehot"]  # nothing to learn below the first params
    assert data["params"]["rnn1/z_hx"]["grad"]["max"] > 0
    out = tmp_path / "g.dot"
    g = subprocess.run([sys.executable, "tools/graph.py", str(vis / "train_net.json"), str(out),
                        "--stats", str(dumps[0])], cwd=ROOT, capture_output=True, text=True)
    assert g.returncode == 0, g.stderr
    dot = out.read_text()
    mean = data["nodes"]["3#rnn1"]["out"]["mean"]
    assert "out: mean" in dot and "grad: mean" in dot
    assert f"{mean:.3g}" in dot or f"{mean:.2g}" in dot


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    job = char_job(tmp_path, steps=100000, hidden=16)
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(ws / "checkpoints"):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in out
    resumed = run_cli("engine.train", job, "--resume", "--steps", 1)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout


def test_skip_nonfinite_keeps_going(tmp_path):
    job = char_job(tmp_path, steps=6)
    text = job.read_text().replace("base_lr: 0.01", "base_lr: 1e38").replace(
        "clip_low: -5 clip_high: 5", "").replace("type: kRMSProp rmsprop_conf { rho: 0.95 }",
                                                 "type: kSGD")
    job.write_text(text.replace('name: "tiny"', 'name: "tiny" skip_nonfinite: true'))
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    assert "batch skipped (skip_nonfinite)" in r.stdout


def test_empty_data_file(tmp_path):
    job = char_job(tmp_path)
    (tmp_path / "train.txt").write_text("")
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and "is empty" in r.stderr and "Traceback" not in r.stderr


def test_tensorboard_scalars_when_tensorboardx_is_installed(tmp_path):
    pytest.importorskip("tensorboardX")
    job = char_job(tmp_path, steps=5)
    assert run_cli("engine.train", job).returncode == 0
    events = list((tmp_path / "ws" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()


@pytest.mark.parametrize("executor", ["auto", "reference"])
def test_nonfinite_gradient_names_the_node_it_arrives_at(tmp_path, executor):
    """Finite outputs, but the gradient flowing into the recurrent layer overflows: the
    batch is replayed and the first node (in backward order) receiving it is named."""
    job = char_job(tmp_path, steps=5, unroll=4)
    text = job.read_text().replace(
        'innerproduct_conf { num_output: 40 } }',
        'innerproduct_conf { num_output: 40 } param { name: "w" init { type: kConstant value: 1e30 } } }')
    text = text.replace('srclayers: "ip1" srclayers: "label" }',
                        'srclayers: "ip1" srclayers: "label" softmaxloss_conf { scale: 1e10 } }')
    job.write_text(text)
    r = run_cli("engine.train", job, "--executor", executor)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "step 1: non-finite loss or gradient; outputs finite; first non-finite gradient " \
           "arriving at 3#rnn1" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
