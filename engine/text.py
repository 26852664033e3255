"""Text as the char-rnn layers see it: a sequence of symbols, either characters or bytes.

A vocabulary is a list of one-symbol strings; symbol id k is ``vocab[k]``. Two units:

* ``"utf-8"`` (characters): files are UTF-8, each symbol one Unicode character.
* ``"bytes"`` (SINGA's unit: its kCharRNN reads ``char``s of a byte string): each
  symbol is one byte b, held as the one-character string ``chr(b)`` (latin-1), so the
  same list, JSON and encoding code serve both units; ``to_bytes`` turns such a string
  back into the raw bytes.

Files are read as bytes and decoded without newline translation: ``"\\r"`` is a symbol
like any other (a CRLF text keeps its ``"\\r\\n"``).

Which unit a job uses (``char_rnn_conf.encoding``): ``"utf-8"``, ``"bytes"``, or, when
unset, ``pick_encoding``: bytes when the vocabulary file (or, without one, the text) is
not valid UTF-8, characters otherwise. A pure-ASCII text reads the same in both units.
"""
from __future__ import annotations

import codecs
import pathlib

import numpy as np

from engine.common import read_file

UTF8, BYTES = "utf-8", "bytes"
ENCODINGS = (UTF8, BYTES)


class TextError(ValueError):
    """A text, vocabulary or setting that cannot be used; str(err) is one line."""


def check_encoding(value: str, where: str) -> str:
    """``value`` when it names a unit (or is "" for automatic), else TextError."""
    if value and value not in ENCODINGS:
        raise TextError(f'{where} "{value}" is not a text unit; use "utf-8" (characters) or '
                        f'"bytes" (SINGA\'s), or leave it unset to pick by the files')
    return value


def read_bytes(path: pathlib.Path, what: str) -> bytes:
    """The bytes of a text or vocabulary file (``config.read_file``: one TextError line)."""
    return read_file(path, what, TextError, hint="give a file")


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def pick_encoding(setting: str, raw: bytes) -> str:
    """The unit: ``setting`` when given, else bytes when ``raw`` is not valid UTF-8."""
    if setting:
        return setting
    return UTF8 if is_utf8(raw) else BYTES


def decode(raw: bytes, encoding: str, where: str) -> str:
    """File bytes -> symbols, newlines untouched. In UTF-8, invalid bytes are an error
    naming the offset and the setting that reads the file as bytes."""
    if encoding == BYTES:
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); to read it as bytes, as SINGA did, set char_rnn_conf "
                        f'{{ encoding: "bytes" }}') from None


def parse_vocab(text: str, where: str, encoding: str) -> list[str]:
    """The symbols of a vocabulary file's text, in order; a symbol listed twice is an error."""
    seen: dict[str, int] = {}
    for k, c in enumerate(text):
        if c in seen:
            unit = "byte" if encoding == BYTES else "character"
            raise TextError(f"vocabulary {where} lists {describe(c, encoding)} twice (at "
                            f"{seen[c]} and {k}); each {unit} once")
        seen[c] = k
    if not seen:
        raise TextError(f"vocabulary {where} is empty")
    return list(text)


def read_vocab(path, setting: str = "") -> tuple[list[str], str]:
    """(symbols, unit) of a vocabulary file: its symbols in order are the ids 0..V-1."""
    raw = read_bytes(path, "vocabulary")
    encoding = pick_encoding(setting, raw)
    return parse_vocab(decode(raw, encoding, f"vocabulary {path}"), str(path), encoding), encoding


def describe(symbol: str, encoding: str) -> str:
    """A symbol for a message: ``'a'``, ``'\\n'``, or ``byte 0x9f``."""
    if encoding == BYTES and ord(symbol) >= 0x80:
        return f"byte 0x{ord(symbol):02x}"
    return repr(symbol)


def encode_text(text: str, vocab: list[str], where: str, encoding: str = UTF8) -> np.ndarray:
    """Symbols -> int32 ids; a symbol outside the vocabulary is an error naming it."""
    index = {c: i for i, c in enumerate(vocab)}
    if all(ord(c) < 256 for c in vocab) and (encoding == BYTES or text.isascii()):
        table = np.full(256, -1, np.int32)
        for c, i in index.items():
            table[ord(c)] = i
        ids = table[np.frombuffer(text.encode("latin-1"), np.uint8)]
    else:
        ids = np.fromiter((index.get(c, -1) for c in text), np.int32, len(text))
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        off = int(bad[0])
        unit = "byte" if encoding == BYTES else "character"
        sym = describe(text[off], encoding)          # "byte 0x9f" names its unit already
        sym = sym if sym.startswith("byte ") else f"{unit} {sym}"
        raise TextError(f"{where}: {sym} at offset {off} is "
                        f"not in the vocabulary; rebuild the vocabulary from this text or remove "
                        f"the {unit}")
    return ids


def to_bytes(symbols: str, encoding: str) -> bytes:
    """Symbols -> the bytes a file holds (raw bytes, or UTF-8)."""
    return symbols.encode("latin-1" if encoding == BYTES else "utf-8")


def from_user(text: str, encoding: str) -> str:
    """Text a user typed (``--prime``) as symbols: its UTF-8 bytes in the byte unit."""
    return text.encode("utf-8").decode("latin-1") if encoding == BYTES else text


def for_display(symbols: str, encoding: str) -> str:
    """Symbols as printable text: bytes are decoded as UTF-8, and a byte sequence that
    is not UTF-8 becomes U+FFFD (the replacement character) instead of failing."""
    if encoding == BYTES:
        return symbols.encode("latin-1").decode("utf-8", errors="replace")
    return symbols


class Display:
    """``for_display`` for symbols that arrive one at a time (sampling prints each as it
    is drawn): a multi-byte UTF-8 sequence is printed once its last byte has come, and
    ``flush()`` gives what an unfinished sequence leaves (U+FFFD)."""

    def __init__(self, encoding: str):
        self.decoder = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                        if encoding == BYTES else None)

    def __call__(self, symbols: str) -> str:
        if self.decoder is None:
            return symbols
        return self.decoder.decode(symbols.encode("latin-1"))

    def flush(self) -> str:
        return "" if self.decoder is None else self.decoder.decode(b"", final=True)
