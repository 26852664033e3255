"""The safetensors file format, read and written by its public specification (no package).

A file is
    8 bytes      N, the header's length, unsigned 64-bit little-endian
    N bytes      the header: a UTF-8 JSON object, possibly padded with trailing spaces,
                 {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
                  "data_offsets": [begin, end]}, ...}
    the rest     the byte buffer: each tensor's raw little-endian, row-major data at
                 [begin, end) (offsets relative to the buffer's start); the tensors
                 cover the buffer exactly, without holes or overlaps.

``encode(tensors, metadata)`` gives the bytes of a file holding NumPy arrays (header
padded to a multiple of 8 bytes, tensors in name order); ``read(path)`` and
``decode(data)`` give ``(tensors, metadata)``, checking every rule above, and raise
``SafetensorsError`` with one line naming the file and what is wrong.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from engine.checkpoint import CheckpointError
from engine.common import read_file

#: safetensors dtype names <-> NumPy dtypes (little-endian); BF16 and the F8 types have
#: no NumPy dtype and are refused with a line saying so
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
_NAMES = {(d.kind, d.itemsize): name for name, d in DTYPES.items()}
#: a header larger than this is not a header (the reference implementation's own limit)
MAX_HEADER = 100_000_000


class SafetensorsError(CheckpointError):
    """A file that is not a valid safetensors file (the message names it and why); a kind
    of CheckpointError, since such a file is given where checkpoints are."""


def _dtype_name(a: np.ndarray, key: str) -> str:
    name = _NAMES.get((a.dtype.kind, a.dtype.itemsize))
    if name is None:
        raise SafetensorsError(f"tensor {key!r} has dtype {a.dtype}, which safetensors cannot hold")
    return name


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (name order) and ``metadata``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for key in sorted(tensors):
        if key == "__metadata__":
            raise SafetensorsError("a tensor cannot be named __metadata__")
        a = np.asarray(tensors[key])
        name = _dtype_name(a, key)
        data = np.ascontiguousarray(a, dtype=DTYPES[name]).tobytes()
        header[key] = {"dtype": name, "shape": [int(s) for s in a.shape],
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)   # the buffer starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def decode(data: bytes, where: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) from a safetensors file's bytes; SafetensorsError when invalid."""
    def bad(msg: str) -> SafetensorsError:
        return SafetensorsError(f"{where}: not a safetensors file: {msg}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise bad(f"the header length {n} does not fit the file's {len(data)} bytes")
    raw = data[8:8 + n]
    if not raw.startswith(b"{"):
        raise bad("the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map names to strings")
    buf = memoryview(data)[8 + n:]
    spans, tensors = [], {}
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or \
                not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"entry {key!r} must have exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(
                f"{where}: tensor {key!r} has dtype {info['dtype']}, which NumPy cannot read; "
                f"save it as float32 (F32)")
        shape, offs = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise bad(f"entry {key!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= len(buf)):
            raise bad(f"entry {key!r} has data_offsets {offs!r} outside the {len(buf)}-byte buffer")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offs[1] - offs[0] != size:
            raise bad(f"entry {key!r} spans {offs[1] - offs[0]} bytes but dtype {info['dtype']} "
                      f"and shape {shape} need {size}")
        spans.append((offs[0], offs[1], key))
        tensors[key] = np.frombuffer(buf[offs[0]:offs[1]], dtype=dtype).reshape(shape).copy()
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a hole at byte {end}"
            raise bad(f"tensor {key!r} {what}")
        end = stop
    if end != len(buf):
        raise bad(f"the tensors cover {end} of the buffer's {len(buf)} bytes")
    return tensors, dict(meta)


def read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; SafetensorsError naming the file when it
    cannot be read or is not valid."""
    return decode(read_file(path, "safetensors file", SafetensorsError), str(path))
