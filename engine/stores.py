"""Apache SINGA v0.3's data stores, read into (and written from) NumPy arrays.

kvfile (``store_conf { backend: "kvfile" }``, what SINGA's create_data tools write):
a sequence of tuples, each

    [keylen: size_t][key: keylen bytes][vallen: size_t][value: vallen bytes]

with size_t an unsigned 64-bit little-endian integer (SINGA's KVFile on x86-64 Linux)
and the value a serialized ``RecordProto``: ``shape`` (1), ``label`` (2), and the
features either as ``pixel`` bytes (3; one uint8 per value) or as packed float
``data`` (4; SINGA's record layer reads ``data`` when it is present, else ``pixel``).
A path that is a folder means ``<folder>/shard.dat``, as in SINGA. Keys are unique
(SINGA's writer refuses a repeated one); create_data names them ``%08d``.

textfile (``backend: "textfile"``, SINGA's CSV input): one record a line, fields
separated by any character of ``separator`` [","]; with ``has_label`` the first field
is the integer label, then prod(shape) numbers. A trailing separator and a CRLF line
end are tolerated (SINGA's tokenizer does too); an empty line or field is an error.

Readers return ``(x, y)``: x [N, *shape] (uint8 for pixel records, float32 otherwise),
y [N] int32 labels, or None when the records carry none. Every problem raises
StoreError whose message is one line naming the file and the byte offset and record
(kvfile) or the line (textfile).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import numpy as np
from google.protobuf.message import DecodeError

from engine.checkpoint import npz_problem
from engine.common import read_file
from engine.proto import job_pb2 as pb

SIZE_T = 8  # bytes of SINGA's size_t length fields (64-bit, little-endian)


class StoreError(ValueError):
    """A store file that cannot be read or written; str(err) is one line naming it."""


def kvfile_path(path) -> pathlib.Path:
    """The file behind a kvfile path: the path itself, or ``shard.dat`` in a folder."""
    path = pathlib.Path(path)
    return path / "shard.dat" if path.is_dir() else path


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    return read_file(path, what, StoreError)


def iter_kvfile(path) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(record index, byte offset, key, value) of every tuple of a kvfile, in file order.
    A length running past the end of the file (a truncated file, or not a kvfile) or an
    empty value raises StoreError naming the file, the record and its byte offset."""
    path = kvfile_path(path)
    buf = _read_bytes(path, "kvfile")
    n, off, k = len(buf), 0, 0

    def length(at: int, what: str) -> int:
        if n - at < SIZE_T:
            raise StoreError(f"{path}: truncated or not a kvfile: record {k} at byte {off}: "
                             f"the file ends at byte {n}, inside its {SIZE_T}-byte {what} "
                             f"length (at byte {at})")
        return int.from_bytes(buf[at:at + SIZE_T], "little")

    while off < n:
        keylen = length(off, "key")
        key_at = off + SIZE_T
        if keylen > n - key_at:
            raise StoreError(f"{path}: truncated or not a kvfile: record {k} at byte {off}: "
                             f"its key length {keylen} runs past the end of the file (byte {n})")
        val_at = key_at + keylen
        vallen = length(val_at, "value")
        if vallen > n - val_at - SIZE_T:
            raise StoreError(f"{path}: truncated or not a kvfile: record {k} at byte {off}: "
                             f"its value length {vallen} runs past the end of the file (byte {n})")
        if vallen == 0:
            raise StoreError(f"{path}: record {k} at byte {off} has an empty value (SINGA "
                             f"never writes one); the file is corrupted or not a kvfile")
        start = val_at + SIZE_T
        yield k, off, bytes(buf[key_at:val_at]), bytes(buf[start:start + vallen])
        off, k = start + vallen, k + 1


def _features(rec: pb.RecordProto) -> np.ndarray | None:
    if len(rec.data):
        return np.fromiter(rec.data, dtype=np.float32, count=len(rec.data))
    if rec.pixel:
        return np.frombuffer(rec.pixel, dtype=np.uint8)
    return None


def read_kvfile(path, shape=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) of a kvfile of RecordProto records (see the module docstring).

    ``shape`` (e.g. store_conf.shape) gives each record's shape; without it, the
    records' own ``shape`` field, else one flat axis. All records must hold the same
    kind (pixel or data) and number of values, and all or none a label."""
    where = kvfile_path(path)
    rows, labels = [], []
    first = None  # (kind, size, record shape) of record 0
    for k, off, key, val in iter_kvfile(path):
        at = f"{where}: record {k} (key {key.decode('utf-8', 'replace')!r}) at byte {off}"
        rec = pb.RecordProto()
        try:
            rec.ParseFromString(val)
        except DecodeError as e:
            raise StoreError(f"{at}: its value is not a RecordProto ({e})") from None
        x = _features(rec)
        if x is None:
            raise StoreError(f"{at}: the record has neither pixel nor data values")
        kind = (x.dtype, x.size, tuple(rec.shape))
        if first is None:
            first = kind
        elif kind != first:
            raise StoreError(f"{at}: {_kind(kind)}, but record 0 holds {_kind(first)}; every "
                             f"record of a store must have the same kind and shape")
        if k and rec.HasField("label") != (labels[0] is not None):
            raise StoreError(f"{at}: {'has' if rec.HasField('label') else 'lacks'} a label "
                             f"and record 0 {'does not' if rec.HasField('label') else 'does'}; "
                             f"label all records or none")
        rows.append(x)
        labels.append(rec.label if rec.HasField("label") else None)
    if first is None:
        raise StoreError(f"{where}: the kvfile holds no records")
    dtype, size, rshape = first
    if shape is not None and len(shape):
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != size:
            raise StoreError(f"{where}: records hold {size} values but the shape {list(shape)} "
                             f"needs {int(np.prod(shape))}")
    elif rshape and int(np.prod(rshape)) == size:
        shape = rshape
    else:
        shape = (size,)
    x = np.stack(rows).reshape((len(rows),) + shape)
    y = None if labels[0] is None else np.array(labels, dtype=np.int32)
    return x, y


def _kind(kind) -> str:
    dtype, size, shape = kind
    what = "pixel" if dtype == np.uint8 else "data"
    return f"{size} {what} values" + (f" of shape {list(shape)}" if shape else "")


def _atomic_write(path: pathlib.Path, chunks) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{path}: cannot write ({e.strerror})") from None


def _check_rows(x, y, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(x)
    for name, a in (("x", x), ("y", None if y is None else np.asarray(y))):
        if a is not None and a.dtype.kind not in "iufb":
            kind = "complex numbers" if a.dtype.kind == "c" else f"{a.dtype} values"
            raise StoreError(f"{where}: {name} holds {kind}; a SINGA record holds real numbers "
                             f"(write the real part, or fix the data)")
    if x.ndim < 2 or x.shape[0] < 1:
        raise StoreError(f"{where}: x has shape {x.shape}; a store needs [N, ...] with at "
                         f"least one record and one value axis")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise StoreError(f"{where}: y has shape {y.shape}; a SINGA record holds one "
                             f"integer label, so y must be [N] = [{x.shape[0]}]")
        if not (np.issubdtype(y.dtype, np.integer) or np.all(y == np.round(y))):
            raise StoreError(f"{where}: y holds non-integer values; a SINGA record's label "
                             f"is an integer")
        if y.min() < -2**31 or y.max() >= 2**31:
            raise StoreError(f"{where}: y holds values outside int32")
        y = y.astype(np.int64)
    return x, y


def record_bytes(x_row: np.ndarray, label: int | None = None) -> bytes:
    """One serialized RecordProto: shape = x_row.shape; uint8 values as ``pixel``,
    any other number as float ``data``."""
    rec = pb.RecordProto()
    rec.shape.extend(int(s) for s in x_row.shape)
    if label is not None:
        rec.label = int(label)
    if x_row.dtype == np.uint8:
        rec.pixel = x_row.tobytes()
    else:
        rec.data.extend(x_row.astype(np.float32).ravel().tolist())
    return rec.SerializeToString()


def write_kvfile(path, x, y=None, keys=None) -> int:
    """Write records x[i] (label y[i]) to a kvfile, keyed ``keys[i]`` (default ``%08d``,
    as SINGA's create_data). uint8 x is stored as pixel bytes, other numbers as float
    data (integers must be exact in float32). Returns the number of records."""
    path = pathlib.Path(path)
    x, y = _check_rows(x, y, str(path))
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise StoreError(f"{path}: x has dtype {x.dtype}; store numbers")
        if np.issubdtype(x.dtype, np.integer) and not np.array_equal(x.astype(np.float32), x):
            raise StoreError(f"{path}: x holds integers that float32 does not represent "
                             f"exactly (beyond 2**24); a record's data is float32")
    n = x.shape[0]
    keys = [f"{i:08d}" for i in range(n)] if keys is None else [str(k) for k in keys]
    if len(keys) != n:
        raise StoreError(f"{path}: {len(keys)} keys for {n} records")
    seen = set()
    for k in keys:
        if k in seen:
            raise StoreError(f"{path}: key {k!r} is given twice; SINGA's kvfile keys are unique")
        seen.add(k)

    def chunks():
        for i in range(n):
            key = keys[i].encode("utf-8")
            val = record_bytes(x[i], None if y is None else int(y[i]))
            yield (len(key).to_bytes(SIZE_T, "little") + key
                   + len(val).to_bytes(SIZE_T, "little") + val)

    _atomic_write(path, chunks())
    return n


def read_textfile(path, shape=None, has_label: bool = True,
                  separator: str = ",") -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) of a SINGA textfile store (see the module docstring): x float32
    [N, *shape] (shape inferred from the first line when not given), y int32 [N]."""
    path = pathlib.Path(path)
    raw = _read_bytes(path, "textfile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    items = ((f"{path}:{num}", line) for num, line in enumerate(lines, 1))
    return _csv_records(items, path, "textfile", shape, has_label, separator)


def read_kvfile_text(path, shape=None, has_label: bool = True,
                     separator: str = ",") -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) of a kvfile whose values are CSV lines, as SINGA's kCSVInput reads a kvfile
    store (each value one record, parsed like a textfile line)."""
    where = kvfile_path(path)

    def items():
        for k, off, key, val in iter_kvfile(path):
            at = f"{where}: record {k} (key {key.decode('utf-8', 'replace')!r}) at byte {off}"
            try:
                yield at, val.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StoreError(f"{at}: its value is not CSV text ({e.reason} at byte "
                                 f"{e.start}); a kvfile of RecordProto records is read by "
                                 f"kRecordInput") from None

    return _csv_records(items(), where, "kvfile", shape, has_label, separator)


def _csv_records(items, path, what: str, shape, has_label: bool,
                 separator: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Parse (where, line) pairs as SINGA's CSV records: the label first (has_label),
    then the values; see ``read_textfile``."""
    if not separator:
        raise StoreError(f"{path}: the separator is empty; give the field separator (e.g. \",\")")
    need = int(np.prod(shape)) if shape is not None and len(shape) else None
    table = str.maketrans({c: "\0" for c in separator})
    rows, labels = [], []
    first = None
    for at, line in items:
        first = first or at
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            raise StoreError(f"{at}: empty line; every line is one record (remove it)")
        fields = line.translate(table).split("\0")
        if fields[-1] == "":
            fields.pop()  # a trailing separator
        if has_label:
            label = _integer(fields[0])
            if label is None:
                raise StoreError(f"{at}: the label {fields[0].strip()!r} is not an "
                                 f"integer (the first field is the label; has_label: false "
                                 f"if there is none)")
            if not 0 <= label < 2 ** 31:
                raise StoreError(f"{at}: the label {fields[0].strip()!r} is not a class id "
                                 f"(a whole number from 0 to {2 ** 31 - 1})")
            labels.append(label)
            fields = fields[1:]
        try:
            values = [float(f) for f in fields]
        except ValueError:
            bad = next(j for j, f in enumerate(fields) if not _is_float(f))
            raise StoreError(f"{at}: value {bad + 1} {fields[bad].strip()!r} is not a "
                             f"number") from None
        if need is None:
            need = len(values)
        if len(values) != need:
            what_has = (f"the shape {list(shape)} needs" if shape is not None and len(shape)
                        else f"{'line' if what == 'textfile' else 'record'} "
                             f"{'1' if what == 'textfile' else '0'} has")
            raise StoreError(f"{at}: {len(values)} values, but {what_has} {need}")
        rows.append(values)
    if not rows:
        raise StoreError(f"{path}: the {what} holds no records")
    shape = tuple(int(s) for s in shape) if shape is not None and len(shape) else (need,)
    x = np.array(rows, dtype=np.float32).reshape((len(rows),) + shape)
    y = np.array(labels, dtype=np.int32) if has_label else None
    return x, y


def _integer(s: str) -> int | None:
    """The integer a label field holds ("3", or an integral "3.0"), else None."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        return None
    return int(v) if v.is_integer() else None


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


#: characters a number is written with: none of them can separate fields
NUMBER_CHARS = set("0123456789.+-eEnaNinfIF")


def separator_problem(separator: str) -> str | None:
    """Why ``separator`` cannot separate the fields this module writes (its reader splits
    at every character of it), or None: one character, not one numbers are written with,
    not a line break."""
    if len(separator) != 1:
        return (f"the separator {separator!r} must be one character (the reader splits at each "
                f"of its characters); use e.g. \",\" or a tab")
    if separator in NUMBER_CHARS or separator in "\r\n":
        return (f"the separator {separator!r} is a character numbers or lines are written with, "
                f"so the file would not read back; use e.g. \",\" or a tab")
    return None


def write_textfile(path, x, y=None, separator: str = ",") -> int:
    """Write one line per record: the label (when y is given), then x[i]'s values,
    separated by ``separator`` (one character that no number holds: ``separator_problem``).
    Floats are written with 9 significant digits (exact for float32). Returns the number
    of records."""
    path = pathlib.Path(path)
    bad = separator_problem(separator)
    if bad:
        raise StoreError(f"{path}: {bad}")
    x, y = _check_rows(x, y, str(path))
    flat = x.reshape(x.shape[0], -1)
    fmt = (lambda v: str(int(v))) if np.issubdtype(x.dtype, np.integer) else (lambda v: f"{v:.9g}")

    def chunks():
        for i in range(flat.shape[0]):
            fields = ([str(int(y[i]))] if y is not None else []) + [fmt(v) for v in flat[i]]
            yield (separator.join(fields) + "\n").encode("utf-8")

    _atomic_write(path, chunks())
    return flat.shape[0]


# ------------------------------------------------------------ the record input's stores

#: store_conf.backend values the record input reads: SINGA's two stores, this engine's
#: .npz, and "csv", this engine's older name for "textfile"
BACKENDS = ("kvfile", "textfile", "npz", "csv")


def backend_of(backend: str, path) -> str:
    """The store format of a data layer: ``store_conf.backend`` ("csv" is "textfile"),
    or, when unset, the file's suffix (.npz, .csv). Any other backend (SINGA's lmdb,
    hdfsfile, imagefolder, or a misspelling) is a StoreError naming the supported ones."""
    path = pathlib.Path(path)
    supported = ('"kvfile" and "textfile" (SINGA\'s stores), "npz" (this engine\'s; '
                 '"csv" is a synonym of "textfile")')
    if not backend:
        by_suffix = {".npz": "npz", ".csv": "textfile"}.get(path.suffix.lower())
        if by_suffix is None:
            raise StoreError(f"{path}: store_conf.backend is not set and the file is neither "
                             f".npz nor .csv; set backend to one of {supported}")
        return by_suffix
    if backend not in BACKENDS:
        raise StoreError(f'{path}: store_conf.backend "{backend}" is not read by this engine; '
                         f"supported: {supported}")
    return "textfile" if backend == "csv" else backend


def read_npz(path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x, y, lengths) of this engine's .npz data (y and lengths None when absent)."""
    import zipfile  # noqa: PLC0415 - only here

    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK":  # an .npz is a zip archive; else numpy would talk of pickles
            what = "a single .npy array" if head == b"\x93NUM" else "not a zip archive"
            raise StoreError(f"{path} is not an .npz file ({what}); write the store with "
                             f"numpy.savez(path, x=..., y=...)")
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d.files:
                raise StoreError(f'{path} has no array "x" (arrays: {", ".join(d.files) or "none"})')
            return (d["x"], d["y"] if "y" in d.files else None,
                    d["lengths"] if "lengths" in d.files else None)
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StoreError(f"{path}: not a readable .npz ({npz_problem(e)})") from None


def read_store(backend: str, path, *, values: str, shape=None, has_label: bool = True,
               separator: str = ",") -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x, y, lengths) of a data layer's store, by ``backend`` (see ``backend_of``).

    ``values`` says how a SINGA store's records are parsed, as the layer type does in
    SINGA: "record" (kRecordInput: RecordProto values) or "csv" (kCSVInput: CSV text).
    A kvfile holds either; a textfile holds lines of text, so "record" (a RecordProto
    per line) is refused. ``shape`` is the record shape (store_conf.shape): a kvfile's
    records are reshaped to it, a textfile's lines must hold it, and an .npz's
    x.shape[1:] must equal it. Only .npz files have ``lengths``."""
    path = pathlib.Path(path)
    shape = tuple(int(s) for s in shape) if shape is not None and len(shape) else None
    if backend == "npz":
        x, y, lengths = read_npz(path)
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise StoreError(f"{path}: x holds records of shape {list(x.shape[1:])} but "
                             f"store_conf.shape is {list(shape)}; fix the shape or remove it "
                             f"(an .npz carries its own)")
        return x, y, lengths
    if backend == "textfile":
        if values == "record":
            raise StoreError(f"{path}: a textfile store holds lines of text, and kRecordInput "
                             f"parses each record as a RecordProto; use type kCSVInput for a "
                             f"textfile store (or a kvfile store)")
        x, y = read_textfile(path, shape, has_label, separator)
    elif values == "csv":
        x, y = read_kvfile_text(path, shape, has_label, separator)
    else:
        x, y = read_kvfile(path, shape)
        if not has_label:
            y = None
        elif y is None:
            raise StoreError(f"{kvfile_path(path)}: the records have no label; set "
                             f"store_conf {{ has_label: false }} or store labelled records")
    return x, y, None


def read_first_record(backend: str, path, *, values: str, separator: str = ",") -> np.ndarray:
    """The float32 values of the first record of a store, flat: what SINGA reads from
    ``mean_file`` / ``std_file`` (one record of float ``data``, or one CSV line without a
    label), with the data layer's backend."""
    path = pathlib.Path(path)
    if backend == "npz":
        raise StoreError(f"{path}: mean_file and std_file are SINGA stores (kvfile or "
                         f"textfile); with .npz data give mean_value / std_value, or normalise "
                         f"the .npz")
    if backend == "textfile" and values == "record":
        raise StoreError(f"{path}: a textfile store holds lines of text, and kRecordInput "
                         f"parses each record as a RecordProto; use type kCSVInput")
    if backend == "textfile" or values == "csv":
        if backend == "textfile":
            first = next(iter(_read_bytes(path, "textfile").split(b"\n")), b"")
            items = iter([(f"{path}:1", first.decode("utf-8", "replace"))])
        else:
            rec = next(iter_kvfile(path), None)
            items = iter([] if rec is None else
                         [(f"{kvfile_path(path)}: record 0", rec[3].decode("utf-8", "replace"))])
        x, _ = _csv_records(items, path, backend, None, False, separator)
        return x[0].ravel()
    for k, off, key, val in iter_kvfile(path):
        rec = pb.RecordProto()
        try:
            rec.ParseFromString(val)
        except DecodeError as e:
            raise StoreError(f"{kvfile_path(path)}: record 0 at byte 0: its value is not a "
                             f"RecordProto ({e})") from None
        x = _features(rec)
        if x is None:
            raise StoreError(f"{kvfile_path(path)}: record 0 has neither pixel nor data values")
        return x.astype(np.float32)
    raise StoreError(f"{kvfile_path(path)}: the kvfile holds no records")
