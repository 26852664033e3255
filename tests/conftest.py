import pathlib
import sys
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture
def standin(monkeypatch):
    """The CuPy stand-in (tests/standin) installed as ``cupy``/``cupyx`` for one test, its
    traffic counts reset; ``make_backend(0)`` then gives a device backend on the CPU."""
    import standin as module  # noqa: PLC0415 - the test tree's own package

    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupyx", module.cupyx)
    module.TRAFFIC.reset()
    return module
