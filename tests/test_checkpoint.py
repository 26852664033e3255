"""Checkpoint files: atomic, checksummed, invalid ones detected and skipped, pruning."""
from __future__ import annotations

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
