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

    def asnumpy(self, a):
        """Host copy of an array of this backend (numpy arrays pass through)."""
        if a is None:
            return None
        if self.name == "cupy":
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def describe(self) -> str:
        dt = np.dtype(self.dtype).name
        return f"{self.name} ({dt})" if self.device is None else f"{self.name} GPU {self.device} ({dt})"


def make_backend(gpu: int | None = None, dtype=np.float32) -> Backend:
    """NumPy when ``gpu`` is None, else CuPy on that device; BackendError when impossible."""
    if gpu is None:
        return Backend(np, np.dtype(dtype).type)
    try:
        import cupy  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise BackendError(f"the job asks for GPU {gpu} but CuPy is not installed; install it with "
                           f"pip install 'rnn-engine[gpu]' (or cupy-cuda12x), or remove the gpu "
                           f"field / --gpu to train on the CPU") from None
    try:
        available = cupy.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install reports in many ways
        available = False
    if not available:
        raise BackendError(f"the job asks for GPU {gpu} but CuPy finds no usable GPU; remove the "
                           f"gpu field / --gpu to train on the CPU")
    n = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= gpu < n:
        raise BackendError(f"GPU {gpu} does not exist (this machine has {n}); use --gpu 0..{n - 1}")
    cupy.cuda.Device(gpu).use()
    return Backend(cupy, np.dtype(dtype).type, "cupy", gpu)


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
