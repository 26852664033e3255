"""The shipped job files and the synthetic data generator.

* every configs/*.conf loads and unrolls in each phase it runs;
* each sequence job (many-to-one, many-to-many, encoder-decoder, addition-lstm,
  addition-bilstm)
  trains a few dozen steps on tiny data generated into tmp_path and its loss
  goes down (and its validation phase runs);
* tools/make_seqdata.py is deterministic for a seed and its data sets mean
  what their docstring says.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from google.protobuf import text_format

from engine.config import Phase, layers_in_phase, load_job
from engine.proto import job_pb2 as pb
from engine.workspace import phases_of
from engine.unroll import unroll

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_seqdata as gen  # noqa: E402

CONFIGS = sorted((ROOT / "configs").glob("*.conf"))

#: the sequence jobs: config -> (generator task, steps, display window)
SEQ_JOBS = {
    "many-to-one.conf": ("classify", 100, 20),
    "many-to-many.conf": ("parity", 100, 20),
    "encoder-decoder.conf": ("reverse", 100, 20),
    "addition-lstm.conf": ("addition", 60, 20),
    "addition-bilstm.conf": ("addition-long", 40, 20),
    "one-to-many.conf": ("count-up", 40, 20),
    "one-to-many-real.conf": ("ramp", 40, 20),
}


# ----------------------------------------------------------- load and unroll

def test_shipped_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"char-rnn.conf", *SEQ_JOBS} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_unrolls(path):
    job = load_job(path)
    phases = phases_of(job)  # a sampling job (train_steps 0) runs only its test phase
    assert phases
    for ph in phases:
        u = unroll(job.neuralnet, ph, job.name, where=str(path))
        g = u.graph
        assert nx.is_directed_acyclic_graph(g)
        layers = layers_in_phase(job.neuralnet, ph)
        assert g.number_of_nodes() == sum(layer.unroll_len for layer in layers)
        # the unrolled NetProto names every copy and wires it to existing copies
        names = {c.name for c in u.netproto.layer}
        assert len(names) == g.number_of_nodes()
        for c in u.netproto.layer:
            assert set(c.srclayers) <= names
        if ph == Phase.TRAIN:
            losses = [c for c in layers if c.type in (pb.kSoftmaxLoss, pb.kEuclideanLoss)]
            assert losses, "a training job needs a loss layer"


@pytest.mark.parametrize("conf", sorted(SEQ_JOBS))
def test_seq_config_header_and_data_paths(conf):
    """The header says how to make the data and how to train; the paths are the generator's."""
    path = ROOT / "configs" / conf
    task = SEQ_JOBS[conf][0]
    text = path.read_text(encoding="utf-8")
    header = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("#"))
    assert f"python tools/make_seqdata.py {task}" in header
    assert f"python -m engine.train configs/{conf}" in header
    job = load_job(path)
    assert job.train_one_batch.alg == pb.kBPTT
    stems = set(gen.generate(task, "train", 2)) | set(gen.generate(task, "val", 2))
    for layer in job.neuralnet.layer:
        if layer.type == pb.kRecordInput:
            s = layer.store_conf
            assert s.backend == "npz"
            p = pathlib.PurePosixPath(s.path)
            assert p.parent == pathlib.PurePosixPath("data") / task and p.suffix == ".npz"
            assert p.stem in stems


def test_addition_config_is_the_addition_problem():
    job = load_job(ROOT / "configs" / "addition-lstm.conf")
    layers = {(c.name, tuple(c.include)): c for c in job.neuralnet.layer}
    data_train = layers[("data", (pb.kTrain,))]
    data_val = layers[("data", (pb.kVal,))]
    assert list(data_train.store_conf.batchsize) == [100] == list(data_val.store_conf.batchsize)
    lstm = layers[("lstm", ())]
    assert lstm.type == pb.kLSTM and lstm.lstm_conf.dim_hidden == 100 and lstm.unroll_len == 25
    ip = layers[("ip", ())]
    assert ip.innerproduct_conf.num_output == 1 and ip.unroll_len == 1
    assert list(ip.unroll_conn_type) == [pb.kUnrollFirstToLast]
    assert layers[("loss", ())].type == pb.kEuclideanLoss
    # it regresses onto the sums the data layer carries, not (SINGA's default) its features
    assert layers[("loss", ())].euclideanloss_conf.target == pb.EuclideanLossProto.kLabels
    assert job.updater.type == pb.kAdam
    assert job.updater.learning_rate.base_lr == pytest.approx(0.003)
    assert job.train_steps == 4000 and job.validate_freq > 0 and job.validate_steps > 0


def test_addition_bilstm_config_is_lasagnes_bidirectional_read_out():
    """Lengths 50..55, a forward and a kBackward LSTM 100 over the data, the forward one's
    last copy (first-to-last) and the backward one's copy 0 (one-to-one into one copy)
    concatenated into kInnerProduct and kEuclideanLoss; Adam 3e-3, batch 100, gradient
    values clipped at 100, validation over 1000 sequences."""
    job = load_job(ROOT / "configs" / "addition-bilstm.conf")
    layers = {(c.name, tuple(c.include)): c for c in job.neuralnet.layer}
    assert job.neuralnet.unroll_len == 55
    for phase in (pb.kTrain, pb.kVal):
        assert list(layers[("data", (phase,))].store_conf.batchsize) == [100]
    fwd, bwd = layers[("fwd", ())], layers[("bwd", ())]
    assert fwd.type == bwd.type == pb.kLSTM
    assert fwd.lstm_conf.dim_hidden == bwd.lstm_conf.dim_hidden == 100
    assert fwd.lstm_conf.direction == pb.kForward and bwd.lstm_conf.direction == pb.kBackward
    cat = layers[("cat", ())]
    assert cat.type == pb.kConcate and cat.unroll_len == 1 and list(cat.srclayers) == ["fwd", "bwd"]
    assert list(cat.unroll_conn_type) == [pb.kUnrollFirstToLast, pb.kUnrollOneToOne]
    assert cat.concate_conf.concate_dim == 1
    assert layers[("ip", ())].innerproduct_conf.num_output == 1
    assert layers[("loss", ())].type == pb.kEuclideanLoss
    u = job.updater
    assert u.type == pb.kAdam and u.learning_rate.base_lr == pytest.approx(0.003)
    assert (u.clip_low, u.clip_high) == (-100, 100)
    assert job.validate_steps * 100 == gen.SIZES["addition-long"][1] == 1000
    assert job.train_steps == 3000
    g = unroll(job.neuralnet, Phase.TRAIN, job.name).graph
    assert set(g.predecessors("0#cat")) == {"54#fwd", "0#bwd"}
    assert g.edges["1#bwd", "0#bwd"]["shift"] == -1


# ------------------------------------------------------------- short training

def tiny_job(conf: str, tmp_path: pathlib.Path, steps: int, disp: int) -> pathlib.Path:
    """A copy of configs/<conf> reading tiny generated data in tmp_path."""
    task = SEQ_JOBS[conf][0]
    data = tmp_path / "data"
    gen.write_task(task, data, seed=1, n_train=400, n_val=200)
    job = load_job(ROOT / "configs" / conf)
    for layer in job.neuralnet.layer:
        if layer.HasField("store_conf"):
            p = data / pathlib.PurePosixPath(layer.store_conf.path).name
            assert p.exists(), p
            layer.store_conf.path = str(p)
            assert layer.store_conf.batchsize[0] <= 200
    job.disp_freq = disp
    job.validate_freq = steps // 2
    job.validate_steps = 2
    job.checkpoint_freq = 0
    job.cluster.workspace = str(tmp_path / "ws")
    out = tmp_path / conf
    out.write_text(text_format.MessageToString(job), encoding="utf-8")
    return out


def records(ws: pathlib.Path, phase: str) -> list[dict]:
    lines = (ws / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


@pytest.mark.parametrize("conf", sorted(SEQ_JOBS))
def test_seq_job_trains(conf, tmp_path):
    """``python -m engine.train`` as a user runs it (one BLAS thread: these GEMMs are tiny,
    and two OpenBLAS threads on a two-core machine make them many times slower)."""
    task, steps, disp = SEQ_JOBS[conf]
    job = tiny_job(conf, tmp_path, steps, disp)
    ws = tmp_path / "ws"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "engine.train", str(job), "--workspace", str(ws),
                        "--steps", str(steps)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"done: {steps} steps" in r.stdout
    tr = records(ws, "train")
    assert [r["step"] for r in tr] == list(range(disp, steps + 1, disp))
    first, last = tr[0]["loss"], tr[-1]["loss"]
    assert np.isfinite(first) and np.isfinite(last)
    assert last < 0.8 * first, f"{conf}: train loss {first:.4f} -> {last:.4f}"
    val = records(ws, "val")
    assert [r["step"] for r in val] == [steps // 2, steps]
    assert val[-1]["loss"] < val[0]["loss"] * 1.05
    metric = "mse" if task.startswith("addition") or task == "ramp" else "accuracy"
    assert all(metric in r for r in tr + val)
    assert (ws / "checkpoints" / f"step{steps}.npz").exists()


def test_shuffled_store_is_shuffled_from_the_first_epoch(tmp_path):
    """many-to-one's training store has shuffle: true: every epoch, the first included, is a
    seeded permutation that visits each row once."""
    from engine.backend import make_backend
    from engine.net import Net
    from engine.workspace import net_info

    job_path = tiny_job("many-to-one.conf", tmp_path, 10, 5)
    job = load_job(job_path)
    data = next(c for c in job.neuralnet.layer if c.name == "data" and pb.kTrain in c.include)
    assert data.store_conf.shuffle
    orders = []
    for seed in (0, 0, 1):
        u = unroll(job.neuralnet, Phase.TRAIN, job.name)
        net = Net(u, make_backend(None), net_info(job_path, tmp_path / "ws", seed), seed=seed)
        lay = net.layers["data"]
        epoch = []
        for _ in range(lay.n // lay.batchsize):
            before = lay.cursor
            lay.load_batch()
            assert lay.epoch == 0
            epoch.extend(lay.order[before:before + lay.batchsize])
        orders.append(np.array(epoch))
        np.testing.assert_array_equal(np.sort(epoch), np.arange(lay.n))
        lay.load_batch()
        assert lay.epoch == 1 and not np.array_equal(lay.order, orders[-1])
    assert not np.array_equal(orders[0], np.arange(len(orders[0])))
    np.testing.assert_array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], orders[2])


# ------------------------------------------------------------ the generator

@pytest.mark.parametrize("task", gen.TASKS)
def test_generator_is_deterministic(task):
    a = gen.generate(task, "train", 64, seed=5)
    b = gen.generate(task, "train", 64, seed=5)
    c = gen.generate(task, "train", 64, seed=6)
    v = gen.generate(task, "val", 64, seed=5)
    assert a.keys() == b.keys() == c.keys()
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for k in a[stem]:
            np.testing.assert_array_equal(a[stem][k], b[stem][k])
    assert any(not np.array_equal(a[s]["x"], c[s]["x"]) for s in a)
    assert any(not np.array_equal(a[s]["x"], v[s.replace("train", "val")]["x"]) for s in a)


def test_write_task_files_are_reproducible(tmp_path):
    p1 = gen.write_task("reverse", tmp_path / "a", seed=2, n_train=30, n_val=10)
    p2 = gen.write_task("reverse", tmp_path / "b", seed=2, n_train=30, n_val=10)
    assert [p.name for p in p1] == ["train_enc.npz", "train_dec.npz", "val_enc.npz", "val_dec.npz"]
    for x, y in zip(p1, p2):
        with np.load(x) as dx, np.load(y) as dy:
            assert dx.files == dy.files
            for k in dx.files:
                np.testing.assert_array_equal(dx[k], dy[k])


def test_cli_writes_default_layout(tmp_path):
    assert gen.main(["addition", "--out", str(tmp_path / "add"), "--seed", "3",
                     "--n-train", "12", "--n-val", "7"]) == 0
    with np.load(tmp_path / "add" / "train.npz") as d:
        assert d["x"].shape == (12, 25, 2) and d["y"].shape == (12, 1)
    with np.load(tmp_path / "add" / "val.npz") as d:
        assert d["x"].shape == (7, 25, 2) and d["lengths"].shape == (7,)
    assert gen.main(["all", "--out", str(tmp_path / "all"), "--n-train", "5", "--n-val", "5"]) == 0
    for task in gen.TASKS:
        assert (tmp_path / "all" / task).is_dir()


def test_addition_data():
    d = gen.generate("addition", "train", 500, seed=0)["train"]
    x, y, lengths = d["x"], d["y"], d["lengths"]
    assert x.shape == (500, 25, 2) and x.dtype == np.float32 and y.shape == (500, 1)
    assert lengths.min() == 20 and lengths.max() == 25
    valid = np.arange(25)[None, :] < lengths[:, None]
    vals, marks = x[..., 0], x[..., 1]
    assert np.all(marks.sum(axis=1) == 2)
    assert np.all(marks[~valid] == 0) and np.all(vals[~valid] == 0)
    assert np.all((vals[valid] >= 0) & (vals[valid] < 1))
    assert set(np.unique(marks)) == {0.0, 1.0}
    np.testing.assert_allclose(y[:, 0], (vals * marks).sum(axis=1), rtol=1e-6)
    assert 0.1 < y.var() < 0.25  # the mean predictor's mse, about 1/6


def test_addition_long_data():
    """Lasagne's lengths: 50..55, padded to 55; otherwise the addition task."""
    d = gen.generate("addition-long", "val", 400, seed=0)["val"]
    x, y, lengths = d["x"], d["y"], d["lengths"]
    assert x.shape == (400, 55, 2) and y.shape == (400, 1)
    assert lengths.min() == 50 and lengths.max() == 55
    valid = np.arange(55)[None, :] < lengths[:, None]
    assert np.all(x[..., 1].sum(axis=1) == 2) and np.all(x[~valid] == 0)
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(axis=1), rtol=1e-6)


def test_parity_data():
    d = gen.generate("parity", "train", 50, seed=0)["train"]
    x, y = d["x"], d["y"]
    assert x.shape == y.shape == (50, 20) and x.dtype.kind == "i"
    for r in range(50):
        count = 0
        for t in range(20):
            count += int(x[r, t] == 1)
            assert y[r, t] == count % 2


def test_reverse_data():
    d = gen.generate("reverse", "val", 40, seed=0)
    src, dec_in, tgt = d["val_enc"]["x"], d["val_dec"]["x"], d["val_dec"]["y"]
    assert "y" not in d["val_enc"]
    np.testing.assert_array_equal(tgt, src[:, ::-1])
    assert np.all(dec_in[:, 0] == 8) and src.max() < 8
    np.testing.assert_array_equal(dec_in[:, 1:], tgt[:, :-1])


def test_classify_data():
    d = gen.generate("classify", "train", 400, seed=0)["train"]
    x, y, lengths = d["x"], d["y"], d["lengths"]
    assert x.shape == (400, 24, 2) and y.shape == (400,) and y.dtype.kind == "i"
    assert set(np.unique(y)) == set(range(len(gen.FREQS)))
    assert lengths.min() >= 12 and lengths.max() <= 24 and lengths.min() < 24
    pad = np.arange(24)[None, :] >= lengths[:, None]
    assert np.all(x[pad] == 0) and np.all(x[~pad] != 0)
    # the class is the dominant frequency of the wave channel
    k = 0
    row = np.flatnonzero((y == k) & (lengths == 24))[0]
    spec = np.abs(np.fft.rfft(x[row, :, 0]))
    peak = np.argmax(spec[1:]) + 1
    assert abs(peak / 24 - gen.FREQS[k]) <= 1 / 24
