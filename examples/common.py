"""What the example trainers share: processes, data, models, schedules, checkpoints and logs.

Nothing here is one method's: it is the plumbing every self-supervised trainer carries, kept out
of the trainer files so that each of them reads as its method. The pieces:

- :class:`Process`, :func:`init_process`, :func:`distribute`, :func:`run_main`: one process, or
  one of ``torchrun``'s (NCCL on CUDA, gloo on the CPU), with DistributedDataParallel and, on
  CUDA, SyncBatchNorm; ``--dist-timeout`` bounds how long a process waits for a hung one.
- :class:`SyntheticImages`, :func:`build_dataset`, :func:`check_images`: images generated from
  their index, or an ImageFolder whose images keep their bit depth and whose read errors name
  the file; a start-up check that images open and transform.
- :class:`ResumableSampler` and :class:`SeededTransform`: the data order and every random crop
  are functions of ``(seed, epoch, index)``, sharded over processes, so a resumed run sees
  exactly the batches an uninterrupted run would have seen, whatever the number of workers.
- :class:`Preset`, :class:`Recipe`, :func:`add_run_arguments`, :func:`setup`, :func:`build_vit`:
  the options, the two recipes (``--recipe authors``: the authors' code, SERE's settings
  included; ``--recipe paper``: the paper's text) and the timm ViT all trainers take.
- :func:`cosine_schedule`, :func:`param_groups`, :func:`set_schedule`, :func:`optimizer_step`
  (which refuses non-finite gradients before the update), :func:`ema_update`,
  :func:`clip_gradients`, :func:`cancel_last_layer_gradients`.
- :class:`OutputDir`, :class:`Checkpointer`, :class:`CSVLog` and :class:`Run`: the loop's
  bookkeeping. One live run per output directory (a lock), checkpoints that hold finite values
  only, carry a checksum, are verified after writing and never replace the last good one; a
  resume that refuses changed options, keeps ``log.csv`` at one row per step and leaves a
  finished run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, Any, TypeVar

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
    a collective's timeout first gets a line that says what it means.
    """
    try:
        main(sys.argv[1:])
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


class ImageReadError(RuntimeError):
    """An image that cannot be read or transformed; the message names its file."""


def describe_item(dataset: Dataset[Any], index: int) -> str:
    """Where item ``index`` comes from: its file for an ImageFolder, else its index."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and 0 <= index < len(samples):
        return f"image {samples[index][0]}"
    return f"item {index} of {type(dataset).__name__}"


class SeededTransform(Dataset[tuple[Any, int]]):
    """Apply ``transform`` to ``dataset[index]`` under a seed made of ``(seed, epoch, index)``.

    The global torch RNG is forked, so the caller's random state is untouched. An image that
    fails to load or transform raises :class:`ImageReadError` with its file's name.
    """

    def __init__(self, dataset: Dataset[Any], transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        try:
            image, target = self.dataset[index]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
                return self.transform(image), target
        except Exception as error:
            raise ImageReadError(
                f"cannot use {describe_item(self.dataset, index)}: {type(error).__name__}: {error}"
            ) from error


def load_image(path: str) -> Any:
    """Open and decode an image file, keeping its mode (16-bit, float...) for the transform.

    torchvision's default loader converts to 8-bit RGB, which clips 16-bit and float images;
    :mod:`sere_loss.transforms` scales them instead. Decoding here, not lazily, makes a truncated
    file fail in this call.
    """
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image


def build_dataset(data: str, synthetic_length: int, synthetic_size: int) -> Dataset[Any]:
    """``"synthetic"`` or the path of an ``ImageFolder`` (``root/class/image.jpg``)."""
    if data == "synthetic":
        return SyntheticImages(synthetic_length, synthetic_size)
    from torchvision.datasets import ImageFolder

    if not Path(data).is_dir():
        raise SystemExit(f"--data must be 'synthetic' or an ImageFolder directory, got {data!r}")
    try:
        return ImageFolder(data, loader=load_image)
    except (FileNotFoundError, OSError) as error:
        raise SystemExit(f"--data {data}: not an ImageFolder ({error})") from error


class _Probe(Dataset[str]):
    """Item ``i``: ``""`` if image ``indices[i]`` loads and transforms, else what went wrong."""

    def __init__(self, items: SeededTransform, indices: Sequence[int]) -> None:
        self.items, self.indices = items, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        try:
            self.items[0, self.indices[i]]
        except ImageReadError as error:
            return str(error)
        return ""


def check_images(
    dataset: Dataset[Any],
    transform: Callable[[Any], Any],
    process: Process,
    count: int,
    workers: int = 0,
) -> None:
    """Start-up check: ``count`` images, spread over the dataset, load and transform.

    ``count = -1`` checks every image (each process its share, with ``workers`` loader
    workers); ``0`` checks none. Every failure is listed with its file before the run stops,
    so a bad file is found before the first step rather than in the middle of an epoch. The
    global random state is left as it was, so the check does not change the initial weights.
    """
    length = len(dataset)  # type: ignore[arg-type]
    if count == 0 or length == 0:
        return
    if count < 0 or count >= length:
        indices = list(range(process.rank, length, process.world_size))
    else:
        picked = torch.linspace(0, length - 1, count).round().long().unique()
        indices = picked.tolist()
    probe = _Probe(SeededTransform(dataset, transform, seed=0), indices)
    loader = DataLoader(probe, batch_size=None, num_workers=workers if count < 0 else 0)
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep the run's weights
        failures = [message for message in loader if message]
    if failures:
        listed = "\n  ".join(failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise SystemExit(
            f"{len(failures)} of the {len(indices)} images checked at start-up cannot be used:\n"
            f"  {listed}{more}\nReplace or remove them (--check-images all checks every image)"
        )


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


# Options, recipes and models ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """What every trainer's configurations fix: the ViT, the global crops, the schedule, the data.

    Each trainer extends it with its method's own settings. ``lr`` is the peak learning rate
    per 256 images.
    """

    arch: str
    patch: int
    global_px: int
    batch_size: int
    epochs: int
    warmup_epochs: float
    lr: float
    drop_path: float
    synthetic_length: int
    synthetic_size: int
    workers: int


P = TypeVar("P", bound=Preset)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What ``--recipe`` fixes: where the authors' code and the paper's text differ (SPEC 8).

    Attributes:
        name: ``"authors"`` or ``"paper"``.
        points: the spatial lattice's points, ``"official"`` (edge to edge) or ``"center"``.
        padding: how points beyond a view's first pixel centres read, ``"zeros"``/``"border"``.
        empty_pairs: non-overlapping (image, pair) terms: ``"uniform"`` (a constant ``log S``
            kept in the mean, as the authors' code) or ``"mask"`` (left out).
        backbone_heads: spatial heads = the backbone's attention heads (else the paper's 6).
        decay_biases: weight decay on every bias too (the authors' parameter groups), not on
            weight matrices alone. Norm scales are never decayed, other tensors always.
        half: the autocast type ``--precision auto`` takes on CUDA.
    """

    name: str
    points: str
    padding: str
    empty_pairs: str
    backbone_heads: bool
    decay_biases: bool
    half: str

    def sere_options(self, backbone: nn.Module) -> dict[str, Any]:
        """The SERE loss's options under this recipe, for ``backbone`` (a timm ViT)."""
        heads = vit_heads(backbone) if self.backbone_heads else 6
        return {
            "points": self.points,
            "padding": self.padding,
            "empty_pairs": self.empty_pairs,
            "num_heads": heads,
        }


RECIPES = {
    # The authors' released code (MCG-NKU/SERE), which produced the paper's numbers.
    "authors": Recipe(
        "authors", points="official", padding="zeros", empty_pairs="uniform",
        backbone_heads=True, decay_biases=True, half="fp16",
    ),
    # The paper's text where it says something, the library's defaults where it does not.
    "paper": Recipe(
        "paper", points="center", padding="border", empty_pairs="mask",
        backbone_heads=False, decay_biases=False, half="bf16",
    ),
}  # fmt: skip


def vit_heads(backbone: nn.Module) -> int:
    """The attention heads of a timm ViT's blocks (6 for ViT-S/16, 12 for ViT-B/16)."""
    blocks = getattr(backbone, "blocks", None)
    if not blocks:
        raise SystemExit(f"{type(backbone).__name__} has no .blocks: cannot read its head count")
    return int(blocks[0].attn.num_heads)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _image_count(text: str) -> int:
    if text == "all":
        return -1
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 0, got {text}")
    return value


def add_run_arguments(
    parser: argparse.ArgumentParser, presets: Iterable[str], *, output_dir: str
) -> None:
    """The options every trainer has; a preset's values are the defaults of the per-run ones."""
    p = parser
    p.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder path")
    p.add_argument("--preset", choices=sorted(presets), default="tiny")
    recipes = "'authors' (default): the authors' code; 'paper': the paper's text (docs/trainers.md)"
    p.add_argument("--recipe", choices=sorted(RECIPES), default="authors", help=recipes)
    p.add_argument("--epochs", type=_positive_int, help="schedule length (preset's)")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many iterations")
    p.add_argument("--batch-size", type=_positive_int, help="images per process (preset's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    precision = "autocast on CUDA; 'auto': fp16 under --recipe authors, bf16 under paper"
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help=precision)  # fmt: skip
    p.add_argument("--lr", type=float, help="peak lr per 256 images in all (preset's)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path(output_dir))
    p.add_argument("--resume", nargs="?", const="auto", help="a checkpoint, or this run's own")
    changes = "options that --resume may change from the checkpoint's (say: epochs lr)"
    p.add_argument("--allow-changed-options", nargs="+", metavar="NAME", help=changes)
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
    timeout = "minutes a process waits for the others in a collective before failing"
    p.add_argument("--dist-timeout", type=_positive_float, default=10.0, help=timeout)
    check = "images opened at start-up: a number spread over the data, 'all', or 0 (default 16)"
    p.add_argument("--check-images", type=_image_count, default=16, help=check)


def setup(presets: dict[str, P], args: argparse.Namespace) -> tuple[P, Process, str, OutputDir]:
    """A trainer's start: preset with overrides, this process, the precision, the output dir.

    The output directory is checked before anything is built (:class:`OutputDir`). Torch is
    seeded with ``--seed``, so that every process builds the same initial weights.
    """
    preset = apply_overrides(presets[args.preset], args)
    process = init_process(args.device, args.dist_timeout)
    output = OutputDir(Path(args.output_dir), resume=args.resume, process=process)
    recipe = RECIPES[args.recipe]
    precision = resolve_precision(args.precision, process.device, recipe.half)
    torch.manual_seed(args.seed)
    return preset, process, precision, output


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


def param_groups(
    modules: Iterable[nn.Module], *, decay_biases: bool = False, decay_all: bool = False
) -> list[dict[str, Any]]:
    """AdamW groups: the decayed parameters, then the others (weight decay 0).

    Weight matrices (every tensor of 2 or more dimensions: position embeddings, tokens...) are
    decayed; norm scales and other vectors are not; biases are decayed with ``decay_biases``
    (the authors' SERE code) and not otherwise (DINO's and iBOT's own rule). ``decay_all``
    decays every parameter (MoCo v3). Each group also lists its parameters' ``names``, for
    error messages.
    """
    decay: dict[str, list[Any]] = {"params": [], "names": []}
    no_decay: dict[str, list[Any]] = {"params": [], "names": []}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            is_bias = name.endswith(".bias")
            decayed = decay_all or param.ndim >= 2 or (is_bias and decay_biases)
            group = decay if decayed else no_decay
            group["params"].append(param)
            group["names"].append(f"{type(module).__name__}[{index}].{name}")
    return [decay, {**no_decay, "weight_decay": 0.0}]


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
    if grads:
        _clip(grads, torch._foreach_norm(grads), max_norm)


def _clip(grads: list[Tensor], norms: Sequence[Tensor], max_norm: float) -> None:
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
    step: int,
    clip_grad: float = 0.0,
    freeze_last_layer: nn.Module | None = None,
) -> bool:
    """Backward, unscale, a check of the gradients, per-parameter clipping, step.

    Non-finite gradients (NaN or inf) never reach the weights. In fp16 the grad scaler skips
    such a step and lowers its scale, as it is meant to (returns ``False``). In fp32 and bf16
    they mean the run diverged: it stops before the update, naming the parameters, with no
    checkpoint written, so the last one still holds finite weights. With ``freeze_last_layer``,
    that module's last layer loses its gradients just before the update (DINO's and iBOT's first
    epoch). ``step`` (0-based) is for the message. Returns whether the weights were updated.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    named = [
        (name, p)
        for group in optimizer.param_groups
        for name, p in zip(_names(group), group["params"], strict=True)
        if p.grad is not None
    ]
    grads = [p.grad for _, p in named if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    finite = torch.isfinite(torch.stack(norms)) if grads else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        if scaler.is_enabled():
            scaler.step(optimizer)  # skipped by the scaler, which lowers its scale
            scaler.update()
            return False
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise SystemExit(
            f"step {step + 1}: non-finite gradients (NaN or inf) in {listed}. Stopped before the "
            "update, without saving: the last checkpoint holds finite weights. Resume from it "
            "(perhaps with a lower --lr or another --precision)"
        )
    if clip_grad > 0:
        _clip(grads, norms, clip_grad)
    if freeze_last_layer is not None:
        cancel_last_layer_gradients(freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()
    return True


def _names(group: dict[str, Any]) -> list[str]:
    names = group.get("names")
    if isinstance(names, list) and len(names) == len(group["params"]):
        return names
    return [f"parameter {i}" for i in range(len(group["params"]))]


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


def resolve_precision(name: str, device: torch.device, half: str = "bf16") -> str:
    """``auto``: ``half`` autocast on CUDA (fp16 where bf16 is missing), float32 on CPU."""
    if name != "auto":
        if name != "fp32" and device.type != "cuda":
            raise SystemExit(f"--precision {name} needs CUDA; on {device.type} use fp32")
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if half == "bf16" and torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Mixed precision for the forward pass; the SERE losses compute in float32 themselves."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# Faults, for the tests only -----------------------------------------------------------------------

FAULT_VARIABLE = "EXAMPLES_TEST_FAULT"


def fault_point(
    point: str, step: int, rank: int = 0, before: Callable[[], None] | None = None
) -> None:
    """Test hook: die or hang here when ``EXAMPLES_TEST_FAULT`` asks for it.

    The variable holds ``ACTION:POINT:STEP[:RANK]`` items, comma-separated: ``kill`` sends
    SIGKILL to this process, ``hang`` sleeps for ten minutes. Points: ``step`` (in the middle of
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


# The output directory ----------------------------------------------------------------------------


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


class Checkpointer:
    """Checkpoints that can be trusted: finite, checksummed, verified, rotated.

    :meth:`save` writes ``checkpoint.pth.tmp``, reads it back and checks its SHA-256 (stored in
    the file, over every tensor and value), and only then makes it ``checkpoint.pth``; the
    previous one becomes ``checkpoint.prev.pth``. A crash at any point leaves
    ``checkpoint.pth`` whole: the old one or the new one. :meth:`load` names the file in every
    error, and refuses one whose checksum does not match.
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
            fault_point("save", step, before=self._cut_in_half)
            if self._read(out.temporary) is None:
                raise SystemExit(
                    f"{out.temporary} reads back with another checksum than was written: the "
                    f"disk or filesystem corrupts data. {self._last_good()}"
                )
            self._rotate()
        except OSError as error:
            with contextlib.suppress(OSError):  # what was written of it, if anything
                out.temporary.unlink()
            raise SystemExit(
                f"cannot write the checkpoint {out.temporary} ({error.strerror or error}). "
                f"{self._last_good()}"
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

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """The checkpoint at ``path`` if its checksum matches, else ``None``; raises on errors."""
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "sha256" not in state:
            raise ValueError("it holds no checksum (not written by these trainers)")
        stored = state.pop("sha256")
        return state if state_digest(state) == stored else None

    def load(self, path: Path) -> dict[str, Any]:
        """The checkpoint at ``path``, verified; a clear error naming the file otherwise."""
        try:
            state = self._read(path)
        except FileNotFoundError as error:
            raise SystemExit(f"--resume {path}: no such checkpoint") from error
        except Exception as error:
            raise SystemExit(
                f"cannot read the checkpoint {path}: {type(error).__name__}: {error}. The file "
                f"is damaged or not a checkpoint of these trainers. {self._fallback(path)}"
            ) from error
        if state is None:
            raise SystemExit(
                f"the checkpoint {path} fails its checksum (SHA-256): the file was damaged after "
                f"it was written. {self._fallback(path)}"
            )
        return state

    def _fallback(self, path: Path) -> str:
        previous = self.output.previous
        if previous.exists() and Path(path).resolve() != previous.resolve():
            return f"The previous checkpoint may be whole: --resume {previous}"
        return "No other checkpoint of this run is known."


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


def finite_or_die(values: dict[str, float], step: int) -> None:
    """Stop with a clear message instead of training on NaN (``step`` counted from 0)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(
            f"step {step + 1}: non-finite loss terms {bad}. Stopped before the update, without "
            "saving: the last checkpoint holds finite weights"
        )


# The run ----------------------------------------------------------------------------------------

# What a checkpoint holds besides the state objects and the trainer's config.
_RUN_KEYS = ("rng", "step", "world_size", "batch_size", "steps_per_epoch", "args", "definition")
# Options that do not change what a run computes: --resume may change them freely.
NOT_DEFINING = frozenset(
    {
        "max_steps", "workers", "no_progress", "output_dir", "resume", "allow_changed_options",
        "dist_timeout", "check_images", "device", "precision", "save_every", "keep_checkpoints",
    }
)  # fmt: skip


def run_definition(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """What defines a run, by option name: the options, the preset's values, the config.

    ``--device`` and ``--precision`` count as what they resolved to (the config's ``device`` and
    ``precision``), the preset's fields as their values after the command line's overrides.
    """
    preset = config.get("preset", {})
    definition = {
        k: plain(v) for k, v in vars(args).items() if k not in NOT_DEFINING and k not in preset
    }
    definition |= {k: plain(v) for k, v in preset.items() if k not in NOT_DEFINING}
    definition |= {k: plain(v) for k, v in config.items() if k != "preset"}
    return definition


class Run:
    """The bookkeeping of one training run around a trainer's own step.

    It owns the loop over iterations (epochs, ``--max-steps``, a resume mid-epoch), the values
    logged (averaged over processes, stopped on NaN), checkpoints of every object in ``state``
    with each process's random state, and the progress bar. Only the main process prints and
    writes ``log.csv``, ``checkpoint.pth`` and ``last.json``. A trainer uses it as::

        run = Run(process, args, state, output=output, epochs=..., steps_per_epoch=..., ...)
        for step, epoch, batch in run.iterations(loader, sampler, run.resume()):
            ...  # the method's step
            run.log(step, epoch, schedules, run.mean(values, step))
        return run.finish()

    Args:
        process: this process.
        args: the command line of :func:`add_run_arguments`.
        state: what a checkpoint holds, by name: the modules themselves (not their DDP
            wrappers), the optimizer, the grad scaler, stateful losses.
        output: the checked output directory (from :func:`setup`); made from ``args`` if
            ``None``.
        epochs: the schedules' length.
        steps_per_epoch: iterations per epoch (of every process).
        batch_size: images per process and iteration.
        fields: the columns of ``log.csv`` after ``step`` and ``epoch``.
        config: saved with each checkpoint and part of the run's definition (the preset, the
            resolved precision, the dataset's size).
    """

    def __init__(
        self,
        process: Process,
        args: argparse.Namespace,
        state: dict[str, Any],
        *,
        output: OutputDir | None = None,
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
        self.config = {**(config or {}), "device": process.device.type}
        self.definition = run_definition(args, self.config)
        if output is None:
            output = OutputDir(Path(args.output_dir), resume=args.resume, process=process)
        self.output = output
        self.output_dir = output.path
        self.checkpointer = Checkpointer(output)
        extra = list(DIAGNOSTICS) if getattr(args, "diagnostics_every", 0) else []
        self.fields = ["step", "epoch", *fields, *extra, "seconds"]
        self.csv: CSVLog | None = None
        self.bar: tqdm[Any] | None = None
        self.row: dict[str, Any] = {}
        self.steps_run = 0
        self._tic = time.perf_counter()
        if process.is_main:
            self._check_disk_space()

    def print(self, *parts: object) -> None:
        """Print on the main process only."""
        if self.process.is_main:
            print(*parts, flush=True)

    def _check_disk_space(self) -> None:
        """Refuse a disk without room for the checkpoints this run keeps (two, one written)."""
        tensors: list[Tensor] = []
        for obj in self.state.values():
            if isinstance(obj, nn.Module):
                tensors += list(obj.state_dict().values())
                trained = [p for p in obj.parameters() if p.requires_grad]
                tensors += trained + trained  # an Adam-like optimizer's two moments
        size = sum(t.numel() * t.element_size() for t in tensors)
        have = sum(p.stat().st_size for p in (self.output.checkpoint, self.output.previous)
                   if p.exists())  # fmt: skip
        need = 2 * size - have
        free = shutil.disk_usage(self.output.path).free
        if need > free:
            raise SystemExit(
                f"--output-dir {self.output.path}: {free / 2**30:.2f} GiB free, but a checkpoint "
                f"takes about {size / 2**30:.2f} GiB and the run keeps two: free some space or "
                "choose another --output-dir"
            )

    def resume(self) -> int:
        """Load ``--resume`` into ``state`` and this process's random state.

        Returns the step to go on from: 0 without ``--resume``, or when ``--resume`` alone finds
        no checkpoint of this run yet. A checkpoint that fails its checksum, was saved with
        another layout or other options (unless ``--allow-changed-options`` names them) is
        refused. ``log.csv`` keeps the rows up to the checkpoint's step.
        """
        resume = self.args.resume
        if resume is None:
            return self._start_log(None, 0)
        path = self.output.checkpoint if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            if self.output.previous.exists():
                raise SystemExit(
                    f"{path} is missing but {self.output.previous} is there (a crash while "
                    f"checkpoints were rotated?): --resume {self.output.previous}"
                )
            self.print(f"no checkpoint in {self.output.path} yet: starting from step 0")
            return self._start_log(0, 0)
        saved = self.checkpointer.load(path)
        self._check_layout(saved, path)
        self._check_definition(saved, path)
        for name, obj in self.state.items():
            obj.load_state_dict(saved[name])
        rng = saved["rng"]
        set_rng_state(rng[self.process.rank] if isinstance(rng, list) else rng)
        step: int = saved["step"]
        if step >= self.total_steps:
            self.print(
                f"the run in {path} is finished (step {step} of {self.total_steps}): nothing to "
                "do. To train it longer, pass a larger --epochs with --allow-changed-options "
                "epochs"
            )
            return step
        if step >= self.max_steps:
            self.print(f"{path} is at step {step}, --max-steps is {self.max_steps}: nothing to do")
            return step
        self.print(f"resumed from step {step} ({path})")
        return self._start_log(step, step)

    def _start_log(self, keep_until: int | None, start: int) -> int:
        if self.process.is_main:
            self.csv = CSVLog(self.output.log, self.fields, keep_until)
        return start

    def _check_layout(self, saved: dict[str, Any], path: Path) -> None:
        layout = (saved.get("world_size", 1), saved.get("batch_size", self.batch_size))
        if layout != (self.process.world_size, self.batch_size):
            raise SystemExit(
                f"{path} was saved by {layout[0]} process(es) with a batch of {layout[1]} each; "
                f"this run has {self.process.world_size} with {self.batch_size}. Exact resume "
                "needs the same layout (the data order and the schedules depend on it)"
            )
        steps = saved.get("steps_per_epoch", self.steps_per_epoch)
        if steps != self.steps_per_epoch:
            raise SystemExit(
                f"{path} was saved with {steps} steps per epoch; this run's data gives "
                f"{self.steps_per_epoch} ({self.definition.get('dataset_size', '?')} images). "
                "Resume with the checkpoint's --data (the step counter, the data order and the "
                "schedules depend on it)"
            )
        held = sorted(set(saved) - set(self.config) - set(_RUN_KEYS))
        if held != sorted(self.state):
            raise SystemExit(
                f"{path} holds the state of {held}, this run has {sorted(self.state)}: it was "
                "saved by another setup (with or without SERE, say)"
            )

    def _check_definition(self, saved: dict[str, Any], path: Path) -> None:
        before: dict[str, Any] = saved.get("definition", {})
        now = self.definition
        allowed = set(self.args.allow_changed_options or [])
        unknown = sorted(allowed - set(before) - set(now))
        if unknown:
            raise SystemExit(
                f"--allow-changed-options {' '.join(unknown)}: no such option; the run's options "
                f"are {', '.join(sorted(now))}"
            )
        missing = object()
        changed = {
            name: (before.get(name, missing), now.get(name, missing))
            for name in sorted(set(before) | set(now))
            if before.get(name, missing) != now.get(name, missing)
        }

        def describe(name: str) -> str:
            old, new = (("(none)" if v is missing else repr(v)) for v in changed[name])
            return f"{_option(self.args, name)} {new} (checkpoint: {old})"

        refused = [name for name in changed if name not in allowed]
        if refused:
            raise SystemExit(
                f"--resume {path}: options differ from the checkpoint's: "
                f"{'; '.join(describe(n) for n in refused)}. Resume with the checkpoint's "
                f"values, or pass --allow-changed-options {' '.join(refused)} to change them on "
                "purpose (schedules and data then follow the new values from the resumed step)"
            )
        if changed:
            self.print("resuming with changed options:", "; ".join(map(describe, changed)))

    def iterations(
        self, loader: Iterable[Any], sampler: ResumableSampler, start: int
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(step, epoch, batch)`` from ``start`` to ``max_steps``.

        ``step`` counts from 0. A checkpoint is written at the end of each epoch and after the
        last step.
        """
        if start >= self.max_steps:
            return
        self.bar = tqdm(
            total=self.max_steps, initial=start, dynamic_ncols=True,
            disable=self.args.no_progress or not self.process.is_main,
        )  # fmt: skip
        step = start
        while step < self.max_steps:
            epoch = step // self.steps_per_epoch
            sampler.set_epoch(epoch, start=step % self.steps_per_epoch * self.batch_size)
            batches = iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except ImageReadError as error:  # from a worker: its traceback, then ours
                    text = str(error)
                    message = text[text.rfind("cannot use ") :].splitlines()[0]
                    raise SystemExit(
                        f"step {step + 1}: {message}\nReplace or remove the file, then continue "
                        f"with --resume (from the last checkpoint, at step "
                        f"{step - step % self.steps_per_epoch} or later)"
                    ) from error
                self._tic = time.perf_counter()
                yield step, epoch, batch
                step += 1
                self.steps_run += 1
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
        fault_point("step", step + 1, self.process.rank)
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
        saved |= {"batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}
        saved |= {"args": plain(vars(self.args)), "definition": self.definition}
        saved |= plain(self.config)
        self.checkpointer.save(saved, step)
        if getattr(self.args, "keep_checkpoints", False):
            self.checkpointer.keep(step)

    def _check_in_sync(self) -> None:
        names = [name for name, obj in self.state.items() if isinstance(obj, nn.Module)]
        prints = [fingerprint(self.state[name], self.process.device) for name in names]
        local = torch.cat(prints)
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
        """Close the bar, write ``last.json``, leave the process group; the last row logged.

        A run that had nothing to do (resumed at its end) leaves ``last.json`` as it was and
        returns what it holds.
        """
        if self.bar is not None:
            self.bar.close()
        summary = dict(self.row)
        if self.steps_run == 0:
            if self.output.last.exists():
                summary = json.loads(self.output.last.read_text())
        elif self.process.is_main:
            tmp = self.output.last.with_name("last.json.tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.output.last)
            self.print("done:", json.dumps(summary))
        self.output.release()
        if self.process.distributed:
            dist.destroy_process_group()
        return summary


def _option(args: argparse.Namespace, name: str) -> str:
    """How the user sets ``name``: ``--flag`` for an option, else where it comes from."""
    if hasattr(args, name):
        return "--" + name.replace("_", "-")
    if name == "dataset_size":
        return "dataset_size (the number of images in --data)"
    return f"{name} (set by --preset)"


def fingerprint(module: nn.Module, device: torch.device) -> Tensor:
    """The sum and the sum of squares of each parameter, in float64 on ``device``: ``(2 * P,)``.

    A module without parameters (DINO's loss, with its centre buffer) gives an empty tensor on
    ``device`` too, so the fingerprints of all modules concatenate wherever they live.
    """
    stats = [
        (p.detach().double().sum(), p.detach().double().square().sum()) for p in module.parameters()
    ]
    if not stats:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([t for pair in stats for t in pair]).to(device)


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
