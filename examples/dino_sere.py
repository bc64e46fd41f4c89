"""DINO with SERE: a complete trainer, written to be read.

DINO (Caron et al., 2021) distils a momentum teacher into a student across multi-crop views.
SERE (Li et al., TPAMI 2023) adds two terms computed on the patch tokens: the spatial
self-relation, compared on the overlap of two views, and the channel self-relation. Every line
that SERE adds ends with ``# SERE``; ``--no-sere`` runs plain DINO through the same code.

    python examples/dino_sere.py --preset tiny                  # a minute on a laptop CPU
    python examples/dino_sere.py --preset vit_small --data /path/to/imagenet/train  # CUDA
    torchrun --nproc_per_node=8 examples/dino_sere.py --preset vit_small --data ...  # 8 GPUs

Recipe (``vit_small``, the paper's Sec. 4.1 and DINO's ViT-S/16 settings): AdamW, lr
0.0005 * batch / 256 with 10 warm-up epochs then cosine to 1e-6, weight decay 0.04 -> 0.4,
teacher momentum 0.996 -> 1, teacher temperature 0.04 -> 0.07 over 30 epochs, student
temperature 0.1, centre momentum 0.9, gradient clipping 3.0, the last layer frozen for the first
epoch, 2 x 224 global crops at scale (0.35, 1) and 4 x 96 local crops at (0.05, 0.35), and SERE
with alpha = beta = 1. All schedules are per iteration and span ``--epochs``; ``--max-steps``
stops early without changing them, so a short run is the start of the long one. The batch is
per process: the paper's 512 is ``--batch-size 64`` on 8 GPUs.

``--recipe authors`` (the default) follows the authors' code where it differs from the paper's
text: SERE's lattice edge to edge with zero padding, non-overlapping pairs counted as log S,
spatial heads = the backbone's, weight decay on biases too, fp16 autocast on CUDA.
``--recipe paper`` follows the text; ``docs/trainers.md`` lists each difference and its effect.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from training import data, distributed, optim, options, runs
from training.options import COUNT, FRACTION, NON_NEGATIVE, POSITIVE

from sere_loss import SERELoss  # SERE
from sere_loss.batch_transforms import as_uint8, batch_dino_sere_transform  # SERE: on the device
from sere_loss.transforms import dino_sere_transform  # SERE: crops with their boxes and flips

# Presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset(options.Preset):
    """Model, crops and schedule of one configuration: the shared fields, and DINO's own."""

    local_px: int
    num_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    out_dim: int
    head_hidden: int
    head_bottleneck: int
    teacher_temp_warmup_epochs: float
    min_lr: float
    freeze_last_layer: int


PRESETS = {
    # A ViT small enough for a 2-core CPU: 64 px global views (8 x 8 tokens), 32 px local ones.
    "tiny": Preset(
        arch="tiny",
        patch=8,
        global_px=64,
        local_px=32,
        num_local=4,
        global_scale=(0.35, 1.0),
        local_scale=(0.05, 0.35),
        out_dim=1024,
        head_hidden=256,
        head_bottleneck=64,
        batch_size=16,
        epochs=2,
        warmup_epochs=1,
        teacher_temp_warmup_epochs=1,
        lr=0.0005,
        min_lr=1e-6,
        freeze_last_layer=1,
        drop_path=0.1,
        synthetic_length=128,
        synthetic_size=96,
        workers=2,
    ),
    # The paper's ViT-S/16 recipe (batch per process; the paper's total is 512).
    "vit_small": Preset(
        arch="vit_small_patch16_224",
        patch=16,
        global_px=224,
        local_px=96,
        num_local=4,
        global_scale=(0.35, 1.0),
        local_scale=(0.05, 0.35),
        out_dim=65536,
        head_hidden=2048,
        head_bottleneck=256,
        batch_size=64,
        epochs=100,
        warmup_epochs=10,
        teacher_temp_warmup_epochs=30,
        lr=0.0005,
        min_lr=1e-6,
        freeze_last_layer=1,
        drop_path=0.1,
        synthetic_length=10_000,
        synthetic_size=256,
        workers=8,
    ),
}


# DINO --------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """MLP, l2 normalisation, then a weight-normalised linear layer to ``out_dim`` prototypes.

    With ``norm_last_layer`` the prototypes' norm is fixed to 1 (DINO's default).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool = True
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )  # fmt: skip
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        last = nn.Linear(bottleneck, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(B, in_dim)`` -> prototype logits ``(B, out_dim)``."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# --8<-- [start:tokens]
class MultiCropModel(nn.Module):
    """Backbone + DINO head. Views of one resolution go through the backbone together.

    Returns the prototype logits of all views ``(V * B, K)`` and, per resolution (globals
    first), the patch tokens of the last block before the final norm ``(V_r * B, N_r, C)``: the
    tokens SERE reads (SPEC 1).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Views ``V x (B, 3, H, W)``, ordered so that equal sizes are adjacent."""
        logits, tokens = [], []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            final, (patches,) = self.backbone.forward_intermediates(
                torch.cat(views[start:end]), indices=1, norm=False, output_fmt="NLC"
            )
            logits.append(self.head(self.backbone.forward_head(final, pre_logits=True)))
            tokens.append(patches)
            start = end
        return torch.cat(logits), tokens
        # --8<-- [end:tokens]


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over view pairs.

    Pairs: teacher view ``i`` (of 2 globals) with every student view ``v != i``. The centre is an
    EMA of the teacher's batch mean (all-reduced when distributed).
    """

    def __init__(
        self, out_dim: int, num_views: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.num_views, self.student_temp, self.center_momentum = (
            num_views, student_temp, center_momentum,
        )  # fmt: skip
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.center: Tensor

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float) -> Tensor:
        """Student logits ``(V * B, K)``, teacher logits ``(2 * B, K)`` -> scalar loss."""
        student, teacher = student.float(), teacher.float().detach()
        log_p = F.log_softmax(student / self.student_temp, dim=-1).chunk(self.num_views)
        q = F.softmax((teacher - self.center) / teacher_temp, dim=-1).chunk(2)
        terms = [
            -(q[i] * log_p[v]).sum(dim=-1).mean()
            for i in range(2)
            for v in range(self.num_views)
            if v != i
        ]
        update_center(self.center, teacher, self.center_momentum)
        return torch.stack(terms).mean()


@torch.no_grad()
def update_center(center: Tensor, teacher: Tensor, momentum: float) -> None:
    """``center = m * center + (1 - m) * mean(teacher)``, in place.

    The mean is over dim 0 of the batch of every process (all-reduced when distributed).
    """
    total = teacher.sum(dim=0, keepdim=True)
    count = torch.tensor(float(len(teacher)), device=teacher.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    center.mul_(momentum).add_(total / count, alpha=1 - momentum)


# Training ----------------------------------------------------------------------------------------


def schedules(
    args: argparse.Namespace, preset: Any, steps_per_epoch: int, world_size: int
) -> dict[str, list[float]]:
    """DINO's values per iteration, over the whole run.

    ``lr``: linear warm-up to ``lr`` x total batch / 256, then cosine to ``min_lr``; ``wd``:
    cosine between the two ``--weight-decay`` values; ``momentum``: cosine from ``--momentum``
    to 1; ``teacher_temp``: linear warm-up between the two ``--teacher-temp`` values.
    """
    epochs, total = preset.epochs, preset.epochs * steps_per_epoch
    lr = preset.lr * preset.batch_size * world_size / 256
    warm = int(preset.teacher_temp_warmup_epochs * steps_per_epoch)
    return {
        "lr": optim.cosine_schedule(
            lr, preset.min_lr, epochs, steps_per_epoch, preset.warmup_epochs
        ),
        "wd": optim.cosine_schedule(*args.weight_decay, epochs, steps_per_epoch),
        "momentum": optim.cosine_schedule(args.momentum, 1.0, epochs, steps_per_epoch),
        "teacher_temp": optim.warmup_schedule(*args.teacher_temp, warm, total),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; preset values are the defaults of the per-run options."""
    p = argparse.ArgumentParser(description="DINO + SERE trainer", allow_abbrev=False)
    options.add_run_arguments(p, PRESETS, output_dir="runs/dino_sere")
    p.add_argument("--num-local", type=COUNT, help="local crops per image (preset's)")
    p.add_argument("--min-lr", type=NON_NEGATIVE, help="final lr (preset's)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, nargs=2, default=(0.04, 0.4))
    p.add_argument("--momentum", type=FRACTION, default=0.996, help="teacher EMA, cosine to 1")
    p.add_argument("--teacher-temp", type=POSITIVE, nargs=2, default=(0.04, 0.07))
    p.add_argument("--teacher-temp-warmup-epochs", type=NON_NEGATIVE, help="(preset's)")
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=3.0, help="per-parameter; 0 disables")
    p.add_argument("--freeze-last-layer", type=COUNT, help="epochs (preset's)")
    p.add_argument("--no-sere", action="store_true", help="plain DINO, the baseline")  # SERE
    p.add_argument("--alpha", type=NON_NEGATIVE, default=1.0, help="spatial term weight")  # SERE
    p.add_argument("--beta", type=NON_NEGATIVE, default=1.0, help="channel term weight")  # SERE
    crops = "draw the multi-crop views on --device, a batch at a time; the loader only decodes"
    p.add_argument("--device-crops", action="store_true", help=crops)
    args = p.parse_args(argv)
    if not args.no_sere and args.alpha == args.beta == 0:  # SERE: SERELoss would refuse it
        p.error("--alpha 0 and --beta 0 leave SERE nothing to add: use --no-sere")  # SERE
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the last iteration's logged values."""
    args = parse_args(argv)
    preset, process, precision, output = options.setup(PRESETS, args)
    recipe, device = options.RECIPES[args.recipe], process.device

    # Data: multi-crop views with their crop boxes and flips, this process's share of them.
    views_of = dict(
        global_size=preset.global_px, local_size=preset.local_px, num_local=preset.num_local,
        global_scale=preset.global_scale, local_scale=preset.local_scale,
    )  # fmt: skip
    transform = dino_sere_transform(**views_of)  # SERE: records each view's box and flip
    device_crops = None  # --device-crops: the loader decodes, the views are drawn on the device
    if args.device_crops:
        transform, device_crops = as_uint8, batch_dino_sere_transform(**views_of)  # SERE: same
    crop_seed = torch.Generator(device)  # each step's device crops: a function of its seed
    dataset, loader, sampler = data.prepare(
        args, preset, transform, process, data.collate_images if device_crops else None
    )
    steps_per_epoch = len(sampler) // preset.batch_size
    total_steps = preset.epochs * steps_per_epoch

    # Student and teacher: the teacher has no stochastic depth and starts as the student.
    def model(drop_path: float) -> MultiCropModel:
        backbone = options.build_vit(preset, drop_path)
        head = DINOHead(
            backbone.embed_dim, preset.out_dim, preset.head_hidden, preset.head_bottleneck
        )
        return MultiCropModel(backbone, head).to(device)

    student = model(preset.drop_path)
    teacher = model(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    num_views = 2 + preset.num_local
    dino_loss = DINOLoss(preset.out_dim, num_views).to(device)

    # --8<-- [start:build]
    sere = None  # SERE
    if not args.no_sere:  # SERE
        dim = student.backbone.embed_dim  # SERE: lattices from the token grids (13, 6 for ViT-S)
        settings = recipe.sere_options(student.backbone)  # SERE: lattice points, padding, heads
        sere = SERELoss(dim, alpha=args.alpha, beta=args.beta, **settings).to(device)  # SERE
    trained = [student] if sere is None else [student, sere]  # SERE: its heads train too
    student_ddp = distributed.distribute(student, process)
    sere_ddp = None if sere is None else distributed.distribute(sere, process)  # SERE: DDP too
    options.compile_sere(sere, args, process)  # SERE: one graph on CUDA (--compile-sere)
    # --8<-- [end:build]

    # Optimisation: per-iteration schedules over the whole run.
    optimizer = torch.optim.AdamW(optim.param_groups(trained, decay_biases=recipe.decay_biases))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedule = schedules(args, preset, steps_per_epoch, process.world_size)

    state: dict[str, Any] = {"student": student, "teacher": teacher, "dino_loss": dino_loss}
    state |= {"optimizer": optimizer, "scaler": scaler}
    if sere is not None:  # SERE
        state["sere"] = sere  # SERE: its heads, the teacher's among them
    fields = ["lr", "wd", "momentum", "teacher_temp", "loss", "dino"]
    fields += ["spatial", "channel"]  # SERE
    config = {"preset": asdict(preset), "precision": precision, "dataset_size": len(dataset)}
    run = runs.Run(
        process, args, state, output=output, epochs=preset.epochs, config=config,
        steps_per_epoch=steps_per_epoch, batch_size=preset.batch_size, fields=fields,
    )  # fmt: skip
    torch.manual_seed(args.seed + 1 + process.rank)  # each process its own stochastic depth
    start = run.resume()  # and, when resuming, the random state it had saved
    method = "DINO" if sere is None else "DINO + SERE"  # SERE
    run.print(
        f"{method} | preset {args.preset} | recipe {recipe.name} | {process.world_size} "
        f"process(es) on {device} "
        f"{precision} | {num_views} views x batch {preset.batch_size} per process | "
        f"{steps_per_epoch} steps/epoch | steps {start} -> {run.max_steps} of {total_steps} | "
        f"logs in {args.output_dir}"
    )
    student.train()
    teacher.train()
    for step, epoch, (crops, _) in run.iterations(loader, sampler, start):
        now = {name: per_step[step] for name, per_step in schedule.items()}
        optim.set_schedule(optimizer, now["lr"], now["wd"])
        if device_crops is not None:  # views drawn from the seed, the step and the rank alone
            crop_seed.manual_seed((args.seed * 1_000_003 + step) * 10_007 + process.rank)
            crops = device_crops(crops, generator=crop_seed, device=device)
        views = [v.to(device, non_blocking=True) for v in crops.views]

        # --8<-- [start:step]
        with options.autocast(device, precision):
            s_logits, s_tokens = student_ddp(views)
            with torch.no_grad():
                t_logits, t_tokens = teacher(views[:2])
            loss_dino = dino_loss(s_logits, t_logits, now["teacher_temp"])
            loss = loss_dino
            terms: dict[str, Tensor] = {}
            if sere_ddp is not None:  # SERE: patch tokens of globals (student, teacher), locals
                s_local = s_tokens[1] if len(s_tokens) > 1 else None  # SERE
                tokens = s_tokens[0], t_tokens[0]  # SERE: student and teacher, global views
                geometry = crops.boxes, crops.flips  # SERE: from the loader (CPU) or the device
                loss_sere, terms = sere_ddp(*tokens, *geometry, s_local, return_terms=True)  # SERE
                loss = loss + loss_sere  # SERE
        # --8<-- [end:step]

        logged = run.mean({"loss": loss, "dino": loss_dino, **terms}, step)
        if run.diagnose(step):  # how alike the teacher's two views relate (Fig. 6)
            logged |= runs.relation_diagnostics(t_tokens[0], crops.boxes, crops.flips)
        frozen = student if epoch < preset.freeze_last_layer else None
        optim.optimizer_step(
            loss, optimizer, scaler, step=step, clip_grad=args.clip_grad, freeze_last_layer=frozen
        )
        # --8<-- [start:ema]
        optim.ema_update(teacher, student, now["momentum"])
        if sere is not None:  # SERE
            sere.update_teacher(now["momentum"])  # SERE: the teacher's relation heads follow
        # --8<-- [end:ema]
        run.log(step, epoch, now, logged)
    return run.finish()


if __name__ == "__main__":
    distributed.run_main(main)
