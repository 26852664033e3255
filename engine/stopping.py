"""SIGINT and SIGTERM for a whole command run: one owner, from start-up to the last save.

A CLI creates one ``StopSignals`` before its heavy imports and keeps it installed
until everything it has to write is on disk. What a signal does depends on the
phase the run is in (``phase``):

  STARTUP  imports, before ``main`` runs: nothing has been written, so the handler
           prints one line and leaves at once (``os._exit(128 + signum)``).
  ABORT    reading the job, taking the workspace, building the net: ``Stop`` is
           raised at once (a write in progress, ``checkpoint.write_atomic``, removes
           its temporary file on the way out).
  DEFER    a loop whose work is worth keeping (training, evaluation, a test-only
           job, sampling): the signal is noted, and the loop calls ``check()`` at
           least once per batch or step, which raises ``Stop`` at that safe point.
  SAVING   the stop checkpoint is being written: nothing is raised.

Signals are counted from the first. The second one (in DEFER or SAVING) only says
what is still being done; the third, in any phase, raises ``ForcedExit`` (a
BaseException, so no ``except Exception`` swallows it): the caller leaves at once,
saying what is lost. The exit status of a stopped run is 128 + the first signal's
number (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP, ABORT, DEFER, SAVING = "startup", "abort", "defer", "saving"


def signal_name(signum: int) -> str:
    """``SIGINT`` / ``SIGTERM``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


class Stop(BaseException):
    """A stop asked for by signal ``signum``, raised where the run can stop cleanly. A
    BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on its way
    (a layer reporting a file it cannot read) turns it into another error."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class ForcedExit(BaseException):
    """The third signal: leave now, without finishing the save in progress."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class StopSignals:
    """The SIGINT/SIGTERM handler of one run (see the module docstring).

    ``stream``: where its own notices go (the run's narrative stream: stdout for
    ``engine.train``, stderr for ``engine.sample``, whose stdout is the text)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.phase = STARTUP
        self.pending: int | None = None  # the first signal received
        self.count = 0
        self.doing = "stopping"  # what the second signal's notice says is under way
        self._old: dict | None = None

    # ------------------------------------------------------------ set-up
    def install(self) -> "StopSignals":
        """Take over SIGINT and SIGTERM (main thread only); ``uninstall`` gives them back."""
        if self._old is None:
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        if self._old is not None:
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old = None

    # ------------------------------------------------------------- state
    def check(self) -> None:
        """Raise ``Stop`` when a signal has arrived (the safe points of DEFER loops)."""
        if self.pending is not None:
            raise Stop(self.pending)

    def saving(self, doing: str) -> None:
        """Enter SAVING: ``doing`` (``writing the checkpoint of step 40``) is what the
        second signal's notice says is under way."""
        self.phase, self.doing = SAVING, doing

    def _notice(self, text: str) -> None:
        stream = self.stream or sys.stdout
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream must not turn a notice into a failure

    # ----------------------------------------------------------- handler
    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.pending is None:
            self.pending = signum
        if self.phase == STARTUP:
            try:
                fd = (self.stream or sys.stdout).fileno()
            except (OSError, ValueError, AttributeError):
                fd = 2
            os.write(fd, f"stopped by {signal_name(signum)} during start-up; nothing was "
                         f"written\n".encode())
            os._exit(exit_status(signum))
        if self.count >= 3:
            raise ForcedExit(self.pending)
        if self.phase == ABORT:
            raise Stop(signum)
        if self.count == 2:
            self._notice(f"{signal_name(signum)} again: still {self.doing}; a third signal "
                         f"exits at once without it")
