"""A strict stand-in for CuPy, for the test suite only (never imported by the engine).

The engine's GPU path is CuPy arrays. Without a GPU that path would never run, so
this module plays CuPy on the CPU: its arrays are a type of their own that holds a
NumPy array inside and behaves like a CuPy array where CuPy differs from NumPy.

- Implicit conversion to NumPy raises TypeError: ``np.asarray(a)``, ``__array__``,
  the buffer protocol (the compiled kernels), a NumPy function or ufunc given a
  device array, an operator mixing a device array with a NumPy array. Stricter than
  CuPy in one place on purpose: CuPy answers some NumPy functions through
  ``__array_function__``; here every NumPy function refuses, so the engine always
  goes through the array module it was handed.
- The explicit copies (``cupy.asnumpy``, ``a.get()``, ``a.tolist()``) work and are
  counted as device-to-host copies; ``cupy.asarray``/``cupy.array`` of host data,
  and host arrays or lists used as indices or assigned into a device array (CuPy
  accepts those and copies them over), are counted as host-to-device copies.
- ``float(a)``, ``int(a)``, ``bool(a)``, ``a.item()`` and formatting a device array
  work and are counted as synchronisations (CuPy waits for the device there).
- Reductions and integer indexing give 0-d device arrays, never host scalars; there
  is no ``__index__``.
- Only the names CuPy has exist: ``cupy_names.txt`` lists ``dir(cupy)``,
  ``dir(cupy.ndarray)`` and ``dir(cupyx)`` of the real wheel (read once, imported
  without a GPU). A CuPy name that the stand-in does not model raises
  AttributeError saying so.

``install()`` puts this module in ``sys.modules`` as ``cupy`` (and ``cupyx``), so
``engine.backend.make_backend(0)`` picks it exactly as it picks CuPy. ``TRAFFIC``
holds the counts.
"""
from __future__ import annotations

import functools
import pathlib
import sys
import types
from dataclasses import dataclass, field

import numpy as _np

HERE = pathlib.Path(__file__).resolve().parent


def _read_names() -> dict[str, frozenset]:
    sections: dict[str, set] = {}
    cur = None
    for line in (HERE / "cupy_names.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), set())
        else:
            cur.add(line.strip())
    return {k: frozenset(v) for k, v in sections.items()}


NAMES = _read_names()
CUPY_NAMES, NDARRAY_NAMES, CUPYX_NAMES = NAMES["cupy"], NAMES["cupy.ndarray"], NAMES["cupyx"]


@dataclass
class Traffic:
    """What crossed between host and device, and how often the host waited for it."""

    h2d: int = 0           # host-to-device copies
    h2d_bytes: int = 0
    d2h: int = 0           # device-to-host copies
    d2h_bytes: int = 0
    sync: int = 0          # scalar reads (float/int/bool/item/format)
    where: dict = field(default_factory=dict)  # "kind: caller" -> count, to find a copy

    def reset(self) -> None:
        self.h2d = self.h2d_bytes = self.d2h = self.d2h_bytes = self.sync = 0
        self.where.clear()

    def snapshot(self) -> dict:
        return {"h2d": self.h2d, "h2d_bytes": self.h2d_bytes, "d2h": self.d2h,
                "d2h_bytes": self.d2h_bytes, "sync": self.sync}

    def note(self, kind: str, nbytes: int = 0) -> None:
        if kind == "h2d":
            self.h2d += 1
            self.h2d_bytes += nbytes
        elif kind == "d2h":
            self.d2h += 1
            self.d2h_bytes += nbytes
        else:
            self.sync += 1
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        at = "?" if frame is None else f"{pathlib.Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        key = f"{kind} {at}"
        self.where[key] = self.where.get(key, 0) + 1


TRAFFIC = Traffic()

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly.")
_SCALARS = (bool, int, float, complex, _np.generic)


def _refuse_host(x):
    raise TypeError(f"Unsupported type {type(x)} (a NumPy array given to the device stand-in; "
                    f"copy it with cupy.asarray first)")


def _operand(x):
    """The NumPy array inside a device array; scalars pass; host arrays are refused."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, _SCALARS) or x is None:
        return x
    if isinstance(x, _np.ndarray):
        _refuse_host(x)
    return x


def _deep(x, host_ok=False):
    """Unwrap device arrays inside arguments (lists, tuples, dicts)."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_deep(v, host_ok) for v in x)
    if isinstance(x, dict):
        return {k: _deep(v, host_ok) for k, v in x.items()}
    if isinstance(x, _np.ndarray) and not host_ok:
        _refuse_host(x)
    return x


def _wrap(r, owners=()):
    """Device arrays for NumPy results: arrays, scalars and tuples/lists of them. A result
    that is one of the arguments' arrays (``out=``) comes back as that argument."""
    if isinstance(r, _np.ndarray):
        for o in owners:
            if o._a is r:
                return o
        return ndarray(r)
    if isinstance(r, _np.generic):
        return ndarray(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v, owners) for v in r)
    if isinstance(r, list):
        return [_wrap(v, owners) for v in r]
    return r


def _owners(args, kwargs):
    out = []
    for v in (*args, *kwargs.values()):
        if type(v) is ndarray:
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(w for w in v if type(w) is ndarray)
    return out


def _index(key):
    """An index for the NumPy array inside: device arrays unwrap; host arrays and lists
    are copied to the device by CuPy, so they count as host-to-device copies."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if type(key) is ndarray:
        return key._a
    if isinstance(key, (_np.ndarray, list)):
        arr = _np.asarray(key)
        TRAFFIC.note("h2d", arr.nbytes)
        return arr
    return key


def _binop(name):
    op = getattr(_np.ndarray, name)

    def f(self, other):
        if not isinstance(other, (ndarray, _np.ndarray, *_SCALARS)):
            return NotImplemented
        return _wrap(op(self._a, _operand(other)))
    f.__name__ = name
    return f


def _iop(name):
    op = getattr(_np.ndarray, name)

    def f(self, other):
        op(self._a, _operand(other))
        return self
    f.__name__ = name
    return f


class ndarray:  # noqa: N801 - CuPy's name
    """A device array of the stand-in (see the module docstring)."""

    __slots__ = ("_a",)
    __array_ufunc__ = None          # NumPy ufuncs and NumPy's operators refuse it
    __hash__ = None

    def __init__(self, a):
        # NumPy's operators on 0-d arrays give scalars: the stand-in keeps 0-d arrays
        object.__setattr__(self, "_a", a if type(a) is _np.ndarray else _np.asarray(a))

    # -- the conversions CuPy refuses or counts -------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func, types_, args, kwargs):
        return NotImplemented       # NumPy then raises TypeError

    def get(self, stream=None, order="C", out=None, blocking=True):
        TRAFFIC.note("d2h", self._a.nbytes)
        if out is not None:
            _np.copyto(out, self._a)
            return out
        return _np.array(self._a, order=order, copy=True)

    def tolist(self):
        TRAFFIC.note("d2h", self._a.nbytes)
        return self._a.tolist()

    def item(self, *args):
        TRAFFIC.note("sync")
        return self._a.item(*args)

    def __format__(self, spec):
        TRAFFIC.note("sync")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __repr__(self):
        TRAFFIC.note("d2h", self._a.nbytes)
        return "standin." + repr(self._a)

    def __str__(self):
        TRAFFIC.note("d2h", self._a.nbytes)
        return str(self._a)

    # -- container protocol -----------------------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray(self._a[i]) for i in range(len(self._a)))

    def __getitem__(self, key):
        r = self._a[_index(key)]
        return ndarray(_np.asarray(r)) if isinstance(r, _np.generic) else ndarray(r)

    def __setitem__(self, key, value):
        if isinstance(value, (_np.ndarray, list)):   # CuPy copies host values over
            value = _np.asarray(value)
            TRAFFIC.note("h2d", value.nbytes)
        else:
            value = _operand(value)
        self._a[_index(key)] = value

    # -- attributes and methods: those CuPy's ndarray has ---------------------------------------
    def __getattr__(self, name):
        if name not in NDARRAY_NAMES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        if name in ("data", "device", "cstruct", "toDlpack", "set", "scatter_add", "scatter_max",
                    "scatter_min", "reduced_view"):
            raise AttributeError(f"the CuPy stand-in does not model ndarray.{name}")
        value = getattr(self._a, name)
        if callable(value):
            @functools.wraps(value)
            def method(*args, **kwargs):
                owners = [self, *_owners(args, kwargs)]
                return _wrap(value(*_deep(args), **_deep(kwargs)), owners)
            return method
        return _wrap(value)

    def __setattr__(self, name, value):
        if name == "shape":
            self._a.shape = value
        else:
            raise AttributeError(f"cannot set ndarray.{name} on the CuPy stand-in")

    def __neg__(self):
        return ndarray(-self._a)

    def __pos__(self):
        return ndarray(+self._a)

    def __abs__(self):
        return ndarray(abs(self._a))

    def __invert__(self):
        return ndarray(~self._a)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __reduce__(self):
        raise TypeError("the CuPy stand-in's arrays do not pickle; copy to the host first")


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
              "__rpow__", "__matmul__", "__rmatmul__", "__and__", "__rand__", "__or__", "__ror__",
              "__xor__", "__rxor__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ndarray, _name, _binop(_name))
def _scalar_read(conv):
    """float(a), int(a), complex(a), bool(a): CuPy waits for the device there."""
    def f(self):
        TRAFFIC.note("sync")
        return conv(self._a)
    f.__name__ = f"__{conv.__name__}__"
    return f


for _conv in (float, int, complex, bool):
    setattr(ndarray, f"__{_conv.__name__}__", _scalar_read(_conv))
for _name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
              "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"):
    setattr(ndarray, _name, _iop(_name))


# -- the module namespace ---------------------------------------------------------------------------
def asarray(a, dtype=None, order=None, *, blocking=False):
    if type(a) is ndarray:
        return a if dtype is None or _np.dtype(dtype) == a.dtype else ndarray(a._a.astype(dtype))
    arr = _np.array(a, dtype=dtype, order=order or "K", copy=True)   # device memory is separate
    TRAFFIC.note("h2d", arr.nbytes)
    return ndarray(arr)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if type(obj) is ndarray:
        return ndarray(_np.array(obj._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    arr = _np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    TRAFFIC.note("h2d", arr.nbytes)
    return ndarray(arr)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(type(a) is ndarray for a in args) else _np


def _ascontiguousarray(a, dtype=None):
    if type(a) is not ndarray:
        _refuse_host(a)
    return ndarray(_np.ascontiguousarray(a._a, dtype=dtype))


_OWN = {"asarray": asarray, "array": array, "asanyarray": asarray, "asnumpy": asnumpy,
        "get_array_module": get_array_module, "ascontiguousarray": _ascontiguousarray,
        "ndarray": ndarray}
#: functions of NumPy that answer about shapes and types, not arrays
_PLAIN = {"result_type", "can_cast", "promote_types", "dtype", "finfo", "iinfo", "isscalar",
          "ndim", "shape", "size", "min_scalar_type", "common_type", "issubdtype"}


class _Function:
    """A CuPy function of the stand-in: NumPy's function on the arrays inside."""

    def __init__(self, name, fn):
        self.__name__, self._fn = name, fn

    def __call__(self, *args, **kwargs):
        owners = _owners(args, kwargs)
        return _wrap(self._fn(*_deep(args), **_deep(kwargs)), owners)

    def __getattr__(self, name):
        raise AttributeError(f"the CuPy stand-in does not model cupy.{self.__name__}.{name}")

    def __repr__(self):
        return f"<standin cupy.{self.__name__}>"


class _Cuda(types.SimpleNamespace):
    pass


def _is_available():
    return True


class _Device:
    def __init__(self, device=0):
        self.id = device

    def use(self):
        return None

    def synchronize(self):
        TRAFFIC.note("sync")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = _Cuda(is_available=_is_available, Device=_Device,
             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
             Stream=types.SimpleNamespace(null=types.SimpleNamespace(synchronize=lambda: None)))


_MISSING = object()


def __getattr__(name):  # module attribute lookup (PEP 562)
    if name not in CUPY_NAMES:
        raise AttributeError(f"module 'cupy' has no attribute '{name}'")
    if name == "newaxis":
        return None
    value = getattr(_np, name, _MISSING)
    if value is _MISSING:
        raise AttributeError(f"the CuPy stand-in does not model cupy.{name}")
    if name in _PLAIN or isinstance(value, (type, float, int)):
        return value
    if callable(value):
        fn = _Function(name, value)
        globals()[name] = fn
        return fn
    raise AttributeError(f"the CuPy stand-in does not model cupy.{name}")


# -- cupyx ------------------------------------------------------------------------------------------
def _scatter_add(a, slices, value):
    if type(a) is not ndarray:
        _refuse_host(a)
    _np.add.at(a._a, _index(slices), _operand(value))


cupyx = types.ModuleType("cupyx", "The stand-in's cupyx: scatter_add only.")
cupyx.scatter_add = _scatter_add


def _cupyx_getattr(name):
    if name in CUPYX_NAMES:
        raise AttributeError(f"the CuPy stand-in does not model cupyx.{name}")
    raise AttributeError(f"module 'cupyx' has no attribute '{name}'")


cupyx.__getattr__ = _cupyx_getattr
globals().update(_OWN)


def install(modules=None) -> None:
    """Make ``import cupy`` and ``import cupyx`` give the stand-in (``modules`` defaults to
    ``sys.modules``; pass pytest's monkeypatch-managed dict through ``setitem`` instead
    where the change must be undone)."""
    mods = sys.modules if modules is None else modules
    mods["cupy"] = sys.modules[__name__]
    mods["cupyx"] = cupyx
