"""Fused CPU cell kernels, and the one switch that chooses them.

The NumPy formulas of ``engine/layers/cells.py`` are the reference: one pass
over memory per operation. The kernels here compute the same step in one pass
per cell (``native.c``, built into ``_native`` by ``pip install``; see
setup.py), on the calling thread, with the GIL released. Each Python function below has the signature of
its NumPy twin in cells.py, less ``xp``, and returns the same arrays (the
tests, tests/test_kernels.py, compare the two); ``softmax_xent`` and ``xent_grad`` stand
for the softmax loss's formulas in engine/layers/loss.py, which calls them.

The switch: the environment variable ``RNN_ENGINE_KERNELS``, read once when
first needed:

* ``native`` (default): the kernels, when the extension is built; otherwise the
  NumPy formulas, and ``describe()`` says why;
* ``numpy``: the NumPy formulas always.

The kernels' loops run with the CPU's best instruction set (AVX-512, AVX2 + FMA, or
baseline x86-64); ``RNN_ENGINE_CELL_ISA`` (``auto``, ``avx512``, ``avx2``, ``baseline``)
lowers it, e.g. to time on an AVX-512 CPU what an AVX2 one runs (``bench.charrnn
--emulate-avx2``). A level above the CPU's, or an unknown value, is a BackendError.

``use(name)`` changes it in a running process (tests, benchmarks). Whatever the
switch says, only NumPy float32 arrays take the kernels (``usable``): CuPy
arrays and float64 (gradient checks, the planner's equality tests) take the
NumPy formulas.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from engine.backend import BackendError

ENV = "RNN_ENGINE_KERNELS"
CHOICES = ("native", "numpy")

#: the interface version native.c must have been built with (its KERNELS_VERSION)
VERSION = 15

#: the cell kernels' instruction set: auto (the CPU's best), or at most this one
CELL_ENV = "RNN_ENGINE_CELL_ISA"
CELL_CHOICES = ("auto", "avx512", "avx2", "baseline")
_CELL_LEVEL = {"baseline": 1, "avx2": 2, "avx512": 3}

try:
    from engine.layers.kernels import _native
    _why_not = ""
except ImportError as e:  # not built (no compiler at install time) or not loadable
    _native = None
    if any(pathlib.Path(__file__).parent.glob("_native*")):
        _why_not = f"the native kernels do not load ({e}); rebuild them with pip install -e ."
    else:
        _why_not = ("the native kernels are not built: was there a C compiler at install "
                    "time? Install one and run pip install -e . again")
if _native is not None and getattr(_native, "VERSION", None) != VERSION:
    _native = None
    _why_not = ("the native kernels were built from another native.c; rebuild them with "
                "pip install -e .")

_mode: str | None = None     # "native" or "numpy" once resolved


def available() -> bool:
    """Whether the compiled kernels are importable."""
    return _native is not None


def mode() -> str:
    """The kernels in use: "native" or "numpy" (the switch, resolved on first use).
    A value of RNN_ENGINE_KERNELS other than native or numpy is a BackendError."""
    global _mode
    if _mode is None:
        want = os.environ.get(ENV, "native").strip().lower() or "native"
        if want not in CHOICES:
            raise BackendError(f"{ENV}={os.environ[ENV]!r} is not a kernel choice; use "
                               f"{ENV}=native (the compiled cell kernels) or {ENV}=numpy")
        _mode = _resolve(want)
    return _mode


def _resolve(want: str) -> str:
    """The mode that ``want`` gives here; for "native", the loops' instruction set set first."""
    if want == "native" and available():
        _cell_isa()
        return "native"
    return "numpy"


def _cell_isa() -> None:
    """Set the kernels' instruction set from RNN_ENGINE_CELL_ISA (auto: the CPU's best)."""
    raw = os.environ.get(CELL_ENV, "auto")
    want = raw.strip().lower() or "auto"
    if want not in CELL_CHOICES:
        raise BackendError(f"{CELL_ENV}={raw!r} is not a choice; use one of "
                           f"{', '.join(CELL_CHOICES)}")
    best = _native.info()["cpu_level"]
    level = best if want == "auto" else _CELL_LEVEL[want]
    if level > best:
        names = {v: k for k, v in _CELL_LEVEL.items()}
        raise BackendError(f"{CELL_ENV}={want}: this CPU gives the cell kernels at most "
                           f"{names[best]}; use {CELL_ENV}=auto")
    _native.cell_isa(level)


def use(name: str | None) -> str:
    """Switch to "native" or "numpy" for this process (None: read the environment again);
    returns the mode now in use ("numpy" when "native" is asked for but not built)."""
    global _mode
    if name is not None and name not in CHOICES:
        raise ValueError(f"kernels {name!r}: use one of {CHOICES}")
    _mode = None
    if name is not None:
        _mode = _resolve(name)
    return mode()


def info() -> dict:
    """The compiled kernels' build: {"isa": the instruction set their loops run with,
    "level": its number (1 baseline, 2 AVX2, 3 AVX-512), "cpu_isa" and "cpu_level": the
    CPU's best}."""
    return {} if _native is None else _native.info()


def describe(dtype=np.float32, xp=np) -> str:
    """One line for the training banner: which cell maths a net of ``dtype`` on ``xp`` runs."""
    if xp is not np:
        return "cell maths: NumPy formulas on the GPU"
    if np.dtype(dtype) != np.float32:
        return f"cell maths: NumPy formulas ({np.dtype(dtype).name})"
    if mode() == "native":
        i = info()
        lowered = (f", lowered from {i['cpu_isa']} by {CELL_ENV}"
                   if i["level"] < i["cpu_level"] else "")
        return f"cell kernels: native ({i['isa']}{lowered}), {step_describe()}"
    if not available():
        why = _why_not
    elif os.environ.get(ENV, "").strip().lower() == "numpy":
        why = f"{ENV}=numpy"
    else:
        why = "switched off in this process"
    return f"cell kernels: NumPy formulas ({why})"


def usable(*arrays, inplace=None) -> bool:
    """Whether the kernels take these arrays now: the switch says native, each array is a
    NumPy float32 array (or None), and ``inplace``, the array a kernel writes its gates
    into, has contiguous rows (inputs without them are copied)."""
    if (_mode or mode()) != "native":
        return False
    for a in arrays + (inplace,):
        if a is not None and (type(a) is not np.ndarray or a.dtype != np.float32):
            return False
    return inplace is None or _rows_ok(inplace)


def _rows_ok(a) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == 4)


def _rows(a):
    """``a`` with contiguous rows (the kernels' layout): itself, or a copy."""
    return a if _rows_ok(a) else np.ascontiguousarray(a)


def _out(out, shape):
    """``out`` when it is a writable array with contiguous rows, else a new array."""
    if out is not None and _rows_ok(out):
        return out
    return np.empty(shape, dtype=np.float32)


def _fill(out, result):
    """Copy a result into the caller's ``out`` when the kernel could not write it there."""
    if out is not None and out is not result:
        out[...] = result
        return out
    return result


# ------------------------------------------------------------------- RNN
def rnn_forward(pre, relu):
    """cells.rnn_forward, fused: h' = act(pre), in ``pre`` (a step's own scratch, rows
    contiguous)."""
    _native.rnn_forward(pre, relu)
    return pre


def rnn_backward(dh_new, h_new, relu, out=None):
    """cells.rnn_backward, fused."""
    d = _out(out, h_new.shape)
    _native.rnn_backward(_rows(dh_new), _rows(h_new), d, relu)
    return _fill(out, d)


# ------------------------------------------------------------------- GRU
def gru_forward(xproj, hproj, h):
    """cells.gru_forward, fused: z and r go into hproj[:2H], as there."""
    H, B = h.shape
    h_new = np.empty((H, B), dtype=np.float32)
    c = np.empty((H, B), dtype=np.float32)
    _native.gru_forward(_rows(xproj), hproj, _rows(h), h_new, c)
    return h_new, (hproj[:2 * H], c, hproj[2 * H:])


def gru_backward(dh_new, h, zr, c, hc, out_x=None, out_h=None):
    """cells.gru_backward, fused."""
    H, B = h.shape
    dx = _out(out_x, (3 * H, B))
    dhp = _out(out_h, (3 * H, B))
    direct = np.empty((H, B), dtype=np.float32)
    _native.gru_backward(_rows(dh_new), _rows(h), _rows(zr), _rows(c), _rows(hc), dx, dhp,
                         direct)
    return _fill(out_x, dx), _fill(out_h, dhp), direct


# ------------------------------------------------------------------ LSTM
def lstm_forward(pre, c):
    """cells.lstm_forward, fused: the gates go into ``pre``, as there."""
    H, B = c.shape
    h_new = np.empty((H, B), dtype=np.float32)
    c_new = np.empty((H, B), dtype=np.float32)
    tc = np.empty((H, B), dtype=np.float32)
    _native.lstm_forward(pre, _rows(c), h_new, c_new, tc)
    return h_new, c_new, (pre[:3 * H], pre[3 * H:], tc)


def lstm_backward(dh_new, dc_new, c, ifo, g, tc, out=None):
    """cells.lstm_backward, fused."""
    H, B = c.shape
    dpre = _out(out, (4 * H, B))
    dc_prev = np.empty((H, B), dtype=np.float32)
    _native.lstm_backward(_rows(dh_new), None if dc_new is None else _rows(dc_new), _rows(c),
                          _rows(ifo), _rows(g), _rows(tc), dpre, dc_prev)
    return _fill(out, dpre), dc_prev


# --------------------------------------------- one-hot inputs, transposes
def usable_index(idx) -> bool:
    """Whether ``idx`` is an index array the kernels take: NumPy int32, contiguous, 1-D."""
    return (type(idx) is np.ndarray and idx.dtype == np.int32 and idx.ndim == 1
            and idx.flags.c_contiguous)


def gather(out, table, idx, add):
    """cells.gather_columns, compiled: ``out`` must have contiguous rows."""
    _native.gather(out, _rows(table), idx, add)
    return out


def unstep(flat, steps):
    """flat (R, T·B) = steps (T, R, B) (C-contiguous) laid out feature-major, the rows split
    over the loop's threads; ``flat`` must have contiguous rows."""
    _native.unstep(flat, steps, steps.shape[0])
    return flat


def restep(steps, flat, bias=None):
    """steps (T, R, B) (C-contiguous) = flat (R, T·B) laid out step-major, plus ``bias`` (R,)
    on every row when given, in one pass, the rows split over the loop's threads; ``flat``
    must have contiguous rows."""
    _native.restep(steps, flat, bias, steps.shape[0])
    return steps


def transpose(out, a):
    """cells.transposed, compiled: ``out`` must have contiguous rows."""
    _native.transpose(out, _rows(a))
    return out


# ---------------------------------------------------------- the step GEMM
#: the step GEMM's switch: auto (the best of this CPU), avx512, avx2, or blas (NumPy's matmul)
STEP_ENV = "RNN_ENGINE_STEP_GEMM"
STEP_CHOICES = ("auto", "avx512", "avx2", "blas")
_ISA_CODE = {"avx2": 2, "avx512": 3}
#: the fewest steps for which a loop packs W_h (about 2 ms for LSTM 512, 0.2 ms saved a step)
STEP_MIN_T = 8

_step: dict | None = None    # {"isa": "avx512" | "avx2" | "blas", "why": str, "openblas": ...}


def _openblas():
    """NumPy's OpenBLAS as a ctypes library, found among the process's mapped files (it is
    loaded already), with the two functions the step GEMM needs: ``blas_thread_shutdown_``
    (puts its spinning threads to sleep; it makes them anew at its next call) and its
    thread count; None when NumPy links another BLAS."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            shutdown = lib.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                     "openblas_get_num_threads"):
            threads = getattr(lib, name, None)
            if threads is not None:
                threads.restype = ctypes.c_int
                return {"path": path, "shutdown": ctypes.cast(shutdown, ctypes.c_void_p).value,
                        "threads": threads}
    return None


def step_mode() -> dict:
    """The step GEMM in use, resolved once: {"isa": "avx512", "avx2" or "blas", "why": the
    reason for "blas"}. RNN_ENGINE_STEP_GEMM asks; a value the CPU cannot run, or an unknown
    one, is a BackendError."""
    global _step
    if _step is not None:
        return _step
    raw = os.environ.get(STEP_ENV, "auto")
    want = raw.strip().lower() or "auto"
    if want not in STEP_CHOICES:
        raise BackendError(f"{STEP_ENV}={raw!r} is not a choice; use one of "
                           f"{', '.join(STEP_CHOICES)}")
    cpu = 0 if _native is None else _native.step_isa()
    best = {code: name for name, code in _ISA_CODE.items()}.get(cpu)
    if want in _ISA_CODE and _ISA_CODE[want] > cpu:
        raise BackendError(f"{STEP_ENV}={want}: this CPU (or build) gives the step GEMM "
                           f"{best or 'no kernel'}; use {STEP_ENV}=auto")
    blas = None if want == "blas" else _openblas()
    if want == "blas":
        _step = {"isa": "blas", "why": f"{STEP_ENV}=blas"}
    elif _native is None:
        _step = {"isa": "blas", "why": "the native kernels are not built"}
    elif best is None:
        _step = {"isa": "blas", "why": "the CPU has neither AVX-512 nor AVX2 with FMA"}
    elif blas is None:
        # our threads beside a BLAS pool we cannot put to sleep would fight it for the cores
        _step = {"isa": "blas", "why": "NumPy's BLAS is not OpenBLAS"}
    else:
        _native.step_quiet(blas["shutdown"])
        _step = {"isa": best if want == "auto" else want, "why": "", "openblas": blas}
    return _step


def step_reset() -> None:
    """Read RNN_ENGINE_STEP_GEMM again at the next use (tests, benchmarks)."""
    global _step
    _step = None


def step_describe() -> str:
    """One phrase for the training banner."""
    m = step_mode()
    if m["isa"] == "blas":
        return f"step GEMM: NumPy's BLAS ({m['why']})"
    return f"step GEMM: packed ({'AVX-512' if m['isa'] == 'avx512' else 'AVX2'}, " \
           f"{step_threads()} threads)"


def step_threads() -> int:
    """The threads of a step GEMM: as many as NumPy's OpenBLAS uses now (OPENBLAS_NUM_THREADS,
    threadpoolctl's limits)."""
    m = step_mode()
    return max(1, int(m["openblas"]["threads"]())) if "openblas" in m else 1


class Packed:
    """A weight matrix ``a`` (M, K) packed for the step GEMM, with the thread count and
    instruction set of its loop (one batch's step loop packs, then multiplies T times).
    ``more`` (M, K2): [a more] (M, K + K2) packed, their columns side by side, without a
    copy of them (``step_gemm``'s ``more`` gives the rows of B they multiply)."""

    __slots__ = ("data", "isa", "threads")

    def __init__(self, a, buffer=None, more=None):
        """``buffer(name, shape)``: where the packed floats go (a block the layer keeps across
        batches: a fresh 4 MB array each batch cost its page faults, 2 ms a step)."""
        m = step_mode()
        self.isa = _ISA_CODE[m["isa"]]
        self.threads = step_threads()
        K = a.shape[1] + (0 if more is None else more.shape[1])
        size = (_native.step_packed_size(a.shape[0], K),)
        self.data = np.empty(size, dtype=np.float32) if buffer is None else buffer(size)
        _native.step_pack(self.data, a, self.threads, more)


def packs(a, T: int) -> bool:
    """Whether a loop of T steps multiplying by ``a`` takes the step GEMM: the kernels are in
    use, ``a`` is a NumPy float32 matrix, the step GEMM is not switched to the BLAS, and T
    is at least STEP_MIN_T (packing costs about ten steps' gain)."""
    return T >= STEP_MIN_T and usable(a) and a.ndim == 2 and step_mode()["isa"] != "blas"


_kernel_threads = 1      # what native.c was last told (its default)


def loop_threads(packing: bool) -> None:
    """Set the threads over which the cell kernels, gathers and scatter-adds of the step
    loop now starting split their rows (when a gate block has 8192 floats or more): the
    step GEMM's threads when the loop ``packing``, else one. A loop of NumPy matmuls keeps
    OpenBLAS's threads awake, and ours would put them to sleep at every step."""
    set_threads(step_threads() if packing else 1)


def set_threads(n: int) -> None:
    """The threads the cell kernels, gathers and scatter-adds split their rows over from now
    on (``loop_threads`` sets it per loop)."""
    global _kernel_threads
    if n != _kernel_threads:
        _native.kernel_threads(n)
        _kernel_threads = n


def park() -> None:
    """The pool's threads sleep now instead of spinning for about a millisecond: OpenBLAS's
    threads, which NumPy's GEMMs after a step loop wake, then have the cores to themselves
    (the output layer's backward GEMMs took 5.6 against 2.7 ms beside spinning workers)."""
    _native.park()


def step_moves() -> int:
    """How many times a step GEMM's caller found the pool's worker waiting on its own core
    and moved it off (stepgemm.c, "the pool"); 0 without the native kernels."""
    return _native.step_moves() if _native is not None else 0


def core_round_trip_ns(rounds: int = 20000, samples: int = 15) -> float | None:
    """The median over ``samples`` of the time a cache line takes from one of this process's
    first two cores to the other and back, in ns (stepgemm.c, "how far apart two cores
    are"; for benchmarks: the step loops' speed follows it); None with fewer than two
    cores to run on or without the native kernels."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if _native is None or len(cores) < 2:
        return None
    step_mode()                    # sets the hook that puts OpenBLAS's threads to sleep first
    got = [_native.round_trip_ns(cores[0], cores[1], rounds) for _ in range(samples)]
    got = sorted(g for g in got if g > 0)
    return got[len(got) // 2] if got else None


def step_gemm(out, packed: Packed, b, accumulate: bool = False, gather=None, scatter=None,
              keep=None, add=None, keep2=None, side=None, more=None):
    """out (M, N) (+)= A b for the packed A (M, K) and b (K, N); ``out`` must have contiguous
    rows, ``b`` is copied when its rows are not contiguous. A one-hot input's projection
    rides along, as (table, idx) with idx (N,) int32 and the table's rows contiguous:
    ``gather``, out[:, j] = A b[:, j] + table[idx[j]] (table (V, M): W_x + b transposed),
    the sum added in the GEMM's registers, so no pass over ``out`` of its own; ``scatter``,
    table[idx[j]] += b[:, j] (table (V, K): dW_x transposed) from b's rows while the GEMM
    packs them, or from the rows of ``side`` when it is given. ``side`` (K, N) with
    contiguous rows: another block in cache beside b (the GRU's dL/d(input projection),
    which differs from b). ``keep`` (K, N) with contiguous rows: b copied there as well,
    from the same rows (a step's columns of a feature-major block); ``keep2`` the same for
    ``side``. ``add`` (M, N) with contiguous rows: out = add + A b, the sum made as the GEMM
    stores (not with ``accumulate``). ``more`` (K2, N) with contiguous rows, for A packed
    as [A1 A2] (``Packed(a, more=...)``): out = A1 b + A2 more, one sum over k as if b and
    ``more`` were one stacked block; the scatter and ``keep`` take b's rows only."""
    table, idx = gather or scatter or (None, None)
    _native.step_gemm(out, packed.data, _rows(b), accumulate, packed.isa, packed.threads,
                      table, idx, scatter is not None, keep, add, keep2, side, more)
    return out


def scatter_t(acc, d, idx):
    """acc[idx[j]] += d[:, j] for every column j of d (R, n), acc (V, R) (a transposed table
    gradient, as the step GEMM's ``scatter`` keeps it); idx int32; rows split over the
    loop's threads."""
    m = step_mode()["isa"]       # the step GEMM's (AVX2 when it is held to it), else the CPU's
    _native.scatter_t(acc, _rows(d), idx, _ISA_CODE.get(m, _native.step_isa()))
    return acc


# ------------------------------------------------------- the updaters' rules
def usable_flat(*arrays) -> bool:
    """Whether the kernels take these arrays as flat runs: the switch says native and each
    is a C-contiguous NumPy float32 array."""
    return usable(*arrays) and all(a.flags.c_contiguous for a in arrays)


def adarule(w, g, h, lr, rho, delta, adagrad, clip=None):
    """The RMSProp (or, ``adagrad``, AdaGrad) step of engine/updaters.py in one pass, equal
    to its NumPy formulas to the bit, after the element-wise clipping to ``clip`` = (low,
    high) when given (written back to ``g``); ``w`` and ``h`` are updated in place. A large
    param is split over the step GEMM's threads when that pool runs (it puts OpenBLAS's
    to sleep first; without it, one thread: another BLAS's pool may be spinning); the
    caller parks the pool (``park``) after its last param."""
    lo, hi = clip if clip is not None else (0.0, 0.0)
    threads = step_threads() if step_mode()["isa"] != "blas" else 1
    _native.adarule(w, g, h, lr, rho, 1.0 - rho, delta, adagrad, clip is not None, lo, hi,
                    threads)


# ---------------------------------------------------- softmax cross-entropy
def softmax_xent(s, labels):
    """Softmax of each row of the scores ``s`` (R, V) with its cross-entropy against
    ``labels`` (R,) in [0, V), in one pass per row: (p (R, V), nll (R,), hit (R,) float32,
    1.0 where the label is the row's np.argmax). ``s`` with contiguous rows (``usable``)."""
    R, V = s.shape
    p = np.empty((R, V), np.float32)
    nll = np.empty((R, 1), np.float32)
    hit = np.empty((R, 1), np.float32)
    _native.softmax_xent(p, _rows(s), np.ascontiguousarray(labels, np.int32), nll, hit)
    return p, nll[:, 0], hit[:, 0]


def xent_grad(p, labels, c):
    """(p - onehot(labels)) * c[:, None], row by row, as NumPy computes it (the same bits)."""
    g = np.empty(p.shape, np.float32)
    _native.xent_grad(g, _rows(p), np.ascontiguousarray(labels, np.int32),
                      np.ascontiguousarray(c, np.float32).reshape(-1, 1))
    return g
