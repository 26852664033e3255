"""Checkpoints: one ``.npz`` file per snapshot, written atomically, with a checksum.

A checkpoint ``<workspace>/checkpoints/step<N>.npz`` holds named sections (``SECTIONS``;
``join`` builds the flat names, ``section`` reads one back):
  param/<name>      every owner param (host arrays, training dtype)
  updater/<key>     the updater's state (histories, Adam's t, ...)
  worker/<key>      the worker's state: carried recurrent state, carry/<layer>/<part>/<parts>
  meta              one JSON string: format version, step, the job text it was
                    trained with, vocabulary, RNG/data cursors, and the SHA-256
                    of all arrays above (checked on load)
It is written to a temporary file in the same folder, fsync'ed and renamed,
so a crash never leaves a half-written ``step<N>.npz``.

Temporary files (``write_atomic``, used by ``save``) are named
``.<name>.tmp<PID>`` (``temp_path``) beside the file they become. A write that
fails removes its temporary and raises the caller's error naming the file and
the OS reason (a full disk says so, and what to do). A process killed mid-write
cannot clean up: ``remove_stale_temps`` removes the temporaries of processes
that no longer exist, and is meant to run at start-up.

SINGA v0.3's checkpoints (``step<N>-worker<K>``, a serialized BlobProtos) are read by
``load_singa`` into the same ``param/<name>`` arrays; ``load_any`` picks the reader.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import zipfile

import numpy as np
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from engine.proto import job_pb2 as pb

FORMAT = 1
_STEP_RE = re.compile(r"^step(\d+)\.npz$")
_TEMP_RE = re.compile(r"^\.(.+)\.tmp(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (the message names the file and why)."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def temp_path(path) -> pathlib.Path:
    """The temporary file ``write_atomic`` writes before renaming it to ``path``:
    ``.<name>.tmp<PID>`` in the same folder (the PID tells ``remove_stale_temps``
    whether its writer still runs)."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _write_failure(path: pathlib.Path, what: str, e: OSError, size: int) -> str:
    """One line: the file, the OS reason and, for a full disk, what to do."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_size(shutil.disk_usage(path.parent).free)} free in {path.parent}, "
        except OSError:
            free = ""
        return (f"{path}: cannot write the {what}: the disk is full ({reason}; {free}the {what} "
                f"needs {_size(size)}); free space there or train in another --workspace, then "
                f"continue with --resume")
    return f"{path}: cannot write the {what} ({reason})"


def write_atomic(path, data, what: str = "file", error=None) -> pathlib.Path:
    """Write the bytes ``data`` to ``path`` so that it is either complete or untouched:
    into ``temp_path(path)``, flushed and fsync'ed, then renamed over ``path`` (and the
    folder fsync'ed). On any failure (a full disk, an interrupt) the temporary file is
    removed; an OSError becomes ``error`` (default CheckpointError) with one line naming
    ``path``, the ``what`` and the OS reason; anything else is re-raised."""
    error = error or CheckpointError
    path = pathlib.Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(_write_failure(path, what, e, len(data))) from None
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


#: the sections of a checkpoint's arrays, each a prefix ``<section>/``
SECTIONS = ("param", "updater", "worker")


def join(**sections: dict) -> dict:
    """One flat dict of arrays from named sections (``param=..., updater=...``)."""
    out = {}
    for name, arrays in sections.items():
        if name not in SECTIONS:
            raise ValueError(f"unknown checkpoint section {name!r}")
        out.update({f"{name}/{k}": v for k, v in arrays.items()})
    return out


def section(arrays: dict, name: str) -> dict:
    """The arrays of one section, named without its prefix."""
    if name not in SECTIONS:
        raise ValueError(f"unknown checkpoint section {name!r}")
    head = name + "/"
    return {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)}


def save(path, arrays: dict[str, np.ndarray], meta: dict) -> pathlib.Path:
    """Write ``arrays`` and ``meta`` atomically to ``path`` (``write_atomic``);
    CheckpointError naming the file when it cannot be written."""
    path = pathlib.Path(path)
    meta = dict(meta, format=FORMAT, sha256=_digest(arrays))
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    return write_atomic(path, buf.getbuffer(), "checkpoint")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (True when unsure: its file is left alone)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # os.kill(pid, 0) would not be a harmless probe there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # PermissionError: another user's live process; odd ids: not ours
    return True


def remove_stale_temps(*folders) -> list[pathlib.Path]:
    """Remove the temporary files (``.<name>.tmp<PID>``, see ``temp_path``) that
    processes which no longer exist left in ``folders`` (not recursive; a missing
    folder is skipped). A live process's file (its PID exists, this process
    included) is never touched. Returns the removed paths. The PID check holds on
    one machine: a workspace shared over a network file system by several machines
    must not run this while another machine writes to it."""
    removed = []
    for folder in folders:
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = _TEMP_RE.match(p.name)
            if m is None or not p.is_file() or _pid_alive(int(m.group(2))):
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError:
                continue  # not ours to remove (permissions): left alone
            removed.append(p)
    return removed


def npz_problem(e: Exception) -> str:
    """What went wrong reading an .npz, in words that never advise unpickling it: NumPy's
    own message for an array of Python objects says to pass allow_pickle=True, which would
    let an untrusted file run code."""
    text = str(e)
    if "pickle" in text.lower():
        return ("it holds Python objects (pickled data), which the engine never loads: "
                "an untrusted file could run code")
    return f"{type(e).__name__}: {text}"


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint and verify its checksum; CheckpointError when unusable."""
    path = pathlib.Path(path)
    if not path.exists():
        raise missing(path)
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files if k != "meta"}
            if "meta" not in d.files:
                raise CheckpointError(f"{path}: not a checkpoint of this engine (no meta record)")
            meta = json.loads(str(d["meta"]))
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: not a checkpoint of this engine (its meta record is "
                                  f"a JSON {type(meta).__name__}, not an object)")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted ({npz_problem(e)})") from None
    if meta.get("sha256") != _digest(arrays):
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted")
    return arrays, meta


def list_checkpoints(folder) -> list[tuple[int, pathlib.Path]]:
    """(step, path) of every ``step<N>.npz`` in ``folder``, oldest first."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# What engine.train needs in a checkpoint's meta to resume from it, and its JSON type.
RESUME_META = {"step": int, "job": str}


def check_meta(path, meta: dict, need: dict) -> None:
    """CheckpointError naming ``path`` when ``meta`` lacks a key of ``need`` ({key: type})
    or holds it with another type."""
    for key, kind in need.items():
        if key not in meta:
            raise CheckpointError(f'{path}: the checkpoint has no "{key}" in its meta record; '
                                  f"it was not written by engine.train")
        v = meta[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise CheckpointError(f'{path}: the checkpoint\'s "{key}" is {json.dumps(v)[:40]}, '
                                  f"not a {kind.__name__}; it was not written by engine.train")


def meta_vocab(path, meta: dict) -> list | None:
    """The vocabulary a checkpoint's meta records (a list of symbols), or None when it has
    none; CheckpointError naming ``path`` when it records something else."""
    v = meta.get("vocab")
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise CheckpointError(f'{path}: the checkpoint\'s "vocab" is {json.dumps(v)[:40]}, not a '
                              f"list of characters; it was not written by engine.train")
    return v


def newest_valid(folder, warn=print, need: dict | None = None):
    """The newest checkpoint that loads and verifies (and whose meta has the keys of
    ``need``, see ``check_meta``): (path, arrays, meta) or None. Each invalid newer one
    is reported through ``warn`` and skipped."""
    for step, p in reversed(list_checkpoints(folder)):
        try:
            arrays, meta = load(p)
            check_meta(p, meta, need or {})
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
            continue
        return p, arrays, meta
    return None


def prune(folder, keep: int, protect: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Delete all but the newest ``keep`` checkpoints; never the ``protect``ed one
    (the last valid) and never when fewer than one would remain."""
    keep = max(1, int(keep))
    items = list_checkpoints(folder)
    removed = []
    for step, p in items[:-keep]:
        if protect is not None and p.resolve() == pathlib.Path(protect).resolve():
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ----------------------------------------------------- SINGA v0.3 checkpoints
# SINGA's workers write ``<workspace>/checkpoint/step<N>-worker<K>``: one serialized
# BlobProtos (common.proto) with, for each param that owns its values, name[i],
# version[i] and blob[i] = BlobProto {shape, packed float32 data, row-major}. In an
# unrolled net every param is named after its copy, ``0#w`` (the owner; copies i > 0
# share it and are usually not written).

_UNROLL_PREFIX = re.compile(r"^(\d+)#(.+)$")


def singa_param_name(name: str) -> str:
    """A SINGA param name without its unrolling prefix: ``0#z_hx`` -> ``z_hx``."""
    m = _UNROLL_PREFIX.match(name)
    return m.group(2) if m else name


def _unknown_fields(msg) -> int:
    return len(unknown_fields.UnknownFieldSet(msg))


def load_singa(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a SINGA v0.3 checkpoint: ``({"param/<name>": float32 array}, meta)``, as
    ``load`` returns them, with names stripped of SINGA's ``i#`` prefix (``0#w`` and
    ``w`` are one param; two entries that map to one name must hold the same array).
    meta: ``{"format": "singa", "versions": {name: version}}``. Anything that is not a
    BlobProtos whose every blob holds prod(shape) values raises CheckpointError."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise missing(path) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: a zip (.npz) file, not a SINGA checkpoint; this "
                              f"engine's own checkpoints are read with engine.checkpoint.load")
    bps = pb.BlobProtos()
    try:
        bps.ParseFromString(raw)
    except DecodeError:
        raise CheckpointError(f"{path}: not a SINGA checkpoint (the file is not a serialized "
                              f"BlobProtos message)") from None
    if _unknown_fields(bps) or any(_unknown_fields(b) for b in bps.blob):
        raise CheckpointError(f"{path}: not a SINGA checkpoint (fields a BlobProtos message "
                              f"does not have)")
    names, blobs, versions = list(bps.name), list(bps.blob), list(bps.version)
    if not names:
        raise CheckpointError(f"{path}: not a SINGA checkpoint, or one without params (no "
                              f"param names)")
    if len(blobs) != len(names) or (versions and len(versions) != len(names)):
        raise CheckpointError(f"{path}: {len(names)} param names, {len(blobs)} blobs and "
                              f"{len(versions)} versions; a SINGA checkpoint has one of each "
                              f"per param")
    arrays: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    out_versions: dict[str, int] = {}
    for i, (name, blob) in enumerate(zip(names, blobs)):
        key = singa_param_name(name)
        if not key:
            raise CheckpointError(f"{path}: param {i} has no name")
        shape = tuple(int(s) for s in blob.shape)
        need = math.prod(int(s) for s in shape)    # Python's integers: no wrap-around
        if any(s < 0 for s in shape) or need != len(blob.data):
            raise CheckpointError(f'{path}: param "{name}": shape {list(shape)} needs '
                                  f"{need} values but its blob holds {len(blob.data)}")
        a = np.fromiter(blob.data, dtype=np.float32, count=len(blob.data)).reshape(shape)
        if key in arrays:
            if arrays[key].shape != a.shape or not np.array_equal(arrays[key], a):
                raise CheckpointError(f'{path}: params "{source[key]}" and "{name}" both map to '
                                      f'"{key}" (without the unrolling prefix) but hold different '
                                      f"values; a checkpoint of one net has one array per param")
            continue
        arrays[key], source[key] = a, name
        if versions:
            out_versions[key] = int(versions[i])
    return ({f"param/{k}": v for k, v in arrays.items()},
            {"format": "singa", "versions": out_versions})


def save_singa(path, params: dict[str, np.ndarray], versions: dict[str, int] | None = None,
               prefix: str = "0#", step: int | None = None) -> pathlib.Path:
    """Write ``{name: array}`` as a SINGA v0.3 checkpoint (BlobProtos), each param named
    ``prefix + name`` (SINGA's owner copy ``0#``; "" for a net that was not unrolled),
    float32 values, version ``step`` for every param when given, else ``versions[name]``
    (default 0; SINGA initialises a param whose version is 0 anew instead of loading it, so
    a checkpoint for SINGA gives the step). Written atomically (``write_atomic``)."""
    path = pathlib.Path(path)
    bps = pb.BlobProtos()
    for name, a in params.items():
        a = np.asarray(a, dtype=np.float32)
        bps.name.append(prefix + name)
        bps.version.append(int(step) if step is not None else int((versions or {}).get(name, 0)))
        blob = bps.blob.add()
        blob.shape.extend(int(s) for s in a.shape)
        blob.data.extend(a.ravel().tolist())
    return write_atomic(path, bps.SerializeToString(), "SINGA checkpoint")


#: what SINGA names its checkpoints: ``step<N>-worker<K>``
SINGA_NAME = re.compile(r"^step(\d+)-worker(\d+)$")


def singa_checkpoint_name(path) -> tuple[int, int] | None:
    """(step, worker) when ``path`` is named like a SINGA checkpoint, else None."""
    m = SINGA_NAME.match(pathlib.Path(path).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def missing(path: pathlib.Path) -> CheckpointError:
    """The error for a checkpoint that is not there, naming what its workspace holds (the
    folder above ``checkpoints/`` or SINGA's ``checkpoint/``, else the file's folder)."""
    ws = path.parent.parent if path.parent.name in ("checkpoints", "checkpoint") else path.parent
    return CheckpointError(f"{path}: no such checkpoint; {ws} holds {workspace_listing(ws)}")


def workspace_listing(ws) -> str:
    """What checkpoints a workspace holds, in words, for a "no such checkpoint" line:
    ``checkpoints/step10.npz, checkpoint/step10-worker0`` or "none"."""
    ws = pathlib.Path(ws)
    found = []
    for sub, pattern in (("checkpoints", "step*.npz"), ("checkpoint", "step*-worker*")):
        folder = ws / sub
        if folder.is_dir():
            found += sorted((f"{sub}/{p.name}" for p in folder.glob(pattern)),
                            key=lambda s: [int(x) if x.isdigit() else x
                                           for x in re.split(r"(\d+)", s)])
    return ", ".join(found) if found else "no checkpoint"


def load_any(path) -> tuple[dict[str, np.ndarray], dict]:
    """``load`` for this engine's .npz checkpoints (a zip file), ``load_singa`` for
    anything else: what ``checkpoint_path`` accepts."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    return load(path) if head == b"PK\x03\x04" else load_singa(path)
