"""SINGA's stores (engine/stores.py) and tools/singa_data.py.

The kvfile layout is proven on a file written byte by byte here, from the facts of
SINGA v0.3's KVFile (size_t lengths, 64-bit little-endian) and protobuf's wire format
for RecordProto (shape 1: varints; label 2: varint; pixel 3: bytes; data 4: packed
floats), independently of the writer.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from engine.stores import (StoreError, iter_kvfile, read_kvfile, read_textfile, write_kvfile,
                           write_textfile)
from engine.proto import job_pb2 as pb
from wire import field, varint

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "singa_data.py"


# --------------------------------------------------------------- wire format

def record(shape, label=None, pixel=None, data=None) -> bytes:
    out = b"".join(field(1, 0) + varint(s) for s in shape)  # proto2 repeated int32: unpacked
    if label is not None:
        out += field(2, 0) + varint(label)
    if pixel is not None:
        out += field(3, 2) + varint(len(pixel)) + bytes(pixel)
    if data is not None:
        packed = struct.pack(f"<{len(data)}f", *data)
        out += field(4, 2) + varint(len(packed)) + packed
    return out


def kv(key: bytes, value: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<Q", len(value)) + value


PIX0 = [[1, 2], [250, 255]]
PIX1 = [[0, 0], [0, 7]]
HAND_PIXELS = (kv(b"00000000", record([2, 2], 3, pixel=[1, 2, 250, 255]))
               + kv(b"00000001", record([2, 2], 0, pixel=[0, 0, 0, 7])))
HAND_FLOATS = (kv(b"img-a", record([3], 7, data=[0.5, -1.25, 3.0]))
               + kv(b"img-b", record([3], -1, data=[0.0, 1e-3, -2.5])))


def test_hand_written_pixel_kvfile_reads(tmp_path):
    path = tmp_path / "train_data.bin"
    path.write_bytes(HAND_PIXELS)
    x, y = read_kvfile(path)
    assert x.dtype == np.uint8 and x.shape == (2, 2, 2)
    np.testing.assert_array_equal(x, [PIX0, PIX1])
    assert y.dtype == np.int32 and y.tolist() == [3, 0]
    assert [(k, off, key) for k, off, key, _ in iter_kvfile(path)] == [
        (0, 0, b"00000000"), (1, 8 + 8 + 8 + 4 + 2 + 6, b"00000001")]  # shape, label, pixel bytes


def test_hand_written_float_kvfile_reads(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(HAND_FLOATS)
    x, y = read_kvfile(path)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.array([[0.5, -1.25, 3.0], [0.0, 1e-3, -2.5]], np.float32))
    assert y.tolist() == [7, -1]
    x, _ = read_kvfile(path, shape=[1, 3])  # store_conf.shape reshapes
    assert x.shape == (2, 1, 3)


def test_the_writer_writes_exactly_those_bytes(tmp_path):
    n = write_kvfile(tmp_path / "p.bin", np.array([PIX0, PIX1], np.uint8), np.array([3, 0]))
    assert n == 2 and (tmp_path / "p.bin").read_bytes() == HAND_PIXELS
    x = np.array([[0.5, -1.25, 3.0], [0.0, 1e-3, -2.5]], np.float32)
    write_kvfile(tmp_path / "f.bin", x, [7, -1], keys=["img-a", "img-b"])
    assert (tmp_path / "f.bin").read_bytes() == HAND_FLOATS


def test_a_folder_means_its_shard_dat(tmp_path):
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "shard.dat").write_bytes(HAND_PIXELS)
    x, _ = read_kvfile(tmp_path / "shard")
    assert x.shape == (2, 2, 2)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 256, (7, 3, 4)) if dtype in (np.uint8, np.int64)
         else rng.normal(size=(7, 3, 4))).astype(dtype)
    y = rng.integers(-3, 10, 7)
    write_kvfile(tmp_path / "d.bin", x, y)
    got_x, got_y = read_kvfile(tmp_path / "d.bin")
    assert got_x.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
    np.testing.assert_array_equal(got_x, x.astype(got_x.dtype))
    np.testing.assert_array_equal(got_y, y)
    write_kvfile(tmp_path / "n.bin", x)  # without labels
    got_x, got_y = read_kvfile(tmp_path / "n.bin")
    assert got_y is None and got_x.shape == x.shape


def test_every_cut_inside_a_record_names_the_file_record_and_offset(tmp_path):
    path = tmp_path / "cut.bin"
    second = len(kv(b"00000000", record([2, 2], 3, pixel=[1, 2, 250, 255])))
    for end in range(1, len(HAND_PIXELS)):
        path.write_bytes(HAND_PIXELS[:end])
        if end == second:  # a cut between records leaves a shorter, valid file
            assert read_kvfile(path)[0].shape == (1, 2, 2)
            continue
        with pytest.raises(StoreError) as e:
            read_kvfile(path)
        k, off = (0, 0) if end < second else (1, second)
        assert str(e.value).startswith(f"{path}: ") and f"record {k} at byte {off}" in str(e.value)
        assert "\n" not in str(e.value)


def test_corrupt_records_are_one_line(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(kv(b"k0", b"\xff\xff\xff"))
    with pytest.raises(StoreError, match=r"record 0 \(key 'k0'\) at byte 0: its value is not a "
                                         r"RecordProto"):
        read_kvfile(path)
    path.write_bytes(kv(b"k0", record([1], 1, pixel=[5])) + kv(b"k1", record([2], 1, pixel=[5, 6])))
    with pytest.raises(StoreError, match=r"record 1 \(key 'k1'\) at byte 25: 2 pixel values of "
                                         r"shape \[2\], but record 0 holds 1 pixel values"):
        read_kvfile(path)
    path.write_bytes(kv(b"k0", record([1], 1, pixel=[5])) + kv(b"k1", record([1], None, pixel=[6])))
    with pytest.raises(StoreError, match=r"record 1 .* lacks a label and record 0 does"):
        read_kvfile(path)
    path.write_bytes(kv(b"k0", record([1], 1)))
    with pytest.raises(StoreError, match=r"neither pixel nor data"):
        read_kvfile(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"abc")
    with pytest.raises(StoreError, match=r"key length 1099511627776 runs past the end"):
        read_kvfile(path)
    path.write_bytes(kv(b"k", b""))
    with pytest.raises(StoreError, match=r"record 0 at byte 0 has an empty value"):
        read_kvfile(path)
    path.write_bytes(b"")
    with pytest.raises(StoreError, match=r"holds no records"):
        read_kvfile(path)
    with pytest.raises(StoreError, match=r"no such kvfile"):
        read_kvfile(tmp_path / "missing.bin")
    path.write_bytes(HAND_PIXELS)
    with pytest.raises(StoreError, match=r"records hold 4 values but the shape \[5\] needs 5"):
        read_kvfile(path, shape=[5])


def test_the_writer_refuses_what_a_record_cannot_hold(tmp_path):
    p = tmp_path / "w.bin"
    with pytest.raises(StoreError, match=r"y has shape \(2, 3\); a SINGA record holds one integer"):
        write_kvfile(p, np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(StoreError, match=r"y holds non-integer values"):
        write_kvfile(p, np.zeros((2, 3)), np.array([0.5, 1.0]))
    with pytest.raises(StoreError, match=r"key '00000000' is given twice"):
        write_kvfile(p, np.zeros((2, 3)), keys=["00000000", "00000000"])
    with pytest.raises(StoreError, match=r"integers that float32 does not represent exactly"):
        write_kvfile(p, np.array([[2**24 + 1]]))
    with pytest.raises(StoreError, match=r"x has shape \(3,\)"):
        write_kvfile(p, np.zeros(3))
    assert not p.exists()


# ------------------------------------------------------------------ textfile

def test_textfile_as_singa_reads_it(tmp_path):
    path = tmp_path / "d.csv"
    # label first; "," and ";" both separate (separator is a set of characters);
    # CRLF and a trailing separator are tolerated; an integral label may be written 2.0
    path.write_bytes(b"1,0.5,2,3;4\r\n0,-1,1e-3,0,7,\n2.0, 1 ,2,3,4")
    x, y = read_textfile(path, shape=[2, 2], separator=",;")
    assert x.dtype == np.float32 and x.shape == (3, 2, 2)
    np.testing.assert_array_equal(x[1].ravel(), np.float32([-1, 1e-3, 0, 7]))
    assert y.tolist() == [1, 0, 2]
    x, y = read_textfile(path, separator=",;")  # shape inferred from line 1
    assert x.shape == (3, 4)
    x, y = read_textfile(path, has_label=False, separator=",;")
    assert y is None and x.shape == (3, 5)


@pytest.mark.parametrize("text, kwargs, expect", [
    ("1,2,3\n\n0,1,2\n", {}, r":2: empty line"),
    ("1,2,3\n0,1\n", {}, r":2: 1 values, but line 1 has 2"),
    ("1,2,3\n", {"shape": [3]}, r":1: 2 values, but the shape \[3\] needs 3"),
    ("1,2,x\n", {}, r":1: value 2 'x' is not a number"),
    ("1,2,,3\n", {}, r":1: value 2 '' is not a number"),
    ("a,2,3\n", {}, r":1: the label 'a' is not an integer"),
    ("", {}, r": the textfile holds no records"),
])
def test_textfile_errors_name_the_line(tmp_path, text, kwargs, expect):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(StoreError, match=expect) as e:
        read_textfile(path, **kwargs)
    assert str(e.value).startswith(str(path))


def test_textfile_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    write_textfile(tmp_path / "r.csv", x, y, separator=";")
    gx, gy = read_textfile(tmp_path / "r.csv", shape=[2, 3], separator=";")
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)


# ---------------------------------------------------------------------- tool

def tool(*args, cwd):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_tool_round_trips_npz_and_kvfile(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    r = tool("seq.npz", "seq.bin", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "wrote 6 records (float32 [4, 3], labelled) to seq.bin\n"
    got_x, got_y = read_kvfile(tmp_path / "seq.bin")
    np.testing.assert_array_equal(got_x, x)
    rec = pb.RecordProto.FromString(next(iter_kvfile(tmp_path / "seq.bin"))[3])
    assert list(rec.shape) == [4, 3] and rec.label == y[0]
    r = tool("seq.bin", "back.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "back.npz") as d:
        np.testing.assert_array_equal(d["x"], x)
        np.testing.assert_array_equal(d["y"], y)
    r = tool("--info", "seq.bin", cwd=tmp_path)
    assert r.stdout == ("seq.bin: kvfile, keys 00000000..00000005, 6 records, float32 [4, 3], "
                        f"labels {y.min()}..{y.max()}\n")


def test_tool_textfile_both_ways(tmp_path):
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([2, 0, 1]))
    assert tool("a.npz", "a.csv", "--backend", "textfile", cwd=tmp_path).returncode == 0
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == "2,0,1,2,3"
    r = tool("a.csv", "b.npz", "--backend", "textfile", "--shape", "2", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "b.npz") as d:
        np.testing.assert_array_equal(d["x"], x.reshape(3, 2, 2).astype(np.float32))


def test_tool_help_and_one_line_errors(tmp_path):
    r = tool("--help", cwd=tmp_path)
    assert r.returncode == 0 and "kvfile" in r.stdout and "textfile" in r.stdout
    np.savez(tmp_path / "len.npz", x=np.zeros((2, 3, 1)), y=np.zeros(2, int), lengths=[3, 2])
    (tmp_path / "cut.bin").write_bytes(HAND_PIXELS[:30])
    for args, expect in [
        (("len.npz", "out.bin"), 'error: len.npz: has "lengths"; a SINGA record has no sequence'),
        (("cut.bin", "out.npz"), "error: cut.bin: truncated or not a kvfile: record 0 at byte 0"),
        (("missing.npz", "out.bin"), "error: missing.npz: no such file"),
        (("a.bin", "b.bin"), "error: exactly one of INPUT and OUTPUT must be an .npz file"),
        (("--shape", "x", "a.bin"), "error: argument --shape: invalid int value: 'x'"),
    ]:
        r = tool(*args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(expect), (args, r.stderr)
    r = tool("cut.bin", "out.npz", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_data_wins_over_pixel_and_a_mean_file_reads(tmp_path):
    """SINGA's record layer reads ``data`` when a record has it, else ``pixel``; cifar10's
    image_mean.bin is one unlabelled record of float data keyed "mean"."""
    path = tmp_path / "image_mean.bin"
    path.write_bytes(kv(b"mean", record([1, 2, 2], pixel=[9, 9, 9, 9], data=[0.5, 1.5, 2.5, 3.5])))
    x, y = read_kvfile(path)
    assert y is None and x.dtype == np.float32 and x.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(x.ravel(), [0.5, 1.5, 2.5, 3.5])


# ------------------------------------------------ the record input's dispatch

def test_backend_of_maps_settings_and_suffixes():
    from engine.stores import backend_of
    assert backend_of("kvfile", "a.bin") == "kvfile"
    assert backend_of("textfile", "a.txt") == "textfile"
    assert backend_of("csv", "a.txt") == "textfile"  # this engine's older name
    assert backend_of("npz", "a.dat") == "npz"
    assert backend_of("", "a.npz") == "npz" and backend_of("", "a.CSV") == "textfile"
    for bad in ("hdf5", "lmdb", "hdfsfile", "imagefolder", "KVFile"):
        with pytest.raises(StoreError, match=rf'store_conf.backend "{bad}" is not read by this '
                                             r'engine; supported: "kvfile" and "textfile"'):
            backend_of(bad, "a.bin")
    with pytest.raises(StoreError, match=r"backend is not set and the file is neither"):
        backend_of("", "train_data.bin")  # never a silent fallback to a reader


def test_read_store_parses_values_as_the_layer_type_does(tmp_path):
    """kRecordInput: RecordProto values; kCSVInput: CSV lines, in a textfile or in a
    kvfile's values (SINGA's CSVInputLayer over a kvfile store)."""
    from engine.stores import read_store
    path = tmp_path / "r.bin"
    path.write_bytes(HAND_FLOATS)
    x, y, lengths = read_store("kvfile", path, values="record")
    assert x.shape == (2, 3) and y.tolist() == [7, -1] and lengths is None
    x, y, _ = read_store("kvfile", path, values="record", has_label=False)
    assert y is None
    lines = tmp_path / "c.bin"
    lines.write_bytes(kv(b"0", b"3,0.5,1,2") + kv(b"1", b"4,1.5,2,3\r"))
    x, y, _ = read_store("kvfile", lines, values="csv", shape=[3])
    assert y.tolist() == [3, 4]
    np.testing.assert_array_equal(x, np.float32([[0.5, 1, 2], [1.5, 2, 3]]))
    with pytest.raises(StoreError, match=r"record 1 \(key '1'\) at byte \d+: 2 values, but the "
                                         r"shape \[3\] needs 3"):
        lines.write_bytes(kv(b"0", b"3,0.5,1,2") + kv(b"1", b"4,1.5,2"))
        read_store("kvfile", lines, values="csv", shape=[3])
    (tmp_path / "t.csv").write_text("1,2,3\n")
    with pytest.raises(StoreError, match=r"use type kCSVInput for a textfile store"):
        read_store("textfile", tmp_path / "t.csv", values="record")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 4)))
    assert read_store("npz", tmp_path / "d.npz", values="record", shape=[3, 4])[0].shape == (2, 3, 4)
    with pytest.raises(StoreError, match=r"records of shape \[3, 4\] but store_conf.shape is \[12\]"):
        read_store("npz", tmp_path / "d.npz", values="record", shape=[12])


def test_first_record_is_the_mean_file(tmp_path):
    from engine.stores import read_first_record
    path = tmp_path / "image_mean.bin"
    path.write_bytes(kv(b"mean", record([1, 2, 2], data=[0.5, 1.5, 2.5, 3.5])) + HAND_FLOATS)
    np.testing.assert_array_equal(read_first_record("kvfile", path, values="record"),
                                  np.float32([0.5, 1.5, 2.5, 3.5]))
    (tmp_path / "mean.csv").write_text("1;2;3\n9;9;9\n")  # no label: SINGA's LoadRecord
    np.testing.assert_array_equal(read_first_record("textfile", tmp_path / "mean.csv",
                                                    values="csv", separator=";"),
                                  np.float32([1, 2, 3]))
    with pytest.raises(StoreError, match=r"mean_file and std_file are SINGA stores"):
        read_first_record("npz", tmp_path / "m.npz", values="record")
