"""Jobs and helpers of the multi-worker tests (tests/test_distributed.py)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from charjobs import ROOT, char_job
from engine import checkpoint as ckpt
from engine.distributed import find_mpiexec


def mpi_ready() -> str:
    """"" when two ranks can run here, else why not (the reason a test is skipped)."""
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        return "mpi4py is not installed (pip install 'rnn-engine[mpi]')"
    if find_mpiexec() is None:
        return "no mpiexec beside this Python (pip install mpich)"
    return ""


def char_job_mpi(tmp: pathlib.Path, steps: int = 10, batch: int = 4, **kw) -> pathlib.Path:
    """The char-rnn GRU job with state carry and RMSProp, its value clipping tight
    enough to clip (the tiny GRU's gradients reach about 0.05)."""
    job = char_job(tmp, steps=steps, batch=batch, **kw)
    text = job.read_text().replace("clip_low: -5 clip_high: 5", "clip_low: -0.01 clip_high: 0.01")
    job.write_text(text)
    return job


def record_job(tmp: pathlib.Path, steps: int = 10, batch: int = 8, n: int = 40, T: int = 6,
               bad_label_row: int | None = None) -> pathlib.Path:
    """A record-input LSTM job: float features [N, T, 3] with lengths (masked steps), a
    label per step, shuffled epochs, Adam and global-norm clipping (tight enough to clip).
    ``bad_label_row``: that row's labels are out of range (a failure at its batch)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, T, 3)).astype(np.float32)
    lengths = rng.integers(2, T + 1, size=n)
    y = (np.cumsum(x[:, :, 0] > 0, axis=1) % 3).astype(np.int64)
    if bad_label_row is not None:
        y[bad_label_row] = 9
    np.savez(tmp / "train.npz", x=x, y=y, lengths=lengths)
    np.savez(tmp / "val.npz", x=x[:16], y=y[:16] % 3, lengths=lengths[:16])
    shuffle = "false" if bad_label_row is not None else "true"
    text = f"""name: "rec"
train_steps: {steps}
disp_freq: 5
validate_freq: 5 validate_steps: 1
checkpoint_freq: 5
train_one_batch {{ alg: kBPTT }}
updater {{ type: kAdam learning_rate {{ type: kFixed base_lr: 0.02 }} clip_norm: 0.05 }}
neuralnet {{ unroll_len: {T}
  layer {{ name: "data" type: kRecordInput include: kTrain
    store_conf {{ path: "{tmp / 'train.npz'}" batchsize: {batch} shuffle: {shuffle} }} }}
  layer {{ name: "data" type: kRecordInput include: kVal
    store_conf {{ path: "{tmp / 'val.npz'}" batchsize: {batch} }} }}
  layer {{ name: "lstm" type: kLSTM srclayers: "data" lstm_conf {{ dim_hidden: 8 }} }}
  layer {{ name: "ip" type: kInnerProduct srclayers: "lstm" innerproduct_conf {{ num_output: 3 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "data" }}
}}
cluster {{ workspace: "{tmp / 'ws'}" }}
"""
    path = tmp / "job.conf"
    path.write_text(text)
    return path


def train(job, *args, workers: int = 1, mpiexec: bool = False, timeout: int = 300,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m engine.train job args``: one process (workers 1), ``--workers N`` (the
    launcher), or ``mpiexec -n N python -m engine.train`` (``mpiexec=True``)."""
    cmd = [sys.executable, "-m", "engine.train", str(job), *map(str, args)]
    if workers > 1 and mpiexec:
        cmd = [find_mpiexec(), "-n", str(workers)] + cmd
    elif workers > 1:
        cmd += ["--workers", str(workers)]
    full_env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def state(ws: pathlib.Path, step: int) -> tuple[dict, dict]:
    """(params, updater state and carried state arrays; meta) of a checkpoint."""
    arrays, meta = ckpt.load(ws / "checkpoints" / f"step{step}.npz")
    return arrays, meta


def records(ws: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]


def worst_relative(a: dict, b: dict, norm: bool = False,
                   prefix: tuple = ("param/", "updater/", "worker/")) -> float:
    """Over the float arrays (params, updater state, carried state): the largest
    max|a - b| / max|a|, or with ``norm`` the largest ||a - b|| / ||a|| (keys must match)."""
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in a:
        if k.startswith(prefix) and a[k].dtype.kind == "f" and a[k].size:
            d = a[k].astype(np.float64) - b[k]
            if norm:
                err, scale = np.linalg.norm(d), np.linalg.norm(a[k].astype(np.float64))
            else:
                err, scale = np.abs(d).max(), float(np.abs(a[k]).max())
            worst = max(worst, float(err) / max(float(scale), 1e-30))
    return worst
