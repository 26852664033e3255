"""The GPU path on the CPU: the engine on the CuPy stand-in (tests/standin) equals the
NumPy run, in float64 to 1e-9, and keeps its host<->device traffic within a budget.

- every net of the backend tests (every layer family, both executors, the one-hot
  gather path, masks, both directions), two training steps with the update;
- a few training steps (with validation) of every shipped config through
  ``python -m engine.train --gpu 0``, against the same command with ``--cpu``;
- finite-difference gradient checks (``engine.gradcheck --gpu 0``) on both executors;
- sampling (``engine.sample --gpu 0`` and SINGA's sample job through engine.train);
- checkpoints: a stand-in run resumed on NumPy and a NumPy run resumed on the stand-in
  give the numbers of an uninterrupted run; an export of a stand-in checkpoint;
- the traffic budget of a training step.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import test_gradcheck as gc
from charjobs import TEXT, char_job
from engine.config import load_job
from test_backends import NETS, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "standin" / "run.py"
sys.path.insert(0, str(ROOT / "tools"))
import make_seqdata as gen  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("executor", ["reference", "auto"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_standin_equals_numpy(tmp_path, standin, executor, net):
    text = NETS[net](tmp_path)
    ref = run(tmp_path, text, "numpy", executor, dtype=np.float64)
    standin.TRAFFIC.reset()
    got = run(tmp_path, text, "cupy", executor, dtype=np.float64)
    assert standin.TRAFFIC.h2d > 0, "the run did not go through the stand-in"
    np.testing.assert_allclose(got[0], ref[0], **TOL)
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], **TOL, err_msg=f"grad {k}")
        np.testing.assert_allclose(got[2][k], ref[2][k], **TOL, err_msg=f"param {k}")


# ------------------------------------------------------------------ command lines

def cli(args, cwd, traffic=None, device=True, timeout=300, ok=True):
    """``python -m <args>``; with ``device`` through the stand-in runner (and ``--gpu 0``
    added by the caller)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    pre = [sys.executable, str(RUNNER)] + (["--traffic", str(traffic)] if traffic else [])
    cmd = (pre if device else [sys.executable]) + ["-m", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def metrics(ws: pathlib.Path) -> list[dict]:
    lines = (ws / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def same_records(got: list[dict], ref: list[dict]) -> None:
    """Equal metrics records (every number but speed and time) to 1e-9."""
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert (g["step"], g["phase"]) == (r["step"], r["phase"])
        for k, v in r.items():
            if k in ("elapsed", "seconds") or k.endswith("_per_s") or not isinstance(v, float):
                continue
            np.testing.assert_allclose(g[k], v, **TOL, err_msg=f"step {r['step']} {k}")


#: shipped config -> data task of tools/make_seqdata.py (None: a char-rnn text corpus)
SHIPPED = {"char-rnn.conf": None, "char-rnn-small.conf": None, "many-to-one.conf": "classify",
           "many-to-many.conf": "parity", "encoder-decoder.conf": "reverse",
           "addition-lstm.conf": "addition", "addition-bilstm.conf": "addition-long",
           "one-to-many.conf": "count-up", "one-to-many-real.conf": "ramp",
           "count-ones.conf": "count-ones", "one-to-one.conf": "quadrant"}


def test_every_shipped_config_is_covered():
    """Every training config of configs/ is in SHIPPED (the sampling job has its own test)."""
    confs = {p.name for p in (ROOT / "configs").glob("*.conf")}
    assert confs == set(SHIPPED) | {"char-rnn-sample.conf"}


def shipped(conf: str, tmp: pathlib.Path, steps: int = 3) -> pathlib.Path:
    """configs/<conf> on small data in ``tmp``: ``steps`` steps, a display every step, a
    validation at the last one."""
    tmp.mkdir(parents=True, exist_ok=True)
    task = SHIPPED[conf]
    if task is not None:
        gen.write_task(task, tmp / "data", seed=1, n_train=200, n_val=100)
    else:
        (tmp / "train.txt").write_text(TEXT, encoding="utf-8")
        (tmp / "val.txt").write_text(TEXT[::-1], encoding="utf-8")
    job = load_job(ROOT / "configs" / conf)
    for layer in job.neuralnet.layer:
        if layer.HasField("store_conf"):
            layer.store_conf.path = str(tmp / "data" / pathlib.PurePosixPath(layer.store_conf.path).name)
            del layer.store_conf.batchsize[:]
            layer.store_conf.batchsize.append(20)
        if layer.HasField("char_rnn_conf"):
            c = layer.char_rnn_conf
            c.path = str(tmp / ("val.txt" if "val" in c.path else "train.txt"))
            c.ClearField("vocab_path")
            c.batchsize = 8
    job.train_steps, job.disp_freq, job.checkpoint_freq = steps, 1, 0
    job.ClearField("disp_after")
    job.validate_freq, job.validate_steps = steps, 1
    job.cluster.workspace = "ws"
    path = tmp / conf
    path.write_text(text_format.MessageToString(job), encoding="utf-8")
    return path


@pytest.mark.parametrize("conf", sorted(SHIPPED))
def test_shipped_config_trains_on_the_standin_as_on_numpy(tmp_path, conf):
    job = shipped(conf, tmp_path)
    common = ["engine.train", job, "--dtype", "float64"]
    cli([*common, "--cpu", "--workspace", "ws-cpu"], tmp_path, device=False)
    r = cli([*common, "--gpu", "0", "--workspace", "ws-gpu"], tmp_path,
            traffic=tmp_path / "traffic.json")
    assert "cupy GPU 0 (float64)" in r.stdout
    assert json.loads((tmp_path / "traffic.json").read_text())["h2d"] > 0
    same_records(metrics(tmp_path / "ws-gpu"), metrics(tmp_path / "ws-cpu"))
    with np.load(tmp_path / "ws-gpu/checkpoints/step3.npz") as g, \
            np.load(tmp_path / "ws-cpu/checkpoints/step3.npz") as c:
        assert set(g.files) == set(c.files)
        for k in c.files:
            if c[k].dtype.kind == "f":
                np.testing.assert_allclose(g[k], c[k], **TOL, err_msg=k)


@pytest.mark.parametrize("executor", ["reference", "planned"])
@pytest.mark.parametrize("rnn", ["kGRU", "kLSTM"])
def test_gradcheck_on_the_standin(tmp_path, rnn, executor):
    job = char_job(tmp_path, rnn=rnn, hidden=5, batch=2, unroll=4, val=False)
    r = cli(["engine.gradcheck", job, "--gpu", "0", "--executor", executor, "--samples", "6",
             "--max-full", "40"], tmp_path, traffic=tmp_path / "t.json")
    assert "0 above" in r.stdout and "FAIL" not in r.stdout, r.stdout
    assert json.loads((tmp_path / "t.json").read_text())["h2d"] > 0


# ------------------------------------------------- sampling, checkpoints, export

@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """char-rnn-small trained 4 steps (checkpoints at 2 and 4) on the stand-in and on NumPy,
    float64."""
    tmp = tmp_path_factory.mktemp("small")
    job = shipped("char-rnn-small.conf", tmp, steps=4)
    text = job.read_text().replace("checkpoint_freq: 0", "checkpoint_freq: 2")
    if "checkpoint_freq" not in text:
        text = "checkpoint_freq: 2\n" + text
    job.write_text(text)
    common = ["engine.train", job, "--dtype", "float64"]
    cli([*common, "--cpu", "--workspace", "cpu"], tmp, device=False)
    cli([*common, "--gpu", "0", "--workspace", "gpu"], tmp)
    return tmp, job


def test_sampling_on_the_standin_equals_numpy(small_runs):
    tmp, _ = small_runs
    ck = tmp / "gpu/checkpoints/step4.npz"
    args = ["engine.sample", "--checkpoint", ck, "--length", 80, "--prime", "def ", "--seed", 5]
    on_gpu = cli([*args, "--gpu", "0"], tmp).stdout
    on_cpu = cli(args, tmp, device=False).stdout
    assert on_gpu == on_cpu and len(on_gpu) >= 80


def test_singa_sample_job_on_the_standin(small_runs):
    """configs/char-rnn-sample.conf (a test-only job, kRNNDummy fed back from kArgSort) on the
    stand-in writes the text it writes on NumPy."""
    tmp, _ = small_runs
    job = load_job(ROOT / "configs" / "char-rnn-sample.conf")
    job.checkpoint_path[:] = [str(tmp / "gpu/checkpoints/step4.npz")]
    job.test_steps = 60
    path = tmp / "sample.conf"
    path.write_text(text_format.MessageToString(job), encoding="utf-8")
    on_gpu = cli(["engine.train", path, "--gpu", "0", "--workspace", "s-gpu"], tmp).stdout
    on_cpu = cli(["engine.train", path, "--cpu", "--workspace", "s-cpu"], tmp, device=False).stdout

    def text(out):
        mark = "--- text written by layer"
        assert mark in out, out
        return out[out.index(mark):]
    assert text(on_gpu) == text(on_cpu) and len(text(on_gpu)) > 60


@pytest.mark.parametrize("first,then", [("gpu", "cpu"), ("cpu", "gpu")])
def test_resume_across_backends(small_runs, first, then):
    """A run checkpointed at step 2 on one backend and resumed on the other ends at step 4
    with the params of the uninterrupted run."""
    tmp, job = small_runs
    ws = tmp / f"resume-{first}-{then}"
    ws.mkdir()
    (ws / "checkpoints").mkdir()
    src = tmp / first / "checkpoints" / "step2.npz"
    (ws / "checkpoints" / "step2.npz").write_bytes(src.read_bytes())
    flag = ["--gpu", "0"] if then == "gpu" else ["--cpu"]
    cli(["engine.train", job, "--dtype", "float64", "--workspace", ws, "--resume", *flag], tmp,
        device=then == "gpu")
    with np.load(ws / "checkpoints/step4.npz") as got, \
            np.load(tmp / "cpu/checkpoints/step4.npz") as ref:
        for k in ref.files:
            if k.startswith("param") and ref[k].dtype.kind == "f":
                np.testing.assert_allclose(got[k], ref[k], **TOL, err_msg=k)


def test_export_of_a_standin_run(small_runs):
    from engine.safetensors_io import read  # noqa: PLC0415

    tmp, _ = small_runs
    outs = {}
    for run_ in ("gpu", "cpu"):
        out = tmp / f"{run_}.safetensors"
        cli(["engine.export", tmp / run_ / "checkpoints/step4.npz", out], tmp, device=False)
        outs[run_] = read(out)[0]
    assert set(outs["gpu"]) == set(outs["cpu"]) and outs["cpu"]
    for k, v in outs["cpu"].items():
        np.testing.assert_allclose(outs["gpu"][k], v, **TOL, err_msg=k)


# ------------------------------------------------------------------ traffic budget

def traffic_of(tmp: pathlib.Path, steps: int, name: str) -> dict:
    job = char_job(tmp / name, steps=steps, val=False)
    text = job.read_text().replace("disp_freq: 5", "disp_freq: 10").replace(
        "checkpoint_freq: 5", "checkpoint_freq: 0")
    job.write_text(text)
    out = tmp / f"{name}.json"
    cli(["engine.train", job, "--gpu", "0"], tmp / name, traffic=out)
    return json.loads(out.read_text())


def test_training_step_traffic_budget(tmp_path):
    """20 more training steps (two displays among them) cost: one copy of the batch to the
    device and one small read (loss, gradient norm, the layers' checks) per step, one read
    per display, no scalar waits, and no copy of a param either way."""
    short, long_ = traffic_of(tmp_path, 10, "short"), traffic_of(tmp_path, 30, "long")
    steps, displays = 20, 2
    d = {k: long_[k] - short[k] for k in ("h2d", "d2h", "sync", "h2d_bytes")}
    assert d["h2d"] == steps, d                   # the batch (the one-hot layer's ids)
    assert d["d2h"] == steps + displays, d        # the step's read and the display's
    assert d["sync"] == 0, (d, long_["where"])
    assert d["h2d_bytes"] == steps * 4 * 9 * 4, d  # 4 rows of 8 + 1 int32 ids per step
    per_file = {k.split()[1].split(":")[0] for k in long_["where"]}
    assert "updaters.py" not in per_file and "layers" not in per_file


def test_a_bad_label_on_the_device_fails_the_step(tmp_path):
    """A label outside the softmax's range stops training on the device as on NumPy: the
    same message, at the same step, before its update (the check is read with the step's
    one read), the last good checkpoint kept."""
    rng = np.random.default_rng(0)
    path = gc.save_npz(tmp_path / "d.npz", x=rng.standard_normal((6, 5, 3)),
                       y=np.array([0, 1, 2, 1, 3, 0]), lengths=np.array([2, 5, 3, 4, 1, 5]))
    text = gc.many_to_one_text(path, "gru").replace(
        "train_one_batch { alg: kBPTT }",
        "train_one_batch { alg: kBPTT }\ntrain_steps: 4 disp_freq: 1 checkpoint_freq: 1\n"
        "updater { type: kSGD learning_rate { type: kFixed base_lr: 0.1 } }")
    job = gc.write_job(tmp_path, text)
    lines, codes = {}, {}
    for dev in ("cpu", "gpu"):
        flag = ["--gpu", "0"] if dev == "gpu" else ["--cpu"]
        r = cli(["engine.train", job, "--workspace", f"ws-{dev}", *flag], tmp_path,
                device=dev == "gpu", ok=False)
        codes[dev] = r.returncode
        lines[dev] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        ckpts = sorted(p.name for p in (tmp_path / f"ws-{dev}/checkpoints").glob("*.npz"))
        assert ckpts == ["step1.npz"], ckpts
    assert len(lines["gpu"]) == 1 and "label 3 is outside [0, 3)" in lines["gpu"][0], lines
    assert lines["gpu"] == lines["cpu"] and codes["gpu"] == codes["cpu"] == 2
