"""A run's directory: one live run in it, nothing overwritten, and its ``log.csv``.

:class:`OutputDir` takes the directory's lock, refuses a directory that holds another run and
probes that checkpoints can be written there, all before anything is built. :class:`CSVLog`
keeps ``log.csv`` at one row per step, reads a damaged one without failing, and says which rows
it could not keep.
"""

from __future__ import annotations

import csv
import errno
import os
import re
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
    a directory that already holds a run (:meth:`held`) is refused too, so nothing is
    overwritten; a ``log.csv`` without rows (a run that failed before its first step) does not
    count. Last, it writes and removes a file where
    checkpoints go, so an unwritable directory fails now, not an epoch in.

    Args:
        path: ``--output-dir``.
        resume: ``--resume`` (``None``, ``"auto"`` or a path).
        process: this process; others than the main one only record the paths.
    """

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
        held = self.held()
        if resume is None and held:
            raise SystemExit(
                f"--output-dir {path} holds a run{self.progress()} ({', '.join(held)}): pass "
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

    def held(self) -> list[str]:
        """The files of a run here: checkpoints (kept ones too), ``last.json``, a log with rows."""
        names = [p.name for p in (self.checkpoint, self.previous, self.last) if p.exists()]
        names += [p.name for _, p in kept_checkpoints(self.path)]
        if self._rows():
            names.append(self.log.name)
        return names

    def _rows(self) -> list[dict[str, str]]:
        try:
            return CSVLog.read(self.log)
        except OSError:
            return []

    def progress(self) -> str:
        """`` at step N`` from ``log.csv``'s last row, when it has one."""
        rows = self._rows()
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


def kept_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-<step>.pth`` files in ``directory``, newest first."""
    found = []
    for path in directory.glob("checkpoint-*.pth"):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


class CSVLog:
    """One row per iteration in ``log.csv``, each step once.

    Args:
        path: the file.
        fields: its columns.
        keep_until: keep the rows of the steps up to this one (those a resumed checkpoint
            holds) and drop the later ones, which the resumed run writes again; ``None`` starts
            a new file.
        source: where the kept rows come from, when not ``path``: the log beside a checkpoint
            that a run resumes in a new directory.

    Attributes:
        damaged: the lines of the old log that could not be read (not UTF-8 text, NUL bytes),
            left out.
        missing: the steps up to ``keep_until`` that the old log has no row for.
    """

    def __init__(
        self,
        path: Path,
        fields: Sequence[str],
        keep_until: int | None = None,
        *,
        source: Path | None = None,
    ) -> None:
        self.path, self.fields = path, list(fields)
        self.damaged: list[int] = []
        self.missing: list[int] = []
        kept: list[dict[str, str]] = []
        origin = path if source is None else source
        if keep_until is not None:
            rows: list[dict[str, str]] = []
            if origin.exists():
                rows, self.damaged = self.read_checked(origin)
            by_step = {int(row["step"]): row for row in rows if int(row["step"]) <= keep_until}
            kept = [by_step[step] for step in sorted(by_step)]
            self.missing = [step for step in range(1, keep_until + 1) if step not in by_step]
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)
        except OSError as error:
            raise SystemExit(
                f"cannot write the log {path} ({error.strerror or error}): free some space or "
                "make it writable, then start again"
            ) from error

    @staticmethod
    def read_checked(path: Path) -> tuple[list[dict[str, str]], list[int]]:
        """The rows of a log whose ``step`` parses, and the numbers of the lines left unread.

        A row cut by a crash is left out; so is a line that is not UTF-8 text or holds NUL
        bytes (a damaged disk, an editor), which would otherwise stop every later read.
        """
        lines, damaged = [], []
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                damaged.append(number)
                continue
            if "\0" in line:
                damaged.append(number)
                continue
            lines.append(line)
        if 1 in damaged:  # the header: no column can be trusted
            return [], damaged
        rows = []
        for row in csv.DictReader(lines):
            try:
                int(row.get("step") or "")
            except (TypeError, ValueError):
                continue
            rows.append(row)
        return rows, damaged

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        """The rows of a log that can be read (:meth:`read_checked`)."""
        return CSVLog.read_checked(path)[0]

    def write(self, row: dict[str, float | int]) -> None:
        """Append ``row``; fields it lacks are left empty."""
        try:
            with self.path.open("a", newline="") as f:
                values = [format_value(row[k]) if k in row else "" for k in self.fields]
                csv.writer(f).writerow(values)
        except OSError as error:
            raise SystemExit(
                f"cannot write step {row.get('step', '?')} to the log {self.path} "
                f"({error.strerror or error}). The run stopped; the steps since its last "
                "checkpoint are lost. Free some space or make the log writable, then continue "
                "with --resume"
            ) from error


def format_value(value: float | int) -> str:
    """How logs write a value: integers as they are, floats to 6 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def step_ranges(steps: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts: list[str] = []
    for step in sorted(steps):
        if parts and step == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{step}"
        else:
            parts.append(str(step))
    return ", ".join(parts)
