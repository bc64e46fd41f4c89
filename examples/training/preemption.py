"""Stopping a run cleanly: SIGTERM, SIGINT, or the end of ``torchrun``.

A scheduler that preempts a job (SLURM, Kubernetes) sends SIGTERM and kills the job a grace
period later; a user stops a run with Ctrl-C (SIGINT). Either way the run finishes the step it is
in, writes a checkpoint and verifies it, says so in one line, and exits with
:data:`REQUEUE_STATUS`, which a job script or a scheduler can read as "requeue me". Under
``torchrun`` every process also watches its parent: a ``torchrun`` killed outright (SIGKILL)
would leave its processes training with no one to stop them, so they stop the same way. Every
process stops after the same step: :class:`training.runs.Run` sums the processes' requests in the
collective it already runs each step.

A second Ctrl-C in a run of one process stops it at once, without a checkpoint (the last one
stands). Under ``torchrun``, which passes its own signal on to the processes, repeated signals
change nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

# What a run stopped by a signal exits with: sysexits.h's EX_TEMPFAIL, "a temporary failure;
# the user is invited to retry". A job script requeues on it; an error exits with 1 or 2.
REQUEUE_STATUS = 75
# Seconds between two looks at the parent process, under torchrun.
PARENT_POLL_S = 1.0


class StopRequest:
    """Whether this process was asked to stop, and by what; the handlers that record it."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._repeat_stops_at_once = True
        self._watching = threading.Event()

    def install(self, *, distributed: bool) -> None:
        """Record SIGTERM and SIGINT from now on instead of dying of them.

        ``distributed``: under ``torchrun``, also watch the parent process (``torchrun``), and
        leave repeated signals alone (``torchrun`` passes on the signal it gets itself).
        Outside the main thread (where Python cannot set handlers) it does nothing.
        """
        self.reason = None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)
        self._repeat_stops_at_once = not distributed
        if distributed:
            self._watching.set()  # ends a watcher of an earlier run in this process
            self._watching = threading.Event()
            parent = os.getppid()
            watcher = threading.Thread(
                target=self._watch, args=(parent, self._watching), daemon=True
            )
            watcher.start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        elif signum == signal.SIGINT and self._repeat_stops_at_once:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (run_main says what it means)

    def _watch(self, parent: int, done: threading.Event) -> None:
        while not done.wait(PARENT_POLL_S):
            if os.getppid() != parent:
                if self.reason is None:
                    self.reason = f"the end of its parent process (torchrun, pid {parent})"
                return

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`; stop watching."""
        self._watching.set()
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for since :meth:`install`."""
        return self.reason is not None


# One per process: signal handlers are per process too.
STOP = StopRequest()
