"""Tiny models for the TokenTap tests (not a test module): a DINO-style ViT and multi-crop wrapper.

Written for these tests from the structure DINO and iBOT use (``patch_embed`` with an int
``patch_size``, a ``cls_token``, ``blocks`` in a ``ModuleList``, a final ``norm``; a wrapper that
runs the backbone once per crop resolution), not from their code. ``TinyViT(registers=4,
nested=True)`` has the structure of DINOv2's own ViT as its student calls it: register tokens
after CLS, a forward that takes a list of image batches, embeds each in turn and runs every
block once on the list of token tensors (``NestedBlock``: a list in, a list out, in order), and
optionally blocks grouped in chunks (``BlockChunk``, a ``ModuleList`` with a forward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), row-major over the grid


class Block(nn.Module):
    """Pre-norm transformer block; ``mix=False`` drops attention (each token on its own)."""

    def __init__(self, dim: int, heads: int, mix: bool = True) -> None:
        super().__init__()
        self.mix = mix
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.mix:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class NestedBlock(Block):
    """A block that also takes a list of token tensors and returns the list of their outputs.

    DINOv2's ``NestedTensorBlock`` runs the list as one sequence with block-diagonal attention
    (xFormers), which equals running each element on its own, as done here.
    """

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:  # type: ignore[override]
        if isinstance(x, list):
            return [super(NestedBlock, self).forward(t) for t in x]
        return super().forward(x)


class BlockChunk(nn.ModuleList):
    """Blocks run in turn: DINOv2 groups its blocks so, for FSDP to wrap each group."""

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        for block in self:
            x = block(x)
        return x


class TinyViT(nn.Module):
    """DINO-style ViT returning the CLS token after the final norm.

    ``checkpoint`` runs every block under ``torch.utils.checkpoint`` (``"reentrant"`` or
    ``"non_reentrant"``), or all blocks as one reentrant segment (``"reentrant_segment"``).
    ``registers`` adds register tokens after CLS; ``nested`` makes the blocks ``NestedBlock``s
    and lets the forward take a list of image batches (one CLS output per element, in a list);
    ``chunks`` groups the blocks in that many ``BlockChunk``s.
    """

    def __init__(
        self,
        dim: int = 24,
        depth: int = 2,
        heads: int = 3,
        patch: int = 4,
        *,
        mix: bool = True,
        checkpoint: str | None = None,
        registers: int = 0,
        nested: bool = False,
        chunks: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = dim
        self.num_heads = heads
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.num_register_tokens = registers
        self.register_tokens = (
            nn.Parameter(0.02 * torch.randn(1, registers, dim)) if registers else None
        )
        block = NestedBlock if nested else Block
        blocks = [block(dim, heads, mix) for _ in range(depth)]
        if chunks:
            size = depth // chunks
            self.blocks = nn.ModuleList(
                BlockChunk(blocks[i : i + size]) for i in range(0, depth, size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def embed(self, x: Tensor) -> Tensor:
        """Patch tokens with CLS and the registers before them: (B, 1 + R + N, C)."""
        x = self.patch_embed(x)
        prefix = [p for p in (self.cls_token, self.register_tokens) if p is not None]
        return torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1)

    def tokens(self, x: Tensor) -> Tensor:
        """The last block's output, CLS first, before the final norm: (B, 1 + R + N, C)."""
        x = self.embed(x)
        if self.checkpoint == "reentrant_segment":
            return checkpoint(self._run_blocks, x, use_reentrant=True)  # type: ignore[no-any-return]
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpoint == "reentrant")
        return x

    def _run_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, list):  # DINOv2's student: every element through each block at once
            tokens: list[Tensor] = [self.embed(images) for images in x]
            for block in self.blocks:
                tokens = block(tokens)
            return [self.norm(t)[:, 0] for t in tokens]
        return self.norm(self.tokens(x))[:, 0]


class MultiCrop(nn.Module):
    """Backbone once per run of crops of one resolution (globals, then locals), then a head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> Tensor:
        outputs, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
                outputs.append(self.backbone(torch.cat(crops[start:end])))
                start = end
        return self.head(torch.cat(outputs))  # type: ignore[no-any-return]
