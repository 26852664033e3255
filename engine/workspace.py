"""The workspace of a job and what goes into it: the folder, the unrolled graphs of the
phases, the net-wide facts the layers get, and params to and from checkpoint arrays."""
from __future__ import annotations

import os
import pathlib

from engine.backend import to_host
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


def net_info(job_path, ws, seed, vocab=None, encoding=None, alg=None) -> dict:
    """The net-wide facts the layers get (see ``Layer.info``): ``vocab`` and its unit
    ``encoding`` ("utf-8" or "bytes") when known (a checkpoint's), ``alg`` the job's
    train_one_batch.alg when it gives one (kBP: a record input emits whole records)."""
    info = {"workspace": str(ws), "job_dir": str(job_dir(job_path)), "seed": seed}
    if vocab is not None:
        info["vocab"] = list(vocab)
        info["encoding"] = encoding or "utf-8"
    if alg is not None:
        info["alg"] = int(alg)
    return info


def job_alg(job: pb.JobProto) -> int | None:
    """The job's train_one_batch.alg when the job gives one, else None."""
    return job.train_one_batch.alg if job.train_one_batch.HasField("alg") else None


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
    return {f"param/{p.name}": to_host(p.data) for p in net.params}
