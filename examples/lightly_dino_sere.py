"""SERE added to a DINO loop built from another library's parts: lightly's.

The loop follows lightly's own DINO example: lightly's ``DINOTransform``, ``DINOProjectionHead``,
``DINOLoss``, ``update_momentum`` and ``cosine_schedule`` around a timm ViT, one view at a time.
The lines that SERE adds end with ``# SERE``; without them this is plain lightly DINO. lightly's
transform stays: ``CropTracker`` runs it unchanged (the same random draws, the same views) and
records each view's crop box and flip, and ``TokenTap`` reads the backbones' patch tokens
without a change to the model.

    pip install lightly            # or: pip install -e ".[dev]", which includes it
    python examples/lightly_dino_sere.py              # a tiny ViT on synthetic images, CPU
"""

from __future__ import annotations

import argparse
import copy

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.transforms import v2
from training.data import SyntheticImages
from training.options import POSITIVE_INT

import sere_loss  # SERE
from sere_loss.transforms import CropTracker  # SERE


# --8<-- [start:model]
class DINO(nn.Module):
    """Student and teacher, each a ViT and a lightly DINO head; the teacher is not trained."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, 512, 64, 2048, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(dim, 512, 64, 2048)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: Tensor) -> Tensor:
        """The student's head output for one view."""
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x: Tensor) -> Tensor:
        """The teacher's head output for one view."""
        return self.teacher_head(self.teacher_backbone(x))
        # --8<-- [end:model]


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the loss of every step."""
    parser = argparse.ArgumentParser(description="lightly DINO + SERE")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=2)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    parser.add_argument("--max-steps", type=POSITIVE_INT, help="stop after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    # 64 px global views (8 x 8 tokens of 8 px) and 32 px local ones (4 x 4).
    backbone = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0,
        dynamic_img_size=True,
    )  # fmt: skip
    model = DINO(backbone).to(device)
    # --8<-- [start:data]
    # lightly's transforms take PIL images, as lightly's datasets give them.
    transform = DINOTransform(global_crop_size=64, local_crop_size=32)
    transform = v2.Compose([v2.ToPILImage(), transform])
    transform = CropTracker(transform)  # SERE: the same views, with their boxes and flips
    # --8<-- [end:data]
    dataset = SyntheticImages(128, size=96, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    # --8<-- [start:build]
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=1).to(device)
    taps = [sere_loss.TokenTap(b) for b in (model.student_backbone, model.teacher_backbone)]  # SERE
    sere = sere_loss.SERELoss(taps[0].dim, num_heads=taps[0].num_heads).to(device)  # SERE
    params = [*model.parameters(), *sere.parameters()]  # SERE: its heads train too
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    # --8<-- [end:build]

    losses: list[float] = []
    steps = args.epochs * len(loader)
    # --8<-- [start:loop]
    for epoch in range(args.epochs):
        for crops, _ in loader:
            step = len(losses)
            if args.max_steps is not None and step >= args.max_steps:
                return losses
            momentum = cosine_schedule(step, steps, 0.996, 1.0)
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
            update_momentum(model.student_head, model.teacher_head, m=momentum)
            sere_loss.update_teacher(sere, momentum)  # SERE: its teacher heads, the same EMA
            crops = crops.to(device)  # the views, and each view's box and flip
            teacher = [model.forward_teacher(view) for view in crops.views[:2]]
            student = [model.forward(view) for view in crops.views]
            loss = criterion(teacher, student, epoch=epoch)
            s, t = (tap.pop() for tap in taps)  # SERE: patch tokens (B, C, H, W), one per view
            loss = loss + sere(s[:2], t, crops.boxes, crops.flips, s[2:])  # SERE
            loss.backward()
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            # --8<-- [end:loop]
    return losses


if __name__ == "__main__":
    main()
