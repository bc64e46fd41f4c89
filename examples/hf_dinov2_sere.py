r"""Continued pre-training of a Hugging Face ``Dinov2Model`` with DINO + SERE.

A plain PyTorch loop around ``transformers``' DINOv2: the student is the model (from
``--pretrained NAME``, a Hub name or a local directory, or a small random configuration), the
teacher its EMA copy, both with DINO's head and loss; the augmentation is a torchvision v2
multi-crop, one ``Compose`` per view. The lines that SERE adds end with ``# SERE``:
``CropTracker`` keeps that multi-crop and records each view's box and flip, ``TokenTap`` reads
the patch tokens of the last layer (before the final layer norm, CLS and register tokens
dropped) without touching the model, and the loss and its teacher heads come in beside DINO's.
The result is saved with ``save_pretrained``, ready for ``Dinov2Model.from_pretrained``. The
loop, ``train``, takes any ``transformers`` model that ``TokenTap`` finds (``hf_dinov3_sere.py``
runs it on ``DINOv3ViTModel``).

    pip install -e ".[hf]"     # or ".[dev]"
    python examples/hf_dinov2_sere.py                       # a small random Dinov2 on a CPU
    python examples/hf_dinov2_sere.py --pretrained facebook/dinov2-small --data /path/to/train \\
        --global-px 224 --local-px 98 --batch-size 32 --steps 10000 --lr 1e-5
"""

from __future__ import annotations

import argparse
import copy
import itertools
from pathlib import Path
from typing import Any

import torch
from dino_sere import DINOHead, DINOLoss
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from training.data import SyntheticImages
from training.optim import clip_gradients, cosine_schedule, ema_update, param_groups
from training.options import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT
from transformers import Dinov2Config, Dinov2Model, PreTrainedModel

import sere_loss  # SERE
from sere_loss.transforms import CropTracker  # SERE

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


# --8<-- [start:multicrop]
class MultiCrop:
    """DINO's multi-crop in torchvision v2: two global views, ``num_local`` local ones."""

    def __init__(self, global_px: int, local_px: int, num_local: int) -> None:
        def view(px: int, scale: tuple[float, float], blur: float, solarize: float) -> Any:
            return v2.Compose([
                v2.RandomResizedCrop(px, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur),
                v2.RandomSolarize(128, p=solarize),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(**IMAGENET),
            ])  # fmt: skip

        self.views = [view(global_px, (0.32, 1), 1.0, 0.0), view(global_px, (0.32, 1), 0.1, 0.2)]
        self.views += [view(local_px, (0.05, 0.32), 0.5, 0.0)] * num_local

    def __call__(self, image: Any) -> list[Tensor]:
        """The views of one image, global views first."""
        return [view(image) for view in self.views]
        # --8<-- [end:multicrop]


def build_model(args: argparse.Namespace) -> Dinov2Model:
    """``--pretrained`` weights, or a 2-layer, 192-channel DINOv2 with 8 px patches."""
    if args.pretrained:
        return Dinov2Model.from_pretrained(args.pretrained)
    config = Dinov2Config(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, patch_size=8,
        image_size=args.global_px,
    )  # fmt: skip
    return Dinov2Model(config)


# --8<-- [start:embed]
def embed(model: PreTrainedModel, head: nn.Module, views: list[Tensor]) -> Tensor:
    """Head logits of every view from the CLS token; one forward per view size."""
    groups = [views[:2], views[2:]] if len(views) > 2 else [views]
    return torch.cat([head(model(torch.cat(g)).pooler_output) for g in groups])
    # --8<-- [end:embed]


def parse_args(
    argv: list[str] | None = None, *, model: str = "Dinov2", example: str = "facebook/dinov2-small"
) -> argparse.Namespace:
    """Command line; the defaults are a small random model on a CPU."""
    p = argparse.ArgumentParser(description=f"continued pre-training of {model} with DINO + SERE")
    p.add_argument("--pretrained", help=f"a Hub name ({example}) or a local directory")
    p.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder path")
    p.add_argument("--global-px", type=POSITIVE_INT, default=64)
    p.add_argument("--local-px", type=POSITIVE_INT, default=32)
    p.add_argument("--num-local", type=COUNT, default=4)
    p.add_argument("--out-dim", type=POSITIVE_INT, default=1024)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--steps", type=POSITIVE_INT, default=20)
    p.add_argument("--lr", type=POSITIVE, default=1e-4)
    p.add_argument("--momentum", type=FRACTION, default=0.996, help="teacher EMA, cosine to 1")
    p.add_argument("--teacher-temp", type=POSITIVE, default=0.04)
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=3.0)
    p.add_argument("--workers", type=COUNT, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", type=Path, default=Path(f"runs/hf_{model.lower()}_sere"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Train a Dinov2Model; returns every step's losses."""
    args = parse_args(argv)
    torch.manual_seed(0)
    return train(args, build_model(args))


def train(args: argparse.Namespace, model: PreTrainedModel) -> list[dict[str, float]]:
    """DINO + SERE continued pre-training of ``model``; returns every step's losses."""
    device = torch.device(args.device)
    # --8<-- [start:tracker]
    transform = MultiCrop(args.global_px, args.local_px, args.num_local)
    transform = CropTracker(transform)  # SERE: the same views, with their boxes and flips
    # --8<-- [end:tracker]
    if args.data == "synthetic":
        dataset: Any = SyntheticImages(64, size=96, transform=transform)
    else:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(args.data, transform=transform)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers,
    )  # fmt: skip

    # --8<-- [start:setup]
    student = model.to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # no dropout or drop path
    dim = student.config.hidden_size
    student_head = DINOHead(dim, args.out_dim, 2048 if args.pretrained else 256, 256).to(device)
    teacher_head = copy.deepcopy(student_head).requires_grad_(False)
    dino_loss = DINOLoss(args.out_dim, num_views=2 + args.num_local).to(device)
    sere = sere_loss.SERELoss(dim).to(device)  # SERE: both terms and their heads
    taps = sere_loss.TokenTap(student), sere_loss.TokenTap(teacher)  # SERE: after the copy
    trained = [student, student_head, sere]  # SERE: its heads train with the student
    optimizer = torch.optim.AdamW(param_groups(trained), lr=args.lr, weight_decay=0.04)
    # --8<-- [end:setup]
    lr = cosine_schedule(args.lr, 0.0, 1, args.steps, warmup_epochs=0.1)
    momentum = cosine_schedule(args.momentum, 1.0, 1, args.steps)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    history: list[dict[str, float]] = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step, (crops, _) in zip(range(args.steps), batches, strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr[step]
        # --8<-- [start:step]
        crops = crops.to(device, non_blocking=True)  # views, boxes (B, V, 4), flips (B, V)
        with autocast:
            with torch.no_grad():
                teacher_out = embed(teacher, teacher_head, crops.views[:2])
            student_out = embed(student, student_head, crops.views)
            loss = dino = dino_loss(student_out, teacher_out, teacher_temp=args.teacher_temp)
            s, t = (tap.pop() for tap in taps)  # SERE: patch tokens (B, C, H, W) per forward
            loss = loss + sere(s[0], t[0], crops.boxes, crops.flips, *s[1:])  # SERE
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
        optimizer.step()
        ema_update(teacher, student, momentum[step])
        ema_update(teacher_head, student_head, momentum[step])
        sere_loss.update_teacher(sere, momentum[step])  # SERE: its teacher heads, same EMA
        # --8<-- [end:step]
        history.append({"loss": loss.item(), "dino": dino.item()})
        print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} (dino {dino.item():.4f})")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    # --8<-- [start:save]
    student.save_pretrained(args.output_dir / "student")  # for from_pretrained
    state = {"teacher": teacher.state_dict(), "optimizer": optimizer.state_dict()}
    state["sere"] = sere.state_dict()  # SERE: its heads, the teacher's among them
    torch.save(state, args.output_dir / "checkpoint.pth")
    # --8<-- [end:save]
    return history


if __name__ == "__main__":
    main()
