"""What the example trainers share: data, schedules, checkpoints, logging, precision.

Nothing here is SERE: it is the plumbing every self-supervised trainer carries, kept out of the
trainer files so that each of them reads as its method. The pieces:

- :class:`SyntheticImages`: images generated from their index, so the examples run anywhere.
- :class:`ResumableSampler` and :class:`SeededTransform`: the data order and every random crop
  are functions of ``(seed, epoch, index)``, so a resumed run sees exactly the batches an
  uninterrupted run would have seen, whatever the number of workers.
- :func:`cosine_schedule`: DINO's per-iteration cosine schedule with linear warm-up.
- :func:`param_groups`, :func:`ema_update`, :func:`clip_gradients`,
  :func:`cancel_last_layer_gradients`.
- :class:`Checkpointer`, :class:`CSVLog`, :func:`autocast`, :func:`resolve_device`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

# Datasets and sampling ---------------------------------------------------------------------------


class SyntheticImages(Dataset[tuple[Tensor, int]]):
    """Deterministic synthetic photos: a colour gradient and a few ellipses and rectangles.

    Image ``i`` is a function of ``(seed, i)`` only. Objects give crops something to agree on:
    the spatial term has structure to learn, unlike on noise.

    Args:
        length: number of images.
        size: side in pixels.
        seed: changes every image.
    """

    def __init__(self, length: int, size: int = 256, seed: int = 0) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"need length >= 1 and size >= 8, got length={length}, size={size}")
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
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
        return (img * 255).round().to(torch.uint8), shapes


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
    *,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader[Any], ResumableSampler]:
    """A loader of augmented batches whose content depends on ``seed`` and the epoch only."""
    length = len(dataset)  # type: ignore[arg-type]
    if length // world_size < batch_size:
        raise SystemExit(
            f"the dataset has {length} images: too few for a batch of {batch_size} per process "
            f"on {world_size} process(es)"
        )
    sampler = ResumableSampler(length, seed, rank, world_size)
    loader = DataLoader(
        SeededTransform(dataset, transform, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
        # A generator of its own: creating the iterator must not draw from the global RNG,
        # which the model's stochastic depth uses (resume would drift otherwise).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


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


def cancel_last_layer_gradients(module: nn.Module, name: str = "last_layer") -> None:
    """DINO's trick for the first epoch(s): drop the prototypes' gradients."""
    for pname, param in module.named_parameters():
        if name in pname:
            param.grad = None


def world_size() -> int:
    """Processes in the default group, 1 when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``, or the module itself."""
    return module.module if hasattr(module, "module") else module  # type: ignore[return-value]


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
