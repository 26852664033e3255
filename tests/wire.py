"""Protobuf wire-format bytes written by hand, for tests that check the engine reads
SINGA's files (kvfile RecordProtos, BlobProtos checkpoints) without protoc's help."""
from __future__ import annotations


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are sign-extended to 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int) -> bytes:
    """A field's key: its number and wire type (0 varint, 2 length-delimited)."""
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return field(number, 2) + varint(len(payload)) + payload
