"""Turning what a trainer hands over (views, tokens or maps) into one layout."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ._checks import check_floating, check_size, check_tensor

Views = Tensor | Sequence[Tensor]
"""What the losses take for a group of views of one batch: the views' outputs of a backbone.

Either one tensor holding the ``V`` views concatenated along dim 0, ``(V * B, T, C)`` ViT
tokens or ``(V * B, C, H, W)`` feature maps (the layout of DINO's multi-crop wrapper and of
``torch.cat(views)``), or a list (or tuple) of ``V`` tensors of batch ``B``, one per view, such
as ``TokenTap.pop()`` gives for a loop that calls the backbone once per view.
"""


def join_views(
    x: Views, num_views: int | None, batch: int | None, name: str
) -> tuple[Tensor, int, int]:
    """Return the views of ``x`` concatenated along the batch, with the view and batch counts.

    ``x`` is either one tensor holding ``V`` views concatenated along dim 0 (``(V * B, ...)``,
    the DINO layout) or a sequence of ``V`` tensors ``(B, ...)``. For a single tensor at least
    one of ``num_views`` and ``batch`` must be known; the other is derived and checked.
    """
    if isinstance(x, Tensor):
        if x.ndim == 5:
            raise ValueError(
                f"{name} must hold its views concatenated along dim 0, (V * B, T, C) tokens or "
                f"(V * B, C, H, W) maps; got shape {tuple(x.shape)}, a stack (V, B, ...): give "
                "x.flatten(0, 1)"
            )
        rows = x.shape[0] if x.ndim else 0
        known = batch if batch is not None else num_views
        if not known or rows == 0 or rows % known:
            expected = f"B={batch}" if batch is not None else f"V={num_views} views"
            raise ValueError(
                f"{name} must hold its views concatenated along dim 0, (V * B, ...) with "
                f"{expected}; got shape {tuple(x.shape)}"
            )
        views = num_views if num_views is not None else rows // known
        per_view = batch if batch is not None else rows // known
        if views * per_view != rows:
            raise ValueError(
                f"{name} must have {views} views of batch {per_view} along dim 0 "
                f"({views * per_view} rows); got shape {tuple(x.shape)}"
            )
        return x, views, per_view
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a tensor (views concatenated along dim 0) or a list of tensors, got "
            f"{type(x).__name__}"
        )
    parts = [check_tensor(v, f"{name}[{k}]") for k, v in enumerate(x)]
    if num_views is not None and len(parts) != num_views:
        raise ValueError(f"{name} must be a list of {num_views} views, got {len(parts)}")
    if not parts:
        raise ValueError(f"{name} must hold at least one view, got an empty list")
    shapes = {tuple(v.shape) for v in parts}
    if len(shapes) != 1:
        raise ValueError(f"the views of {name} must all have one shape, got {sorted(shapes)}")
    first = parts[0]
    if first.ndim == 0 or (batch is not None and first.shape[0] != batch):
        raise ValueError(
            f"each view of {name} must have batch {batch} along dim 0, got shape "
            f"{tuple(first.shape)}"
        )
    return torch.cat(parts), len(parts), first.shape[0]


def patch_tokens(x: Tensor, num_prefix_tokens: int, name: str) -> Tensor:
    """Patch tokens ``(B, N, C)`` from ViT tokens ``(B, T, C)`` or CNN maps ``(B, C, H, W)``.

    The first ``num_prefix_tokens`` tokens (CLS, registers) of ViT tokens are dropped.
    """
    check_floating(check_tensor(x, name), name)
    if x.ndim == 4:
        return rearrange(x, "b c h w -> b (h w) c")
    if x.ndim != 3:
        raise ValueError(
            f"{name} must be ViT tokens (B, T, C) or CNN feature maps (B, C, H, W), got shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"{name} has {x.shape[1]} tokens, not more than num_prefix_tokens={num_prefix_tokens}"
        )
    return x[:, num_prefix_tokens:]


def to_tokens(
    x: Tensor, num_prefix_tokens: int, grid: int | tuple[int, int] | None, name: str
) -> tuple[Tensor, tuple[int, int]]:
    """Patch tokens ``(B, N, C)`` and their grid ``(H, W)`` from tokens or feature maps.

    ``x`` is ViT tokens ``(B, T, C)``, of which the first ``num_prefix_tokens`` (CLS, registers)
    are dropped, or CNN maps ``(B, C, H, W)``. For tokens, ``grid`` says ``(H, W)``; without it
    the grid must be square.
    """
    tokens = patch_tokens(x, num_prefix_tokens, name)
    if x.ndim == 4:
        hw = (x.shape[2], x.shape[3])
        if grid is not None and check_size(grid, f"grid of {name}") != hw:
            raise ValueError(f"{name} is a feature map of grid {hw}, but the grid given is {grid}")
        return tokens, hw
    total, count = x.shape[1], tokens.shape[1]
    if grid is not None:
        h, w = check_size(grid, f"grid of {name}")
        if h * w != count:
            raise ValueError(
                f"{name} has {count} patch tokens ({total} minus {num_prefix_tokens} prefix), "
                f"which is not the grid {(h, w)} = {h * w} tokens"
            )
        return tokens, (h, w)
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(
            f"{name} has {count} patch tokens ({total} minus {num_prefix_tokens} prefix), not a "
            f"square grid; pass the grid (H, W), or set num_prefix_tokens (1 for a CLS token)"
        )
    return tokens, (side, side)


def to_maps(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """Tokens ``(B, H * W, C)`` to feature maps ``(B, C, H, W)``."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=hw[0], w=hw[1])
