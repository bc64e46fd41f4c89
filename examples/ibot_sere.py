"""iBOT with SERE: a complete trainer, written to be read.

iBOT (Zhou et al., 2022) is DINO's self-distillation on the [CLS] token plus masked image
modelling: the student sees its global views with blocks of patches replaced by a learnable mask
token and predicts, for the masked patches, the teacher's distribution over the same shared
head's prototypes. SERE (Li et al., TPAMI 2023) adds its spatial and channel self-relation
terms; as in the authors' code, the student's relations come from the masked global views.
Every line that SERE adds ends with ``# SERE``; ``--no-sere`` runs plain iBOT through the same
code.

    python examples/ibot_sere.py --preset tiny                   # a minute on a laptop CPU
    torchrun --nproc_per_node=8 examples/ibot_sere.py --preset vit_small --data /path/to/train
    torchrun --nproc_per_node=8 examples/ibot_sere.py --preset vit_base --data /path/to/train

Recipe (``vit_small``, the authors' iBOT + SERE command for ViT-S/16, 100 epochs): 2 x 224
global crops at scale (0.4, 1) and 10 x 96 local crops at (0.05, 0.4); block masks on the global
views with a ratio of 0 or U(0.1, 0.5) per view (``--pred-ratio 0 0.3 --pred-ratio-var 0 0.2``);
a shared head with 8192 prototypes whose last layer is not weight-normalised; teacher
temperatures 0.04 -> 0.07 over 30 epochs for [CLS] and patches; AdamW, lr 0.0005 * batch / 256
(batch 128 per GPU on 8 GPUs) with 10 warm-up epochs then cosine to 1e-6; weight decay
0.04 -> 0.4; per-parameter gradient clipping at 0.3; the last layer frozen for the first epoch;
teacher momentum 0.996 -> 1; SERE with alpha = 0.2, beta = 0.5. ``vit_base`` is the authors'
ViT-B/16 command (Table 1): crops at (0.32, 1) and (0.05, 0.32), a weight-normalised last layer
frozen for 3 epochs, lr 0.00075 * batch / 256 down to 2e-6, temperatures warmed up over 50
epochs, and 12 spatial heads, the backbone's, as in the authors' code.

``--recipe authors`` (the default) follows the authors' code where it differs from the paper's
text (lattice points and padding, non-overlapping pairs, spatial heads, weight decay on biases,
fp16 on CUDA); ``--recipe paper`` follows the text. ``docs/trainers.md`` lists the differences.

The total loss: by default the authors' weighting ``(4 - alpha - beta) / 2 * L_iBOT + alpha * L_p
+ beta * L_c`` (1.65 * L_iBOT here), which produced the paper's iBOT numbers;
``--ibot-weight paper`` gives the paper's Eq. 6, ``L_iBOT + alpha * L_p + beta * L_c``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from dino_sere import DINOHead, DINOLoss, update_center
from dino_sere import Preset as DINOPreset
from dino_sere import schedules as dino_schedules
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from training import data, distributed, optim, options, runs
from training.options import COUNT, FRACTION, NON_NEGATIVE, POSITIVE

from sere_loss import SERELoss  # SERE
from sere_loss.transforms import Crops, MultiCropTransform, ibot_sere_transform  # SERE

# Presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset(DINOPreset):
    """DINO's settings, and whether the shared head's last layer is weight-normalised."""

    norm_last_layer: bool


PRESETS = {
    # A ViT small enough for a 2-core CPU: 64 px global views (8 x 8 tokens), 32 px local ones.
    "tiny": Preset(
        arch="tiny",
        patch=8,
        global_px=64,
        local_px=32,
        num_local=10,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        out_dim=1024,
        head_hidden=256,
        head_bottleneck=64,
        norm_last_layer=False,
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
    # The authors' ViT-S/16 recipe (batch per process; theirs is 128 on each of 8 GPUs).
    "vit_small": Preset(
        arch="vit_small_patch16_224",
        patch=16,
        global_px=224,
        local_px=96,
        num_local=10,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        out_dim=8192,
        head_hidden=2048,
        head_bottleneck=256,
        norm_last_layer=False,
        batch_size=128,
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
    # The authors' ViT-B/16 command (Table 1's ViT-B/16 row: 83.3 -> 83.7 top-1), 128 per GPU
    # on 8 GPUs: crops (0.32, 1) and (0.05, 0.32), a weight-normalised last layer frozen for 3
    # epochs, lr 0.00075 to 2e-6, teacher temperatures warmed up over 50 epochs.
    "vit_base": Preset(
        arch="vit_base_patch16_224",
        patch=16,
        global_px=224,
        local_px=96,
        num_local=10,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        out_dim=8192,
        head_hidden=2048,
        head_bottleneck=256,
        norm_last_layer=True,
        batch_size=128,
        epochs=100,
        warmup_epochs=10,
        teacher_temp_warmup_epochs=50,
        lr=0.00075,
        min_lr=2e-6,
        freeze_last_layer=3,
        drop_path=0.1,
        synthetic_length=10_000,
        synthetic_size=256,
        workers=8,
    ),
}


# Masked image modelling --------------------------------------------------------------------------


def block_mask(
    height: int,
    width: int,
    ratio: float,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> Tensor:
    """A ``(height, width)`` bool mask of about ``ratio * height * width`` patches, in blocks.

    BEiT's block-wise masking, as iBOT draws it: while fewer than ``ratio * N`` patches are
    masked, try up to ``attempts`` times to place a rectangle of random area (at least
    ``(min(height, width) // 3) ** 2`` patches, at most what is left to mask) and log-uniform
    aspect ratio in ``aspect``, at a random position; keep it if it masks at least one new patch
    without going over the budget. Stop when a round of attempts places nothing. Random numbers
    come from torch's global generator (seeded per image by the data pipeline).
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    target = ratio * height * width
    min_area = (min(height, width) // 3) ** 2
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        budget = target - count
        added = 0
        for _ in range(attempts):
            area = min_area + (budget - min_area) * float(torch.rand(()))
            shape = math.exp(log_low + (log_high - log_low) * float(torch.rand(())))
            h, w = round(math.sqrt(area * shape)), round(math.sqrt(area / shape))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


class MaskedMultiCrop:
    """Multi-crop views and a block mask for each global view.

    Each global view's mask ratio is drawn uniformly from one of ``ranges``, picked at random:
    iBOT's ``--pred-ratio 0 0.3 --pred-ratio-var 0 0.2`` is ``[(0, 0)``, ``(0.1, 0.5)]``, so half
    of the views are not masked and the others at 10 % to 50 %. Returns ``(crops, masks)``,
    ``masks`` bool ``(G, H / patch, W / patch)``.
    """

    def __init__(
        self, multicrop: MultiCropTransform, patch: int, ranges: Sequence[tuple[float, float]]
    ) -> None:
        self.multicrop, self.patch, self.ranges = multicrop, patch, list(ranges)

    def __call__(self, image: Any) -> tuple[Crops, Tensor]:
        """Crops of ``image`` and the masks of its global views."""
        crops = self.multicrop(image)
        masks = []
        for view in crops.views[: self.multicrop.num_global]:
            low, high = self.ranges[int(torch.randint(len(self.ranges), ()))]
            ratio = low + (high - low) * float(torch.rand(()))
            grid = view.shape[-2] // self.patch, view.shape[-1] // self.patch
            masks.append(block_mask(*grid, ratio))
        return crops, torch.stack(masks)


# iBOT --------------------------------------------------------------------------------------------


class MultiCropModel(nn.Module):
    """ViT with a learnable mask token, and one head shared by [CLS] and patch tokens.

    ``forward`` returns the [CLS] prototype logits of all views ``(V * B, K)``, the patch logits
    of the global views ``(G * B, N, K)``, and the patch tokens of the last block before the
    final norm, of the global ``(G * B, N, C)`` and local ``(L * B, n, C)`` views: the tokens
    SERE reads (SPEC 1).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))  # iBOT's shape

    def tokens(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens after the final norm ``(B, T, C)`` and patch tokens before it ``(B, N, C)``.

        ``images`` are ``(B, 3, H, W)``, ``mask`` is ``(B, h, w)`` bool over the patch grid.
        Masked patches are replaced by the mask token after the patch embedding, before the
        position embedding and the [CLS] token, as in iBOT.
        """
        vit = self.backbone
        x = vit.patch_embed(images)  # (B, h, w, C): dynamic_img_size keeps the grid
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(x))))
        return vit.norm(x), x[:, vit.num_prefix_tokens :]

    def forward(
        self, global_views: Tensor, masks: Tensor | None = None, local_views: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Global views ``(G * B, 3, H, W)``, their ``masks`` ``(G * B, h, w)``, local views."""
        final, global_tokens = self.tokens(global_views, masks)
        logits = self.head(final)
        cls, patches = [logits[:, 0]], logits[:, self.backbone.num_prefix_tokens :]
        local_tokens = None
        if local_views is not None:
            final, local_tokens = self.tokens(local_views)
            cls.append(self.head(final[:, 0]))
        return torch.cat(cls), patches, global_tokens, local_tokens


class IBOTLoss(nn.Module):
    """iBOT's two terms: DINO's loss on [CLS], and the masked patches' self-distillation.

    The patch term: for each global view, the cross-entropy between the teacher's centred,
    sharpened patch distributions and the student's, over the student's masked patches (averaged
    per image, then over images and the 2 views). Its centre is an EMA of the teacher's mean
    patch output. Returns ``(cls, patch)``; iBOT's loss is their sum.
    """

    def __init__(
        self, out_dim: int, num_views: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.cls = DINOLoss(out_dim, num_views, student_temp, center_momentum)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center2", torch.zeros(1, 1, out_dim))
        self.center2: Tensor

    def forward(
        self,
        student: tuple[Tensor, Tensor],
        teacher: tuple[Tensor, Tensor],
        masks: Tensor,
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> tuple[Tensor, Tensor]:
        """``(cls (V * B, K), patches (2 * B, N, K))`` of each, masks ``(2 * B, N)`` bool."""
        loss_cls = self.cls(student[0], teacher[0], teacher_temp)
        s_patch, t_patch = student[1].float(), teacher[1].float().detach()
        log_p = F.log_softmax(s_patch / self.student_temp, dim=-1).chunk(2)
        q = F.softmax((t_patch - self.center2) / teacher_patch_temp, dim=-1).chunk(2)
        weights = masks.float().chunk(2)
        terms = []
        for v in range(2):
            per_patch = -(q[v] * log_p[v]).sum(dim=-1)
            per_image = (per_patch * weights[v]).sum(dim=-1) / weights[v].sum(dim=-1).clamp(min=1)
            terms.append(per_image.mean())
        update_center(self.center2, t_patch.mean(dim=1, keepdim=True), self.center_momentum)
        return loss_cls, torch.stack(terms).mean()


# Training ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; preset values are the defaults of the per-run options."""
    p = argparse.ArgumentParser(description="iBOT + SERE trainer", allow_abbrev=False)
    options.add_run_arguments(p, PRESETS, output_dir="runs/ibot_sere")
    p.add_argument("--num-local", type=COUNT, help="local crops per image (preset's)")
    p.add_argument("--min-lr", type=NON_NEGATIVE, help="final lr (preset's)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, nargs=2, default=(0.04, 0.4))
    p.add_argument("--momentum", type=FRACTION, default=0.996, help="teacher EMA, cosine to 1")
    p.add_argument("--teacher-temp", type=POSITIVE, nargs=2, default=(0.04, 0.07))
    p.add_argument("--teacher-temp-warmup-epochs", type=NON_NEGATIVE, help="(preset's)")
    p.add_argument("--teacher-patch-temp", type=POSITIVE, nargs=2, default=(0.04, 0.07))
    p.add_argument("--pred-ratio", type=NON_NEGATIVE, nargs="+", default=[0.0, 0.3])
    p.add_argument("--pred-ratio-var", type=NON_NEGATIVE, nargs="+", default=[0.0, 0.2])
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=0.3, help="per-parameter; 0 disables")
    p.add_argument("--freeze-last-layer", type=COUNT, help="epochs (preset's)")
    p.add_argument("--no-sere", action="store_true", help="plain iBOT, the baseline")  # SERE
    p.add_argument("--alpha", type=NON_NEGATIVE, default=0.2, help="spatial term weight")  # SERE
    p.add_argument("--beta", type=NON_NEGATIVE, default=0.5, help="channel term weight")  # SERE
    weighting = "L_iBOT's weight: 'authors' (4 - alpha - beta) / 2, 'paper' 1 (Eq. 6)"  # SERE
    weightings = ["authors", "paper"]  # SERE
    p.add_argument("--ibot-weight", default="authors", choices=weightings, help=weighting)  # SERE
    args = p.parse_args(argv)
    if not args.no_sere and args.alpha == args.beta == 0:  # SERE: SERELoss would refuse it
        p.error("--alpha 0 and --beta 0 leave SERE nothing to add: use --no-sere")  # SERE
    if not args.no_sere and args.ibot_weight == "authors" and args.alpha + args.beta >= 4:  # SERE
        p.error("--ibot-weight authors needs --alpha + --beta < 4 (L_iBOT's weight > 0)")  # SERE
    if len(args.pred_ratio) != len(args.pred_ratio_var):
        p.error(f"--pred-ratio {args.pred_ratio} and --pred-ratio-var {args.pred_ratio_var} differ")
    args.mask_ranges = [
        (r - v, r + v) for r, v in zip(args.pred_ratio, args.pred_ratio_var, strict=True)
    ]
    if not all(0 <= low <= high < 1 for low, high in args.mask_ranges):
        p.error(f"each --pred-ratio +- --pred-ratio-var must lie in [0, 1), got {args.mask_ranges}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the last iteration's logged values."""
    args = parse_args(argv)
    preset, process, precision, output = options.setup(PRESETS, args)
    recipe, device = options.RECIPES[args.recipe], process.device

    # Data: multi-crop views with their crop boxes and flips, and block masks for the globals.
    multicrop = ibot_sere_transform(  # SERE: records each view's box and flip
        global_size=preset.global_px, local_size=preset.local_px, num_local=preset.num_local,
        global_scale=preset.global_scale, local_scale=preset.local_scale,
    )  # fmt: skip
    transform = MaskedMultiCrop(multicrop, preset.patch, args.mask_ranges)
    dataset, loader, sampler = data.prepare(args, preset, transform, process)
    steps_per_epoch = len(sampler) // preset.batch_size
    total_steps = preset.epochs * steps_per_epoch

    # Student and teacher: the teacher has no stochastic depth and starts as the student.
    def model(drop_path: float) -> MultiCropModel:
        backbone = options.build_vit(preset, drop_path)
        head = DINOHead(
            backbone.embed_dim, preset.out_dim, preset.head_hidden, preset.head_bottleneck,
            norm_last_layer=preset.norm_last_layer,
        )  # fmt: skip
        return MultiCropModel(backbone, head).to(device)

    student = model(preset.drop_path)
    teacher = model(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    ibot_loss = IBOTLoss(preset.out_dim, 2 + preset.num_local).to(device)

    sere = None  # SERE
    ibot_weight = 1.0  # SERE: L_iBOT's weight, 1 in plain iBOT
    if not args.no_sere:  # SERE
        dim = student.backbone.embed_dim  # SERE: lattices from the token grids (13, 6 for ViT-S)
        settings = recipe.sere_options(student.backbone)  # SERE: lattice points, padding, heads
        sere = SERELoss(dim, alpha=args.alpha, beta=args.beta, **settings).to(device)  # SERE
        if args.ibot_weight == "authors":  # SERE
            ibot_weight = (4 - args.alpha - args.beta) / 2  # SERE: 1.65 for 0.2 and 0.5
    trained = [student] if sere is None else [student, sere]  # SERE: its heads train too
    student_ddp = distributed.distribute(student, process)
    sere_ddp = None if sere is None else distributed.distribute(sere, process)  # SERE: DDP too
    options.compile_sere(sere, args, process)  # SERE: one graph on CUDA (--compile-sere)

    # Optimisation: DINO's per-iteration schedules, and the patch temperature's warm-up.
    optimizer = torch.optim.AdamW(optim.param_groups(trained, decay_biases=recipe.decay_biases))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedule = dino_schedules(args, preset, steps_per_epoch, process.world_size)
    warm = int(preset.teacher_temp_warmup_epochs * steps_per_epoch)
    schedule["teacher_patch_temp"] = optim.warmup_schedule(
        *args.teacher_patch_temp, warm, total_steps
    )

    state: dict[str, Any] = {"student": student, "teacher": teacher, "ibot_loss": ibot_loss}
    state |= {"optimizer": optimizer, "scaler": scaler}
    if sere is not None:  # SERE
        state["sere"] = sere  # SERE: its heads, the teacher's among them
    fields = ["lr", "wd", "momentum", "teacher_temp", "teacher_patch_temp", "loss", "ibot"]
    fields += ["cls", "patch", "masked"]
    fields += ["spatial", "channel"]  # SERE
    config = {"preset": asdict(preset), "precision": precision, "dataset_size": len(dataset)}
    run = runs.Run(
        process, args, state, output=output, epochs=preset.epochs, config=config,
        steps_per_epoch=steps_per_epoch, batch_size=preset.batch_size, fields=fields,
    )  # fmt: skip
    torch.manual_seed(args.seed + 1 + process.rank)  # each process its own stochastic depth
    start = run.resume()  # and, when resuming, the random state it had saved
    method = "iBOT" if sere is None else "iBOT + SERE"  # SERE
    run.print(
        f"{method} | preset {args.preset} | recipe {recipe.name} | {process.world_size} "
        f"process(es) on {device} "
        f"{precision} | {2 + preset.num_local} views x batch {preset.batch_size} per process | "
        f"{steps_per_epoch} steps/epoch | steps {start} -> {run.max_steps} of {total_steps} | "
        f"logs in {args.output_dir}"
    )
    student.train()
    teacher.train()
    for step, epoch, ((crops, masks), _) in run.iterations(loader, sampler, start):
        now = {name: per_step[step] for name, per_step in schedule.items()}
        optim.set_schedule(optimizer, now["lr"], now["wd"])
        views = [v.to(device, non_blocking=True) for v in crops.views]
        global_views = torch.cat(views[:2])
        local_views = torch.cat(views[2:]) if len(views) > 2 else None
        masks = masks.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (2 * B, h, w)

        with options.autocast(device, precision):
            s_cls, s_patch, s_tokens, s_local = student_ddp(global_views, masks, local_views)
            with torch.no_grad():
                t_cls, t_patch, t_tokens, _ = teacher(global_views)
            temps = now["teacher_temp"], now["teacher_patch_temp"]
            loss_cls, loss_patch = ibot_loss(
                (s_cls, s_patch), (t_cls, t_patch), masks.flatten(1), *temps
            )
            loss_ibot = loss_cls + loss_patch
            loss = ibot_weight * loss_ibot  # SERE: weight 1 without SERE
            terms: dict[str, Tensor] = {}
            if sere_ddp is not None:  # SERE: student tokens from the masked global views
                tokens = s_tokens, t_tokens  # SERE: student and teacher, global views
                geometry = crops.boxes, crops.flips  # SERE: as the loader gives them, on the CPU
                loss_sere, terms = sere_ddp(*tokens, *geometry, s_local, return_terms=True)  # SERE
                loss = loss + loss_sere  # SERE

        values = {"loss": loss, "ibot": loss_ibot, "cls": loss_cls, "patch": loss_patch}
        values["masked"] = masks.float().mean()
        logged = run.mean(values | terms, step)
        if run.diagnose(step):  # how alike the teacher's two views relate (Fig. 6)
            logged |= runs.relation_diagnostics(t_tokens, crops.boxes, crops.flips)
        frozen = student if epoch < preset.freeze_last_layer else None
        optim.optimizer_step(
            loss, optimizer, scaler, step=step, clip_grad=args.clip_grad, freeze_last_layer=frozen
        )
        optim.ema_update(teacher, student, now["momentum"])
        if sere is not None:  # SERE
            sere.update_teacher(now["momentum"])  # SERE: the teacher's relation heads follow
        run.log(step, epoch, now, logged)
    return run.finish()


if __name__ == "__main__":
    distributed.run_main(main)
