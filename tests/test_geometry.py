"""Region-aligned sampling: overlap grids checked by hand, against the authors' algorithm, and
end to end on feature maps that encode their own coordinates in the original image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, random_boxes, random_flips
from sere_loss import RegionAlignedSampler
from sere_loss import functional as SF


def test_hand_computed_example() -> None:
    # Overlap x in [0.25, 0.5], y in [0, 1]; 1 x 2 cell centres at x = 0.3125, 0.4375, y = 0.5.
    b1 = torch.tensor([[0.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    b2 = torch.tensor([[0.25, 0.0, 1.0, 1.0]], dtype=torch.float64)
    g1, g2, valid = SF.overlap_grids(
        b1, torch.tensor([False]), b2, torch.tensor([True]), lattice=(1, 2)
    )
    assert valid.tolist() == [True]
    # View 1: u = 0.625, 0.875 -> 2u - 1 = 0.25, 0.75; v = 0.5 -> 0.
    assert_close(g1[0, 0], torch.tensor([[0.25, 0.0], [0.75, 0.0]], dtype=torch.float64))
    # View 2 (x0 = 0.25, width 0.75, flipped): u = 1/12, 1/4 -> 11/12, 3/4 -> 5/6, 1/2.
    assert_close(g2[0, 0], torch.tensor([[5 / 6, 0.0], [0.5, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("points", ["center", "official"])
def test_disjoint_and_touching_boxes_are_invalid(points: str) -> None:
    b1 = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.5, 1.0], [0.1, 0.1, 0.9, 0.9]])
    b2 = torch.tensor([[0.6, 0.6, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    no = torch.zeros(3, dtype=torch.bool)
    g1, g2, valid = SF.overlap_grids(b1, no, b2, no, lattice=3, points=points)
    assert valid.tolist() == [False, False, True]
    assert torch.all(g1[:2] == -2)
    assert torch.all(g2[:2] == -2)
    assert torch.all(g1[2].abs() <= 1)
    assert torch.all(g2[2].abs() <= 1)


def _authors_get_grid(
    rect_q: tuple[int, int, int, int, bool], rect_k: tuple[int, int, int, int, bool], side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' lattice, restated from its description (SPEC 4): crops as pixel rectangles
    (x, y, w, h, flip), points spaced edge to edge over the overlap (step len / (side - 1)),
    u -> 1 - u when flipped, then 2u - 1; a -2 fill when the rectangles do not overlap."""
    ox0, oy0 = max(rect_q[0], rect_k[0]), max(rect_q[1], rect_k[1])
    ox1 = min(rect_q[0] + rect_q[2], rect_k[0] + rect_k[2])
    oy1 = min(rect_q[1] + rect_q[3], rect_k[1] + rect_k[3])
    if not (ox0 < ox1 and oy0 < oy1):
        full = torch.full((side, side, 2), -2.0, dtype=torch.float64)
        return full, full.clone()
    grids = []
    for x, y, w, h, flip in (rect_q, rect_k):
        grid = torch.empty(side, side, 2, dtype=torch.float64)
        for i in range(side):
            for j in range(side):
                u = (ox0 - x) / w + j * ((ox1 - ox0) / w) / (side - 1)
                v = (oy0 - y) / h + i * ((oy1 - oy0) / h) / (side - 1)
                grid[i, j, 0] = 2 * (1 - u if flip else u) - 1
                grid[i, j, 1] = 2 * v - 1
        grids.append(grid)
    return grids[0], grids[1]


def _random_rect(gen: torch.Generator, width: int, height: int) -> tuple[int, int, int, int, bool]:
    w = int(torch.randint(8, width + 1, (1,), generator=gen))
    h = int(torch.randint(8, height + 1, (1,), generator=gen))
    x = int(torch.randint(0, width - w + 1, (1,), generator=gen))
    y = int(torch.randint(0, height - h + 1, (1,), generator=gen))
    return x, y, w, h, bool(torch.rand(1, generator=gen) < 0.5)


@pytest.mark.parametrize("side", [13, 6, 2])
def test_official_points_reproduce_the_authors_lattice(gen: torch.Generator, side: int) -> None:
    width, height = 320, 240
    rects = [
        (_random_rect(gen, width, height), _random_rect(gen, width, height)) for _ in range(24)
    ]

    def norm(r: tuple[int, int, int, int, bool]) -> list[float]:
        return [r[0] / width, r[1] / height, (r[0] + r[2]) / width, (r[1] + r[3]) / height]

    b1 = torch.tensor([norm(q) for q, _ in rects], dtype=torch.float64)
    b2 = torch.tensor([norm(k) for _, k in rects], dtype=torch.float64)
    f1 = torch.tensor([q[4] for q, _ in rects])
    f2 = torch.tensor([k[4] for _, k in rects])
    g1, g2, valid = SF.overlap_grids(b1, f1, b2, f2, lattice=side, points="official")
    assert 0 < int(valid.sum()) < len(rects), "the draw should hold overlapping and disjoint pairs"
    for n, (q, k) in enumerate(rects):
        e1, e2 = _authors_get_grid(q, k, side)
        assert_close(g1[n], e1)
        assert_close(g2[n], e2)


def _coordinate_maps(
    boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """What a view of a coordinate-encoding image looks like: (B, 2, H, W) maps whose pixel
    (r, c) holds the original-image (x, y) of its centre, mirrored for flipped views."""
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    maps = []
    for box, flip in zip(boxes, flips, strict=True):
        uu = 1 - u if flip else u
        x = box[0] + uu * (box[2] - box[0])
        y = box[1] + v * (box[3] - box[1])
        maps.append(torch.stack([x[None, :].expand(height, -1), y[:, None].expand(-1, width)]))
    return torch.stack(maps)


def _lattice(lo: float, hi: float, n: int, points: str) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    t = (k + 0.5) / n if points == "center" else k / (n - 1)
    return lo + t * (hi - lo)


@pytest.mark.parametrize("points", ["center", "official"])
def test_both_views_read_the_same_original_point(gen: torch.Generator, points: str) -> None:
    # End to end: sampling each view at its grid must read, from both views, the original-image
    # point of the lattice over the overlap. Bilinear reading of a linear map is exact between
    # pixel centres, so only points within half a pixel of a view's border are left out.
    batch, lattice = 32, (5, 7)
    boxes = random_boxes(batch, 2, min_size=0.3, generator=gen)
    flips = random_flips(batch, 2, generator=gen)
    sampler = RegionAlignedSampler(lattice, points=points)
    m1 = _coordinate_maps(boxes[:, 0], flips[:, 0], 48, 40)
    m2 = _coordinate_maps(boxes[:, 1], flips[:, 1], 24, 32)
    s1, s2, valid = sampler(m1, m2, boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1])
    g1, g2, _ = SF.overlap_grids(
        boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], lattice, points
    )
    checked = 0
    for n in range(batch):
        if not valid[n]:
            continue
        lo = torch.maximum(boxes[n, 0, :2], boxes[n, 1, :2])
        hi = torch.minimum(boxes[n, 0, 2:], boxes[n, 1, 2:])
        xs = _lattice(float(lo[0]), float(hi[0]), lattice[1], points)
        ys = _lattice(float(lo[1]), float(hi[1]), lattice[0], points)
        expected = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        for grid, sampled, (h, w) in ((g1, s1, (48, 40)), (g2, s2, (24, 32))):
            inside = (grid[n].reshape(-1, 2).abs() <= torch.tensor([1 - 1 / w, 1 - 1 / h])).all(1)
            assert_close(sampled[n][inside], expected[inside])
            checked += int(inside.sum())
    assert checked > batch * 20, "too few points were checked for the test to mean anything"


def _relate_then_sample(
    features: torch.Tensor, grid: torch.Tensor, heads: int, padding: str
) -> torch.Tensor:
    """The authors' route (SPEC 4): full N x N relation per head, then bilinear sampling of its
    columns and of its rows on the same grid."""
    b, c, h, w = features.shape
    d = c // heads
    tokens = features.flatten(2).transpose(1, 2).reshape(b, h * w, heads, d)
    full = torch.einsum("bnmd,bkmd->bmnk", tokens, tokens) / math.sqrt(d)  # (B, M, N, N)
    hs, ws = grid.shape[1:3]

    def sample_last(rel: torch.Tensor) -> torch.Tensor:  # (B, M, R, N) -> (B, M, R, S)
        rows = rel.shape[2]
        maps = rel.reshape(b, heads * rows, h, w)
        out = F.grid_sample(maps, grid, mode="bilinear", padding_mode=padding, align_corners=False)
        return out.reshape(b, heads, rows, hs * ws)

    cols = sample_last(full)  # (B, M, N, S)
    return sample_last(cols.transpose(2, 3))  # (B, M, S, S), symmetric


@pytest.mark.parametrize(
    ("points", "padding"), [("official", "zeros"), ("center", "border"), ("center", "zeros")]
)
def test_sample_then_relate_equals_relate_then_sample(
    gen: torch.Generator, points: str, padding: str
) -> None:
    batch, heads = 16, 3
    boxes = random_boxes(batch, 2, generator=gen)
    flips = random_flips(batch, 2, generator=gen)
    f1 = torch.randn(batch, 12, 7, 7, dtype=torch.float64, generator=gen)
    f2 = torch.randn(batch, 12, 5, 6, dtype=torch.float64, generator=gen)
    g1, g2, valid = SF.overlap_grids(
        boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], lattice=6, points=points
    )
    assert bool(valid.any())
    for feats, grid in ((f1, g1), (f2, g2)):
        fast = SF.spatial_relation(SF.sample_region(feats, grid, padding), heads)
        torch.testing.assert_close(
            fast, _relate_then_sample(feats, grid, heads, padding), atol=1e-6, rtol=1e-6
        )


def test_official_needs_two_points_per_side() -> None:
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    f = torch.tensor([False])
    with pytest.raises(ValueError, match="lattice >= \\(2, 2\\)"):
        SF.overlap_grids(b, f, b, f, lattice=(1, 3), points="official")


def test_grids_follow_box_dtype_and_flips_accept_integers() -> None:
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    g1, g2, _ = SF.overlap_grids(b, torch.tensor([1]), b, torch.tensor([0]), lattice=2)
    assert g1.dtype == torch.float64
    assert_close(g1[..., 0], -g2[..., 0])  # the flipped view reads mirrored x
