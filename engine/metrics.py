"""Metrics of a run: averaging (sum, count) pairs, the metrics log, the console format
and the progress bar."""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

from engine.backend import host_floats
from engine.checkpoint import write_atomic


def derived_metrics(metrics: dict, net) -> dict:
    """{name: value} from {name: [sum, count]}, with what the net's loss layers derive
    from those values (perplexity; bits per character when the net reads text)."""
    out = {k: (s / c if c else float("nan")) for k, (s, c) in metrics.items() if k != "objective"}
    text = any(lay.text for lay in net.inputs)
    for lay in net.losses:
        out.update(lay.derived_metrics(out, text))
    return out


def host_metrics(metrics: dict, xp) -> dict:
    """{name: [sum, count]} with Python floats, read from the device in one copy where the
    sums are device scalars (a GPU run keeps them there between displays)."""
    keys = list(metrics)
    flat = host_floats(xp, [v for k in keys for v in metrics[k]])
    return {k: [flat[2 * i], flat[2 * i + 1]] for i, k in enumerate(keys)}


def merge_metrics(total: dict, batch: dict) -> None:
    for k, (s, c) in batch.items():
        slot = total.setdefault(k, [0.0, 0.0])
        slot[0] += s
        slot[1] += c


class MetricsError(Exception):
    """metrics.jsonl cannot be written (the message names it and the OS reason)."""


def json_value(v):
    """A record's value as strict JSON allows it: a NaN or infinite float becomes null
    (json.dumps would write the bare ``NaN`` / ``Infinity``, which JSON does not have)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends one JSON object per display or evaluation to <workspace>/metrics.jsonl,
    and, when tensorboardX is installed, the same numbers as TensorBoard scalars under
    <workspace>/tensorboard (``<phase>/<metric>``). Every line is strict JSON: a
    non-finite number is written as null. A failed write is a MetricsError naming the
    file."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._tb = None
        self._tb_tried = False

    def _board(self):
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                return None
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        return self._tb

    def count(self) -> int:
        """How many lines the log holds (0 when it does not exist or cannot be read)."""
        try:
            with open(self.path, "rb") as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0

    @property
    def superseded(self) -> pathlib.Path:
        """Where ``truncate_after`` keeps the records it takes out of the log."""
        return self.path.with_name(self.path.stem + ".superseded" + self.path.suffix)

    def _keep_superseded(self, lines: list) -> None:
        """Append ``lines`` to ``superseded``; on a failure the file is put back as it was
        (removed when it did not exist) and MetricsError names it."""
        existed = self.superseded.exists()
        size = self.superseded.stat().st_size if existed else 0
        try:
            with open(self.superseded, "a", encoding="utf-8") as f:
                f.write("".join(d + "\n" for d in lines))
        except OSError as e:
            try:
                if existed:
                    os.truncate(self.superseded, size)
                else:
                    self.superseded.unlink(missing_ok=True)
            except OSError:
                pass
            raise MetricsError(f"{self.superseded}: cannot keep the records the resumed run "
                               f"supersedes ({e.strerror}); the metrics log was not changed") from None

    def truncate_after(self, step: int) -> None:
        """Take the records newer than ``step`` out of the log (resume from a checkpoint at
        that step; -1: all of them): they are appended to ``superseded`` first, so no
        record is ever lost, then the shortened log replaces the old one only once it is
        complete (``write_atomic``); the old one is left as it was when that fails."""
        if not self.path.exists():
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MetricsError(f"{self.path}: cannot read the metrics log ({e.strerror})") from None
        lines, keep, drop = text.splitlines(), [], []
        for line in lines:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                drop.append(line)
                continue  # a line cut by a crash
            s = r.get("step", 0) if isinstance(r, dict) else None
            (keep if isinstance(s, (int, float)) and s <= step else drop).append(line)
        if len(keep) == len(lines) and (not text or text.endswith("\n")):
            return  # nothing to drop: the file stays as it is
        if drop:
            self._keep_superseded(drop)
        write_atomic(self.path, "".join(k + "\n" for k in keep).encode("utf-8"), "metrics log",
                     MetricsError)

    def write(self, record: dict) -> None:
        line = json.dumps({k: json_value(v) for k, v in record.items()}, allow_nan=False)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            raise MetricsError(f"{self.path}: cannot write the metrics log "
                               f"({e.strerror or e})") from None
        tb = self._board()
        if tb is not None:
            for k, v in record.items():
                if k not in ("step", "phase") and isinstance(v, (int, float)):
                    tb.add_scalar(f"{record.get('phase', 'train')}/{k}", v, record.get("step", 0))
            tb.flush()


def fmt_metrics(values: dict) -> str:
    parts = []
    for k in ("loss", "accuracy", "perplexity", "bpc", "mse"):
        if k in values:
            parts.append(f"{k} {values[k]:.4f}")
    for k, v in values.items():
        if k not in ("loss", "accuracy", "perplexity", "bpc", "mse"):
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)


def fmt_time(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


class Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, start: int = 0):
        self.total = max(1, total)
        self.on = sys.stderr.isatty()
        self.t0 = time.time()
        self.start = start

    def update(self, step: int) -> None:
        if not self.on:
            return
        frac = step / self.total
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        done = step - self.start
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} {rate:.2f} step/s eta {fmt_time(eta)} ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()
