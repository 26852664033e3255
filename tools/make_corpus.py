"""Build the default char-rnn corpus from the Python standard library's own source.

    python tools/make_corpus.py [--out data/corpus] [--size 6000000] [--val-fraction 0.05]

Takes the ``.py`` files of this Python's standard library (no test folders,
no site-packages), in sorted path order, keeps the files that are plain ASCII
(so every character is in a small fixed vocabulary), concatenates them until
``--size`` bytes and writes:
    <out>/train.txt   the first (1 - val_fraction) of the text
    <out>/val.txt     the rest (held out: files the training text never saw)
    <out>/vocab.txt   the characters of both, sorted, as one line of text
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import sysconfig

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Sorted .py files of the standard library below ``root``, without test folders."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_PARTS or part.startswith("test_") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        out.append(p)
    return out


def build(out: pathlib.Path, size: int, val_fraction: float) -> dict:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    pieces, total, used = [], 0, 0
    for p in stdlib_files(root):
        try:
            text = p.read_bytes().decode("ascii")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n")
        if total + len(text) > size:
            text = text[: size - total]
        pieces.append(text)
        total += len(text)
        used += 1
        if total >= size:
            break
    corpus = "".join(pieces)
    if not corpus:
        sys.exit(f"make_corpus: no ASCII .py files found under {root}")
    cut = int(len(corpus) * (1 - val_fraction))
    cut = corpus.rfind("\n", 0, cut) + 1 or cut
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(corpus[:cut], encoding="ascii")
    (out / "val.txt").write_text(corpus[cut:], encoding="ascii")
    vocab = "".join(sorted(set(corpus)))
    (out / "vocab.txt").write_text(vocab, encoding="ascii")
    return {"root": str(root), "files": used, "chars": len(corpus), "train": cut,
            "val": len(corpus) - cut, "vocab": len(vocab)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the char-rnn corpus from the standard library.")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("data/corpus"))
    ap.add_argument("--size", type=int, default=6_000_000, help="bytes of text (default 6 MB)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    a = ap.parse_args(argv)
    if not 0 < a.val_fraction < 1:
        ap.error("--val-fraction must lie between 0 and 1")
    s = build(a.out, a.size, a.val_fraction)
    print(f"corpus: {s['files']} files from {s['root']}: {s['chars']:,} chars "
          f"(train {s['train']:,}, val {s['val']:,}), vocabulary {s['vocab']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
