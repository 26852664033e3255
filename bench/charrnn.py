"""char-rnn training speed: the engine and PyTorch, each in its own processes, as users run them.

    python -m bench.charrnn [--case gru512|lstm512|rnn512|gru128|gru512x2|all] [--steps N]
                            [--warmup N] [--pairs N] [--framework engine|pytorch|both]
                            [--executor auto|planned|reference] [--gpu ID]
                            [--emulate-avx2] [--probe-every N] [--json FILE]

For each case both frameworks train the same model (one-hot input, recurrent
layer(s), linear head, softmax cross-entropy summed over steps and averaged over
the batch, RMSProp rho 0.95 lr 0.002, element-wise clipping to ±5, state carried
across batches) on the same random text, float32, on all cores.

Method. Two frameworks alternating inside one process get in each other's way
(each one's idle BLAS/OpenMP worker threads), which no user of either one sees.
So every measurement here is one child process (``python -m bench.charrnn
--child ...``) that imports one framework, sets the model up, runs ``--warmup``
steps, times ``--steps`` steps one by one and prints one JSON line. Start-up
(interpreter, imports, set-up, warm-up) is outside the step times. The parent
runs the children one at a time, engine, PyTorch, engine, PyTorch, ... for
``--pairs`` pairs per case, so slow phases of a busy machine hit both alike; no
pair is thrown away, as each process warms itself up before its timed steps.

Reported per framework:

- step time: the median of the per-process median step times, and the min–max
  of those per-process medians. Each process is one sample of what a user gets
  (its own thread placement and memory layout): its median drops the odd slow
  step, the median over processes drops the odd slow process, and the range
  shows how much processes differ.
- chars/s = batch × unroll / step time; GFLOP/s = the GEMM FLOPs of one
  forward + backward step (``model_flops``) / step time; and that as a fraction
  of NumPy's float32 GEMM peak (2048³, best of 5), measured once in its own
  child process under the engine's environment. The machine's speed drifts (the
  same build's LSTM 512 step and that peak each moved by 10-15 % within minutes),
  so each engine process also measures the peak itself, after its timed steps
  (after its memory readings, so the GEMM's buffers do not enter them): the
  fraction of its own process's peak, median and min–max over the processes.
  On a host whose speed swings within seconds (a shared VM), ``--probe-every N``
  measures the peak again in each engine process before its timed steps and after
  every N of them (best of 2, on blocks made and used once before the set-up RSS,
  so they count in the peak RSS but not in the growth): each window's median step
  against the higher of the two probes around it, the median over the windows per
  process, and the median and min–max over the processes.
- memory: each process takes its RSS after set-up (model built, math library
  warm from a small GEMM), resets its peak counter (``/proc/self/clear_refs``),
  and takes VmHWM after the last step. Growth = that peak − the set-up RSS;
  peak RSS = the highest RSS of the whole process. Medians over processes.
- ratios: speed engine/PyTorch = PyTorch's step time / the engine's (> 1: the
  engine is faster), per pair, with its median and min–max over the pairs;
  memory = engine growth / PyTorch growth, and the same for peak RSS.

With every result: CPU model, core count, the BLAS kernel and threads of each
framework's processes, PyTorch's version and threads.

Environment. ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` pin OpenBLAS to an
older kernel (see docs/speed.md). When they are set, the engine's processes
(and the GEMM peak's) run with both removed, and the output says so; PyTorch's
processes get the environment unchanged (PyTorch brings its own BLAS, MKL in the
x86 wheels, which does not read them).
The engine's processes call ``engine.backend.keep_freed_memory()``, as
``engine.train`` does. PyTorch's do not: a PyTorch user does not get that
malloc setting, and PyTorch no longer shares a process with the engine.

PyTorch is optional (``pip install torch==2.13.0``); without it the engine is
measured alone and the output says so. A child that fails stops the run with
``error:`` and the child's last stderr line, and the command exits 1.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = {
    #          cell   hidden batch unroll vocab layers
    "gru512": ("GRU", 512, 50, 50, 101, 1),
    "lstm512": ("LSTM", 512, 50, 50, 101, 1),
    "rnn512": ("RNN", 512, 50, 50, 101, 1),
    "gru128": ("GRU", 128, 32, 50, 101, 1),
    "gru512x2": ("GRU", 512, 50, 50, 101, 2),
}
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}
FRAMEWORKS = ("engine", "pytorch")
NAMES = {"engine": "engine", "pytorch": "PyTorch"}
#: removed from the environment of the engine's processes when set (see the module docstring)
UNSET_FOR_ENGINE = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _numpy_avx512_targets() -> str:
    """NumPy's dispatch targets above AVX2 (X86_V4, AVX512_ICL, ... in NumPy 2; AVX512F,
    AVX512_SKX, ... in NumPy 1), for NPY_DISABLE_CPU_FEATURES; NumPy ignores names it lacks."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:                                # NumPy 1
        from numpy.core import _multiarray_umath as umath
    return " ".join(t for t in getattr(umath, "__cpu_dispatch__", ())
                    if "512" in t or t == "X86_V4")


#: --emulate-avx2 on an AVX-512 machine: each framework's math libraries limited to AVX2:
#: NumPy's OpenBLAS on its Haswell kernel and NumPy's own loops without their AVX-512
#: targets; the engine's step GEMM and cell kernels on AVX2; PyTorch's ATen, MKL and oneDNN
#: (which runs its LSTM) on AVX2.
AVX2 = {"engine": {"OPENBLAS_CORETYPE": "Haswell", "RNN_ENGINE_STEP_GEMM": "avx2",
                   "RNN_ENGINE_CELL_ISA": "avx2",
                   "NPY_DISABLE_CPU_FEATURES": _numpy_avx512_targets()},
        "gemm": {"OPENBLAS_CORETYPE": "Haswell"},
        "pytorch": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2"}}
EMULATE_AVX2 = [False]
#: seconds one child process may run before it counts as failed
CHILD_TIMEOUT_S = 3600


class PeakProbe:
    """The float32 GEMM peak, GFLOP/s: 2·n³ / the best time of ``reps`` products (a call's
    argument, default 2) after one to warm the library, n = 2048 (NumPy's BLAS, or with
    ``gpu`` CuPy's on that GPU, n = 8192, waiting for the device). The blocks are made
    once, so that a process can measure again and again between its timed steps
    (``--probe-every``, then its own peak after them) on blocks made before its set-up
    RSS reading."""

    def __init__(self, gpu: int | None = None):
        from engine.backend import make_backend, to_host
        self.xp, self.to_host = make_backend(gpu).xp, to_host
        self.n = 2048 if gpu is None else 8192
        rng = np.random.default_rng(0)
        self.a = self.xp.asarray(rng.random((self.n, self.n), dtype=np.float32))
        self.b = self.xp.asarray(rng.random((self.n, self.n), dtype=np.float32))
        self.c = self.xp.empty_like(self.a)

    def __call__(self, reps: int = 2) -> float:
        best = float("inf")
        for i in range(reps + 1):
            t = time.perf_counter()
            self.xp.matmul(self.a, self.b, out=self.c)
            self.to_host(self.c[0, 0])    # the copy of one number waits for the product
            if i:
                best = min(best, time.perf_counter() - t)
        return 2 * self.n ** 3 / best / 1e9


def gemm_peak(gpu: int | None = None) -> float:
    """The GEMM peak of this process, once: the best of 5 (``PeakProbe``)."""
    return PeakProbe(gpu)(reps=5)


def window_shares(step_s: list[float], probes: list[float], every: int,
                  flops: float) -> list[float]:
    """The share of the GEMM peak of each window of ``every`` timed steps: the window's median
    step against the higher of the probes just before and just after it (the steps' rate
    against what the machine gave around them; the higher, so a slow probe never flatters)."""
    shares = []
    for w in range(len(probes) - 1):
        win = step_s[w * every:(w + 1) * every]
        if win:
            shares.append(flops / statistics.median(win) / 1e9 / max(probes[w], probes[w + 1]))
    return shares


def thread_pools() -> list[dict] | None:
    """The BLAS and OpenMP libraries loaded in this process with their kernel and thread
    count (threadpoolctl, from the ``bench`` extra); None without threadpoolctl."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads", "prefix")
    return [{k: i.get(k) for k in keys} for i in threadpoolctl.threadpool_info()]


def describe_blas(pools: list[dict] | None) -> str:
    """One line for the BLAS libraries among ``pools`` (see ``thread_pools``)."""
    if pools is None:
        return "BLAS kernel unknown (pip install threadpoolctl)"
    return "; ".join(f"{i['internal_api']} {i['version']} kernel {i['architecture']}, "
                     f"{i['num_threads']} threads" for i in pools if i["user_api"] == "blas") \
        or "no BLAS found"


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def model_flops(cell, H, B, T, V, layers) -> float:
    """GEMM FLOPs of one training step (forward, backward data and weight gradients)."""
    G = GATES[cell]
    rows = T * B
    f = 0.0
    D = V
    for layer in range(layers):
        f += 2 * rows * D * G * H * (2 if layer == 0 else 3)  # input proj: fwd + dW (+ dX above layer 0)
        f += 2 * rows * H * G * H * 3                          # recurrent: fwd + dW + dh
        D = H
    f += 2 * rows * H * V * 3                                  # output layer: fwd + dW + dX
    return f


def corpus(path: pathlib.Path, V: int, n: int = 400_000) -> None:
    alphabet = [chr(c) for c in range(33, 33 + V - 1)] + ["\n"]
    ids = np.random.default_rng(0).integers(0, V, n)
    path.write_text("".join(alphabet[i] for i in ids), encoding="utf-8")


def job_text(case: str, data: pathlib.Path, ws: pathlib.Path) -> str:
    cell, H, B, T, V, layers = CASES[case]
    from engine.layers import layer_class      # the engine's processes only
    from engine.proto import job_pb2 as pb
    conf = layer_class(getattr(pb, f"k{cell}")).CONF_FIELD   # the cell class says its conf
    rec = ""
    src = "onehot"
    for k in range(layers):
        rec += (f'layer {{ name: "rnn{k + 1}" type: k{cell} srclayers: "{src}" '
                f'{conf} {{ dim_hidden: {H} }} }}\n')
        src = f"rnn{k + 1}"
    return f"""name: "bench-{case}" train_steps: 1000000
train_one_batch {{ alg: kBPTT }}
updater {{ type: kRMSProp rmsprop_conf {{ rho: 0.95 }}
  learning_rate {{ type: kFixed base_lr: 0.002 }} clip_low: -5 clip_high: 5 }}
neuralnet {{ unroll_len: {T}
layer {{ name: "data" type: kCharRNN unroll_len: 1
  char_rnn_conf {{ path: "{data}" batchsize: {B} unroll_len: {T} encoding: "utf-8" }} }}
layer {{ name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll
  onehot_conf {{ vocab_size: {V} }} }}
layer {{ name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
{rec}layer {{ name: "ip1" type: kInnerProduct srclayers: "{src}" innerproduct_conf {{ num_output: {V} }} }}
layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }}
}}
cluster {{ workspace: "{ws}" }}
"""


class EngineRunner:
    """The engine's char-rnn: the job of ``job_text`` built as ``engine.train`` builds it."""

    def __init__(self, case, tmp: pathlib.Path, executor: str, gpu: int | None = None):
        from engine.backend import make_backend
        from engine.config import Phase, normalise, parse_job, validate
        from engine.net import Net
        from engine.planner import make_worker
        from engine.workspace import net_info
        from engine.unroll import unroll
        from engine.updaters import Updater

        V = CASES[case][4]
        data = tmp / "text.txt"
        if not data.exists():
            corpus(data, V)
        job = parse_job(job_text(case, data, tmp / "ws"), "bench")
        normalise(job)
        validate(job)
        info = net_info(tmp / "job.conf", tmp / "ws", 0)
        info["vocab"] = [chr(c) for c in range(33, 33 + V - 1)] + ["\n"]
        self.backend = make_backend(gpu)
        self.net = Net(unroll(job.neuralnet, Phase.TRAIN), self.backend, info, seed=0)
        self.worker, self.note = make_worker(self.net, 0, executor=executor)
        self.updater = Updater(job.updater, self.net.params, self.backend.xp)
        self.step_no = 0

    def step(self) -> float:
        """One training step as engine.train runs it, with its one read of the loss and the
        gradient norm (on a GPU: the wait for the step's work)."""
        from engine.updaters import grad_norm_squared
        m = self.worker.run_batch(train=True)
        loss, count, norm_sq = self.worker.host_values(
            m["loss"][0], m["loss"][1], grad_norm_squared(self.net.params, self.backend.xp))
        self.updater.update(self.step_no, grad_norm=math.sqrt(norm_sq))
        self.step_no += 1
        return loss / count

    def warm_library(self) -> None:
        """One small GEMM, so NumPy's BLAS has its buffers and threads before the set-up RSS."""
        a = np.ones((64, 64), np.float32)
        a @ a

    def describe(self) -> dict:
        from engine.layers import kernels
        pools = thread_pools()
        blas = ("NumPy BLAS: " + describe_blas(pools) if self.backend.device is None
                else f"CuPy on {self.backend.describe()}")
        rep = {"executor": self.note, "pools": pools, "blas": blas,
               "kernels": kernels.describe(self.backend.dtype, self.backend.xp)}
        if self.backend.device is None:
            rep["step_moves"] = kernels.step_moves()
        return rep


class TorchRunner:
    """The same model in PyTorch: nn.GRU/LSTM/RNN, nn.Linear, RMSprop, clamped gradients."""

    def __init__(self, case, gpu: int | None = None):
        import torch
        from torch import nn

        self.dev = torch.device("cpu" if gpu is None else f"cuda:{gpu}")
        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        cell, H, B, T, V, layers = CASES[case]
        self.torch, self.T, self.B, self.V = torch, T, B, V
        mod = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[cell]
        self.rnn = mod(V, H, num_layers=layers).to(self.dev)
        self.head = nn.Linear(H, V).to(self.dev)
        self.params = list(self.rnn.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.RMSprop(self.params, lr=0.002, alpha=0.95, eps=1e-8)
        L = 400_000 // B
        self.streams = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, L))).to(self.dev)
        self.cursor = 0
        self.state = None
        self.eye = torch.eye(V, device=self.dev)

    def step(self) -> float:
        torch, T, B = self.torch, self.T, self.B
        if self.cursor + T + 1 > self.streams.shape[1]:
            self.cursor = 0
            self.state = None
        chunk = self.streams[:, self.cursor:self.cursor + T + 1]   # (B, T+1), B contiguous streams
        self.cursor += T
        x = self.eye[chunk[:, :T].T]              # (T, B, V) one-hot
        y = chunk[:, 1:T + 1].T.reshape(-1)
        out, state = self.rnn(x, self.state)
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        logits = self.head(out.reshape(T * B, -1))
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum") / B
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        for p in self.params:
            p.grad.clamp_(-5, 5)
        self.opt.step()
        return float(loss.detach()) / T

    def warm_library(self) -> None:
        """One small matrix product, so PyTorch's BLAS and threads are up before the set-up RSS."""
        t = self.torch.ones(64, 64)
        t @ t

    def describe(self) -> dict:
        torch = self.torch
        built = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        return {"pytorch": torch.__version__, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "pools": thread_pools(),
                "blas": f"PyTorch {torch.__version__}: BLAS {built.group(1) if built else 'unknown'}, "
                        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                        f"{torch.get_num_threads()} threads, "
                        f"{torch.get_num_interop_threads()} inter-op threads"
                        + ("" if self.dev.type == "cpu" else
                           f"; on {torch.cuda.get_device_name(self.dev)} with cuDNN "
                           f"{torch.backends.cudnn.version()}")}


def have_torch() -> bool:
    """Whether PyTorch is installed (found, not imported: the parent never loads it)."""
    return importlib.util.find_spec("torch") is not None


# ---------------------------------------------------------------- the child process

def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def core_apart() -> float | None:
    """How far apart the host has put this process's first two cores now: a cache line's
    round trip between them, ns (the engine's step loops slow down as it grows; see
    docs/speed.md, fifteenth session); None on one core."""
    from engine.layers import kernels
    ns = kernels.core_round_trip_ns()
    return None if ns is None else round(ns, 1)


def child_main(kind: str, case: str, steps: int, warmup: int, executor: str,
               gpu: int | None = None, probe_every: int = 0) -> int:
    """One measurement: print one JSON line with this process's result.

    ``kind`` "gemm": NumPy's GEMM peak and BLAS. "engine"/"pytorch": set up ``case``,
    warm the math library, take the set-up RSS, reset the peak counter, run ``warmup``
    steps, then time ``steps`` steps one by one (``step_s``), and take the peak RSS. With
    ``probe_every`` (the engine only) the GEMM peak is measured before the timed steps and
    after every ``probe_every`` of them (``window_peaks_gflops``).
    """
    rep: dict = {"kind": kind, "malloc": "default"}
    if kind in ("engine", "gemm"):
        from engine.backend import keep_freed_memory  # as engine.train does
        rep["malloc"] = "keeps freed memory" if keep_freed_memory() else "default (no glibc)"
    if kind == "gemm":
        rep["gemm_peak_gflops"] = round(gemm_peak(gpu), 1)
        rep["pools"] = thread_pools()
        rep["blas"] = ("NumPy BLAS: " + describe_blas(rep["pools"]) if gpu is None
                       else f"CuPy GEMM on GPU {gpu}")
        print(json.dumps(rep))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runner = (EngineRunner(case, pathlib.Path(tmp), executor, gpu) if kind == "engine"
                  else TorchRunner(case, gpu))
        runner.warm_library()
        probe = PeakProbe(gpu) if probe_every and kind == "engine" else None
        if probe is not None:
            probe()            # the BLAS's buffers for its size, before the set-up RSS
        setup_rss, setup_peak = _status_mib("VmRSS"), _status_mib("VmHWM")
        reset = _reset_peak()
        loss = float("nan")
        for _ in range(warmup):
            loss = runner.step()
        times, probes = [], []
        apart = [core_apart()] if kind == "engine" and gpu is None else []
        for i in range(steps):
            if probe is not None and i % probe_every == 0:
                probes.append(round(probe(), 1))
            t = time.perf_counter()
            loss = runner.step()
            times.append(time.perf_counter() - t)
        if apart:
            apart.append(core_apart())
            rep["core_round_trip_ns"] = apart
        if probe is not None:
            probes.append(round(probe(), 1))
            rep["window_peaks_gflops"] = probes
            rep["probe_every"] = probe_every
        peak = _status_mib("VmHWM")
        if kind == "engine":     # the peak under the same conditions as the steps just timed
            rep["gemm_peak_gflops"] = round(probe(reps=5) if probe is not None
                                            else gemm_peak(gpu), 1)
    rep.update(runner.describe())
    rep.update({"step_s": [round(t, 6) for t in times], "last_loss": round(loss, 4),
                "setup_rss_mib": round(setup_rss, 1),
                # without the reset the peak may be set-up's, so growth is an upper bound
                "peak_reset": reset, "train_mib": round(peak - setup_rss, 1),
                "peak_rss_mib": round(max(peak, setup_peak), 1)})
    print(json.dumps(rep))
    return 0


# ---------------------------------------------------------------- the parent

class ChildFailed(Exception):
    """A measurement process exited non-zero, timed out or printed no result."""


def child_env(kind: str, environ) -> tuple[dict, dict]:
    """(the environment for a child of ``kind``, the variables taken out of it).

    The engine's and the GEMM peak's children run without ``UNSET_FOR_ENGINE``;
    PyTorch's get ``environ`` unchanged."""
    env = dict(environ)
    removed = {}
    if kind in ("engine", "gemm"):
        removed = {k: env.pop(k) for k in UNSET_FOR_ENGINE if k in env}
    if EMULATE_AVX2[0]:
        env.update(AVX2[kind])
    return env, removed


def unset_note(removed: dict) -> str:
    return ("unset " + ", ".join(f"{k}={v}" for k, v in removed.items())
            + " for the engine's processes (see docs/speed.md)")


def child_argv(kind: str, case: str, steps: int, warmup: int, executor: str,
               gpu: int | None = None, probe_every: int = 0) -> list[str]:
    """The command line of one measurement process."""
    return ([sys.executable, "-m", "bench.charrnn", "--child", kind, "--case", case,
             "--steps", str(steps), "--warmup", str(warmup), "--executor", executor]
            + ([] if gpu is None else ["--gpu", str(gpu)])
            + (["--probe-every", str(probe_every)] if probe_every else []))


def run_child(kind: str, case: str, steps: int, warmup: int, executor: str, label: str,
              gpu: int | None = None, probe_every: int = 0) -> dict:
    """Run one measurement process (in the repository root, so it imports this checkout's
    ``bench`` and ``engine``) and return its JSON result plus its wall time ``process_s``."""
    env, _ = child_env(kind, os.environ)
    t = time.perf_counter()
    try:
        r = subprocess.run(child_argv(kind, case, steps, warmup, executor, gpu, probe_every),
                           capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{label} ran past {CHILD_TIMEOUT_S} s and was stopped") from None
    wall = time.perf_counter() - t
    if r.returncode != 0:
        how = f"exit {r.returncode}" if r.returncode > 0 else f"killed by signal {-r.returncode}"
        last = r.stderr.strip().splitlines()
        raise ChildFailed(f"{label} failed ({how}): {last[-1] if last else 'no message on stderr'}")
    try:
        rep = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ChildFailed(f"{label} printed no result line") from None
    rep["process_s"] = round(wall, 3)
    return rep


def _mid(values) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarise(runs: list[dict], flops: float, chars: int, peak: float) -> dict:
    """One framework's result from its processes' reports (see the module docstring):
    step time = median of the per-process medians, range = their min–max."""
    meds = [statistics.median(r["step_s"]) for r in runs]
    med, lo, hi = _mid(meds)
    gf = flops / med / 1e9
    train, train_lo, train_hi = _mid([r["train_mib"] for r in runs])
    rss, rss_lo, rss_hi = _mid([r["peak_rss_mib"] for r in runs])
    own = {}
    if all(r.get("gemm_peak_gflops") for r in runs):   # each process's share of its own peak
        shares = [flops / m / 1e9 / r["gemm_peak_gflops"] for m, r in zip(meds, runs)]
        f, f_lo, f_hi = _mid(shares)
        own = {"process_peaks_gflops": [r["gemm_peak_gflops"] for r in runs],
               "own_peak_fraction": round(f, 3),
               "own_peak_fraction_range": [round(f_lo, 3), round(f_hi, 3)]}
    if all(r.get("window_peaks_gflops") for r in runs):   # each window against its probes
        per = [statistics.median(window_shares(r["step_s"], r["window_peaks_gflops"],
                                               r["probe_every"], flops)) for r in runs]
        f, f_lo, f_hi = _mid(per)
        peaks = [p for r in runs for p in r["window_peaks_gflops"]]
        own.update({"window_peak_fraction": round(f, 3),
                    "window_peak_fraction_range": [round(f_lo, 3), round(f_hi, 3)],
                    "window_peaks_range_gflops": [min(peaks), max(peaks)],
                    "probe_every": runs[0]["probe_every"]})
    if all("step_moves" in r for r in runs):
        own["step_moves"] = [r["step_moves"] for r in runs]
    if all(r.get("core_round_trip_ns") and None not in r["core_round_trip_ns"] for r in runs):
        own["core_round_trip_ns"] = [r["core_round_trip_ns"] for r in runs]
    return {"processes": len(runs), "process_median_step_s": [round(m, 6) for m in meds],
            "median_step_s": round(med, 6), "min_step_s": round(lo, 6), "max_step_s": round(hi, 6),
            "chars_per_s": round(chars / med, 1),
            "chars_per_s_range": [round(chars / hi, 1), round(chars / lo, 1)],
            "gflops": round(gf, 2), "peak_fraction": round(gf / peak, 3),
            "train_mib": train, "train_mib_range": [train_lo, train_hi],
            "peak_rss_mib": rss, "peak_rss_mib_range": [rss_lo, rss_hi],
            "setup_rss_mib": statistics.median(r["setup_rss_mib"] for r in runs),
            "last_loss": runs[-1]["last_loss"], "blas": runs[0]["blas"],
            "malloc": runs[0]["malloc"], **own, "runs": runs}


def ratios(eng: dict, pt: dict) -> dict:
    """engine/PyTorch: speed per pair (PyTorch's step time / the engine's, same pair index),
    its median and min–max; memory growth and peak RSS (medians over processes)."""
    pairs = [p / e for e, p in zip(eng["process_median_step_s"], pt["process_median_step_s"])]
    med, lo, hi = _mid(pairs)
    return {"ratio_speed": round(med, 3), "ratio_speed_min": round(lo, 3),
            "ratio_speed_max": round(hi, 3), "ratio_speed_pairs": [round(r, 3) for r in pairs],
            "ratio_memory": round(eng["train_mib"] / max(1e-9, pt["train_mib"]), 3),
            "ratio_peak_rss": round(eng["peak_rss_mib"] / max(1e-9, pt["peak_rss_mib"]), 3)}


def run_case(case: str, a, frameworks: tuple[str, ...], peak: float) -> dict:
    """Alternate the frameworks' processes for ``a.pairs`` pairs; print each pair as it ends."""
    cell, H, B, T, V, layers = CASES[case]
    flops = model_flops(cell, H, B, T, V, layers)
    res = {"case": case, "cell": cell, "hidden": H, "batch": B, "unroll": T, "vocab": V,
           "layers": layers, "gflop_per_step": round(flops / 1e9, 3)}
    print(f"\n{case}: {cell} {H} x{layers} batch {B} unroll {T} vocab {V} "
          f"({res['gflop_per_step']} GFLOP/step)", flush=True)
    runs = {k: [] for k in frameworks}
    for i in range(a.pairs):
        line = []
        for k in frameworks:
            rep = run_child(k, case, a.steps, a.warmup, a.executor,
                            f"{k} process {i + 1} of {a.pairs} ({case})", a.gpu,
                            a.probe_every if k == "engine" else 0)
            runs[k].append(rep)
            line.append(f"{NAMES[k]} {statistics.median(rep['step_s']) * 1000:.2f} ms/step")
        print(f"  {'pair' if len(frameworks) == 2 else 'run'} {i + 1}: " + ", ".join(line), flush=True)
    if "engine" in runs:
        res["engine_executor"] = runs["engine"][0]["executor"]
        res["engine_kernels"] = runs["engine"][0]["kernels"]
    for k, rs in runs.items():
        res[k] = summarise(rs, flops, B * T, peak)
    if len(frameworks) == 2:
        res.update(ratios(res["engine"], res["pytorch"]))
    return res


def print_case(r: dict) -> None:
    if "engine_executor" in r:
        print(f"  engine {r['engine_executor']}")
    if "engine_kernels" in r:
        print(f"  engine {r['engine_kernels']}")
    for k in FRAMEWORKS:
        if k not in r:
            continue
        x = r[k]
        print(f"  {NAMES[k]:<8} {x['median_step_s'] * 1000:8.2f} ms/step (min-max {x['min_step_s'] * 1000:.2f}"
              f"-{x['max_step_s'] * 1000:.2f} over {x['processes']} process{'es' * (x['processes'] > 1)})  "
              f"{x['chars_per_s']:10,.0f} chars/s  {x['gflops']:7.1f} GFLOP/s  "
              f"{100 * x['peak_fraction']:5.1f}% of peak  memory +{x['train_mib']:.0f} MiB, "
              f"peak RSS {x['peak_rss_mib']:.0f} MiB")
        if "own_peak_fraction" in x:
            lo, hi = x["own_peak_fraction_range"]
            print(f"           of each process's own GEMM peak ("
                  f"{', '.join(f'{p:.1f}' for p in x['process_peaks_gflops'])} GFLOP/s): "
                  f"{100 * x['own_peak_fraction']:.1f}% (min-max {100 * lo:.1f}-{100 * hi:.1f})")
        if "window_peak_fraction" in x:
            lo, hi = x["window_peak_fraction_range"]
            plo, phi = x["window_peaks_range_gflops"]
            every = x["probe_every"]
            print(f"           of the peak probed around each {every} step{'s' * (every > 1)} "
                  f"({plo:.1f}-{phi:.1f} GFLOP/s): {100 * x['window_peak_fraction']:.1f}% "
                  f"(min-max over processes {100 * lo:.1f}-{100 * hi:.1f})")
        print(f"           {x['blas']}; malloc {x['malloc']}")
        if x.get("core_round_trip_ns"):
            print("           the two cores' cache-line round trip before / after the timed "
                  "steps: " + ", ".join(f"{a:.0f} / {b:.0f}" for a, b in x["core_round_trip_ns"])
                  + " ns (per process)")
        if x.get("step_moves"):
            print(f"           the step GEMM's worker, found on the caller's core, moved off it "
                  f"{', '.join(map(str, x['step_moves']))} times (per process)")
    if "ratio_speed" in r:
        print(f"  engine/PyTorch speed {r['ratio_speed']:.2f} (min-max {r['ratio_speed_min']:.2f}-"
              f"{r['ratio_speed_max']:.2f} over {len(r['ratio_speed_pairs'])} pair{'s' * (len(r['ratio_speed_pairs']) > 1)}), memory "
              f"{r['ratio_memory']:.2f} (growth), peak RSS {r['ratio_peak_rss']:.2f}")


def _count(lowest: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {n}")
        return n
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.charrnn", description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="all", choices=[*CASES, "all"])
    ap.add_argument("--steps", type=_count(1), default=30, help="timed steps per process")
    ap.add_argument("--warmup", type=_count(0), default=3, help="untimed steps per process first")
    ap.add_argument("--pairs", type=_count(1), default=5,
                    help="processes per framework, alternating engine, PyTorch (default 5)")
    ap.add_argument("--framework", default="both", choices=["engine", "pytorch", "both"])
    ap.add_argument("--executor", default="auto", choices=["auto", "planned", "reference"])
    ap.add_argument("--gpu", type=int, help="both frameworks on this GPU (the engine on CuPy, "
                    "PyTorch on CUDA/cuDNN); the peak is CuPy's GEMM")
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="on an AVX-512 CPU, limit both frameworks' math libraries to AVX2 "
                         "(NumPy's OpenBLAS on its Haswell kernel, NumPy's own loops, the "
                         "engine's step GEMM and cell kernels; PyTorch's ATen, MKL and oneDNN)")
    ap.add_argument("--probe-every", type=_count(0), default=0, metavar="N",
                    help="in the engine's processes, measure the GEMM peak again before the "
                         "timed steps and after every N of them, and report each window's share "
                         "of the peak around it (a host whose speed drifts; default 0: off)")
    ap.add_argument("--json", help="also write the results as one JSON object to this file")
    ap.add_argument("--child", choices=["engine", "pytorch", "gemm"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if a.case == "all" and a.child != "gemm":
            ap.error("--child needs one --case")
        return child_main(a.child, a.case, a.steps, a.warmup, a.executor, a.gpu, a.probe_every)

    from engine.common import output_problem   # the engine's processes only
    bad = a.json and output_problem(a.json, "--json")
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    torch_found = have_torch()
    if a.framework == "pytorch" and not torch_found:
        ap.error("PyTorch is not installed (pip install torch==2.13.0); use --framework engine")
    frameworks = ("engine", "pytorch") if a.framework == "both" else (a.framework,)
    alone = a.framework == "both" and not torch_found
    if alone:
        frameworks = ("engine",)
    EMULATE_AVX2[0] = a.emulate_avx2
    _, removed = child_env("engine", os.environ)
    try:
        gemm = run_child("gemm", "gru128", 1, 0, a.executor, "the GEMM peak process", a.gpu)
        peak = gemm["gemm_peak_gflops"]
        machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "numpy_blas": gemm["blas"],
                   "numpy_pools": gemm["pools"], "gemm_peak_gflops": peak,
                   "pytorch": importlib.metadata.version("torch") if torch_found else None,
                   "unset_for_engine": removed, "emulate_avx2": a.emulate_avx2}
        print(f"CPU: {machine['cpu']}, {machine['cores']} cores")
        print(f"{gemm['blas']} (in the engine's processes); float32 GEMM peak "
              f"({'NumPy, 2048^3' if a.gpu is None else 'CuPy, 8192^3'}): "
              f"{peak:.1f} GFLOP/s")
        if removed:
            print(unset_note(removed))
        if a.emulate_avx2:
            print("AVX2 emulated: " + "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in e.items())
                                                for k, e in AVX2.items() if k != "gemm"))
        print(f"PyTorch {machine['pytorch']} (threads: see each case)" if torch_found else
              "PyTorch is not installed: the engine is measured alone (pip install torch==2.13.0)")
        order = (f"engine and PyTorch alternating, {a.pairs} pair{'s' * (a.pairs > 1)}"
                 if len(frameworks) == 2 else f"{a.pairs} run{'s' * (a.pairs > 1)}")
        print(f"each run in its own process, {order}; {a.warmup} warm-up + {a.steps} timed "
              f"steps per process; step time = median of the per-process medians", flush=True)
        results = []
        for case in (list(CASES) if a.case == "all" else [a.case]):
            r = run_case(case, a, frameworks, peak)
            print_case(r)
            results.append(r)
    except ChildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "pytorch" in frameworks:
        pt = results[0]["pytorch"]["runs"][0]
        machine.update(pytorch_threads=pt["threads"], pytorch_interop_threads=pt["interop_threads"],
                       pytorch_blas=pt["blas"])
    if a.json:
        settings = {"steps": a.steps, "warmup": a.warmup, "pairs": a.pairs, "executor": a.executor,
                    "probe_every": a.probe_every,
                    "frameworks": list(frameworks), "engine_alone_without_pytorch": alone,
                    "step_time": "median of the per-process median step times"}
        pathlib.Path(a.json).write_text(json.dumps({**machine, "settings": settings,
                                                    "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
