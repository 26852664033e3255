"""SINGA v0.3 checkpoints (step<N>-worker<K>: a serialized BlobProtos) in
engine/checkpoint.py: load_singa, save_singa, load_any.

One file is written byte by byte from protobuf's wire format for SINGA's BlobProtos
(version 3: varint, name 4: string, blob 5: BlobProto {shape 1: varints, data 2:
packed floats}), so the layout is proven independently of the writer.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError, load_any, load_singa, save_singa
from wire import ld, varint


def blob(shape, values) -> bytes:
    packed = struct.pack(f"<{len(values)}f", *values)
    return b"".join(varint(1 << 3) + varint(s) for s in shape) + ld(2, packed)


W = np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -3.5]], np.float32)
B = np.array([1.5, -0.5, 0.125], np.float32)
# SINGA writes all versions, then all names, then all blobs (field order)
HAND = (varint(3 << 3) + varint(1200) + varint(3 << 3) + varint(0)
        + ld(4, b"0#w") + ld(4, b"0#b")
        + ld(5, blob([2, 3], W.ravel().tolist())) + ld(5, blob([3], B.tolist())))


def test_hand_written_checkpoint_reads(tmp_path):
    path = tmp_path / "step1200-worker0"
    path.write_bytes(HAND)
    arrays, meta = load_singa(path)
    assert sorted(arrays) == ["param/b", "param/w"]
    assert arrays["param/w"].dtype == np.float32
    np.testing.assert_array_equal(arrays["param/w"], W)
    np.testing.assert_array_equal(arrays["param/b"], B)
    assert meta == {"format": "singa", "versions": {"w": 1200, "b": 0}}


def test_the_writer_writes_exactly_those_bytes(tmp_path):
    path = save_singa(tmp_path / "step1200-worker0", {"w": W, "b": B}, versions={"w": 1200})
    assert path.read_bytes() == HAND


def test_round_trip_with_and_without_the_prefix(tmp_path):
    rng = np.random.default_rng(0)
    params = {"z_hx": rng.normal(size=(4, 3)), "z_b": rng.normal(size=4),
              "scalar": np.array(2.0)}
    for prefix in ("0#", ""):
        arrays, _ = load_singa(save_singa(tmp_path / f"c{prefix[:1]}", params, prefix=prefix))
        assert sorted(arrays) == ["param/scalar", "param/z_b", "param/z_hx"]
        for k, v in params.items():
            np.testing.assert_array_equal(arrays[f"param/{k}"], v.astype(np.float32))


def test_unrolled_copies_that_agree_are_one_param(tmp_path):
    """SINGA names the params of unrolled copy i "i#name"; all copies share one array."""
    path = tmp_path / "c"
    path.write_bytes(save_singa(tmp_path / "a", {"w": W}, prefix="0#").read_bytes()
                     + save_singa(tmp_path / "b", {"w": W}, prefix="1#").read_bytes()
                     + save_singa(tmp_path / "d", {"w": W}, prefix="").read_bytes())
    arrays, _ = load_singa(path)
    assert list(arrays) == ["param/w"]
    assert ckpt.singa_param_name("12#gru1/z_hx") == "gru1/z_hx"
    assert ckpt.singa_param_name("a#b") == "a#b" and ckpt.singa_param_name("w") == "w"


def test_two_different_arrays_for_one_name_are_refused(tmp_path):
    path = tmp_path / "c"
    path.write_bytes(save_singa(tmp_path / "a", {"w": W}, prefix="0#").read_bytes()
                     + save_singa(tmp_path / "b", {"w": W + 1}, prefix="3#").read_bytes())
    with pytest.raises(CheckpointError, match=r'params "0#w" and "3#w" both map to "w" .* hold '
                                              r"different values"):
        load_singa(path)


def test_every_proper_prefix_of_the_file_is_refused(tmp_path):
    path = tmp_path / "cut"
    for end in range(len(HAND)):
        path.write_bytes(HAND[:end])
        with pytest.raises(CheckpointError) as e:
            load_singa(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("content, expect", [
    (b"PK\x03\x04rest of a zip", r"a zip \(\.npz\) file, not a SINGA checkpoint"),
    (b'name: "char-rnn"\ntrain_steps: 10\n', r"not a SINGA checkpoint"),
    (ld(4, b"0#w") + ld(5, blob([2, 2], [1.0, 2.0, 3.0])),
     r'param "0#w": shape \[2, 2\] needs 4 values but its blob holds 3'),
    (ld(4, b"0#w") + ld(4, b"0#b") + ld(5, blob([1], [1.0])),
     r"2 param names, 1 blobs and 0 versions"),
    (b"", r"not a SINGA checkpoint, or one without params"),
])
def test_files_that_are_not_blobprotos_are_one_line(tmp_path, content, expect):
    path = tmp_path / "step1-worker0"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expect) as e:
        load_singa(path)
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_singa(tmp_path / "missing")


def test_load_any_reads_both_kinds(tmp_path):
    ours = ckpt.save(tmp_path / "step5.npz", {"param/w": W}, {"step": 5})
    arrays, meta = load_any(ours)
    assert meta["step"] == 5 and np.array_equal(arrays["param/w"], W)
    theirs = save_singa(tmp_path / "step5-worker0", {"w": W})
    arrays, meta = load_any(theirs)
    assert meta["format"] == "singa" and np.array_equal(arrays["param/w"], W)
