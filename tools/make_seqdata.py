"""Small synthetic sequence data sets for the example jobs, written as .npz stores.

    python tools/make_seqdata.py TASK [--out DIR] [--seed S] [--n-train N] [--n-val N]
    python tools/make_seqdata.py all            (every task, default sizes)

TASK, the job that reads it, and the files written under ``--out`` (default
``data/<task>``):

  classify  configs/many-to-one.conf     train.npz, val.npz
      Sequence classification. Class k of K is a sine wave of frequency
      FREQS[k] (cycles per step) with a random phase and amplitude, plus
      Gaussian noise, as F=2 features [wave, noise-only channel]. Lengths
      vary in [min_len, T]; steps past a sequence's length are zero.
      x [N, T, 2] float32, y [N] int64 (the class), lengths [N] int64.

  parity    configs/many-to-many.conf    train.npz, val.npz
      Synced sequence labelling. Tokens are ids in [0, V); the label of step
      t is the parity of how many times token 1 occurs in steps 0..t.
      x [N, T] int64, y [N, T] int64 (0 even, 1 odd).

  reverse   configs/encoder-decoder.conf train_enc.npz, train_dec.npz, val_enc.npz, val_dec.npz
      Sequence to sequence: output the input sequence reversed. Source ids in
      [0, V); the decoder's input is the target shifted right by one step
      behind a GO token (id V), i.e. teacher forcing. The *_enc file holds
      x = source [N, L]; the *_dec file holds x = [GO, target[:-1]] [N, L]
      and y = target [N, L]. Row n of both files is the same example, so two
      kRecordInput layers reading them in order see matching batches.

  addition  configs/addition-lstm.conf   train.npz, val.npz
      The addition problem. Each sequence has a length in [min_len, T]
      (default 20..25) and is padded with zeros to T; step t has two features
      [value in [0, 1), marker]. Exactly two distinct valid steps are marked
      (marker 1, all others 0); the target is the sum of their two values.
      x [N, T, 2] float32, y [N, 1] float32, lengths [N] int64. Predicting the
      mean gives a mean squared error of about 1/6.

  addition-long  configs/addition-bilstm.conf   train.npz, val.npz
      The same problem at lengths 50..55 (padded to 55), as Lasagne's recurrent
      example sets it (MIN_LENGTH 50, MAX_LENGTH 55); 1000 validation sequences.

  count-ones  configs/count-ones.conf   train.npz, val.npz
      The numpy BPTT tutorial's task: binary sequences of 10 steps (one feature,
      0 or 1); the target is how many ones the sequence holds. x [N, 10, 1]
      float32, y [N] float32. A linear recurrence h' = wx x + wRec h counts them
      exactly with wx = wRec = 1. 20 training sequences, as the tutorial.

  count-up   configs/one-to-many.conf     train.npz, val.npz
      One-to-many with class labels: one input, then a sequence of outputs. The
      input is a digit d in [0, V) as a one-hot vector; the targets are the T
      digits d, d+1, ... counting up modulo V. x [N, 1, V] float32 (one step),
      y [N, T] int64 (target of output step t in column t).

  ramp       configs/one-to-many-real.conf  train.npz, val.npz
      One-to-many with real targets: the input is (a, b), each uniform in
      [-1, 1]; the targets are the T points of the ramp a + b t / (T - 1) from a
      to a + b. x [N, 1, 2] float32, y [N, T] float32.

  quadrant   configs/one-to-one.conf     train.npz, val.npz
      One-to-one (no recurrence): a point (u, v) uniform in [-1, 1]^2 and the
      quadrant it lies in (0: u, v >= 0; 1: u < 0 <= v; 2: u, v < 0; 3: v < 0 <= u).
      x [N, 2] float32 (one record = one example, alg kBP), y [N] int64.

Every generator is a pure function of its arguments and a numpy Generator;
the files of a task depend only on --seed and the sizes (train and val draw
from separate streams derived from the seed), so a run is reproducible.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

TASKS = ("classify", "parity", "reverse", "addition", "addition-long", "count-ones", "count-up",
         "ramp", "quadrant")

#: frequencies (cycles per step) of the classify task's classes
FREQS = (0.04, 0.09, 0.15, 0.23)

#: default sizes (train, val) per task
SIZES = {"classify": (4000, 1000), "parity": (4000, 1000), "reverse": (8000, 1000),
         "addition": (40000, 2000), "addition-long": (50000, 1000), "count-ones": (20, 20),
         "count-up": (4000, 1000), "ramp": (4000, 1000),
         "quadrant": (4000, 1000)}


def rng_for(seed: int, task: str, split: str) -> np.random.Generator:
    """The stream of one task's split: depends only on (seed, task, split)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, TASKS.index(task) + 1,
                                  {"train": 1, "val": 2}[split]])


# ------------------------------------------------------------------ tasks

def make_classify(n: int, rng: np.random.Generator, T: int = 24, min_len: int = 12,
                  noise: float = 0.3, freqs=FREQS) -> dict:
    """Noisy sine waves of len(freqs) classes, variable length (see the module docstring)."""
    k = len(freqs)
    y = rng.integers(0, k, size=n)
    lengths = rng.integers(min_len, T + 1, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    amp = rng.uniform(0.7, 1.3, size=(n, 1))
    t = np.arange(T)[None, :]
    wave = amp * np.sin(2 * np.pi * np.asarray(freqs)[y][:, None] * t + phase)
    x = np.stack([wave + noise * rng.standard_normal((n, T)),
                  noise * rng.standard_normal((n, T))], axis=-1)
    x[t[0][None, :] >= lengths[:, None]] = 0.0
    return {"x": x.astype(np.float32), "y": y.astype(np.int64),
            "lengths": lengths.astype(np.int64)}


def make_parity(n: int, rng: np.random.Generator, T: int = 20, vocab: int = 3) -> dict:
    """Token ids and the running parity of the count of token 1 (see the module docstring)."""
    x = rng.integers(0, vocab, size=(n, T))
    y = np.cumsum(x == 1, axis=1) % 2
    return {"x": x.astype(np.int64), "y": y.astype(np.int64)}


def make_reverse(n: int, rng: np.random.Generator, L: int = 6, vocab: int = 8) -> tuple[dict, dict]:
    """(encoder arrays, decoder arrays) of the reversal task; GO is id ``vocab``."""
    src = rng.integers(0, vocab, size=(n, L))
    tgt = src[:, ::-1]
    dec_in = np.concatenate([np.full((n, 1), vocab), tgt[:, :-1]], axis=1)
    return ({"x": src.astype(np.int64)},
            {"x": dec_in.astype(np.int64), "y": np.ascontiguousarray(tgt).astype(np.int64)})


def make_addition(n: int, rng: np.random.Generator, T: int = 25, min_len: int = 20) -> dict:
    """The addition problem, lengths in [min_len, T] padded to T (see the module docstring)."""
    lengths = rng.integers(min_len, T + 1, size=n)
    vals = rng.uniform(0.0, 1.0, size=(n, T))
    # two distinct marked steps among the first lengths[r] steps of row r
    a = (rng.random(n) * lengths).astype(np.int64)
    b = (rng.random(n) * (lengths - 1)).astype(np.int64)
    b = b + (b >= a)
    marks = np.zeros((n, T))
    rows = np.arange(n)
    marks[rows, a] = 1.0
    marks[rows, b] = 1.0
    valid = np.arange(T)[None, :] < lengths[:, None]
    vals = np.where(valid, vals, 0.0)
    x = np.stack([vals, marks], axis=-1)
    y = (vals[rows, a] + vals[rows, b])[:, None]
    return {"x": x.astype(np.float32), "y": y.astype(np.float32),
            "lengths": lengths.astype(np.int64)}


def make_count_ones(n: int, rng: np.random.Generator, T: int = 10) -> dict:
    """Binary sequences and their number of ones (the numpy BPTT tutorial's data)."""
    x = rng.integers(0, 2, size=(n, T)).astype(np.float32)
    return {"x": x[:, :, None], "y": x.sum(axis=1).astype(np.float32)}


def make_count_up(n: int, rng: np.random.Generator, T: int = 5, vocab: int = 8) -> dict:
    """One one-hot digit d in, the digits d, d+1, ... (mod vocab) out, one per step."""
    d = rng.integers(0, vocab, size=n)
    x = np.eye(vocab, dtype=np.float32)[d][:, None, :]
    y = (d[:, None] + np.arange(T)[None, :]) % vocab
    return {"x": x, "y": y.astype(np.int64)}


def make_ramp(n: int, rng: np.random.Generator, T: int = 5) -> dict:
    """(a, b) in, the ramp a + b t / (T - 1), t = 0..T-1, out, one point per step."""
    ab = rng.uniform(-1.0, 1.0, size=(n, 2))
    y = ab[:, :1] + ab[:, 1:] * (np.arange(T)[None, :] / (T - 1))
    return {"x": ab[:, None, :].astype(np.float32), "y": y.astype(np.float32)}


def make_quadrant(n: int, rng: np.random.Generator) -> dict:
    """Points in [-1, 1]^2 and their quadrant (see the module docstring)."""
    x = rng.uniform(-1.0, 1.0, size=(n, 2))
    u, v = x[:, 0] >= 0, x[:, 1] >= 0
    y = np.select([u & v, ~u & v, ~u & ~v], [0, 1, 2], 3)
    return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


# ----------------------------------------------------------------- writing

def generate(task: str, split: str, n: int, seed: int = 0, **kw) -> dict[str, dict]:
    """{file stem: arrays} of one split of a task (stems as written by ``write_task``)."""
    rng = rng_for(seed, task, split)
    if task == "classify":
        return {split: make_classify(n, rng, **kw)}
    if task == "parity":
        return {split: make_parity(n, rng, **kw)}
    if task == "reverse":
        enc, dec = make_reverse(n, rng, **kw)
        return {f"{split}_enc": enc, f"{split}_dec": dec}
    if task == "addition":
        return {split: make_addition(n, rng, **kw)}
    if task == "addition-long":
        return {split: make_addition(n, rng, **{"T": 55, "min_len": 50, **kw})}
    if task == "count-ones":
        return {split: make_count_ones(n, rng, **kw)}
    if task == "count-up":
        return {split: make_count_up(n, rng, **kw)}
    if task == "ramp":
        return {split: make_ramp(n, rng, **kw)}
    if task == "quadrant":
        return {split: make_quadrant(n, rng, **kw)}
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def write_task(task: str, out, seed: int = 0, n_train: int | None = None,
               n_val: int | None = None, **kw) -> list[pathlib.Path]:
    """Write the train and val files of ``task`` under ``out``; returns their paths."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d_train, d_val = SIZES[task]
    paths = []
    for split, n in (("train", n_train or d_train), ("val", n_val or d_val)):
        for stem, arrays in generate(task, split, n, seed, **kw).items():
            p = out / f"{stem}.npz"
            np.savez(p, **arrays)
            paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/make_seqdata.py",
                                 description="Write the synthetic sequence data sets (.npz).")
    ap.add_argument("task", choices=TASKS + ("all",))
    ap.add_argument("--out", type=pathlib.Path,
                    help="output folder (default data/<task>; with 'all', data/<task> under it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, help="training sequences (default per task)")
    ap.add_argument("--n-val", type=int, help="validation sequences (default per task)")
    a = ap.parse_args(argv)
    for n_ in (a.n_train, a.n_val):
        if n_ is not None and n_ < 1:
            ap.error("--n-train and --n-val must be at least 1")
    tasks = TASKS if a.task == "all" else (a.task,)
    for task in tasks:
        if a.task == "all":
            out = (a.out or pathlib.Path("data")) / task
        else:
            out = a.out or pathlib.Path("data") / task
        paths = write_task(task, out, a.seed, a.n_train, a.n_val)
        print(f"{task}: wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
