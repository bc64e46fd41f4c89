"""Processes: one, or one of ``torchrun``'s, and how a trainer's process starts and ends.

:class:`Process` is this process's place in the job. :func:`init_process` joins ``torchrun``'s
group (NCCL on CUDA, gloo on the CPU) or runs alone; :func:`distribute` wraps a trained module in
DistributedDataParallel (with SyncBatchNorm on CUDA); :func:`gather` collects a tensor from every
process; :func:`run_main` runs a trainer as a script and ends a distributed process with
``os._exit`` (gloo's shutdown sometimes aborts after the work is done).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from training.preemption import REQUEUE_STATUS


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's place in the job: its rank, how many there are, its device and group."""

    rank: int
    world_size: int
    device: torch.device
    group: bool = False  # whether it joined a process group (torchrun)

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the process is in a process group (torchrun), even a group of one."""
        return self.group


def under_torchrun() -> bool:
    """Whether ``torchrun`` started this process (it sets these variables)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_process(device_name: str, timeout_minutes: float = 10.0) -> Process:
    """Join ``torchrun``'s process group, or run alone when started without it.

    ``torchrun --nproc_per_node=K`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. Each process
    then takes GPU ``LOCAL_RANK`` with NCCL, or, with ``--device cpu`` (or no GPU), the CPU with
    gloo; also with ``K = 1``, so that one GPU runs the NCCL, DDP and SyncBatchNorm code paths.
    A collective that waits longer than ``timeout_minutes`` for another process fails.
    """
    device = resolve_device(device_name)
    if not under_torchrun():
        return Process(0, 1, device)
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"process {rank} has LOCAL_RANK {local_rank}, but torch sees only "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if rank == 0:
        print(
            f"process group: {backend}, {world_size} process(es), a collective fails after "
            f"{timeout_minutes:g} min of waiting (--dist-timeout)",
            flush=True,
        )
    return Process(rank, world_size, device, group=True)


def distribute(module: nn.Module, process: Process) -> nn.Module:
    """Wrap a trained module for a process group: SyncBatchNorm on CUDA, then DDP.

    Alone, the module comes back as it is. On the CPU, BatchNorm stays per process
    (``SyncBatchNorm`` runs on GPUs only). The returned wrapper shares the module's parameters;
    keep using the module itself for ``state_dict`` and EMA.
    """
    if not process.distributed:
        return module
    module = sync_batchnorm(module, process)
    device_ids = [process.device.index] if process.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def sync_batchnorm(module: nn.Module, process: Process) -> nn.Module:
    """``module`` with SyncBatchNorm layers, on CUDA in a process group; else unchanged.

    For modules that are not wrapped in DDP too, such as a momentum teacher whose projector
    normalises with batch statistics. Layers are swapped inside ``module``, which is returned.
    The main process says how many layers it converted.
    """
    if process.distributed and process.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        count = sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
        if process.is_main and count:
            print(f"{type(module).__name__}: {count} SyncBatchNorm layers", flush=True)
    return module


@torch.no_grad()
def gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient); itself alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# How torch says that a collective timed out: gloo in the waiting process, NCCL's watchdog.
_TIMEOUT_MARKS = ("Timed out waiting", "collective operation timeout")


def run_main(main: Callable[[list[str]], object]) -> None:
    """Run a trainer's ``main`` as a script.

    Under ``torchrun`` the process then ends with ``os._exit(0)`` once its output is flushed:
    with gloo, the interpreter's own shutdown sometimes aborts ("terminate called without an
    active exception") after all the work is done, which would fail a finished run. An
    exception still ends the process with an error, and torchrun stops the other processes;
    a collective's timeout first gets a line that says what it means. A run stopped by a signal
    ends with :data:`~training.preemption.REQUEUE_STATUS` (``os._exit`` too, under torchrun); a
    second Ctrl-C, which stops a run of one process at once, gets a line instead of a traceback.
    """
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print(
            "interrupted (SIGINT): stopped at once, without a checkpoint; the last checkpoint "
            "stands and --resume goes on from it",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except SystemExit as stop:
        if stop.code == REQUEUE_STATUS and under_torchrun():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(REQUEUE_STATUS)
        raise
    except RuntimeError as error:  # DistBackendError too
        if under_torchrun() and any(mark in str(error) for mark in _TIMEOUT_MARKS):
            print(
                f"process {os.environ.get('RANK', '?')}: a collective waited longer than "
                "--dist-timeout for another process, which hung or failed: its own error, "
                "earlier in the log, is the cause; raise --dist-timeout only if a process can "
                "legitimately be that slow (docs/troubleshooting.md, 'Several processes')",
                file=sys.stderr,
                flush=True,
            )
        raise
    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)
