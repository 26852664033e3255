"""Shared set-up for the CLIs: workspace, nets per phase, checkpoint loading, metrics log."""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from engine.config import ConfigError, Phase, job_dir, layers_in_phase
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.unroll import unroll, write_graph_json


def workspace_of(job: pb.JobProto, override: str | None) -> pathlib.Path:
    """``--workspace``, else cluster.workspace, else workspace/<job name>."""
    if override:
        return pathlib.Path(override)
    if job.cluster.workspace:
        return pathlib.Path(job.cluster.workspace)
    return pathlib.Path("workspace") / (job.name or "job")


def ensure_workspace(ws: pathlib.Path) -> None:
    """Create the workspace and check it is writable; ConfigError otherwise."""
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe = ws / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{ws}: the workspace cannot be written ({e.strerror}); choose another "
                          f"with --workspace DIR") from None


def phases_of(job: pb.JobProto) -> list[Phase]:
    """The phases the job runs: train (when train_steps > 0), val, test."""
    out = []
    if job.train_steps > 0:
        out.append(Phase.TRAIN)
    if job.validate_steps > 0 and layers_in_phase(job.neuralnet, Phase.VAL):
        out.append(Phase.VAL)
    if job.test_steps > 0:
        out.append(Phase.TEST)
    return out or [Phase.TRAIN]


def write_graphs(job, path, ws: pathlib.Path, phases) -> dict:
    """Unroll each phase and write visualization/<phase>_net.json; returns {phase: Unrolled}."""
    vis = ws / "visualization"
    vis.mkdir(parents=True, exist_ok=True)
    out = {}
    for ph in phases:
        u = unroll(job.neuralnet, ph, job.name, where=str(path))
        write_graph_json(u.graph, vis / f"{ph.label}_net.json")
        out[ph] = u
    return out


def net_info(job_path, ws, seed, vocab=None) -> dict:
    info = {"workspace": str(ws), "job_dir": str(job_dir(job_path)), "seed": seed}
    if vocab is not None:
        info["vocab"] = list(vocab)
    return info


def load_params(net: Net, arrays: dict, where: str) -> None:
    """Copy ``param/<name>`` arrays into the net's params, naming every mismatch."""
    missing, wrong = [], []
    for p in net.params:
        a = arrays.get(f"param/{p.name}")
        if a is None:
            missing.append(p.name)
        elif tuple(a.shape) != tuple(p.shape):
            wrong.append(f"{p.name} {list(a.shape)} vs net {list(p.shape)}")
        else:
            p.data[...] = net.xp.asarray(a.astype(p.data.dtype, copy=False))
    if wrong:
        raise ConfigError(f"{where}: param shapes differ from the net: {', '.join(wrong)}")
    if missing:
        have = sorted(k[6:] for k in arrays if k.startswith("param/"))
        raise ConfigError(f"{where}: the checkpoint has no param {', '.join(missing)} (it has "
                          f"{', '.join(have) or 'none'}); the net's param names must match the "
                          f"job that wrote it")


def param_arrays(net: Net) -> dict:
    return {f"param/{p.name}": net.backend.asnumpy(p.data) for p in net.params}


def derived_metrics(metrics: dict, net: Net) -> dict:
    """{name: value} from {name: [sum, count]}, adding perplexity (softmax loss) and
    bits per character (char input)."""
    out = {k: (s / c if c else float("nan")) for k, (s, c) in metrics.items() if k != "objective"}
    if "loss" in out and any(lay.conf.type == pb.kSoftmaxLoss for lay in net.losses):
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        if any(lay.conf.type == pb.kCharRNN for lay in net.inputs):
            out["bpc"] = out["loss"] / math.log(2)
    return out


def merge_metrics(total: dict, batch: dict) -> None:
    for k, (s, c) in batch.items():
        slot = total.setdefault(k, [0.0, 0.0])
        slot[0] += s
        slot[1] += c


class MetricsLog:
    """Appends one JSON object per display or evaluation to <workspace>/metrics.jsonl,
    and, when tensorboardX is installed, the same numbers as TensorBoard scalars under
    <workspace>/tensorboard (``<phase>/<metric>``)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._tb = None
        self._tb_tried = False

    def _board(self):
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                return None
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (resume from a checkpoint at that step)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._board()
        if tb is not None:
            for k, v in record.items():
                if k not in ("step", "phase") and isinstance(v, (int, float)):
                    tb.add_scalar(f"{record.get('phase', 'train')}/{k}", v, record.get("step", 0))
            tb.flush()


def fmt_metrics(values: dict) -> str:
    parts = []
    for k in ("loss", "accuracy", "perplexity", "bpc", "mse"):
        if k in values:
            parts.append(f"{k} {values[k]:.4f}")
    for k, v in values.items():
        if k not in ("loss", "accuracy", "perplexity", "bpc", "mse"):
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)


def fmt_time(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


class Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, start: int = 0):
        self.total = max(1, total)
        self.on = sys.stderr.isatty()
        self.t0 = time.time()
        self.start = start

    def update(self, step: int) -> None:
        if not self.on:
            return
        frac = step / self.total
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        done = step - self.start
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} {rate:.2f} step/s eta {fmt_time(eta)} ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def first_nonfinite(worker) -> str | None:
    """The first unrolled node (schedule order) whose output is not finite."""
    xp = worker.xp
    blocks = getattr(worker, "blocks", None)
    if blocks:  # planned executor: one block per layer, rows step-major
        B = worker.batchsize
        for st in worker.plan.steps:
            y = blocks.get(st.layer.name)
            if y is None or not np.issubdtype(y.dtype, np.floating):
                continue
            bad = ~xp.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
            if bool(bad.any()):
                return f"{int(xp.argmax(bad)) // B}#{st.layer.name}"
        return None
    for n in worker.net.nodes:
        y = worker.outs.get(n.id)
        if y is None:
            continue
        ys = y if isinstance(y, list) else [y]
        for a in ys:
            if hasattr(a, "dtype") and np.issubdtype(a.dtype, np.floating) and \
                    not bool(xp.isfinite(a).all()):
                return n.id
    return None
