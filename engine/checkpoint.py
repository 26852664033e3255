"""Checkpoints: one ``.npz`` file per snapshot, written atomically, with a checksum.

A checkpoint ``<workspace>/checkpoints/step<N>.npz`` holds:
  param/<name>      every owner param (host arrays, training dtype)
  updater/<key>     the updater's state (histories, Adam's t, ...)
  worker/<key>      carried recurrent state
  meta              one JSON string: format version, step, the job text it was
                    trained with, vocabulary, RNG/data cursors, and the SHA-256
                    of all arrays above (checked on load)
It is written to a temporary file in the same folder, fsync'ed and renamed,
so a crash never leaves a half-written ``step<N>.npz``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import zipfile

import numpy as np

FORMAT = 1
_STEP_RE = re.compile(r"^step(\d+)\.npz$")


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


def save(path, arrays: dict[str, np.ndarray], meta: dict) -> pathlib.Path:
    """Write ``arrays`` and ``meta`` atomically to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format=FORMAT, sha256=_digest(arrays))
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint and verify its checksum; CheckpointError when unusable."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files if k != "meta"}
            if "meta" not in d.files:
                raise CheckpointError(f"{path}: not a checkpoint of this engine (no meta record)")
            meta = json.loads(str(d["meta"]))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted ({type(e).__name__}: {e})") from None
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


def newest_valid(folder, warn=print):
    """The newest checkpoint that loads and verifies: (path, arrays, meta) or None.
    Each invalid newer one is reported through ``warn`` and skipped."""
    for step, p in reversed(list_checkpoints(folder)):
        try:
            arrays, meta = load(p)
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
