"""Builds the optional C extension of the fused cell kernels at install time
(``pip install .`` or ``pip install -e .``); the project's metadata is in pyproject.toml.

When engine/layers/kernels/native.c does not compile (no C compiler, no Python
headers) the install still succeeds, with a warning, and the engine runs the NumPy
formulas (``engine.layers.kernels.describe()`` and the training banner say so).
After changing native.c, run ``pip install -e .`` again: a build of another version of
the interface is refused, and the NumPy formulas run until then.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[Extension(
        "engine.layers.kernels._native", ["engine/layers/kernels/native.c", "engine/layers/kernels/stepgemm.c"],
        depends=["engine/layers/kernels/stepgemm.h"],
        # -fno-trapping-math lets the compiler vectorise the selects of tanh (see native.c),
        # -fno-math-errno the square roots of the updater's rule
        extra_compile_args=["-O3", "-fno-trapping-math", "-fno-math-errno"],
        optional=True,  # a failed build leaves the NumPy formulas in use
    )],
)
