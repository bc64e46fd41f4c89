r"""Continued pre-training of a Hugging Face ``DINOv3ViTModel`` with DINO + SERE.

The loop is ``hf_dinov2_sere.py``'s ``train``, unchanged: ``TokenTap`` finds DINOv3 by itself
(its blocks, CLS and 4 register tokens before the patches, RoPE over the patch grid, so views
of any size that is a multiple of the 16 px patch), and the rest (DINO's head and loss,
``CropTracker`` on a torchvision v2 multi-crop, SERE's loss and EMA) is the same. This file only
builds the model: ``--pretrained NAME`` (a Hub name or a local directory), or a small random
configuration, as the tests use it.

    pip install -e ".[hf]"     # or ".[dev]"
    python examples/hf_dinov3_sere.py                       # a small random DINOv3 on a CPU
    python examples/hf_dinov3_sere.py --pretrained facebook/dinov3-vits16-pretrain-lvd1689m \\
        --data /path/to/train --global-px 256 --local-px 112 --batch-size 32 --steps 10000 \\
        --lr 1e-5
"""

from __future__ import annotations

import argparse

import torch
from hf_dinov2_sere import parse_args, train
from transformers import DINOv3ViTConfig, DINOv3ViTModel


# --8<-- [start:model]
def build_model(args: argparse.Namespace) -> DINOv3ViTModel:
    """``--pretrained`` weights, or a 2-layer, 192-channel DINOv3 with 8 px patches."""
    if args.pretrained:
        return DINOv3ViTModel.from_pretrained(args.pretrained)
    config = DINOv3ViTConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
        patch_size=8, image_size=args.global_px, num_register_tokens=4,
    )  # fmt: skip
    return DINOv3ViTModel(config)
    # --8<-- [end:model]


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Train a DINOv3ViTModel; returns every step's losses."""
    args = parse_args(argv, model="DINOv3", example="facebook/dinov3-vits16-pretrain-lvd1689m")
    torch.manual_seed(0)
    return train(args, build_model(args))


if __name__ == "__main__":
    main()
