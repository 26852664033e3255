"""Builds the optional C extension of the fused cell kernels at install time
(``pip install .`` or ``pip install -e .``); the project's metadata is in pyproject.toml.

engine/layers/kernels/native.c compiles with OpenMP (``-fopenmp``) when the compiler
takes it and without it (one thread) otherwise. When it does not compile at all (no C
compiler, no Python headers) the install still succeeds, with a warning, and the engine
runs the NumPy formulas (``engine.layers.kernels.describe()`` and the training banner
say so).
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"]


class BuildExt(build_ext):
    """build_ext that retries without OpenMP when the compiler refuses it."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - CompileError, LinkError, CCompilerError
            if not any(f in ext.extra_compile_args for f in OPENMP):
                raise
            print(f"warning: building {ext.name} with OpenMP failed ({e}); building it "
                  f"without OpenMP (the cell kernels then run on one thread)")
            ext.extra_compile_args = [f for f in ext.extra_compile_args if f not in OPENMP]
            ext.extra_link_args = [f for f in ext.extra_link_args if f not in OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[Extension(
        "engine.layers.kernels._native", ["engine/layers/kernels/native.c"],
        extra_compile_args=["-O3", "-fno-trapping-math", *OPENMP],
        extra_link_args=[*OPENMP],
        optional=True,  # a failed build leaves the NumPy formulas in use
    )],
    cmdclass={"build_ext": BuildExt},
)
