r"""DINO + SERE as a PyTorch Lightning module, the teacher's EMA in a callback.

The LightningModule holds the student (a timm ViT and DINO's head), its EMA teacher and the
DINO loss; a Callback moves the teacher after every optimizer step. The lines that SERE adds
end with ``# SERE``: its loss module is a child of the LightningModule, so Lightning's DDP,
``sync_batchnorm``, precision, optimizer and checkpoints take its heads along with the student;
two ``TokenTap`` read the backbones' patch tokens without touching the model; the callback
moves SERE's teacher heads with the same momentum. The crops come from ``dino_sere_transform``,
DINO's multi-crop that also records each view's box and flip.

    pip install -e ".[lightning]"     # or ".[dev]"
    python examples/lightning_dino_sere.py                    # a tiny ViT on synthetic images, CPU
    python examples/lightning_dino_sere.py --data /path/to/train --arch vit_small_patch16_224 \\
        --global-px 224 --local-px 96 --batch-size 64 --epochs 100 \\
        --devices 8 --strategy ddp --sync-batchnorm --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from dino_sere import DINOHead, DINOLoss
from lightning.pytorch.loggers import CSVLogger
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader
from training.data import SyntheticImages
from training.optim import cancel_last_layer_gradients, clip_gradients, ema_update, param_groups
from training.options import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Number

import sere_loss  # SERE
from sere_loss.transforms import dino_sere_transform  # SERE: DINO's crops, with boxes and flips


class DINO(pl.LightningModule):
    """Student, EMA teacher and DINO's loss; ``training_step`` returns the loss."""

    # --8<-- [start:init]
    def __init__(self, backbone: nn.Module, args: argparse.Namespace, total_steps: int) -> None:
        super().__init__()
        dim = backbone.embed_dim
        head = DINOHead(dim, args.out_dim, args.head_hidden, args.head_bottleneck)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.dino_loss = DINOLoss(args.out_dim, num_views=2 + args.num_local)
        self.sere = sere_loss.SERELoss(dim, alpha=args.alpha, beta=args.beta)  # SERE
        self.taps = [sere_loss.TokenTap(m.backbone) for m in (self.student, self.teacher)]  # SERE
        self.args, self.total_steps = args, total_steps
        # --8<-- [end:init]

    @staticmethod
    def embed(model: nn.ModuleDict, views: list[Tensor]) -> Tensor:
        """Head logits of all views; the views of one size go through the backbone together."""
        groups = [views[:2], views[2:]] if len(views) > 2 else [views]
        return torch.cat([model["head"](model["backbone"](torch.cat(g))) for g in groups])

    # --8<-- [start:training-step]
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """DINO's loss, and SERE's on the patch tokens of the same forward passes."""
        crops, _ = batch  # Crops: views, boxes (B, V, 4), flips (B, V); on the device already
        with torch.no_grad():
            teacher = self.embed(self.teacher, crops.views[:2])
        student = self.embed(self.student, crops.views)
        loss = self.dino_loss(student, teacher, teacher_temp=self.args.teacher_temp)
        self.log("dino", loss)
        s, t = (tap.pop() for tap in self.taps)  # SERE: patch tokens (B, C, H, W) per forward
        sere = self.sere(s[0], t[0], crops.boxes, crops.flips, *s[1:])  # SERE
        self.log("sere", sere)  # SERE
        loss = loss + sere  # SERE
        self.log("loss", loss, prog_bar=True)
        return loss
        # --8<-- [end:training-step]

    # --8<-- [start:optimizers]
    def configure_optimizers(self) -> Any:
        """AdamW without weight decay on biases and norms; warm-up then cosine, per step."""
        optimizer = torch.optim.AdamW(param_groups([self]), weight_decay=0.04)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.args.lr, total_steps=self.total_steps, pct_start=0.1,
            cycle_momentum=False,
        )  # fmt: skip
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
        # --8<-- [end:optimizers]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """DINO keeps its prototypes fixed for the first epoch."""
        if self.current_epoch < 1:
            cancel_last_layer_gradients(self.student)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:  # fmt: skip
        """DINO's clipping: each parameter's gradient norm on its own (after fp16 unscaling)."""
        clip_gradients(self.parameters(), self.args.clip_grad)


# --8<-- [start:callback]
class TeacherEMA(pl.Callback):
    """After each optimizer step the teacher follows the student: momentum cosine from m0 to 1."""

    def __init__(self, momentum: float = 0.996) -> None:
        self.momentum = momentum

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """One EMA step of the teacher (and of SERE's teacher heads) with this step's momentum."""
        progress = min(trainer.global_step / max(trainer.estimated_stepping_batches, 1), 1.0)
        m = 1 - (1 - self.momentum) * (1 + math.cos(math.pi * progress)) / 2
        ema_update(module.teacher, module.student, m)
        sere_loss.update_teacher(module, m)  # SERE: SERE's teacher heads, the same momentum
        # --8<-- [end:callback]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the defaults are a tiny run on a CPU."""
    p = argparse.ArgumentParser(description="DINO + SERE in PyTorch Lightning")
    p.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder path")
    p.add_argument("--arch", default="tiny", help="'tiny' or a timm ViT name")
    p.add_argument("--global-px", type=POSITIVE_INT, default=64)
    p.add_argument("--local-px", type=POSITIVE_INT, default=32)
    p.add_argument("--num-local", type=COUNT, default=4)
    p.add_argument("--out-dim", type=POSITIVE_INT, default=1024)
    p.add_argument("--head-hidden", type=POSITIVE_INT, default=256)
    p.add_argument("--head-bottleneck", type=POSITIVE_INT, default=64)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument("--epochs", type=POSITIVE_INT, default=2)
    p.add_argument(
        "--max-steps", type=Number(-1, integer=True), default=-1, help="stop early (-1: never)"
    )
    p.add_argument("--lr", type=POSITIVE, default=5e-4)
    p.add_argument("--teacher-temp", type=POSITIVE, default=0.04)
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=3.0)
    p.add_argument("--workers", type=COUNT, default=2)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--sync-batchnorm", action="store_true", help="with several GPUs")
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on GPUs")
    p.add_argument("--output-dir", type=Path, default=Path("runs/lightning_dino_sere"))
    p.add_argument("--alpha", type=NON_NEGATIVE, default=1.0, help="spatial term weight")  # SERE
    p.add_argument("--beta", type=NON_NEGATIVE, default=1.0, help="channel term weight")  # SERE
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train; returns the last step's logged values."""
    args = parse_args(argv)
    pl.seed_everything(0)
    # --8<-- [start:data]
    transform = dino_sere_transform(  # SERE: crops with their boxes and flips
        global_size=args.global_px, local_size=args.local_px, num_local=args.num_local
    )
    # --8<-- [end:data]
    if args.data == "synthetic":
        dataset: Any = SyntheticImages(128, size=96, transform=transform)
    else:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(args.data, transform=transform)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0,
    )  # fmt: skip
    if args.arch == "tiny":  # 4 blocks of 192 channels, 8 px patches: 8 x 8 and 4 x 4 tokens
        backbone: nn.Module = VisionTransformer(
            img_size=args.global_px, patch_size=8, embed_dim=192, depth=4, num_heads=3,
            num_classes=0, dynamic_img_size=True,
        )  # fmt: skip
    else:
        backbone = timm.create_model(
            args.arch, num_classes=0, dynamic_img_size=True, drop_path_rate=0.1
        )
    steps = len(loader) * args.epochs
    total_steps = steps if args.max_steps < 0 else min(steps, args.max_steps)
    # --8<-- [start:trainer]
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps, accelerator=args.accelerator,
        devices=args.devices, strategy=args.strategy, sync_batchnorm=args.sync_batchnorm,
        precision=args.precision, callbacks=[TeacherEMA()], log_every_n_steps=1,
        logger=CSVLogger(args.output_dir), default_root_dir=args.output_dir,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(DINO(backbone, args, total_steps), loader)
    trainer.save_checkpoint(args.output_dir / "last.ckpt")  # the module's state, SERE's included
    # --8<-- [end:trainer]
    logged = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        values = ", ".join(f"{name} {value:.4f}" for name, value in logged.items())
        print(f"step {trainer.global_step}: {values}")
    return logged


if __name__ == "__main__":
    main()
