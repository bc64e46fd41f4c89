"""The signatures of broken runs that the docs give (Getting started: healthy values).

Each common failure leaves a mark on the logged ``spatial`` and ``channel`` terms; the page
states the mark, and each test here holds one of them on a setting small enough to run in a
second, against a working twin of the same setting:

* a collapsed relation: a student backbone that gives the same token everywhere scores the flat
  values, ``mean ln S`` and ``ln C``, exactly, whatever the teacher;
* no SERE gradient: a loss that is logged but left out of the backward (or tokens cut from the
  graph) leaves the terms where they started, while the same loop with the gradient lowers them;
* a wrong grid: views read at the wrong places (flips dropped, a grid given transposed) raise
  the spatial term above what the same features give with the right geometry, and leave the
  channel term, which has no lattice, exactly as it was.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import sere_loss
from sere_loss import ChannelSelfRelationLoss, SERELoss, SpatialSelfRelationLoss

# The tiny preset's shapes: 2 global views of 8 x 8 tokens, 4 local views of 4 x 4, 96 channels.
B, C, HEADS = 4, 96, 3
FLAT_SPATIAL = (2 * math.log(49) + 8 * math.log(16)) / 10  # 7 x 7 and 4 x 4 lattices
GLOBAL_BOXES = [[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0]]
LOCAL_BOXES = [
    [0.1, 0.1, 0.5, 0.5],
    [0.4, 0.2, 0.8, 0.6],
    [0.3, 0.5, 0.7, 0.9],
    [0.2, 0.3, 0.6, 0.7],
]
BOXES = torch.tensor([*GLOBAL_BOXES, *LOCAL_BOXES]).expand(B, 6, 4)
FLIPS = torch.tensor([False, True, False, True, True, False]).expand(B, 6)


def test_collapsed_tokens_score_the_flat_values_exactly() -> None:
    """The same token everywhere: the heads' BatchNorm makes it zero, every row is uniform, and
    the terms are ``mean ln S`` and ``ln C`` whatever the teacher."""
    torch.manual_seed(0)
    sere = SERELoss(C, num_heads=HEADS)
    one = torch.randn(1, C, 1, 1)  # a collapsed backbone: one output for every patch and image
    collapsed = one.expand(2 * B, C, 8, 8).clone().requires_grad_()
    local = one.expand(4 * B, C, 4, 4).clone()
    teacher = torch.randn(2 * B, C, 8, 8)
    _, terms = sere(collapsed, teacher, BOXES, FLIPS, local, return_terms=True)
    assert abs(terms["spatial"].item() - FLAT_SPATIAL) < 1e-5
    assert abs(terms["channel"].item() - math.log(C)) < 1e-5

    # A working backbone at initialisation: near the flat values, never on them.
    tokens = torch.randn(2 * B, C, 8, 8, requires_grad=True)
    args = (tokens, teacher, BOXES, FLIPS, torch.randn(4 * B, C, 4, 4))
    _, healthy = sere(*args, return_terms=True)
    assert 1e-3 < abs(healthy["spatial"].item() - FLAT_SPATIAL) < 0.2
    assert 1e-3 < abs(healthy["channel"].item() - math.log(C)) < 0.2


def _train(steps: int, backprop: bool) -> list[float]:
    """A linear 'backbone' on one fixed batch, its EMA teacher and SERE: the logged spatial term."""
    torch.manual_seed(0)
    inputs = torch.randn(2 * B, 64, C)  # 2 global views of 8 x 8 tokens
    local_inputs = torch.randn(4 * B, 16, C)
    backbone = nn.Linear(C, C)
    teacher = nn.Linear(C, C).requires_grad_(False)
    teacher.load_state_dict(backbone.state_dict())
    sere = SERELoss(C, num_heads=HEADS)
    optimizer = torch.optim.Adam([*backbone.parameters(), *sere.parameters()], lr=1e-2)
    logged = []
    for _ in range(steps):
        with torch.no_grad():
            t = teacher(inputs)
        args = (backbone(inputs), t, BOXES, FLIPS, backbone(local_inputs))
        loss, terms = sere(*args, return_terms=True)
        logged.append(terms["spatial"].item())
        if backprop:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for p_t, p_s in zip(teacher.parameters(), backbone.parameters(), strict=True):
                p_t.mul_(0.99).add_(p_s, alpha=0.01)
        sere_loss.update_teacher(sere, 0.99)
    return logged


def test_no_sere_gradient_leaves_the_terms_where_they_start() -> None:
    healthy = _train(40, backprop=True)
    logged_only = _train(40, backprop=False)
    assert healthy[0] == logged_only[0]  # the same start
    assert healthy[-1] < healthy[0] - 0.05  # the gradient lowers the term
    assert max(abs(v - logged_only[0]) for v in logged_only) < 1e-4  # without it, it stays


def _position_tokens(boxes: Tensor, flips: Tensor, grid: tuple[int, int]) -> Tensor:
    """Tokens that encode where they are in the original image: smooth features of (x, y).

    ``boxes`` ``(B, 4)``, ``flips`` ``(B,)``; returns maps ``(B, C, H, W)``. A token at the
    centre ``(u, v)`` of its cell in the view (``u -> 1 - u`` when flipped) sits at
    ``x = x0 + u (x1 - x0)`` in the image, and its features are ``sin(2 pi k . (x, y) + phase)``.
    """
    gen = torch.Generator().manual_seed(1)
    freq = torch.randn(C, 2, generator=gen) * 1.5
    phase = torch.rand(C, generator=gen) * 2 * math.pi
    h, w = grid
    v, u = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    maps = []
    for box, flipped in zip(boxes, flips, strict=True):
        uu = 1 - u if flipped else u
        x = box[0] + uu * (box[2] - box[0])
        y = box[1] + v * (box[3] - box[1])
        angle = 2 * math.pi * (freq[:, 0, None, None] * x + freq[:, 1, None, None] * y)
        maps.append(3 * torch.sin(angle + phase[:, None, None]))  # sharp relations
    return torch.stack(maps)


def test_a_wrong_grid_raises_the_spatial_term_and_not_the_channel_term() -> None:
    """The same features read with the right geometry, without the flips, and transposed."""
    grid = (6, 8)  # non-square views: 6 x 8 tokens
    boxes, flips = BOXES[:, :2].reshape(-1, 4), FLIPS[:, :2].reshape(-1)
    # Views of one image, the teacher's and the student's: identical features (no heads), so
    # with the right geometry the relations agree up to the bilinear reads.
    maps = _position_tokens(boxes, flips, grid).reshape(B, 2, C, *grid).transpose(0, 1)
    views = maps.reshape(2 * B, C, *grid)
    tokens = views.flatten(2).transpose(1, 2)  # (2B, 48, C), as a ViT gives them
    identity = {"projection": nn.Identity(), "prediction": nn.Identity(), "local_heads": False}
    temps = {"teacher_temp": 1.0, "student_temp": 1.0}  # so the term is least when rows agree
    spatial = SpatialSelfRelationLoss(C, HEADS, **temps, **identity)
    channel = ChannelSelfRelationLoss(C, **temps, **identity)
    geometry = (BOXES[:, :2], FLIPS[:, :2])

    right = spatial(tokens, tokens, *geometry, global_grid=grid).item()
    no_flips = spatial(tokens, tokens, geometry[0], torch.zeros_like(geometry[1]), global_grid=grid)
    transposed = spatial(tokens, tokens, *geometry, global_grid=grid[::-1]).item()
    flat = math.log(7 * 5)  # the lattice between two 6 x 8 grids: 5 x 7 points
    excess = {"flips dropped": no_flips.item() - right, "transposed": transposed - right}
    for name, value in excess.items():
        assert value > 0.05 * flat, f"{name}: {value}"

    # The channel term reads no lattice: a wrong grid (here the tokens read in another order)
    # leaves it as it was, to rounding.
    reordered = tokens.flip(1)
    torch.testing.assert_close(channel(reordered, reordered), channel(tokens, tokens))
