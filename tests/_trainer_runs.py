"""Helpers for the tests that run a trainer and look at what the run leaves on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import EXAMPLES, log_rows

# A trainer's tiny run in a child process: batch 4, no workers, no bar, one image checked.
TINY = ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--no-progress"]
TINY += ["--check-images", "1"]


def steps(run: Path) -> list[int]:
    """The steps of a run's ``log.csv``, in order."""
    return [int(r["step"]) for r in log_rows(run)]


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock, by name."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != "run.lock"}


def checkpoint(run: Path, name: str = "checkpoint.pth") -> dict[str, Any]:
    """A checkpoint of ``run`` as torch reads it (no checksum)."""
    state: dict[str, Any] = torch.load(run / name, map_location="cpu", weights_only=True)
    return state


def all_finite(obj: Any) -> bool:
    """Whether every floating tensor in ``obj`` is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def start_trainer(
    script: str, data: Path, out: Path, *extra: str, fault: str = ""
) -> subprocess.Popen[str]:
    """A trainer in a child process (its own session), with the test fault ``fault``."""
    cmd = [sys.executable, str(EXAMPLES / script), "--data", str(data), *TINY]
    env = {**os.environ, "EXAMPLES_TEST_FAULT": fault}
    return subprocess.Popen(
        [*cmd, "--output-dir", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class Output:
    """A child's output, read as it comes by a thread, so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines = proc, []
        self._event, self._text = threading.Event(), ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._text and self._text in line:
                self._event.set()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Until a line holds ``text``; the test fails if none does in ``timeout`` seconds."""
        self._event.clear()
        self._text = text
        if not any(text in line for line in self.lines) and not self._event.wait(timeout):
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the child never printed {text!r}:\n{self.text()[-3000:]}")

    def text(self) -> str:
        """All the output so far (all of it once the child has ended)."""
        if self.proc.poll() is not None:
            self._thread.join(timeout=10)
        return "".join(self.lines)


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor record of a ``torch.save`` zip file."""
    with zipfile.ZipFile(path) as archive:
        record = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    with path.open("r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        offset = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
