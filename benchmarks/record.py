"""What a benchmark record says about the run: machine, versions, tree, allocator, threads, load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Output of ``git args`` in the repository, or ``"unknown"``."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.rstrip("\n")


def dirty() -> list[str]:
    """``git status --porcelain`` of the whole tree, untracked files included: one line each."""
    status = git("status", "--porcelain", "--untracked-files=all")
    if status == "unknown":
        return ["unknown: git status failed"]
    return [line for line in status.splitlines() if line.strip()]


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def mem_available() -> int | None:
    """``MemAvailable`` in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def threads() -> dict[str, Any]:
    """Torch's thread settings and the environment variables that set them."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "env": {name: os.environ.get(name) for name in names},
    }


def allocator() -> dict[str, Any]:
    """This process's memory allocator settings.

    glibc's defaults unless the environment sets them: the timing process never calls
    ``mallopt``; the memory process does (see memory.py).
    """
    names = (
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_ARENA_MAX",
        "MALLOC_TOP_PAD_",
        "LD_PRELOAD",
        "PYTORCH_CUDA_ALLOC_CONF",
    )
    libc, version = platform.libc_ver()
    env = {name: os.environ[name] for name in names if name in os.environ}
    return {
        "libc": f"{libc} {version}".strip(),
        "mallopt": "none: the library's defaults (dynamic mmap threshold)",
        "env": env,
    }


def machine(device: torch.device) -> dict[str, Any]:
    """The machine: CPU model, cores, memory; the GPU when ``device`` is CUDA."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out: dict[str, Any] = {
        "type": device.type,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(total / 2**30, 1),
        "name": f"{cpu_name()}, {os.cpu_count()} cores",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            name=props.name,
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return out


def versions() -> dict[str, Any]:
    """Python, torch, CUDA, sere-loss and the platform."""
    import sere_loss

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sere_loss": sere_loss.__version__,
        "platform": platform.platform(),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Everything above, for the top of a results file."""
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": dirty(),
        "device": machine(device),
        "versions": versions(),
        "threads": threads(),
        "allocator": allocator(),
    }
