"""Faults on demand, for the tests only: a trainer that kills itself, hangs or is signalled."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

FAULT_VARIABLE = "EXAMPLES_TEST_FAULT"


def fault_point(
    point: str, step: int, rank: int = 0, before: Callable[[], None] | None = None
) -> None:
    """Test hook: die or hang here when ``EXAMPLES_TEST_FAULT`` asks for it.

    The variable holds ``ACTION:POINT:STEP[:RANK]`` items, comma-separated: ``kill`` sends
    SIGKILL to this process, ``hang`` sleeps for ten minutes, ``sigterm`` and ``sigint`` send
    that signal to this process, ``group-sigterm`` and ``group-sigint`` to its whole process
    group, data loader workers included (as SLURM's preemption and a terminal's Ctrl-C do).
    Points: ``step`` (in the middle of
    iteration ``STEP``, counted from 1, before its collectives) and ``save`` (the checkpoint of
    step ``STEP`` half-written to its temporary file). ``before`` runs first when an item
    matches. Unset, it does nothing.
    """
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    for item in spec.split(","):
        action, where, at, *who = item.split(":")
        if where != point or int(at) != step or (who and int(who[0]) != rank):
            continue
        if before is not None:
            before()
        print(f"{FAULT_VARIABLE}: {action} at {point} {step} (rank {rank})", flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            time.sleep(600)
        elif action in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.Signals[action.upper()])
        elif action in ("group-sigterm", "group-sigint"):
            os.killpg(os.getpgrp(), signal.Signals[action.removeprefix("group-").upper()])
