"""Checkpoint files: atomic, checksummed, invalid ones detected and skipped, pruning."""
from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from engine import checkpoint as ckpt


def write(folder, step, value=1.0):
    return ckpt.save(folder / f"step{step}.npz", {"param/w": np.full((3, 4), value, np.float32)},
                     {"step": step})


def test_round_trip_and_no_temporary_left(tmp_path):
    p = write(tmp_path, 7, 2.5)
    arrays, meta = ckpt.load(p)
    np.testing.assert_array_equal(arrays["param/w"], np.full((3, 4), 2.5, np.float32))
    assert meta["step"] == 7 and len(meta["sha256"]) == 64
    assert [x.name for x in tmp_path.iterdir()] == ["step7.npz"]


def test_truncated_file_is_named(tmp_path):
    p = write(tmp_path, 1)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"step1\.npz: truncated or corrupted"):
        ckpt.load(p)


def test_changed_array_fails_the_checksum(tmp_path):
    p = write(tmp_path, 1)
    arrays, meta = ckpt.load(p)
    arrays["param/w"][0, 0] = 99.0  # rewrite the arrays with the old meta (and its checksum)
    import io
    import json
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    p.write_bytes(buf.getvalue())
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load(p)


def test_newest_valid_skips_bad_ones_with_a_warning(tmp_path):
    for s in (10, 20, 30):
        write(tmp_path, s, float(s))
    (tmp_path / "step30.npz").write_bytes(b"garbage")
    warnings = []
    path, arrays, meta = ckpt.newest_valid(tmp_path, warn=warnings.append)
    assert path.name == "step20.npz" and meta["step"] == 20
    assert len(warnings) == 1 and "step30.npz" in warnings[0]


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for s in (1, 2, 3, 4, 5):
        write(tmp_path, s)
    removed = ckpt.prune(tmp_path, 2, protect=tmp_path / "step1.npz")
    assert sorted(p.name for p in removed) == ["step2.npz", "step3.npz"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 4, 5]
    ckpt.prune(tmp_path, 0)  # never below one
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]


# ------------------------------------------- a failed write leaves nothing (issue 16)

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_disk_full_error(e, path):
    msg = str(e)
    assert "\n" not in msg
    assert str(path) in msg and "disk is full" in msg
    assert "--resume" in msg and "--workspace" in msg  # what to do


def test_disk_full_at_fsync_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    write(tmp_path, 5)
    before = (tmp_path / "step5.npz").read_bytes()
    monkeypatch.setattr(ckpt.os, "fsync", _enospc)
    with pytest.raises(ckpt.CheckpointError) as e:
        write(tmp_path, 10)
    assert_disk_full_error(e.value, tmp_path / "step10.npz")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step5.npz"]
    assert (tmp_path / "step5.npz").read_bytes() == before


class _HalfWriter:
    """A file whose write puts half the bytes on disk and then fails as a full disk does."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def write(self, data):
        data = memoryview(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        _enospc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_mid_write_removes_the_partial_file(tmp_path, monkeypatch):
    seen = []

    def half_open(path, mode="r", *a, **kw):
        seen.append(pathlib.Path(path))
        return _HalfWriter(path, mode)

    monkeypatch.setattr(ckpt, "open", half_open, raising=False)
    with pytest.raises(ckpt.CheckpointError) as e:
        write(tmp_path, 60)
    assert_disk_full_error(e.value, tmp_path / "step60.npz")
    assert seen and seen[0].name == f".step60.npz.tmp{os.getpid()}"  # the temp file was written
    assert list(tmp_path.iterdir()) == []


def test_other_write_failures_name_the_file_and_the_reason(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    with pytest.raises(ckpt.CheckpointError) as e:
        write(tmp_path, 3)
    assert str(tmp_path / "step3.npz") in str(e.value)
    assert os.strerror(errno.EACCES) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ckpt.CheckpointError) as e:
        write(tmp_path / "file" / "checkpoints", 1)
    assert "step1.npz" in str(e.value)


def test_interrupted_write_removes_the_temporary_and_reraises(tmp_path, monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 2)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------- stale temporaries of dead processes (issue 16)

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temps_removes_only_dead_processes_files(tmp_path):
    ws, cp = tmp_path / "ws", tmp_path / "ws" / "checkpoints"
    cp.mkdir(parents=True)
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [cp / f".step60.npz.tmp{dead}", ws / f".metrics.jsonl.tmp{dead}"]
        kept = [cp / f".step70.npz.tmp{live.pid}", cp / f".step80.npz.tmp{os.getpid()}",
                ws / f".metrics.jsonl.tmp{os.getpid()}",
                cp / "step50.npz", cp / ".step5.npz.tmpabc", ws / "notes.tmp", ws / "metrics.jsonl",
                cp / f"step60.npz.tmp{dead}"]  # not hidden: not a name this engine writes
        for f in stale + kept:
            f.write_bytes(b"x" * 100)
        removed = ckpt.remove_stale_temps(ws, cp, tmp_path / "missing")
        assert sorted(removed) == sorted(stale)
        assert not any(f.exists() for f in stale)
        assert all(f.exists() for f in kept)
    finally:
        live.kill()
        live.wait()


def test_temp_path_is_the_name_remove_stale_temps_knows(tmp_path):
    t = ckpt.temp_path(tmp_path / "metrics.jsonl")
    assert t.parent == tmp_path and t.name == f".metrics.jsonl.tmp{os.getpid()}"
    t.write_text("")
    assert ckpt.remove_stale_temps(tmp_path) == []  # our own: alive
    assert t.exists()
