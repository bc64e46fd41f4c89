"""A run's directory: one live run in it, nothing overwritten, and its ``log.csv``.

:class:`OutputDir` takes the directory's lock, refuses a directory that holds another run and
probes that checkpoints can be written there, all before anything is built. :class:`CSVLog`
keeps ``log.csv`` at one row per step.
"""

from __future__ import annotations

import csv
import errno
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from training.distributed import Process


class OutputDir:
    """A run's directory, checked before anything is built.

    On the main process it makes the directory and takes ``run.lock`` (a POSIX lock, which the
    system drops when the process dies, even by SIGKILL: a crashed run never blocks the next).
    A second live run in the same directory is refused, naming the first. Without ``--resume``
    a directory that already holds a run (a checkpoint, ``log.csv`` or ``last.json``) is
    refused too, so nothing is overwritten. Last, it writes and removes a file where
    checkpoints go, so an unwritable directory fails now, not an epoch in.

    Args:
        path: ``--output-dir``.
        resume: ``--resume`` (``None``, ``"auto"`` or a path).
        process: this process; others than the main one only record the paths.
    """

    RUN_FILES = ("checkpoint.pth", "checkpoint.prev.pth", "log.csv", "last.json")

    def __init__(self, path: Path, *, resume: str | None, process: Process) -> None:
        self.path = path
        self.checkpoint = path / "checkpoint.pth"
        self.previous = path / "checkpoint.prev.pth"
        self.temporary = path / "checkpoint.pth.tmp"
        self.log = path / "log.csv"
        self.last = path / "last.json"
        self._lock: IO[str] | None = None
        if not process.is_main:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"--output-dir {path}: cannot create it ({error})") from error
        self._take_lock()
        held = [name for name in self.RUN_FILES if (path / name).exists()]
        if resume is None and held:
            raise SystemExit(
                f"--output-dir {path} holds a run{self._progress()} ({', '.join(held)}): pass "
                "--resume to continue it, or choose another --output-dir"
            )
        try:  # where checkpoints go; this also clears a checkpoint half-written by a crash
            with open(self.temporary, "wb") as f:
                f.write(b"probe")
                f.flush()
                os.fsync(f.fileno())
            self.temporary.unlink()
        except OSError as error:
            raise SystemExit(
                f"--output-dir {path}: cannot write checkpoints there ({self.temporary}: "
                f"{error.strerror or error})"
            ) from error

    def _progress(self) -> str:
        """`` at step N`` from ``log.csv``'s last row, when it has one."""
        try:
            rows = CSVLog.read(self.log)
        except OSError:
            return ""
        return f" at step {rows[-1]['step']}" if rows else ""

    def _take_lock(self) -> None:
        import fcntl

        lock_path = self.path / "run.lock"
        try:
            lock = open(lock_path, "a+")  # noqa: SIM115 - held until release()
        except OSError as error:
            raise SystemExit(f"--output-dir {self.path}: cannot write there ({error})") from error
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                lock.close()
                raise SystemExit(
                    f"--output-dir {self.path} is in use by a live run ({holder}): wait for it "
                    "to end, or choose another --output-dir"
                ) from error
            print(
                f"warning: cannot lock {lock_path} ({error}); nothing stops a second run there",
                file=sys.stderr,
                flush=True,
            )
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Drop the lock (also dropped when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class CSVLog:
    """One row per iteration in ``log.csv``, each step once.

    Args:
        path: the file.
        fields: its columns.
        keep_until: keep the rows of the steps up to this one (those a resumed checkpoint
            holds) and drop the later ones, which the resumed run writes again; ``None`` starts
            a new file.
    """

    def __init__(self, path: Path, fields: Sequence[str], keep_until: int | None = None) -> None:
        self.path, self.fields = path, list(fields)
        kept = []
        if keep_until is not None and path.exists():
            kept = [row for row in self.read(path) if int(row["step"]) <= keep_until]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        """The rows of a log whose ``step`` parses (a row cut by a crash is left out)."""
        rows = []
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    int(row.get("step") or "")
                except ValueError:
                    continue
                rows.append(row)
        return rows

    def write(self, row: dict[str, float | int]) -> None:
        """Append ``row``; fields it lacks are left empty."""
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([format_value(row[k]) if k in row else "" for k in self.fields])


def format_value(value: float | int) -> str:
    """How logs write a value: integers as they are, floats to 6 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"
