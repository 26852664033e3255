"""The jobs that reproduce the source documents' examples (issue 21): the numpy BPTT
tutorial's count-ones (linear RNN + Rprop) and Karpathy's one-to-many pattern. Each
trains through ``python -m engine.train`` on data from tools/make_seqdata.py and must
reach the learning target the issue sets; where the document gives a PyTorch result,
the same set-up in PyTorch is run beside it."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from engine.config import load_job
from engine.proto import job_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_seqdata as gen  # noqa: E402


def run_job(conf: str, task: str, tmp_path: pathlib.Path, n_train=None, n_val=None,
            steps=None, **overrides) -> pathlib.Path:
    """Train configs/<conf> on fresh data of ``task`` in tmp_path; returns the workspace."""
    data = tmp_path / "data"
    gen.write_task(task, data, seed=0, n_train=n_train, n_val=n_val)
    job = load_job(ROOT / "configs" / conf)
    for layer in job.neuralnet.layer:
        if layer.HasField("store_conf"):
            layer.store_conf.path = str(data / pathlib.PurePosixPath(layer.store_conf.path).name)
    for k, v in overrides.items():
        setattr(job, k, v)
    ws = tmp_path / "ws"
    job.cluster.workspace = str(ws)
    path = tmp_path / conf
    path.write_text(text_format.MessageToString(job), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "engine.train", str(path)]
    if steps:
        cmd += ["--steps", str(steps)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return ws


def last_checkpoint(ws: pathlib.Path) -> dict:
    ck = sorted((ws / "checkpoints").glob("step*.npz"), key=lambda p: int(p.stem[4:]))[-1]
    with np.load(ck) as d:
        return {k: d[k] for k in d.files}


def records(ws: pathlib.Path, phase: str) -> list[dict]:
    lines = (ws / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


# ---------------------------------------------------------------- count-ones

def test_count_ones_config_is_the_tutorials_model():
    job = load_job(ROOT / "configs" / "count-ones.conf")
    rnn = next(c for c in job.neuralnet.layer if c.name == "rnn")
    assert rnn.type == pb.kRNN and rnn.rnn_conf.activation == pb.LINEAR
    assert rnn.rnn_conf.dim_hidden == 1 and not rnn.rnn_conf.bias_term
    assert [(p.name, p.init.value) for p in rnn.param] == [("wx", -1.5), ("wRec", 2.0)]
    assert job.updater.type == pb.kRProp
    data = next(c for c in job.neuralnet.layer if c.name == "data")
    assert data.store_conf.batchsize[0] == gen.SIZES["count-ones"][0] == 20  # full batch


def torch_count_ones(x: np.ndarray, y: np.ndarray, steps: int):
    """The tutorial's model and start in PyTorch (float64), trained by torch.optim.Rprop
    with the job's settings: (wx, wRec) after ``steps`` full-batch steps."""
    torch = pytest.importorskip("torch")
    w = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Rprop([w], lr=0.001, etas=(0.5, 1.2))
    X, Y = torch.tensor(x[:, :, 0], dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        h = torch.zeros(X.shape[0], dtype=torch.float64)
        for t in range(X.shape[1]):
            h = X[:, t] * w[0] + h * w[1]
        ((h - Y) ** 2).mean().backward()
        opt.step()
    return float(w[0].detach()), float(w[1].detach())


def test_count_ones_learns_to_count_from_the_tutorials_start(tmp_path):
    ws = run_job("count-ones.conf", "count-ones", tmp_path)
    ck = last_checkpoint(ws)
    wx, wrec = float(ck["param/wx"].item()), float(ck["param/wRec"].item())
    print(f"count-ones: engine wx {wx:.6f} wRec {wrec:.6f}")
    assert abs(wx - 1) < 0.01 and abs(wrec - 1) < 0.01, (wx, wrec)
    assert records(ws, "train")[-1]["mse"] < 1e-4
    d = np.load(tmp_path / "data" / "train.npz")
    twx, twrec = torch_count_ones(d["x"], d["y"], 500)
    print(f"count-ones: torch  wx {twx:.6f} wRec {twrec:.6f}")
    assert abs(twx - 1) < 0.01 and abs(twrec - 1) < 0.01


# -------------------------------------------------------------- one-to-many

@pytest.mark.parametrize("conf,task,metric,ok", [
    ("one-to-many.conf", "count-up", "accuracy", lambda v: v >= 0.95),
    ("one-to-many-real.conf", "ramp", "mse", lambda v: v < 0.01)])
def test_one_to_many_reaches_its_target_within_600_steps(tmp_path, conf, task, metric, ok):
    job = load_job(ROOT / "configs" / conf)
    assert job.train_steps <= 600
    gru = next(c for c in job.neuralnet.layer if c.name == "gru")
    assert list(gru.unroll_conn_type) == [pb.kUnrollOneToFirst]
    assert all(c.unroll_len == 1 for c in job.neuralnet.layer if c.name == "data")
    ws = run_job(conf, task, tmp_path, n_train=1000, n_val=500, validate_steps=10)
    val = records(ws, "val")
    assert val[-1]["step"] == job.train_steps
    print(f"{conf}: val {metric} {val[-1][metric]:.6f} at step {val[-1]['step']}")
    assert ok(val[-1][metric]), val[-1]


# ------------------------------------------------------------ one-to-one, gallery

def test_one_to_one_learns_the_quadrants(tmp_path):
    ws = run_job("one-to-one.conf", "quadrant", tmp_path)
    val = records(ws, "val")
    print(f"one-to-one: val accuracy {val[-1]['accuracy']:.4f}")
    assert val[-1]["step"] == 600 and val[-1]["accuracy"] >= 0.95


def test_gallery_renders_the_five_patterns_and_the_docs_show_them(tmp_path):
    pytest.importorskip("graphviz")
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    import gallery
    assert gallery.main(["--out", str(tmp_path)]) == 0
    names = [name for name, _ in gallery.PATTERNS]
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(names)
    assert all((tmp_path / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    jobs = (ROOT / "docs" / "jobs.md").read_text(encoding="utf-8")
    for n in names:
        assert f"gallery/{n}.png" in jobs and (ROOT / "docs" / "gallery" / f"{n}.png").exists()
    assert "python tools/gallery.py" in jobs
    # the shortened copy keeps each pattern: the decoder still follows the encoder
    text = gallery.shortened(ROOT / "configs" / "encoder-decoder.conf", 4)
    assert "unroll_len: 4" in text and "unroll_len: 6" not in text


def test_export_refuses_the_linear_rnn_instead_of_writing_tanh(tmp_path):
    """PyTorch's nn.RNN has no identity: exporting count-ones' linear kRNN is one line (it
    was exported as a tanh RNN)."""
    from engine.backend import make_backend
    from engine.config import Phase
    from engine.interop import InteropError, chain_of
    from engine.net import Net
    from engine.unroll import unroll
    from engine.workspace import net_info
    gen.write_task("count-ones", tmp_path / "data", seed=0)
    job = load_job(ROOT / "configs" / "count-ones.conf")
    job.neuralnet.layer[0].store_conf.path = str(tmp_path / "data" / "train.npz")
    out = job.neuralnet.layer.add(name="out", type=pb.kInnerProduct, srclayers=["rnn"], unroll_len=10,
                                  unroll_conn_type=[pb.kUnrollOneToOne], shift=[0])
    out.innerproduct_conf.num_output = 1
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None),
              net_info(tmp_path / "c.conf", tmp_path / "ws", 0))
    with pytest.raises(InteropError, match=r'layer "rnn".*activation LINEAR.*tanh and relu only'):
        chain_of(net, "c.conf")
