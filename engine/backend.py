"""Array backend: NumPy by default, CuPy when the job's ``gpu`` field or ``--gpu`` asks.

The array module is chosen once per net and handed to every layer (layers
never import cupy). float32 for training, float64 for gradient checks.
Random numbers come from seeded numpy Generators on the host, one stream per
purpose, so a job with a fixed seed is reproducible run to run and on either
backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class BackendError(Exception):
    """The requested backend cannot be used (one line saying what to install or change)."""


@dataclass
class Backend:
    xp: object
    dtype: object
    name: str = "numpy"
    device: int | None = None

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def describe(self) -> str:
        dt = np.dtype(self.dtype).name
        return f"{self.name} ({dt})" if self.device is None else f"{self.name} GPU {self.device} ({dt})"


def to_host(a):
    """A NumPy array with the data of ``a``: NumPy arrays (and scalars, lists) pass through,
    a CuPy array is copied from the device; None stays None. The one host-copy helper."""
    if a is None or isinstance(a, (np.ndarray, np.generic, int, float, list, tuple)):
        return None if a is None else np.asarray(a)
    import cupy  # noqa: PLC0415 - only a CuPy array gets here
    return cupy.asnumpy(a)


def on_device(v) -> bool:
    """Whether ``v`` is an array of a device array module: not None, not a Python number,
    not a NumPy array or scalar."""
    return v is not None and not isinstance(v, (bool, int, float, np.generic, np.ndarray))


def host_or_device(v):
    """A host number (a NumPy scalar or 0-d array) as a Python float; anything else (a
    device array, a Python number) as it is."""
    return float(v) if isinstance(v, (np.generic, np.ndarray)) else v


def host_floats(xp, values) -> list:
    """``values`` as Python floats (None stays None): host numbers directly, device scalars
    (0-d arrays of ``xp``) with one copy from the device for all of them, one wait."""
    out = list(values)
    dev = [k for k, v in enumerate(out) if on_device(v)]
    if dev:
        got = to_host(xp.stack([xp.asarray(out[k], dtype=xp.float64).reshape(()) for k in dev]))
        for k, v in zip(dev, got.tolist()):
            out[k] = v
    return [None if v is None else float(v) for v in out]


def make_backend(gpu: int | None = None, dtype=np.float32) -> Backend:
    """NumPy when ``gpu`` is None, else CuPy on that device; BackendError when impossible.
    The error is one line that says why and names ``--cpu``, the option of the training,
    sampling and gradient-check commands that runs a job naming a GPU on the CPU."""
    if gpu is None:
        return Backend(np, np.dtype(dtype).type)
    cpu = "run with --cpu to use the CPU instead"
    try:
        import cupy  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise BackendError(f"the job asks for GPU {gpu} but CuPy is not installed; {cpu}, or "
                           f"install CuPy with pip install 'rnn-engine[gpu]' (or "
                           f"cupy-cuda12x)") from None
    try:
        available = cupy.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install reports in many ways
        available = False
    if not available:
        raise BackendError(f"the job asks for GPU {gpu} but CuPy finds no usable GPU on this "
                           f"machine; {cpu}")
    n = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= gpu < n:
        raise BackendError(f"GPU {gpu} does not exist (this machine has {n}); use --gpu "
                           f"0..{n - 1}, or {cpu}")
    cupy.cuda.Device(gpu).use()
    return Backend(cupy, np.dtype(dtype).type, "cupy", gpu)


def device_of(cpu: bool, gpu: int | None, job_gpu=()) -> int | None:
    """The GPU a command runs on: None (the CPU) with ``--cpu``, else ``--gpu``, else the
    first id of the job's ``gpu`` field, else None. ``--cpu`` with ``--gpu`` is a
    BackendError (they contradict each other)."""
    if cpu and gpu is not None:
        raise BackendError(f"--cpu and --gpu {gpu} contradict each other; give one of them")
    if cpu:
        return None
    if gpu is not None:
        return gpu
    return int(job_gpu[0]) if len(job_gpu) else None


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_mb: int = 32, trim_mb: int = 1024) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to
    the system after every batch.

    A training step allocates and frees the same large temporaries every batch
    (logits, gradients, gate blocks: megabytes each). By default glibc serves them
    with fresh mmap'ed pages, or trims its heap when they are freed, so every batch
    faults in those pages again (about a tenth of an LSTM 512 step here). With
    blocks up to ``mmap_mb`` MiB taken from the heap and the heap trimmed only when
    ``trim_mb`` MiB lie free at its top, the next batch reuses the same memory.
    The peak memory does not grow. This is process-wide, so the training commands
    and the benchmark call it and a library user decides for themselves. Returns
    False where there is no glibc (macOS, musl), and then nothing changes.
    """
    import ctypes  # noqa: PLC0415 - only here
    import ctypes.util  # noqa: PLC0415

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has a no-op mallopt)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) and mallopt(_M_TRIM_THRESHOLD, trim_mb << 20))


def scatter_add(xp, a, index, values) -> None:
    """a[index] += values with repeated indices adding up (numpy.add.at; on CuPy
    cupyx.scatter_add, which older CuPy releases need instead of add.at)."""
    if xp is np:
        np.add.at(a, index, values)
    else:
        import cupyx  # noqa: PLC0415 - only on the GPU backend
        cupyx.scatter_add(a, index, values)


def rng_stream(seed: int, *purpose: int) -> np.random.Generator:
    """A numpy Generator for one purpose (e.g. (INIT,), (DROPOUT, batch, node))."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in purpose]])


class LazyRNG:
    """Creates its Generator on first use: most layers never draw a random number."""

    __slots__ = ("_key", "_gen")

    def __init__(self, *key: int):
        self._key = key
        self._gen = None

    def __getattr__(self, name):
        if self._gen is None:
            self._gen = rng_stream(*self._key)
        return getattr(self._gen, name)


# purposes of the rng streams
INIT, DROPOUT, DATA, SAMPLE = 1, 2, 3, 4
