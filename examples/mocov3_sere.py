"""MoCo v3 with SERE: a complete trainer, written to be read.

MoCo v3 (Chen, Xie and He, 2021) trains a ViT contrastively: the student's prediction of one
view must pick out, among the keys of every image in the global batch, the momentum encoder's
key of the other view of its own image (InfoNCE). SERE (Li et al., TPAMI 2023, Table 7) adds
its spatial and channel self-relation terms between the two views. Every line that SERE adds
ends with ``# SERE``; ``--no-sere`` runs plain MoCo v3 through the same code.

    python examples/mocov3_sere.py --preset tiny                 # a minute on a laptop CPU
    torchrun --nproc_per_node=8 examples/mocov3_sere.py --preset vit_small --data /path/to/train

Recipe (``vit_small``: MoCo v3's ViT-S/16 settings, which the paper keeps for Table 7, over the
paper's 100 epochs): a ViT-S/16 with 12 attention heads, a fixed 2-D sin-cos position embedding
and a frozen random patch projection ("stop-grad conv1"), MoCo v3's initialisation; projector
(3 layers) and predictor (2 layers) MLPs with 4096 hidden units, 256 outputs, BatchNorm (the
last without affine parameters); InfoNCE at temperature 0.2 over the keys of all processes,
symmetrised and scaled by 2 * 0.2; two 224 px crops at scale (0.08, 1) with MoCo v3's asymmetric
blur and solarisation; AdamW, lr 1.5e-4 * batch / 256 (batch 1024 in all) with 40 warm-up
epochs then cosine to 0, weight decay 0.1 on every parameter; momentum 0.99 -> 1 (cosine); SERE
with alpha = beta = 1 (the paper does not give MoCo v3's weights; DINO's are used). As in MoCo
v3, the momentum encoder (and SERE's teacher heads) take their EMA step at the start of each
iteration.

``--recipe authors`` (the default) applies the authors' SERE code where it differs from the
paper's text (lattice points and padding, non-overlapping pairs, spatial heads = the backbone's:
12 for MoCo v3's ViT-S, fp16 on CUDA, as MoCo v3 too trains); ``--recipe paper`` follows the
text. Weight decay is on every parameter under both, as in MoCo v3.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from training import data, distributed, optim, options, runs
from training.options import FRACTION, NON_NEGATIVE, POSITIVE

from sere_loss import SERELoss  # SERE
from sere_loss.transforms import mocov3_transform  # SERE: MoCo v3's crops, geometry recorded

# Presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset(options.Preset):
    """Model, crops and schedule of one configuration: the shared fields, and MoCo v3's own."""

    num_heads: int
    mlp_dim: int
    out_dim: int


PRESETS = {
    # A ViT small enough for a 2-core CPU: two 64 px views (8 x 8 tokens).
    "tiny": Preset(
        arch="tiny",
        patch=8,
        global_px=64,
        num_heads=3,
        mlp_dim=256,
        out_dim=64,
        batch_size=16,
        epochs=2,
        warmup_epochs=1,
        lr=1.5e-4,
        drop_path=0.0,
        synthetic_length=128,
        synthetic_size=96,
        workers=2,
    ),
    # MoCo v3's ViT-S/16 (batch per process; theirs is 1024 in all, 128 on each of 8 GPUs).
    "vit_small": Preset(
        arch="vit_small_patch16_224",
        patch=16,
        global_px=224,
        num_heads=12,
        mlp_dim=4096,
        out_dim=256,
        batch_size=128,
        epochs=100,
        warmup_epochs=40,
        lr=1.5e-4,
        drop_path=0.0,
        synthetic_length=10_000,
        synthetic_size=256,
        workers=8,
    ),
}


# MoCo v3 -----------------------------------------------------------------------------------------


def sincos_position_embedding(height: int, width: int, dim: int) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding ``(1, 1 + height * width, dim)``.

    A quarter of the channels each: ``sin`` and ``cos`` of the row index times frequencies
    ``1 / 10000 ** (k / (dim / 4))``, then the same of the column index; zero for [CLS].
    """
    if dim % 4:
        raise ValueError(
            f"dim: a 2-D sin-cos position embedding needs channels divisible by 4, got {dim}"
        )
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angle_r, angle_c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    grid = torch.cat([angle_r.sin(), angle_r.cos(), angle_c.sin(), angle_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), grid]).unsqueeze(0)


def mocov3_vit(preset: Preset) -> VisionTransformer:
    """A timm ViT set up as MoCo v3's.

    Fixed sin-cos positions, MoCo v3's initialisation, and a frozen random patch projection
    (the "stop-grad conv1" trick that steadies training).
    """
    vit = options.build_vit(preset, preset.drop_path, num_heads=preset.num_heads)
    if vit.embed_dim % 4:
        raise SystemExit(
            f"preset arch {preset.arch!r} is {vit.embed_dim} channels wide; MoCo v3's 2-D sin-cos "
            "position embedding needs a width divisible by 4: choose another arch"
        )
    height, width = vit.patch_embed.grid_size
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_position_embedding(height, width, vit.embed_dim))
    vit.pos_embed.requires_grad_(False)
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:  # Xavier-uniform for Q, K and V as three matrices
                bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + vit.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    proj.requires_grad_(False)
    return vit


def mlp(layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's MLP of ``layers`` bias-free linear layers.

    BatchNorm and ReLU come between them, and a BatchNorm without affine parameters after the
    last (SimCLR's design).
    """
    modules: list[nn.Module] = []
    for i in range(layers):
        dim_in, dim_out = in_dim if i == 0 else hidden, out_dim if i == layers - 1 else hidden
        modules.append(nn.Linear(dim_in, dim_out, bias=False))
        last = i == layers - 1
        modules += [nn.BatchNorm1d(dim_out, affine=False)] if last else [
            nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True),
        ]  # fmt: skip
    return nn.Sequential(*modules)


class Encoder(nn.Module):
    """ViT + projector. The momentum encoder is a copy of the student's.

    ``forward`` runs the backbone once over all views, and the projector on each view's [CLS]
    token separately (its BatchNorm normalises over one view's batch, as in MoCo v3). Returns
    the projections, one ``(B, out_dim)`` per view, and the patch tokens of the last block
    before the final norm ``(V * B, N, C)``: the tokens SERE reads (SPEC 1).
    """

    def __init__(self, backbone: VisionTransformer, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, views: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Views ``V x (B, 3, H, W)`` of one size."""
        final, (patches,) = self.backbone.forward_intermediates(
            torch.cat(views), indices=1, norm=False, output_fmt="NLC"
        )
        cls = self.backbone.forward_head(final, pre_logits=True)
        return [self.projector(c) for c in cls.chunk(len(views))], patches


class Student(nn.Module):
    """The trained part: the encoder, then the predictor on each view's projection."""

    def __init__(self, encoder: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, views: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Predictions ``(B, out_dim)`` per view, and the patch tokens ``(V * B, N, C)``."""
        projections, tokens = self.encoder(views)
        return [self.predictor(p) for p in projections], tokens


def contrastive_loss(query: Tensor, key: Tensor, temperature: float, rank: int) -> Tensor:
    """InfoNCE of ``query`` ``(B, D)`` against the keys of every process, ``2 * t`` times.

    The positive of query ``i`` is key ``i`` of this process, at row ``rank * B + i`` of the
    gathered keys; the keys of all other images of the global batch are the negatives.
    """
    query = F.normalize(query.float(), dim=1)
    keys = distributed.gather(F.normalize(key.float().detach(), dim=1))
    logits = query @ keys.T / temperature
    labels = torch.arange(len(query), device=query.device) + rank * len(query)
    return F.cross_entropy(logits, labels) * (2 * temperature)


# Training ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; preset values are the defaults of the per-run options."""
    p = argparse.ArgumentParser(description="MoCo v3 + SERE trainer", allow_abbrev=False)
    options.add_run_arguments(p, PRESETS, output_dir="runs/mocov3_sere")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1)
    p.add_argument("--moco-m", type=FRACTION, default=0.99, help="momentum, cosine to 1")
    p.add_argument("--moco-t", type=POSITIVE, default=0.2, help="InfoNCE temperature")
    p.add_argument("--no-sere", action="store_true", help="plain MoCo v3, the baseline")  # SERE
    p.add_argument("--alpha", type=NON_NEGATIVE, default=1.0, help="spatial term weight")  # SERE
    p.add_argument("--beta", type=NON_NEGATIVE, default=1.0, help="channel term weight")  # SERE
    args = p.parse_args(argv)
    if not args.no_sere and args.alpha == args.beta == 0:  # SERE: SERELoss would refuse it
        p.error("--alpha 0 and --beta 0 leave SERE nothing to add: use --no-sere")  # SERE
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the last iteration's logged values."""
    args = parse_args(argv)
    preset, process, precision, output = options.setup(PRESETS, args)
    recipe, device = options.RECIPES[args.recipe], process.device

    # Data: two views, with their crop boxes and flips recorded.
    transform = mocov3_transform(size=preset.global_px)  # SERE: records each view's box and flip
    dataset, loader, sampler = data.prepare(args, preset, transform, process)
    steps_per_epoch = len(sampler) // preset.batch_size

    # Student (encoder + predictor) and momentum encoder, which starts as the student's.
    backbone = mocov3_vit(preset)
    projector = mlp(3, backbone.embed_dim, preset.mlp_dim, preset.out_dim)
    predictor = mlp(2, preset.out_dim, preset.mlp_dim, preset.out_dim)
    student = Student(Encoder(backbone, projector), predictor).to(device)
    teacher = copy.deepcopy(student.encoder).requires_grad_(False)

    sere = None  # SERE
    if not args.no_sere:  # SERE: two global views, no local ones, so no local heads
        dim = backbone.embed_dim  # SERE: the lattice from the token grid (13 for ViT-S at 224 px)
        settings = recipe.sere_options(backbone) | {"local_heads": False}  # SERE: points, heads
        sere = SERELoss(dim, alpha=args.alpha, beta=args.beta, **settings).to(device)  # SERE
    trained = [student] if sere is None else [student, sere]  # SERE: its heads train too
    student_ddp = distributed.distribute(student, process)
    teacher = distributed.sync_batchnorm(teacher, process)
    sere_ddp = None if sere is None else distributed.distribute(sere, process)  # SERE: DDP too
    options.compile_sere(sere, args, process)  # SERE: one graph on CUDA (--compile-sere)

    # Optimisation: AdamW with weight decay on every parameter, per-iteration schedules.
    params = optim.param_groups(trained, decay_all=True)
    optimizer = torch.optim.AdamW(params, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lr_peak = preset.lr * preset.batch_size * process.world_size / 256
    schedule = {
        "lr": optim.cosine_schedule(
            lr_peak, 0, preset.epochs, steps_per_epoch, preset.warmup_epochs
        ),
        "momentum": optim.cosine_schedule(args.moco_m, 1.0, preset.epochs, steps_per_epoch),
    }

    state: dict[str, Any] = {"student": student, "teacher": teacher}
    state |= {"optimizer": optimizer, "scaler": scaler}
    if sere is not None:  # SERE
        state["sere"] = sere  # SERE: its heads, the teacher's among them
    fields = ["lr", "momentum", "loss", "moco"]
    fields += ["spatial", "channel"]  # SERE
    config = {"preset": asdict(preset), "precision": precision, "dataset_size": len(dataset)}
    run = runs.Run(
        process, args, state, output=output, epochs=preset.epochs, config=config,
        steps_per_epoch=steps_per_epoch, batch_size=preset.batch_size, fields=fields,
    )  # fmt: skip
    torch.manual_seed(args.seed + 1 + process.rank)  # each process its own random state
    start = run.resume()  # and, when resuming, the random state it had saved
    method = "MoCo v3" if sere is None else "MoCo v3 + SERE"  # SERE
    run.print(
        f"{method} | preset {args.preset} | recipe {recipe.name} | {process.world_size} "
        f"process(es) on {device} "
        f"{precision} | 2 views x batch {preset.batch_size} per process | "
        f"{steps_per_epoch} steps/epoch | steps {start} -> {run.max_steps} of "
        f"{run.total_steps} | logs in {args.output_dir}"
    )
    student.train()
    teacher.train()
    for step, epoch, (crops, _) in run.iterations(loader, sampler, start):
        now = {name: per_step[step] for name, per_step in schedule.items()}
        optim.set_schedule(optimizer, now["lr"], None)
        optim.ema_update(teacher, student.encoder, now["momentum"])  # MoCo v3: before the forward
        if sere is not None:  # SERE
            sere.update_teacher(now["momentum"])  # SERE: the teacher's relation heads follow
        views = [v.to(device, non_blocking=True) for v in crops.views]

        with options.autocast(device, precision):
            (q1, q2), s_tokens = student_ddp(views)
            with torch.no_grad():
                (k1, k2), t_tokens = teacher(views)
            loss_moco = contrastive_loss(q1, k2, args.moco_t, process.rank)
            loss_moco = loss_moco + contrastive_loss(q2, k1, args.moco_t, process.rank)
            loss = loss_moco
            terms: dict[str, Tensor] = {}
            if sere_ddp is not None:  # SERE: the patch tokens of both views
                tokens = s_tokens, t_tokens  # SERE: student and teacher
                geometry = crops.boxes, crops.flips  # SERE: as the loader gives them, on the CPU
                loss_sere, terms = sere_ddp(*tokens, *geometry, return_terms=True)  # SERE
                loss = loss + loss_sere  # SERE

        logged = run.mean({"loss": loss, "moco": loss_moco, **terms}, step)
        if run.diagnose(step):  # how alike the teacher's two views relate (Fig. 6)
            logged |= runs.relation_diagnostics(t_tokens, crops.boxes, crops.flips)
        optim.optimizer_step(loss, optimizer, scaler, step=step)
        run.log(step, epoch, now, logged)
    return run.finish()


if __name__ == "__main__":
    distributed.run_main(main)
