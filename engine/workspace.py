"""The workspace of a job and what goes into it: the folder, its lock, the unrolled graphs
of the phases, the net-wide facts the layers get, and params to and from checkpoint arrays."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import stat

import numpy as np

from engine.backend import to_host
from engine.checkpoint import section, temp_path, write_atomic
from engine.config import ConfigError, Phase, job_dir, layers_in_phase
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.unroll import graph_to_json, unroll

try:
    import fcntl
except ImportError:  # not a POSIX system: workspaces are not locked there
    fcntl = None


def workspace_of(job: pb.JobProto, override: str | None) -> pathlib.Path:
    """``--workspace``, else cluster.workspace, else workspace/<job name>. A job name is a
    name, not a path: it becomes ONE folder under ./workspace (a separator, or a name of
    "." or "..", cannot take the run outside it)."""
    if override:
        return pathlib.Path(override)
    if job.cluster.workspace:
        return pathlib.Path(job.cluster.workspace)
    return pathlib.Path("workspace") / folder_name(job.name or "job")


def folder_name(name: str) -> str:
    """``name`` as a single, harmless folder name: path separators and NUL become "_", and
    "." or ".." (or nothing) becomes "_"."""
    safe = "".join("_" if c in "/\\\0" else c for c in name)
    return "_" if safe in ("", ".", "..") else safe


def ensure_workspace(ws: pathlib.Path) -> None:
    """Create the workspace and check it is writable; ConfigError otherwise."""
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe = temp_path(ws / "write-test")  # a killed run's probe is a stale temporary
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{ws}: the workspace cannot be written ({e.strerror}); choose another "
                          f"with --workspace DIR") from None


LOCK = "lock"


class WorkspaceLock:
    """An exclusive lock on a workspace: ``fcntl.flock`` on ``<ws>/lock``, whose text is the
    holder's PID. The OS releases it when the holder's process ends, however it ends, so a
    killed run never leaves a stale lock (the file stays; its PID is only informative).
    Network file systems may not honour flock between machines: a workspace shared by
    several machines is not protected by it. Without ``fcntl`` (not a POSIX system) the
    lock is not taken."""

    def __init__(self, ws: pathlib.Path):
        self.path = pathlib.Path(ws) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "WorkspaceLock":
        """Take the lock or raise ConfigError naming the process that holds it. The file is
        opened without following a symbolic link (a link named ``lock`` is refused: the
        run would write into whatever it points to) and must be a regular file. Nothing is
        written into it here: ``stamp`` writes the PID once the run is accepted, so a
        refused run leaves the file as it found it."""
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP or self.path.is_symlink():
                raise ConfigError(f"{self.path} is a symbolic link; the engine keeps its own lock "
                                  f"file there and would write into what the link points to: "
                                  f"remove the link, or use another --workspace") from None
            raise ConfigError(f"{self.path}: cannot open the workspace lock ({e.strerror}); "
                              f"choose another --workspace") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"{self.path} is not a regular file; the engine keeps its lock file "
                              f"there: move it away, or use another --workspace")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.path.parent}: the workspace is in use by {holder} (it "
                                  f"holds {self.path}); wait for it to finish or stop it, or use "
                                  f"another --workspace") from None
            raise ConfigError(f"{self.path}: cannot lock the workspace ({e.strerror}); the file "
                              f"system may not support locks: use a local --workspace") from None
        self.fd = fd
        return self

    def stamp(self) -> None:
        """Write this process's PID into the held lock (what a refused run names)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the PID is informative only; the lock itself is held

    def release(self) -> None:
        """Give the lock back (the process's end does the same)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        text = []
    return f"process {text[0]}" if text and text[0].isdigit() else "another process"


def lock_workspace(ws: pathlib.Path) -> WorkspaceLock:
    """``WorkspaceLock(ws).acquire()``: the run's exclusive hold on its workspace."""
    return WorkspaceLock(ws).acquire()


# What the engine keeps in a workspace, and whether each is a folder.
_LAYOUT = {"checkpoints": True, "visualization": True, "metrics.jsonl": False,
           "metrics.superseded.jsonl": False,
           "vocab.txt": False, LOCK: False}


def check_layout(ws: pathlib.Path) -> None:
    """Every entry the engine writes in ``ws`` that exists already has the right kind
    (a folder ``checkpoints``, a file ``metrics.jsonl``, ...); ConfigError naming it
    otherwise, before anything runs."""
    for name, folder in _LAYOUT.items():
        p = pathlib.Path(ws) / name
        if not p.exists() or p.is_dir() == folder:
            continue
        kind, want = ("a folder", "a file") if p.is_dir() else ("not a folder", "a folder")
        raise ConfigError(f"{p} is {kind}, but the engine keeps {want} there; move it away or "
                          f"use another --workspace")


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


def write_graphs(job, path, ws: pathlib.Path, phases, keep: bool = False) -> dict:
    """Unroll each phase and write visualization/<phase>_net.json; returns {phase: Unrolled}.
    ``keep``: the workspace's graphs belong to its checkpoints, so a graph that differs
    from the one there is a ConfigError (nothing written) instead of a replacement."""
    out = {ph: unroll(job.neuralnet, ph, job.name, where=str(path)) for ph in phases}
    vis = ws / "visualization"
    texts = {ph: json.dumps(graph_to_json(u.graph), indent=1).encode() for ph, u in out.items()}
    if keep:
        for ph, text in texts.items():
            old = vis / f"{ph.label}_net.json"
            if old.exists() and old.read_bytes() != text:
                raise ConfigError(f"{old} is the graph the checkpoints in {ws / 'checkpoints'} "
                                  f"were trained with, and this job's {ph.label} net differs; "
                                  f"write its graphs to another --workspace (nothing was "
                                  f"overwritten)")
    for ph, text in texts.items():  # each file whole or untouched (write_atomic)
        write_atomic(vis / f"{ph.label}_net.json", text, "graph", ConfigError)
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


def check_values(a, what: str) -> None:
    """ConfigError unless ``a`` holds real, finite numbers (a param read from a file: a NaN
    would poison every step and every sample, an imaginary part would be dropped)."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise ConfigError(f"{what} holds complex numbers ({a.dtype}); the engine's params are "
                          f"real: write the real part, or fix the file")
    if a.dtype.kind not in "fiub":
        raise ConfigError(f"{what} holds {a.dtype} values, not numbers")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ConfigError(f"{what} holds {int(bad.sum())} non-finite value(s) (the first, "
                              f"{a[first]}, at index {list(first)}); the file's weights are "
                              f"unusable: use an earlier checkpoint")


def load_params(net: Net, arrays: dict, where: str, partial: bool = False) -> list:
    """Copy ``param/<name>`` arrays into the net's params, naming every mismatch. With
    ``partial`` (``checkpoint_path``, as SINGA's Worker::InitNetParams does) a param the
    arrays lack keeps its initial value; the names of those are returned."""
    missing, wrong = [], []
    params = section(arrays, "param")
    for p in net.params:
        a = params.get(p.name)
        if a is None:
            missing.append(p.name)
        elif tuple(a.shape) != tuple(p.shape):
            wrong.append(f"{p.name} {list(a.shape)} vs net {list(p.shape)}")
        else:
            check_values(a, f'{where}: param "{p.name}"')
            p.data[...] = net.xp.asarray(a.astype(p.data.dtype, copy=False))
    if wrong:
        raise ConfigError(f"{where}: param shapes differ from the net: {', '.join(wrong)}")
    if missing and partial and len(missing) < len(net.params):
        return missing      # some loaded: the rest keep their initial values
    if missing:
        have = sorted(params)
        raise ConfigError(f"{where}: the checkpoint has no param {', '.join(missing)} (it has "
                          f"{', '.join(have) or 'none'}); the net's param names must match the "
                          f"job that wrote it")
    return []


def param_arrays(net: Net) -> dict:
    """The net's params as host arrays by name (the checkpoint section ``param``)."""
    return {p.name: to_host(p.data) for p in net.params}
