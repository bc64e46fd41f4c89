"""What the example trainers share: processes, data, models, schedules, checkpoints and logs.

Nothing here is SERE, and nothing is one method's: it is the plumbing every self-supervised
trainer carries, kept out of the trainer files so that each of them reads as its method. The
pieces:

- :class:`Process`, :func:`init_process`, :func:`distribute`, :func:`run_main`: one process, or
  one of ``torchrun``'s (NCCL on CUDA, gloo on the CPU), with DistributedDataParallel and, on
  CUDA, SyncBatchNorm.
- :class:`SyntheticImages`: images generated from their index, so the examples run anywhere.
- :class:`ResumableSampler` and :class:`SeededTransform`: the data order and every random crop
  are functions of ``(seed, epoch, index)``, sharded over processes, so a resumed run sees
  exactly the batches an uninterrupted run would have seen, whatever the number of workers.
- :class:`Preset`, :func:`add_run_arguments`, :func:`build_vit`: the options and the timm ViT
  all trainers take.
- :func:`cosine_schedule`, :func:`param_groups`, :func:`set_schedule`, :func:`optimizer_step`,
  :func:`ema_update`, :func:`clip_gradients`, :func:`cancel_last_layer_gradients`.
- :class:`Run`: the loop's bookkeeping (iterations over epochs, the values logged, checkpoints
  with exact resume, the progress bar), written by the main process only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

# Processes ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's place in the job: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group joins several processes."""
        return self.world_size > 1


def init_process(device_name: str, timeout_minutes: float = 30.0) -> Process:
    """Join ``torchrun``'s process group, or run alone when started without it.

    ``torchrun --nproc_per_node=K`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. Each process
    then takes GPU ``LOCAL_RANK`` with NCCL, or, with ``--device cpu`` (or no GPU), the CPU with
    gloo.
    """
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"process {rank} has LOCAL_RANK {local_rank}, but torch sees only "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return Process(rank, world_size, device)


def distribute(module: nn.Module, process: Process) -> nn.Module:
    """Wrap a trained module for several processes: SyncBatchNorm on CUDA, then DDP.

    In one process the module comes back as it is. On the CPU, BatchNorm stays per process
    (``SyncBatchNorm`` runs on GPUs only). The returned wrapper shares the module's parameters;
    keep using the module itself for ``state_dict`` and EMA.
    """
    if not process.distributed:
        return module
    module = sync_batchnorm(module, process)
    device_ids = [process.device.index] if process.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def sync_batchnorm(module: nn.Module, process: Process) -> nn.Module:
    """``module`` with SyncBatchNorm layers, on CUDA with several processes; else unchanged.

    For modules that are not wrapped in DDP too, such as a momentum teacher whose projector
    normalises with batch statistics. Layers are swapped inside ``module``, which is returned.
    """
    if process.distributed and process.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


@torch.no_grad()
def gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient); itself alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def run_main(main: Callable[[list[str]], object]) -> None:
    """Run a trainer's ``main`` as a script.

    Under ``torchrun`` the process then ends with ``os._exit(0)`` once its output is flushed:
    with gloo, the interpreter's own shutdown sometimes aborts ("terminate called without an
    active exception") after all the work is done, which would fail a finished run. An
    exception still ends the process with an error, and torchrun stops the other processes.
    """
    main(sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# Datasets and sampling ---------------------------------------------------------------------------


class SyntheticImages(Dataset[tuple[Any, int]]):
    """Deterministic synthetic photos: a colour gradient and a few ellipses and rectangles.

    Image ``i`` is a function of ``(seed, i)`` only. Objects give crops something to agree on:
    the spatial term has structure to learn, unlike on noise.

    Args:
        length: number of images.
        size: side in pixels.
        seed: changes every image.
        transform: applied to each ``(3, size, size)`` uint8 image, as torchvision datasets do.
    """

    def __init__(
        self,
        length: int,
        size: int = 256,
        seed: int = 0,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"need length >= 1 and size >= 8, got length={length}, size={size}")
        self.length, self.size, self.seed, self.transform = length, size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.size
        ys, xs = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
        c0, c1 = torch.rand(2, 3, 1, 1, generator=gen)
        angle = torch.rand((), generator=gen) * 2 * math.pi
        ramp = (xs * torch.cos(angle) + ys * torch.sin(angle)).clamp(0, 1)
        img = c0 + (c1 - c0) * ramp
        shapes = int(torch.randint(3, 7, (), generator=gen))
        for k in range(shapes):
            cx, cy, rx, ry = torch.rand(4, generator=gen) * torch.tensor([1, 1, 0.25, 0.25]) + (
                torch.tensor([0, 0, 0.05, 0.05])
            )
            colour = torch.rand(3, 1, 1, generator=gen)
            if k % 2:
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            else:
                inside = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
            img = torch.where(inside, colour, img)
        image = (img * 255).round().to(torch.uint8)
        return (image if self.transform is None else self.transform(image)), shapes


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled indices per epoch, sharded over ranks, able to start mid-epoch.

    Yields ``(epoch, index)`` pairs, so that :class:`SeededTransform` can seed each sample's
    augmentation. The order is a function of ``(seed, epoch)``; every rank gets
    ``len(dataset) // world_size`` samples (the tail is dropped, as ``drop_last``).

    Args:
        length: dataset size.
        seed: seed of the order.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, skipping its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length // self.world_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.length, generator=gen)
        mine = order[: self.length // self.world_size * self.world_size][
            self.rank :: self.world_size
        ]
        for index in mine[self.start :].tolist():
            yield self.epoch, index


class SeededTransform(Dataset[tuple[Any, int]]):
    """Apply ``transform`` to ``dataset[index]`` under a seed made of ``(seed, epoch, index)``.

    The global torch RNG is forked, so the caller's random state is untouched.
    """

    def __init__(self, dataset: Dataset[Any], transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        image, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(image), target


def build_dataset(data: str, synthetic_length: int, synthetic_size: int) -> Dataset[Any]:
    """``"synthetic"`` or the path of an ``ImageFolder`` (``root/class/image.jpg``)."""
    if data == "synthetic":
        return SyntheticImages(synthetic_length, synthetic_size)
    from torchvision.datasets import ImageFolder

    if not Path(data).is_dir():
        raise SystemExit(f"--data must be 'synthetic' or an ImageFolder directory, got {data!r}")
    return ImageFolder(data)


def build_loader(
    dataset: Dataset[Any],
    transform: Callable[[Any], Any],
    process: Process,
    *,
    batch_size: int,
    workers: int,
    seed: int,
) -> tuple[DataLoader[Any], ResumableSampler]:
    """This process's loader of augmented batches; content depends on ``seed`` and epoch only."""
    length = len(dataset)  # type: ignore[arg-type]
    if length // process.world_size < batch_size:
        raise SystemExit(
            f"the dataset has {length} images: too few for a batch of {batch_size} per process "
            f"on {process.world_size} process(es)"
        )
    sampler = ResumableSampler(length, seed, process.rank, process.world_size)
    loader = DataLoader(
        SeededTransform(dataset, transform, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=process.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        # A generator of its own: creating the iterator must not draw from the global RNG,
        # which the model's stochastic depth uses (resume would drift otherwise).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


# Options and models ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """What every trainer's configurations fix: the ViT, the global crops, the schedule, the data.

    Each trainer extends it with its method's own settings.
    """

    arch: str
    patch: int
    global_px: int
    batch_size: int
    epochs: int
    warmup_epochs: float
    drop_path: float
    synthetic_length: int
    synthetic_size: int
    workers: int


P = TypeVar("P", bound=Preset)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_run_arguments(
    parser: argparse.ArgumentParser, presets: Iterable[str], *, lr: float, output_dir: str
) -> None:
    """The options every trainer has; a preset's values are the defaults of the per-run ones."""
    p = parser
    p.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder path")
    p.add_argument("--preset", choices=sorted(presets), default="tiny")
    p.add_argument("--epochs", type=_positive_int, help="schedule length (preset's)")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many iterations")
    p.add_argument("--batch-size", type=_positive_int, help="images per process (preset's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--lr", type=float, default=lr, help="peak lr per 256 images in all")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path(output_dir))
    p.add_argument("--resume", nargs="?", const="auto", help="a checkpoint, or this run's own")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--warmup-epochs", type=float, help="lr warm-up length (preset's)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument(
        "--keep-checkpoints", action="store_true",
        help="keep every checkpoint written (each epoch's end, --save-every) as "
        "checkpoint-<step>.pth beside checkpoint.pth",
    )  # fmt: skip
    p.add_argument(
        "--diagnostics-every", type=int, default=0,
        help="every N steps, log how invariant the teacher's relations are between the two "
        "global views (sere_loss.diagnostics, on process 0's batch) to log.csv",
    )  # fmt: skip


def setup(presets: dict[str, P], args: argparse.Namespace) -> tuple[P, Process, str]:
    """A trainer's start: its preset with the command line's overrides, this process, the precision.

    It also seeds torch with ``--seed``, so that every process builds the same initial weights.
    """
    preset = apply_overrides(presets[args.preset], args)
    process = init_process(args.device)
    precision = resolve_precision(args.precision, process.device)
    torch.manual_seed(args.seed)
    return preset, process, precision


def apply_overrides(preset: P, args: argparse.Namespace) -> P:
    """``preset`` with the fields that the command line set (``--epochs``, ``--batch-size``...)."""
    fields = {f.name for f in dataclasses.fields(preset)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return dataclasses.replace(preset, **given)


def build_vit(preset: Preset, drop_path: float, **kwargs: Any) -> VisionTransformer:
    """A timm ViT without a classifier that takes any input size (global and local views).

    ``preset.arch == "tiny"`` is a 4-block, 96-channel ViT with 3 heads, small enough for a
    CPU; any other name is a timm model (``vit_small_patch16_224`` for ViT-S/16). ``kwargs``
    go to the ViT (``num_heads=12``, say).
    """
    options = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path)
    if preset.arch == "tiny":
        tiny = dict(img_size=preset.global_px, patch_size=preset.patch, embed_dim=96, depth=4)
        return VisionTransformer(**(tiny | {"num_heads": 3} | options | kwargs))
    model = timm.create_model(preset.arch, pretrained=False, **(options | kwargs))
    if not isinstance(model, VisionTransformer):
        raise SystemExit(f"{preset.arch} is not a timm VisionTransformer")
    return model


# Schedules and optimisation ----------------------------------------------------------------------


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.0,
) -> list[float]:
    """One value per iteration: linear warm-up from ``warmup_start``, then cosine to ``final``."""
    total = epochs * steps_per_epoch
    warmup = min(int(warmup_epochs * steps_per_epoch), total)
    values = [warmup_start + (base - warmup_start) * i / warmup for i in range(warmup)]
    rest = total - warmup
    values += [
        final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)
    ]
    return values


def warmup_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> list[float]:
    """One value per iteration: linear from ``start`` to ``end``, then ``end``.

    DINO's and iBOT's teacher temperatures warm up this way over ``warmup_steps``.
    """
    warm = min(warmup_steps, total_steps)
    return [start + (end - start) * i / warm for i in range(warm)] + [end] * (total_steps - warm)


def param_groups(modules: Iterable[nn.Module]) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only, not on biases and norm scales."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` over parameters; buffers are left alone."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients(params: Iterable[Tensor], max_norm: float) -> None:
    """DINO's and iBOT's clipping: each parameter's gradient norm to at most ``max_norm``.

    Per parameter, not over all of them at once (``clip_grad_norm_``): that is the recipe whose
    numbers the paper reports.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None) -> None:
    """Set this iteration's learning rate, and weight decay if given.

    The learning rate goes to every group, the weight decay to the first (the decayed group of
    :func:`param_groups`; the other keeps 0).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    if weight_decay is not None:
        optimizer.param_groups[0]["weight_decay"] = weight_decay


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    clip_grad: float = 0.0,
    freeze_last_layer: nn.Module | None = None,
) -> None:
    """Backward, unscale, per-parameter clipping (``clip_grad > 0``), step.

    With ``freeze_last_layer``, that module's last layer loses its gradients just before the
    update (DINO's and iBOT's first epoch).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if clip_grad > 0:
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    if freeze_last_layer is not None:
        cancel_last_layer_gradients(freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()


def cancel_last_layer_gradients(module: nn.Module, name: str = "last_layer") -> None:
    """DINO's trick for the first epoch(s): drop the prototypes' gradients."""
    for pname, param in module.named_parameters():
        if name in pname:
            param.grad = None


# Devices and precision ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bfloat16 autocast on CUDA (float16 where bfloat16 is missing), float32 on CPU."""
    if name != "auto":
        if name != "fp32" and device.type != "cuda":
            raise SystemExit(f"--precision {name} needs CUDA; on {device.type} use fp32")
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Mixed precision for the forward pass; the SERE losses compute in float32 themselves."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# The run ----------------------------------------------------------------------------------------


_RUN_KEYS = ("rng", "step", "world_size", "batch_size", "args")  # a checkpoint's own entries


class Run:
    """The bookkeeping of one training run around a trainer's own step.

    It owns the loop over iterations (epochs, ``--max-steps``, a resume mid-epoch), the values
    logged (averaged over processes, stopped on NaN), checkpoints of every object in ``state``
    with each process's random state, and the progress bar. Only the main process prints and
    writes ``log.csv``, ``checkpoint.pth`` and ``last.json``. A trainer uses it as::

        run = Run(process, args, state, epochs=..., steps_per_epoch=..., batch_size=..., ...)
        for step, epoch, batch in run.iterations(loader, sampler, run.resume()):
            ...  # the method's step
            run.log(step, epoch, schedules, run.mean(values, step))
        return run.finish()

    Args:
        process: this process.
        args: the command line of :func:`add_run_arguments`.
        state: what a checkpoint holds, by name: the modules themselves (not their DDP
            wrappers), the optimizer, the grad scaler, stateful losses.
        epochs: the schedules' length.
        steps_per_epoch: iterations per epoch (of every process).
        batch_size: images per process and iteration.
        fields: the columns of ``log.csv`` after ``step`` and ``epoch``.
        config: saved with each checkpoint (the preset, say).
    """

    def __init__(
        self,
        process: Process,
        args: argparse.Namespace,
        state: dict[str, Any],
        *,
        epochs: int,
        steps_per_epoch: int,
        batch_size: int,
        fields: Sequence[str],
        config: dict[str, Any] | None = None,
    ) -> None:
        self.process, self.args, self.state = process, args, state
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.total_steps = epochs * steps_per_epoch
        self.max_steps = min(args.max_steps or self.total_steps, self.total_steps)
        self.config = config or {}
        self.output_dir = Path(args.output_dir)
        self.checkpointer = Checkpointer(self.output_dir)
        self.csv: CSVLog | None = None
        if process.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            extra = list(DIAGNOSTICS) if getattr(args, "diagnostics_every", 0) else []
            self.csv = CSVLog(
                self.output_dir / "log.csv", ["step", "epoch", *fields, *extra, "seconds"]
            )
        self.bar: tqdm[Any] | None = None
        self.row: dict[str, Any] = {}
        self._tic = time.perf_counter()

    def print(self, *parts: object) -> None:
        """Print on the main process only."""
        if self.process.is_main:
            print(*parts, flush=True)

    def resume(self) -> int:
        """Load ``--resume`` into ``state`` and this process's random state.

        Returns the step to go on from: 0 without ``--resume``, or when ``--resume`` alone finds
        no checkpoint of this run yet.
        """
        saved = self.checkpointer.load(self.args.resume)
        if saved is None:
            return 0
        source = self.checkpointer.path if self.args.resume == "auto" else self.args.resume
        layout = (saved.get("world_size", 1), saved.get("batch_size", self.batch_size))
        if layout != (self.process.world_size, self.batch_size):
            raise SystemExit(
                f"{source} was saved by {layout[0]} process(es) with a batch of {layout[1]} each; "
                f"this run has {self.process.world_size} with {self.batch_size}. Exact resume "
                "needs the same layout (the data order and the schedules depend on it)"
            )
        held = sorted(set(saved) - set(self.config) - set(_RUN_KEYS))
        if held != sorted(self.state):
            raise SystemExit(
                f"{source} holds the state of {held}, this run has {sorted(self.state)}: it was "
                "saved by another setup (with or without SERE, say)"
            )
        for name, obj in self.state.items():
            obj.load_state_dict(saved[name])
        rng = saved["rng"]
        set_rng_state(rng[self.process.rank] if isinstance(rng, list) else rng)
        step: int = saved["step"]
        self.print(f"resumed from step {step} ({source})")
        return step

    def iterations(
        self, loader: Iterable[Any], sampler: ResumableSampler, start: int
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(step, epoch, batch)`` from ``start`` to ``max_steps``.

        ``step`` counts from 0. A checkpoint is written at the end of each epoch and after the
        last step.
        """
        self.bar = tqdm(
            total=self.max_steps, initial=start, dynamic_ncols=True,
            disable=self.args.no_progress or not self.process.is_main,
        )  # fmt: skip
        step = start
        while step < self.max_steps:
            epoch = step // self.steps_per_epoch
            sampler.set_epoch(epoch, start=step % self.steps_per_epoch * self.batch_size)
            for batch in loader:
                self._tic = time.perf_counter()
                yield step, epoch, batch
                step += 1
                if step >= self.max_steps or step % self.steps_per_epoch == 0:
                    break
                if self.args.save_every and step % self.args.save_every == 0:
                    self.save(step)
            self.save(step)

    def diagnose(self, step: int) -> bool:
        """Whether iteration ``step`` logs the relation diagnostics (``--diagnostics-every``).

        Only the main process computes them, from its own share of the batch.
        """
        every = getattr(self.args, "diagnostics_every", 0)
        return bool(every) and self.process.is_main and step % every == 0

    def mean(self, values: dict[str, Tensor], step: int) -> dict[str, float]:
        """Scalars averaged over processes; every process stops together on a NaN or inf."""
        if not values:
            return {}
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        if self.process.distributed:
            dist.all_reduce(stacked)
            stacked /= self.process.world_size
        means = dict(zip(values, stacked.tolist(), strict=True))
        finite_or_die(means, step)
        return means

    def log(
        self, step: int, epoch: int, schedules: dict[str, float], values: dict[str, float]
    ) -> None:
        """Record iteration ``step`` (0-based): ``log.csv``, the progress bar, the console."""
        self.row = {"step": step + 1, "epoch": epoch, **schedules, **values}
        self.row["seconds"] = time.perf_counter() - self._tic
        if self.csv is not None:
            self.csv.write(self.row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if self.args.no_progress:
            self.print(" ".join(f"{k} {format_value(v)}" for k, v in self.row.items()))

    def save(self, step: int) -> None:
        """Checkpoint ``state`` after ``step`` iterations, with every process's random state.

        With several processes it first checks that they hold the same parameters: DDP keeps
        them equal, so a difference is a bug, and a checkpoint of one process would hide it.
        """
        rng: list[Any] = [rng_state()]
        if self.process.distributed:
            self._check_in_sync()
            rng = [None] * self.process.world_size
            dist.all_gather_object(rng, rng_state())
        if not self.process.is_main:
            return
        saved = {name: obj.state_dict() for name, obj in self.state.items()}
        saved |= {"rng": rng, "step": step, "world_size": self.process.world_size}
        saved |= {"batch_size": self.batch_size, "args": vars(self.args), **self.config}
        self.checkpointer.save(saved)
        if getattr(self.args, "keep_checkpoints", False):
            self.checkpointer.keep(step)

    def _check_in_sync(self) -> None:
        names = [name for name, obj in self.state.items() if isinstance(obj, nn.Module)]
        prints = [fingerprint(self.state[name]) for name in names]
        local = torch.cat(prints).to(self.process.device)
        everyone = gather(local.unsqueeze(0))
        same = torch.isclose(everyone, local.expand_as(everyone), rtol=1e-6, atol=1e-9).all(dim=0)
        parts = same.split([len(p) for p in prints])
        differ = [name for name, part in zip(names, parts, strict=True) if not part.all()]
        if differ:
            raise RuntimeError(
                f"the processes' parameters differ in {differ}: DDP keeps a trained module's "
                "parameters equal in every process, so wrap each one with distribute()"
            )

    def finish(self) -> dict[str, Any]:
        """Close the bar, write ``last.json``, leave the process group; the last row logged."""
        if self.bar is not None:
            self.bar.close()
        summary = dict(self.row)
        if self.process.is_main:
            (self.output_dir / "last.json").write_text(json.dumps(summary, indent=1))
        self.print("done:", json.dumps(summary))
        if self.process.distributed:
            dist.destroy_process_group()
        return summary


def fingerprint(module: nn.Module) -> Tensor:
    """The sum and the sum of squares of each parameter, in float64: ``(2 * P,)``."""
    stats = [
        (p.detach().double().sum(), p.detach().double().square().sum()) for p in module.parameters()
    ]
    return (
        torch.stack([t for pair in stats for t in pair])
        if stats
        else torch.zeros(0, dtype=torch.float64)
    )


# The columns --diagnostics-every adds to log.csv: sere_loss.diagnostics' controlled measures
# (0: the two views relate alike, 1: no more alike than two images), the plain distances, and
# the spatial relations' row entropy (their sharpness).
DIAGNOSTICS = ("inv_spatial", "inv_channel", "inv_spatial_plain", "inv_channel_plain",
               "inv_spatial_entropy")  # fmt: skip


@torch.no_grad()
def relation_diagnostics(tokens: Tensor, boxes: Tensor, flips: Tensor) -> dict[str, float]:
    """How alike the two global views relate their patches and channels (paper Fig. 6).

    Args:
        tokens: patch tokens of the two global views, concatenated ``(2 * B, N, C)`` on a
            square grid (a teacher's, say).
        boxes: ``(B, V, 4)`` crop boxes of all views, globals first.
        flips: ``(B, V)``.

    Returns:
        :data:`DIAGNOSTICS` as floats, or nothing when fewer than 2 pairs overlap (the columns
        stay empty at that step).
    """
    from sere_loss.diagnostics import relation_invariance
    from sere_loss.functional import overlap_grids

    first, second = tokens.detach().float().chunk(2)
    geometry = boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1]
    if int(overlap_grids(*geometry, lattice=1)[2].sum()) < 2:
        return {}  # the controlled measure compares each overlapping pair with another
    out = relation_invariance(first, second, *(g.to(tokens.device) for g in geometry)).summary()
    values = (out["spatial_controlled"], out["channel_controlled"], out["spatial_plain"])
    values += (out["channel_plain"], out["spatial_entropy"])
    return dict(zip(DIAGNOSTICS, values, strict=True))


# Checkpoints and logs ----------------------------------------------------------------------------


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


class Checkpointer:
    """Save and load ``output_dir/checkpoint.pth`` atomically (write, then rename)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / "checkpoint.pth"

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state``; a crash mid-write leaves the previous checkpoint intact."""
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def keep(self, step: int) -> Path:
        """Keep the checkpoint just saved as ``checkpoint-<step>.pth`` (a hard link, or a copy).

        ``save`` replaces ``checkpoint.pth`` by a new file, so a link keeps this one's content.
        """
        kept = self.path.with_name(f"checkpoint-{step:07d}.pth")
        kept.unlink(missing_ok=True)
        try:
            os.link(self.path, kept)
        except OSError:
            shutil.copyfile(self.path, kept)
        return kept

    def load(self, path: str | None) -> dict[str, Any] | None:
        """``path``, or this run's checkpoint for ``"auto"``; ``None`` if ``auto`` finds none."""
        if path is None:
            return None
        target = self.path if path == "auto" else Path(path)
        if not target.is_file():
            if path == "auto":
                return None
            raise SystemExit(f"--resume {path}: no such checkpoint")
        state: dict[str, Any] = torch.load(target, map_location="cpu", weights_only=False)
        return state


class CSVLog:
    """One row per iteration in ``output_dir/log.csv``; appends on resume."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path, self.fields = path, list(fields)
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, row: dict[str, float | int]) -> None:
        """Append ``row``; fields it lacks are left empty."""
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([format_value(row[k]) if k in row else "" for k in self.fields])


def format_value(value: float | int) -> str:
    """How logs write a value: integers as they are, floats to 6 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def finite_or_die(values: dict[str, float], step: int) -> None:
    """Stop with a clear message instead of training on NaN."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(f"step {step}: non-finite loss terms {bad}; stopping")
