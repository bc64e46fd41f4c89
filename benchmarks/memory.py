"""Peak memory of one forward+backward step, as the extra over the inputs.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before the step (inputs, weights), measured in the harness's own process.

CPU has no allocator counter, so the step runs in a fresh process (``python memory.py ...``):

1. glibc's ``mallopt`` fixes the mmap threshold at 64 KiB and the trim threshold at 1 MiB before
   torch is imported. Every buffer over 64 KiB (all tensors that matter here) then gets its own
   mapping, and freeing it gives the pages back at once, so the resident set size (RSS) follows
   the live tensors instead of what malloc keeps cached.
2. One step of the same implementation and term on the tiny smoke setting runs first, so the
   one-time set-up of torch's CPU kernels is not charged to the step.
3. The case is built (inputs, weights), gradients cleared, garbage collected; writing ``5`` to
   ``/proc/self/clear_refs`` resets the kernel's RSS high-water mark (``VmHWM``), and ``VmRSS``
   is read as the base.
4. One forward+backward runs; the peak is ``VmHWM - base``: the most memory the step held at
   once beyond its inputs, gradients included.

The same step also serves as the correctness guard: the process sends back the loss and a
fingerprint of the gradients (:func:`cases.fingerprint`), taken after the measurement.

:func:`validate_cpu_method` checks this on known allocations (a 256 MiB tensor; three 128 MiB
tensors allocated and freed one after the other must read 128 MiB, not 384).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MIB = 2**20
MMAP_THRESHOLD = 64 * 1024
TRIM_THRESHOLD = MIB
ALLOCATOR = (
    f"glibc mallopt: M_MMAP_THRESHOLD {MMAP_THRESHOLD} B, M_TRIM_THRESHOLD {TRIM_THRESHOLD} B, "
    "in the memory process only (per-tensor mmap/munmap slows it; nothing is timed there)"
)


def _fix_malloc() -> bool:
    """Make glibc map large buffers one by one and unmap them on free; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def _status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_growth(step: Callable[[], object]) -> int:
    """Bytes the RSS rose above its level before ``step`` at the step's peak."""
    gc.collect()
    _reset_high_water_mark()
    base = _status()["VmRSS"]
    step()
    return _status()["VmHWM"] - base


def validate_cpu_method() -> dict[str, float]:
    """Measure known allocations with :func:`rss_peak_growth`; MiB, expected 256 and 128."""
    import torch

    def one_tensor() -> None:
        x = torch.empty(256 * MIB // 4)
        x.fill_(1.0)

    def three_in_turn() -> None:
        for _ in range(3):
            x = torch.empty(128 * MIB // 4)
            x.fill_(1.0)
            del x

    one_tensor()  # any first-touch set-up out of the way
    return {
        "alloc_256MiB_measured_MiB": rss_peak_growth(one_tensor) / MIB,
        "alloc_free_3x128MiB_measured_MiB": rss_peak_growth(three_in_turn) / MIB,
    }


def cuda_peak(step: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated during ``step`` beyond what was allocated before it."""
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_case(case: Any) -> dict[str, Any]:
    """Peak memory, wall time, loss and gradient fingerprint of one step of ``case``.

    CPU: the RSS method (call it in a fresh process with malloc fixed); CUDA: the allocator.
    """
    import torch
    from cases import fingerprint

    for t in case.grad_leaves:
        t.grad = None
    out: dict[str, Any] = {}

    def step() -> None:
        tic = time.perf_counter()
        out["loss"] = case.step()
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - tic

    cuda = case.grad_leaves[0].device.type == "cuda"
    peak = cuda_peak(step) if cuda else rss_peak_growth(step)
    return {"peak_bytes": peak, "seconds": out["seconds"], **fingerprint(case, out["loss"])}


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Body of the fresh process: warm up on the smoke setting, then measure one step per term.

    The terms of one implementation share the process; each is measured from its own base after
    the previous one's tensors are gone (they go back to the system at once, see step 1).
    """
    fixed = _fix_malloc()
    import torch

    torch.set_num_threads(args.threads)
    if args.validate:
        return {"malloc_fixed": fixed, **validate_cpu_method()}
    from cases import QUICK, SETTINGS, build_case

    setting = SETTINGS[args.setting]
    device = torch.device("cpu")
    warm = args.impl.partition("@")[0]  # the smoke setting on its own lattice
    for term in args.terms:
        build_case(SETTINGS[QUICK[0]], warm, term, device).step()
    out: dict[str, Any] = {"malloc_fixed": fixed, "allocator": ALLOCATOR}
    for term in args.terms:
        case = build_case(setting, args.impl, term, device)
        out[term] = measure_case(case)
        del case
    return out


def measure_cpu(
    setting: str, impl: str, terms: list[str], threads: int, timeout: float = 3600.0
) -> dict[str, Any]:
    """Run :func:`measure_case` for each term in one fresh process; ``{term: result}``.

    Returns:
        ``{"malloc_fixed": bool, term: {...}, ...}``, or ``{"error": ...}``.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--setting", setting, "--impl", impl]
    cmd += ["--threads", str(threads), "--terms", *terms]
    return _run(cmd, timeout)


def validate_cpu(threads: int) -> dict[str, Any]:
    """Run :func:`validate_cpu_method` in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--validate", "--threads", str(threads)]
    return _run(cmd, 300.0)


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if p
    )
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    """Entry point of the measuring process; prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting")
    parser.add_argument("--impl")
    parser.add_argument("--terms", nargs="+", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args()
    from cases import Unavailable

    try:
        result = _worker(args)
    except Unavailable as exc:
        result = {"error": f"unavailable: {exc}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
