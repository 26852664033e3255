"""Convert between this engine's .npz data and Apache SINGA's stores (kvfile, textfile).

    python tools/singa_data.py train.npz train_data.bin               # .npz -> kvfile
    python tools/singa_data.py train_data.bin train.npz               # kvfile -> .npz
    python tools/singa_data.py train.npz train.csv --backend textfile # .npz -> textfile
    python tools/singa_data.py train.csv train.npz --backend textfile --shape 784
    python tools/singa_data.py --info train_data.bin                  # what a store holds

Exactly one of IN and OUT ends in .npz; the other is a SINGA store (kvfile unless
--backend textfile; a kvfile path that is a folder means <folder>/shard.dat, as in
SINGA). The .npz side holds ``x`` (one record per row, [N, ...]) and ``y`` (one integer
label per record, [N]), as engine/layers/input.py's record input reads them.

  .npz -> kvfile    each x[i] becomes a RecordProto with shape x.shape[1:], label y[i]
                    and its values as pixel bytes (uint8 x) or float data (other x;
                    integer ids are stored exactly up to 2**24); keys %08d, or --keys.
  kvfile -> .npz    x [N, *shape] as stored (uint8 or float32), y int32 when the records
                    carry labels; --shape overrides the records' shape (same size).
  textfile          one record a line: the label (unless --no-label), then the values,
                    separated by --separator (SINGA's store_conf.separator, default ",").

A .npz with ``lengths`` (or ``y`` other than one label per row) has no SINGA record
form and is refused. Exit status 0; 2 with one line "error: ..." on stderr for bad input
(--debug shows the traceback).
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.stopping import StopSignals  # noqa: E402

# Before the imports below: a Ctrl-C while they load (or while this short command runs)
# is one line on stderr and exit 130, not a traceback.
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None


import argparse  # noqa: E402

import numpy as np  # noqa: E402

from engine import stores  # noqa: E402


class UsageError(Exception):
    """Bad arguments or input; str(err) is the one line to print."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="singa_data.py", description=__doc__.splitlines()[0],
                 epilog="\n".join(__doc__.splitlines()[2:]),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=".npz file or SINGA store")
    ap.add_argument("output", nargs="?", help=".npz file or SINGA store (not with --info)")
    ap.add_argument("--info", action="store_true", help="describe INPUT (a SINGA store)")
    ap.add_argument("--backend", choices=("kvfile", "textfile"), default="kvfile",
                    help="the SINGA store's format (default kvfile)")
    ap.add_argument("--shape", type=int, nargs="+", help="record shape when reading a store")
    ap.add_argument("--no-label", action="store_true",
                    help="textfile: the lines have no label field")
    ap.add_argument("--separator", default=",", help="textfile field separator(s) [,]")
    ap.add_argument("--keys", help="kvfile: a text file with one key per record, in order")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def read_npz(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray | None]:
    """x and y of an .npz as the record input reads it; refuses what a record cannot hold."""
    x, y, lengths = stores.read_npz(path)
    if lengths is not None:
        raise UsageError(f"{path}: has \"lengths\"; a SINGA record has no sequence "
                         f"length (pad the sequences and drop lengths to convert)")
    return x, y


def read_store(path: pathlib.Path, args) -> tuple[np.ndarray, np.ndarray | None]:
    if args.backend == "textfile":
        return stores.read_textfile(path, args.shape, has_label=not args.no_label,
                                    separator=args.separator)
    return stores.read_kvfile(path, args.shape)


def describe(x: np.ndarray, y: np.ndarray | None) -> str:
    labels = "no labels" if y is None else f"labels {int(y.min())}..{int(y.max())}"
    return f"{x.shape[0]} records, {x.dtype} {list(x.shape[1:])}, {labels}"


def run(args) -> str:
    src = pathlib.Path(args.input)
    if args.info:
        if args.output is not None:
            raise UsageError("--info takes one file")
        x, y = read_store(src, args)
        what = args.backend
        if args.backend == "kvfile":
            keys = [key for _, _, key, _ in stores.iter_kvfile(src)]
            what += f", keys {keys[0].decode('utf-8', 'replace')}..{keys[-1].decode('utf-8', 'replace')}"
        return f"{stores.kvfile_path(src) if args.backend == 'kvfile' else src}: {what}, " \
               f"{describe(x, y)}"
    if args.output is None:
        raise UsageError("give INPUT and OUTPUT (or --info INPUT)")
    dst = pathlib.Path(args.output)
    if (src.suffix == ".npz") == (dst.suffix == ".npz"):
        raise UsageError("exactly one of INPUT and OUTPUT must be an .npz file")
    if src.suffix == ".npz":
        x, y = read_npz(src)
        if args.backend == "textfile":
            n = stores.write_textfile(dst, x, y, separator=args.separator)
        else:
            keys = None
            if args.keys:
                keys = pathlib.Path(args.keys).read_text(encoding="utf-8").splitlines()
            n = stores.write_kvfile(dst, x, y, keys)
        return f"wrote {n} records ({x.dtype} {list(x.shape[1:])}" \
               f"{'' if y is None else ', labelled'}) to {dst}"
    x, y = read_store(src, args)
    dst.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(dst, **arrays)
    return f"wrote {describe(x, y)} to {dst}"


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        print(run(_parser().parse_args(argv)))
    except (UsageError, stores.StoreError, OSError) as e:
        if debug:
            raise
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
