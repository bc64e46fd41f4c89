"""SERE added to a DINO loop built from another library's parts: lightly's.

The loop follows lightly's own DINO example: lightly's ``DINOProjectionHead``, ``DINOLoss``,
``update_momentum`` and ``cosine_schedule`` around a timm ViT, one view at a time. The lines
that SERE adds end with ``# SERE``; without them this is plain lightly DINO. One more line
changes: lightly's ``DINOTransform`` does not say where its crops came from, so the crops come
from ``sere_loss.transforms.dino_sere_transform``, the same multi-crop recipe that also records
each view's crop box and flip.

    pip install lightly            # or: pip install -e ".[dev]", which includes it
    python examples/lightly_dino_sere.py              # a tiny ViT on synthetic images, CPU
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import SyntheticImages
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sere_loss import SERELoss  # SERE
from sere_loss.transforms import dino_sere_transform  # SERE: crops with their boxes and flips


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

    @staticmethod
    def _embed(backbone: VisionTransformer, head: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        final, (patches,) = backbone.forward_intermediates(
            x, indices=1, norm=False, output_fmt="NLC"
        )  # patches: the last block's patch tokens before the final norm, (B, N, C)
        return head(backbone.forward_head(final, pre_logits=True)), patches

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The student's head output and patch tokens for one view."""
        return self._embed(self.student_backbone, self.student_head, x)

    def forward_teacher(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's head output and patch tokens for one view."""
        return self._embed(self.teacher_backbone, self.teacher_head, x)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the loss of every step."""
    parser = argparse.ArgumentParser(description="lightly DINO + SERE")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps")
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
    transform = dino_sere_transform(global_size=64, local_size=32)  # SERE: was DINOTransform
    dataset = SyntheticImages(128, size=96, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=1).to(device)
    sere = SERELoss(backbone.embed_dim, num_heads=3).to(device)  # SERE: the ViT's heads; grids 7, 4
    params = [*model.parameters(), *sere.parameters()]  # SERE: its heads train too
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)

    losses: list[float] = []
    steps = args.epochs * len(loader)
    for epoch in range(args.epochs):
        for crops, _ in loader:
            step = len(losses)
            if args.max_steps is not None and step >= args.max_steps:
                return losses
            momentum = cosine_schedule(step, steps, 0.996, 1.0)
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
            update_momentum(model.student_head, model.teacher_head, m=momentum)
            sere.update_teacher(momentum)  # SERE: the teacher's relation heads, the same EMA
            views = [view.to(device) for view in crops.views]
            teacher = [model.forward_teacher(view) for view in views[:2]]
            student = [model.forward(view) for view in views]
            loss = criterion([t[0] for t in teacher], [s[0] for s in student], epoch=epoch)
            s_tokens, t_tokens = [s[1] for s in student], [t[1] for t in teacher]  # SERE
            geometry = crops.boxes.to(device), crops.flips.to(device)  # SERE
            loss = loss + sere(s_tokens[:2], t_tokens, *geometry, s_tokens[2:])  # SERE
            loss.backward()
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
