"""The command line every trainer shares, its presets and recipes, and the ViT they build.

- :class:`Preset`: what every trainer's configurations fix (each trainer extends it).
- :class:`Recipe` and :data:`RECIPES`: ``--recipe authors`` (the authors' code, SERE's settings
  included) and ``--recipe paper`` (the paper's text), where the two differ.
- :func:`add_run_arguments`, :func:`setup`: the shared options and a trainer's start.
- :func:`build_vit`: the timm ViT all trainers take; :func:`resolve_precision`,
  :func:`autocast`: the precision of the forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from training.distributed import Process, init_process
from training.preemption import STOP
from training.rundir import OutputDir


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


@dataclasses.dataclass(frozen=True)
class Number:
    """An argparse type: a finite number, or an integer, within bounds.

    Every numeric option goes through one, so that a careless value (``--lr -1``,
    ``--clip-grad nan``, ``--momentum 1.5``) fails on the command line, before any file is
    written, with argparse's ``argument --lr: expected ...`` and exit status 2.

    Args:
        low: the smallest value allowed (``None``: no bound).
        high: the largest value allowed (``None``: no bound).
        integer: integers only.
        above: ``low`` itself is not allowed (``> low`` rather than ``>= low``).
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    above: bool = False

    def __call__(self, text: str) -> Any:
        """``text`` as a number; ``argparse.ArgumentTypeError`` saying what was expected."""
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self}, got {text!r}") from None
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        high_ok = self.high is None or value <= self.high
        if not (math.isfinite(value) and low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected {self}, got {text}")
        return value

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = (None if v is None else str(int(v)) if self.integer else f"{v:g}"
                     for v in (self.low, self.high))  # fmt: skip
        if low is not None and high is not None:
            return f"{kind} in [{low}, {high}]"
        if low is not None:
            return f"{kind} {'>' if self.above else '>='} {low}"
        return kind


POSITIVE_INT = Number(1, integer=True)  # epochs, steps, batches
COUNT = Number(0, integer=True)  # workers, "every N steps" (0: never), epochs frozen
POSITIVE = Number(0, above=True)  # learning rates, temperatures, minutes
NON_NEGATIVE = Number(0)  # weights, weight decay, clipping (0: none), warm-up lengths
FRACTION = Number(0, 1)  # momenta
# The seeds of the data order and the crops, (seed * 1_000_003 + epoch) * 10_000_019 + index,
# must stay below 2 ** 64: torch refuses larger seeds.
SEED = Number(0, 1_000_000, integer=True)


def _image_count(text: str) -> int:
    if text == "all":
        return -1
    try:
        value = int(text)
    except ValueError:
        value = -1
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
    p.add_argument("--epochs", type=POSITIVE_INT, help="schedule length (preset's)")
    p.add_argument("--max-steps", type=POSITIVE_INT, help="stop after this many iterations")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="images per process (preset's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    precision = "autocast on CUDA; 'auto': fp16 under --recipe authors, bf16 under paper"
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help=precision)  # fmt: skip
    p.add_argument("--lr", type=POSITIVE, help="peak lr per 256 images in all (preset's)")
    p.add_argument("--workers", type=COUNT, help="DataLoader workers per process (preset's)")
    p.add_argument("--seed", type=SEED, default=0, help="0 to 1,000,000")
    p.add_argument("--output-dir", type=Path, default=Path(output_dir))
    p.add_argument("--resume", nargs="?", const="auto", help="a checkpoint, or this run's own")
    changes = "options that --resume may change from the checkpoint's (say: epochs lr)"
    p.add_argument("--allow-changed-options", nargs="+", metavar="NAME", help=changes)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, help="lr warm-up length (preset's)")
    p.add_argument("--save-every", type=COUNT, default=0, help="also checkpoint every N steps")
    p.add_argument(
        "--keep-checkpoints", action="store_true",
        help="keep every checkpoint written (each epoch's end, --save-every) as "
        "checkpoint-<step>.pth beside checkpoint.pth",
    )  # fmt: skip
    p.add_argument(
        "--diagnostics-every", type=COUNT, default=0,
        help="every N steps, log how invariant the teacher's relations are between the two "
        "global views (sere_loss.diagnostics, on process 0's batch) to log.csv",
    )  # fmt: skip
    timeout = "minutes a process waits for the others in a collective before failing"
    p.add_argument("--dist-timeout", type=POSITIVE, default=10.0, help=timeout)
    check = "images opened at start-up: a number spread over the data, 'all', or 0 (default 16)"
    p.add_argument("--check-images", type=_image_count, default=16, help=check)
    bad = "use the next image in place of one that cannot be read or transformed (with a warning)"
    p.add_argument("--replace-bad-images", action="store_true", help=bad)
    compiled = (
        "compile SERE into one graph (SERELoss.compile(): CUDA graphs on CUDA); 'auto' (default): "
        "on one GPU, eager on the CPU and across several processes"
    )
    p.add_argument("--compile-sere", choices=["auto", "on", "off"], default="auto", help=compiled)


def compile_sere(sere: nn.Module | None, args: argparse.Namespace, process: Process) -> bool:
    """``sere.compile()`` where ``--compile-sere`` asks for it; whether it did.

    ``auto`` compiles on one GPU. Across several processes SERE's heads hold SyncBatchNorm,
    whose collectives inside a compiled, graph-replayed SERE have not run on GPUs yet: there
    ``auto`` stays eager, and ``on`` compiles anyway. Call it after ``distributed.distribute``,
    which converts the BatchNorms: the graph is then traced with the layers the run uses. The
    first step compiles (tens of seconds on a GPU), and again when the batch's shape changes (the
    loaders drop the last incomplete batch, so a run has one shape).
    """
    wanted = args.compile_sere == "on" or (
        args.compile_sere == "auto" and process.device.type == "cuda" and process.world_size == 1
    )
    if sere is None or not wanted:
        return False
    sere.compile()  # SERELoss.compile(): the library's own, the boxes outside the graph
    if process.is_main:
        print(
            "SERE is compiled: its first step compiles the graph (tens of seconds on a GPU); "
            "--compile-sere off runs it eager",
            flush=True,
        )
    return True


def setup(presets: dict[str, P], args: argparse.Namespace) -> tuple[P, Process, str, OutputDir]:
    """A trainer's start: preset with overrides, this process, the precision, the output dir.

    The output directory is checked before anything is built (:class:`OutputDir`). Torch is
    seeded with ``--seed``, so that every process builds the same initial weights. From here
    on SIGTERM and SIGINT stop the run after a step, with a checkpoint
    (:mod:`training.preemption`).
    """
    preset = apply_overrides(presets[args.preset], args)
    process = init_process(args.device, args.dist_timeout)
    STOP.install(distributed=process.distributed)
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
