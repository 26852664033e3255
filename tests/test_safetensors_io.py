"""The safetensors format read and written by its spec (engine/safetensors_io.py): round
trips, agreement with the safetensors package both ways, and each invalid file refused in
one line naming it."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from engine import safetensors_io


def _st_numpy():
    """The safetensors package's NumPy API (the test extra), or the test is skipped."""
    return pytest.importorskip("safetensors.numpy")


def test_round_trip_and_the_package_agree(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a": np.arange(7, dtype=np.int64),
               "c": rng.standard_normal(4), "scalar": np.array(2.5, np.float32),
               "empty": np.zeros((0, 3), np.float32), "h": np.ones(3, np.float16)}
    data = safetensors_io.encode(tensors, {"k": "v"})
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0 and data[8:9] == b"{"
    back, meta = safetensors_io.decode(data)
    assert meta == {"k": "v"} and sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    # the safetensors package reads ours, and we read its
    st_numpy = _st_numpy()
    (tmp_path / "ours.safetensors").write_bytes(data)
    theirs = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
    st_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"x": "y"})
    back, meta = safetensors_io.read(tmp_path / "theirs.safetensors")
    assert meta == {"x": "y"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)


def _file(header: dict, buf: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buf


@pytest.mark.parametrize("data, expect", [
    (b"PK\x03\x04", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10 ** 6) + b"{}", "does not fit"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "spans 4 bytes but dtype F32 and shape [2] need 8"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     "leaves a hole at byte 0"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
     "cover 4 of the buffer's 8 bytes"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "overlaps the previous tensor"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 40]}}, b"\0" * 4),
     "outside the 4-byte buffer"),
    (_file({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "dtype BF16, which NumPy cannot read; save it as float32"),
    (_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype, shape and data_offsets"),
])
def test_not_a_safetensors_file(tmp_path, data, expect):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    with pytest.raises(safetensors_io.SafetensorsError) as e:
        safetensors_io.read(p)
    msg = str(e.value)
    assert str(p) in msg and expect in msg and "\n" not in msg
