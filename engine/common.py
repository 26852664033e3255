"""What every other module may need and that needs nothing of theirs: the error of a
user's input, the phases, the one reader of user files, the check of a number.

This module imports no other engine module but the generated schema, so anything can
import it without a cycle; the validator (``engine.config``) sits on top of it and of the
layer registry.
"""
from __future__ import annotations

import enum
import math
import pathlib

from engine.proto import job_pb2 as pb


class ConfigError(Exception):
    """A job-file problem; str(err) is one line naming the file and what to do."""


class Phase(enum.Flag):
    """Training phases; values are SINGA's Phase enum (kTrain=1, kVal=2, kTest=4)."""

    TRAIN = 1
    VAL = 2
    TEST = 4

    @classmethod
    def parse(cls, name: str) -> "Phase":
        key = name.strip().lower()
        table = {"train": cls.TRAIN, "val": cls.VAL, "validate": cls.VAL, "validation": cls.VAL,
                 "test": cls.TEST}
        if key not in table:
            raise ConfigError(f"unknown phase {name!r}; use train, val or test")
        return table[key]

    @property
    def label(self) -> str:
        return {Phase.TRAIN: "train", Phase.VAL: "val", Phase.TEST: "test"}[self]


# Types that SINGA's enum has and that are not RNN layers: clear "not supported".
_TYPE_NAMES = {v: k for k, v in pb.LayerType.items()}

def number_problem(field: str, value: float, rule: str = "", ok: bool = True) -> str | None:
    """The one-line complaint about a number of a job file, or None when it is fine:
    "<field> is <value>; it must be [a finite number] <rule>". NaN and infinities always
    fail (they would silently poison every step); ``ok`` says whether ``rule`` holds."""
    if not math.isfinite(value):
        return f"{field} is {value:g}; it must be a finite number" + (f" {rule}" if rule else "")
    if not ok:
        return f"{field} is {value:g}; it must be {rule}"
    return None


def type_name(t: int) -> str:
    """LayerType value -> its name (``kGRU``)."""
    return _TYPE_NAMES.get(t, str(t))


def read_file(path, what: str, error=None, hint: str = "") -> bytes:
    """A file's bytes; each way of failing is one ``error`` line (ConfigError by default)
    naming the file: missing, a folder (``hint`` says what to give instead), unreadable.
    The one reader of user files: job files, vocabularies, stores, exchange files."""
    error = error or ConfigError
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder" + (f"; {hint}" if hint else f", not a {what}")) from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def read_text(path, what: str, error=None, hint: str = "") -> str:
    """A UTF-8 text file's content with universal newlines (``read_file``'s errors, and one
    line for a file that is not UTF-8)."""
    error = error or ConfigError
    raw = read_file(path, what, error, hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def job_dir(path) -> pathlib.Path:
    """Folder against which the job's relative paths are resolved."""
    return pathlib.Path(path).resolve().parent


#: what a picture may be written as (the formats matplotlib's Agg, SVG and PDF backends write)
PICTURE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff",
                    ".webp")


def output_problem(path, option: str, suffixes: tuple = ()) -> str | None:
    """Why ``path`` (given as ``option``) cannot be written, in one line, or None: checked
    before a long run, so its results are not lost at the end. A missing folder, a folder
    in its place, or (``suffixes`` given) a suffix that is not one of them."""
    p = pathlib.Path(path)
    if p.is_dir():
        return f"{option} {path}: is a folder; give a file name"
    if not p.parent.is_dir():
        return f"{option} {path}: the folder {p.parent} does not exist; create it first"
    if suffixes and p.suffix.lower() not in suffixes:
        return (f"{option} {path}: cannot write a {p.suffix or 'file without extension'}; "
                f"use one of {', '.join(suffixes)}")
    return None

