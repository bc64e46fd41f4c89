"""Checkpoints that can be trusted: finite, checksummed, verified before they replace the last.

:class:`Checkpointer` writes them for a run; :func:`state_digest` is the SHA-256 each carries.
Every reader of a checkpoint (``--resume``, ``examples/evaluate.py``, the benchmarks) loads it
with :func:`load_checkpoint`, through the checksum, and a file that fails is named with what is
wrong with it and the other checkpoints of its run that may be whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.faults import fault_point
from training.rundir import OutputDir, kept_checkpoints


def rng_state() -> dict[str, Any]:
    """The global RNG states (CPU, and CUDA if present), for exact resume."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists: what a checkpoint stores of options."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the CPU, containers rebuilt."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def state_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and the rest.

    Containers are walked in a fixed order (dict keys sorted), so a checkpoint written and read
    back gives the same digest, and any changed byte of a tensor or value gives another.
    """
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, Tensor):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{item.dtype}{tuple(item.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().data)
        elif isinstance(item, dict):
            digest.update(b"{")
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode() + b":")
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, (list, tuple)):
            digest.update(b"[" if isinstance(item, list) else b"(")
            for value in item:
                feed(value)
            digest.update(b"]")
        else:
            digest.update(f"{type(item).__name__}:{item!r};".encode())

    feed(obj)
    return digest.hexdigest()


def non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """The paths of the floating tensors in ``obj`` that hold a NaN or an inf."""
    if isinstance(obj, Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix.rstrip(".") or "value"] if bad else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_entries(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_entries(v, f"{prefix}{i}.")]
    return []


def _read(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if its checksum matches, else ``None``; raises on errors."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "sha256" not in state:
        raise ValueError("it holds no checksum (not written by these trainers)")
    stored = state.pop("sha256")
    return state if state_digest(state) == stored else None


def verifies(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of these trainers that passes its checksum."""
    try:
        return _read(path) is not None
    except Exception:
        return False


def peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's ``step`` and ``run_id`` (``None`` if absent), read without verifying it.

    The tensors are mapped, not read, so this is cheap for any size; ``None`` when the file
    cannot be read at all.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {"step": int(state["step"]), "run_id": state.get("run_id")}
    except Exception:
        return None


def _what_is_wrong(path: Path, error: Exception) -> str:
    """Why ``path`` could not be loaded, in words; never torch's advice to unpickle anything."""
    if isinstance(error, ValueError) and "no checksum" in str(error):
        return "it holds no checksum: it was not written by these trainers"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (a write that never reached the disk?)"
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            zeros = not f.read(1 << 20).strip(b"\0")
        if zeros:
            return (
                f"the file holds zeros, not a checkpoint ({size} bytes): its data never reached "
                "the disk (a crash or a power cut soon after it was written?)"
            )
        return (
            "it is not a torch checkpoint (torch.save writes a zip archive): damaged, or another "
            "kind of file"
        )
    if isinstance(error, pickle.UnpicklingError):
        return (
            "it holds objects other than tensors and plain values: it is damaged, or was not "
            "written by these trainers"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"it is damaged ({type(error).__name__}: {first})"


def other_checkpoints(path: Path) -> str:
    """The other checkpoints of ``path``'s run, which may be whole, and how to resume one."""
    directory = Path(path).parent
    candidates = [directory / "checkpoint.prev.pth", directory / "checkpoint.pth"]
    candidates += [kept for _, kept in kept_checkpoints(directory)]
    others = []
    for other in candidates:
        if not other.exists() or other.resolve() == Path(path).resolve() or other in others:
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(other, path):
                continue  # a hard link to the same damaged bytes
        others.append(other)
    if not others:
        return f"No other checkpoint of this run is in {directory}."
    names = ", ".join(o.name for o in others[:4]) + (" and more" if len(others) > 4 else "")
    return f"Other checkpoints of this run may be whole ({names}): --resume {others[0]}"


def load_checkpoint(path: Path, *, given_as: str = "") -> dict[str, Any]:
    """The checkpoint at ``path``, verified; a clear ``SystemExit`` naming the file otherwise.

    Args:
        path: a checkpoint of the trainers.
        given_as: how the user gave it (``"--resume"``), for the message of a missing file.
    """
    path = Path(path)
    try:
        state = _read(path)
    except FileNotFoundError as error:
        where = f"{given_as} {path}" if given_as else str(path)
        raise SystemExit(f"{where}: no such checkpoint") from error
    except Exception as error:
        raise SystemExit(
            f"cannot read the checkpoint {path}: {_what_is_wrong(path, error)}. "
            f"{other_checkpoints(path)}"
        ) from error
    if state is None:
        raise SystemExit(
            f"the checkpoint {path} fails its checksum (SHA-256): the file was damaged after "
            f"it was written. {other_checkpoints(path)}"
        )
    return state


def _nbytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj``."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class Checkpointer:
    """Checkpoints that can be trusted: finite, checksummed, verified, rotated.

    :meth:`save` writes ``checkpoint.pth.tmp``, reads it back and checks its SHA-256 (stored in
    the file, over every tensor and value), and only then makes it ``checkpoint.pth``; the
    previous one becomes ``checkpoint.prev.pth``. A crash at any point leaves
    ``checkpoint.pth`` whole: the old one or the new one. :meth:`load` is
    :func:`load_checkpoint`.
    """

    def __init__(self, output: OutputDir) -> None:
        self.output = output
        self.path = output.checkpoint

    def save(self, state: dict[str, Any], step: int) -> None:
        """Write ``state`` (the checkpoint after ``step`` iterations) as ``checkpoint.pth``."""
        out = self.output
        state = to_cpu(state)
        bad = non_finite_entries({k: v for k, v in state.items() if k != "rng"})
        if bad:
            listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise SystemExit(
                f"step {step}: non-finite values in {listed}. The checkpoint is not written; "
                f"{self._last_good()}"
            )
        state["sha256"] = state_digest(state)
        try:
            with open(out.temporary, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as error:  # torch.save's zip writer raises RuntimeError
            with contextlib.suppress(OSError):  # what was written of it, if anything
                out.temporary.unlink()
            why = error.strerror if isinstance(error, OSError) and error.strerror else None
            why = why or str(error).strip().splitlines()[0]
            free = shutil.disk_usage(out.path).free / 2**30
            raise SystemExit(
                f"cannot write the checkpoint {out.temporary} ({why}; {free:.2f} GiB free there, "
                f"a checkpoint takes about {_nbytes(state) / 2**30:.2f} GiB). "
                f"{self._last_good()} Free some space, then continue with --resume"
            ) from error
        fault_point("save", step, before=self._cut_in_half)
        if not verifies(out.temporary):
            raise SystemExit(
                f"{out.temporary} reads back with another checksum than was written: the "
                f"disk or filesystem corrupts data. {self._last_good()}"
            )
        try:
            self._rotate()
        except OSError as error:
            raise SystemExit(
                f"cannot put the checkpoint {out.temporary} in place of {out.checkpoint} "
                f"({error.strerror or error}). {self._last_good()}"
            ) from error

    def keep(self, step: int) -> Path:
        """Keep the checkpoint just saved as ``checkpoint-<step>.pth`` (a hard link, or a copy).

        :meth:`save` replaces ``checkpoint.pth`` by a new file, so a link keeps this one's
        content; the kept file carries the same checksum and loads with :meth:`load`.
        """
        kept = self.path.with_name(f"checkpoint-{step:07d}.pth")
        kept.unlink(missing_ok=True)
        try:
            os.link(self.path, kept)
        except OSError:
            shutil.copyfile(self.path, kept)
        return kept

    def _cut_in_half(self) -> None:
        """For the tests' fault: leave the new file as a crash mid-write would."""
        os.truncate(self.output.temporary, self.output.temporary.stat().st_size // 2)

    def _rotate(self) -> None:
        """``checkpoint.pth`` -> ``checkpoint.prev.pth``, the new file -> ``checkpoint.pth``.

        With hard links ``checkpoint.pth`` exists at every moment; without them (some network
        filesystems) there is an instant where only ``checkpoint.prev.pth`` does.
        """
        out = self.output
        if out.checkpoint.exists():
            staged = out.path / "checkpoint.prev.pth.tmp"
            staged.unlink(missing_ok=True)
            try:
                os.link(out.checkpoint, staged)
                os.replace(staged, out.previous)
            except OSError:
                os.replace(out.checkpoint, out.previous)
        os.replace(out.temporary, out.checkpoint)
        directory = os.open(out.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _last_good(self) -> str:
        if self.path.exists():
            return f"The last checkpoint, {self.path}, is untouched."
        return "No checkpoint was written before."

    def load(self, path: Path) -> dict[str, Any]:
        """The checkpoint at ``path``, verified (:func:`load_checkpoint`)."""
        return load_checkpoint(path, given_as="--resume")
