"""A minimal DINO loop with SERE added, on synthetic images, small enough for a CPU.

Every line that SERE adds ends with ``# SERE``: that is the whole integration. The full DINO
trainer (timm ViT, schedules, checkpoints, multi-GPU) comes with the examples of later releases;
this one keeps DINO to its bones so the SERE lines stand out.

    python examples/minimal_dino_sere.py --steps 10
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from sere_loss import SERELoss  # SERE


def synthetic_image(gen: torch.Generator, size: int = 96) -> Tensor:
    """A background colour and a few coloured rectangles: objects for crops to share."""
    img = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone()
    for _ in range(4):
        x0, y0 = torch.randint(0, size - 16, (2,), generator=gen).tolist()
        w, h = torch.randint(12, 48, (2,), generator=gen).tolist()
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=gen)
    return img


def crop(img: Tensor, out: int, scale: tuple[float, float]) -> tuple[Tensor, list[float], bool]:
    """Random resized crop and flip; returns the view, its box in the image and the flip."""
    top, left, h, w = T.RandomResizedCrop.get_params(img, scale=list(scale), ratio=[3 / 4, 4 / 3])
    view = TF.resized_crop(img, top, left, h, w, [out, out], antialias=True)
    flip = bool(torch.rand(()) < 0.5)
    if flip:
        view = TF.horizontal_flip(view)
    height, width = img.shape[-2:]
    box = [left / width, top / height, (left + w) / width, (top + h) / height]  # SERE
    return view, box, flip


def multicrop(images: list[Tensor], n_local: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """2 global 64 px and ``n_local`` local 32 px views per image, with boxes and flips."""
    views: list[list[Tensor]] = [[] for _ in range(2 + n_local)]
    boxes, flips = [], []
    for img in images:
        row_boxes, row_flips = [], []
        for v in range(2 + n_local):
            size, scale = (64, (0.35, 1.0)) if v < 2 else (32, (0.05, 0.35))
            view, box, flip = crop(img, size, scale)
            views[v].append(view)
            row_boxes.append(box)
            row_flips.append(flip)
        boxes.append(row_boxes)
        flips.append(row_flips)
    return [torch.stack(v) for v in views], torch.tensor(boxes), torch.tensor(flips)


class TinyViT(nn.Module):
    """A small ViT returning the CLS embedding and the patch tokens before the final norm."""

    def __init__(self, dim: int = 96, depth: int = 3, heads: int = 3, patch: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, dim, 8, 8))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, 0.0, "gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, 3, H, W)`` -> CLS ``(B, dim)`` and patch tokens ``(B, N, dim)``."""
        x = self.embed(x)
        x = x + F.interpolate(self.pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = self.blocks(x)
        return self.norm(x[:, 0]), x[:, 1:]


class DINOHead(nn.Module):
    """DINO's projection head, shrunk: MLP, l2 normalisation, linear to prototypes."""

    def __init__(self, dim: int, out: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 64))
        self.last = nn.Linear(64, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(B, dim)`` -> prototype logits ``(B, out)``."""
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Model(nn.Module):
    """Backbone plus DINO head, as DINO's student and teacher."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = TinyViT(), DINOHead(96)

    def forward(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run views of one resolution together (as DINO does); logits and patch tokens."""
        logits, tokens = [], []
        for size in dict.fromkeys(v.shape[-1] for v in views):
            batch = torch.cat([v for v in views if v.shape[-1] == size])
            cls, patches = self.backbone(batch)
            logits.append(self.head(cls))
            tokens.append(patches)
        return logits, tokens


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, n_views: int) -> Tensor:
    """DINO's cross-entropy between centred, sharpened teacher and student, over view pairs."""
    s = (student / 0.1).log_softmax(-1).chunk(n_views)
    t = ((teacher - center) / 0.04).softmax(-1).chunk(2)
    terms = [
        -(ti * s[v]).sum(-1).mean() for i, ti in enumerate(t) for v in range(n_views) if v != i
    ]
    return torch.stack(terms).mean()


def main() -> None:
    """Train for a few steps and print every loss term."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--no-sere", action="store_true", help="the DINO baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    student = Model()
    teacher = copy.deepcopy(student).requires_grad_(False)
    sere = SERELoss(dim=96, alpha=1.0, beta=1.0, global_size=7, local_size=3)  # SERE
    # SERE: the heads train with the student; the teacher heads are frozen and get no grad.
    params = [*student.parameters(), *sere.parameters()]  # SERE
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04)
    center = torch.zeros(256)
    n_views = 2 + args.local_crops

    for step in range(args.steps):
        images = [synthetic_image(gen) for _ in range(args.batch_size)]
        views, boxes, flips = multicrop(images, args.local_crops)  # SERE: boxes, flips
        s_logits, s_tokens = student(views)
        with torch.no_grad():
            t_logits, t_tokens = teacher(views[:2])
        loss_dino = dino_loss(torch.cat(s_logits), t_logits[0], center, n_views)
        loss = loss_dino
        if not args.no_sere:
            # SERE: patch tokens of the global views (student, teacher) and of the local views.
            sere_out = sere(s_tokens[0], t_tokens[0], boxes, flips, s_tokens[1], return_terms=True)
            loss = loss + sere_out[0]  # SERE
            terms = sere_out[1]  # SERE: unweighted spatial and channel values, for logging
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            m = 0.996
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            sere.update_teacher(m)  # SERE
            center = 0.9 * center + 0.1 * t_logits[0].mean(0)
        line = f"step {step:3d}  loss {loss.item():.4f}  dino {loss_dino.item():.4f}"
        if not args.no_sere:
            line += (
                f"  spatial {terms['spatial'].item():.4f}  channel {terms['channel'].item():.4f}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
