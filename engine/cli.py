"""What a command does with an exception that ends it: one line on stderr, and its exit
status (2: the job, its input or an option is at fault; 1: the command failed). Every
CLI of the engine (train, sample, gradcheck, export) reports through ``failure``; with
``--debug`` they re-raise instead, for the traceback."""
from __future__ import annotations

import sys

from engine.backend import BackendError
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.layers.base import LayerError
from engine.updaters import UpdaterError

#: the job, its input, an option or the machine's set-up is at fault; the message says
#: which file and what to do
INPUT_ERRORS = (ConfigError, BackendError, CheckpointError)


def failure(e: BaseException, job=None, inputs: tuple = ()) -> tuple[int, str]:
    """(exit status, one line) for ``e``: 2 for INPUT_ERRORS and ``inputs`` (a command's
    own), and for a layer's or an updater's complaint (prefixed with the ``job`` file
    when given); 1 with the exception's type for anything else."""
    if isinstance(e, INPUT_ERRORS + tuple(inputs)):
        return 2, str(e)
    if isinstance(e, (LayerError, UpdaterError)):
        return 2, f"{job}: {e}" if job else str(e)
    return 1, f"{type(e).__name__}: {e} (run with --debug for the traceback)"


def report(e: BaseException, job=None, inputs: tuple = ()) -> int:
    """Print ``failure``'s line as ``error: ...`` on stderr; return its exit status."""
    code, line = failure(e, job, inputs)
    print(f"error: {line}", file=sys.stderr)
    return code
