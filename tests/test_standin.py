"""The CuPy stand-in itself (tests/standin): it must refuse what CuPy refuses and count
what crosses, or the device-path tests prove nothing."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import standin as cp
from engine.backend import host_floats, make_backend, scatter_add, to_host
from engine.layers import kernels


@pytest.fixture
def a():
    cp.TRAFFIC.reset()
    return cp.asarray(np.arange(6.0).reshape(2, 3))


IMPLICIT = {
    "np.asarray": lambda a: np.asarray(a),
    "np.array": lambda a: np.array(a),
    "__array__": lambda a: a.__array__(),
    "a NumPy ufunc": lambda a: np.exp(a),
    "a NumPy function": lambda a: np.sum(a),
    "np.concatenate": lambda a: np.concatenate([a, a]),
    "device + host": lambda a: a + np.ones(3),
    "host + device": lambda a: np.ones(3) + a,
    "host @ device": lambda a: np.ones((3, 2)) @ a.T,
    "device into a host array": lambda a: np.zeros((2, 3)).__setitem__(slice(None), a),
    "copyto into host": lambda a: np.copyto(np.zeros((2, 3)), a),
    "the buffer protocol": lambda a: memoryview(a),
    "as an index": lambda a: [0, 1, 2][a[0, 1]],
    "a cupy function given host data": lambda a: cp.concatenate([a, np.ones((1, 3))]),
}


@pytest.mark.parametrize("name", sorted(IMPLICIT))
def test_implicit_conversion_raises(a, name):
    with pytest.raises(TypeError):
        IMPLICIT[name](a)


def test_compiled_kernels_refuse_device_arrays():
    """The kernels are behind a NumPy-only gate; called past it they refuse a device array
    (the C code reads buffers, which the stand-in has not)."""
    x = cp.zeros((4, 8), dtype=np.float32)
    assert not kernels.usable(x)
    if not kernels.available():
        pytest.skip("the compiled kernels are not built here")
    with pytest.raises(TypeError):
        kernels.rnn_forward(x, False)


def test_explicit_copies_and_waits_are_counted(a):
    assert cp.TRAFFIC.snapshot() == {"h2d": 1, "h2d_bytes": 48, "d2h": 0, "d2h_bytes": 0,
                                     "sync": 0}
    s = a.sum()
    assert type(s) is cp.ndarray and s.shape == ()        # reductions stay on the device
    assert type(a[0, 1]) is cp.ndarray                     # so does integer indexing
    assert cp.TRAFFIC.sync == 0
    assert float(s) == 15.0 and int(s) == 15 and bool(s) and s.item() == 15.0
    assert f"{s:.1f}" == "15.0"
    assert cp.TRAFFIC.sync == 5
    host = cp.asnumpy(a)
    assert isinstance(host, np.ndarray) and a.get().tolist() == host.tolist()
    assert cp.TRAFFIC.d2h == 2 and cp.TRAFFIC.d2h_bytes == 96
    a.tolist()
    assert cp.TRAFFIC.d2h == 3


def test_host_indices_and_values_count_as_copies(a):
    before = cp.TRAFFIC.h2d
    a[np.array([0])] = 1.0
    a[0] = np.array([7.0, 8.0, 9.0])
    b = a[[0, 1]]
    assert cp.TRAFFIC.h2d == before + 3
    assert b.get().tolist() == [[7.0, 8.0, 9.0], [3.0, 4.0, 5.0]]


def test_device_memory_is_not_host_memory():
    host = np.zeros(3)
    dev = cp.asarray(host)
    host[0] = 5.0
    assert dev.get()[0] == 0.0          # asarray copied
    back = cp.asnumpy(dev)
    back[1] = 3.0
    assert dev.get()[1] == 0.0          # and so did asnumpy


def test_in_place_ops_views_and_out(a):
    v = a[:, 1]
    v += 10.0
    assert a.get()[:, 1].tolist() == [11.0, 14.0]
    out = cp.empty_like(a)
    assert cp.add(a, a, out=out) is out
    assert cp.multiply(a, 2.0).get().tolist() == (2 * a.get()).tolist()
    assert (np.float32(2) * a).get().tolist() == (2 * a.get()).tolist()  # a NumPy scalar is fine


def test_only_cupy_names_exist():
    assert hasattr(cp, "asnumpy") and hasattr(cp, "matmul")
    for name in ("matvec", "asmatrix", "errstate", "nditer"):   # NumPy has them, CuPy has not
        assert hasattr(np, name)
        with pytest.raises(AttributeError):
            getattr(cp, name)
    with pytest.raises(AttributeError):
        cp.asarray(np.ones(2)).ctypes                              # a NumPy-only attribute
    assert "scatter_add" in cp.CUPYX_NAMES
    with pytest.raises(AttributeError):
        cp.cupyx.rsqrt                                             # a cupyx name not modelled


def test_backend_picks_the_standin_as_cupy(standin):
    be = make_backend(0)
    assert be.xp is standin and be.name == "cupy" and be.device == 0
    x = be.xp.zeros(5)
    scatter_add(be.xp, x, be.xp.asarray(np.array([1, 1, 3])), 1.0)
    assert to_host(x).tolist() == [0.0, 2.0, 0.0, 1.0, 0.0]
    standin.TRAFFIC.reset()
    got = host_floats(be.xp, [x.sum(), 2.5, None, x[1]])
    assert got == [3.0, 2.5, None, 2.0]
    assert standin.TRAFFIC.d2h == 1 and standin.TRAFFIC.sync == 0   # one copy for all


def test_standin_is_not_installed_outside_the_fixture():
    real = sys.modules.get("cupy")
    assert real is None or real is not cp


def test_nan_and_math(a):
    z = cp.asarray(np.array([np.nan]))
    assert math.isnan(float(z[0]))
    assert not bool(cp.isfinite(z).all())
