"""Property tests over shapes, boxes and flips (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sere_loss import SERELoss
from sere_loss import functional as SF

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def boxes_and_flips(draw: st.DrawFn, batch: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes anywhere in the unit square (tiny, huge, disjoint, touching), random flips."""
    rows = []
    for _ in range(batch * views):
        x = sorted(draw(st.lists(st.floats(0, 1, width=32), min_size=2, max_size=2, unique=True)))
        y = sorted(draw(st.lists(st.floats(0, 1, width=32), min_size=2, max_size=2, unique=True)))
        rows.append([x[0], y[0], x[1], y[1]])
    flips = draw(st.lists(st.booleans(), min_size=batch * views, max_size=batch * views))
    return (
        torch.tensor(rows, dtype=torch.float32).view(batch, views, 4),
        torch.tensor(flips).view(batch, views),
    )


@st.composite
def multicrop_batch(draw: st.DrawFn) -> dict[str, object]:
    batch = draw(st.integers(1, 3))
    num_local = draw(st.integers(0, 3))
    heads = draw(st.sampled_from([1, 2, 3]))
    dim = heads * draw(st.integers(1, 4))
    points = draw(st.sampled_from(["center", "official"]))
    least = 2 if points == "official" else 1  # lattice points per side
    # Local grids are smaller than global ones (test_errors checks it). The heads' BatchNorm
    # needs two tokens or more per group of views; the default lattices are grid - 1 (global)
    # and grid (local), so a grid must leave `least` points per side.
    least_l = max(least, 1 if num_local * batch >= 2 else 2)
    side_g = draw(st.integers(max(least + 1, least_l + 1), 6))
    side_l = draw(st.integers(least_l, side_g - 1))
    lattices = st.one_of(st.none(), st.integers(least, 7))  # derived, or any explicit one
    boxes, flips = draw(boxes_and_flips(batch, 2 + num_local))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    return {
        "dim": dim,
        "heads": heads,
        "student": scale * torch.randn(2 * batch, side_g * side_g, dim, generator=gen),
        "teacher": scale * torch.randn(2 * batch, side_g * side_g, dim, generator=gen),
        "local": scale * torch.randn(num_local * batch, side_l * side_l, dim, generator=gen)
        if num_local
        else None,
        "boxes": boxes,
        "flips": flips,
        "points": points,
        "global_lattice": draw(lattices),
        "local_lattice": draw(lattices),
        "padding": draw(st.sampled_from(["border", "zeros"])),
    }


@SETTINGS
@given(multicrop_batch())
@pytest.mark.filterwarnings("ignore:.*is denser than the .* token grid:UserWarning")
def test_loss_and_gradients_are_finite(case: dict[str, object]) -> None:
    sere = SERELoss(
        case["dim"],  # type: ignore[arg-type]
        num_heads=case["heads"],  # type: ignore[arg-type]
        points=case["points"],  # type: ignore[arg-type]
        padding=case["padding"],  # type: ignore[arg-type]
        global_lattice=case["global_lattice"],  # type: ignore[arg-type]
        local_lattice=case["local_lattice"],  # type: ignore[arg-type]
    )
    student = case["student"].requires_grad_()  # type: ignore[attr-defined]
    local = case["local"]
    if local is not None:
        local.requires_grad_()  # type: ignore[attr-defined]
    loss = sere(student, case["teacher"], case["boxes"], case["flips"], local)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    assert loss >= 0
    loss.backward()
    assert torch.isfinite(student.grad).all()
    for name, p in sere.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


@SETTINGS
@given(boxes_and_flips(batch=4, views=2), st.integers(1, 7), st.integers(1, 7))
def test_center_points_always_lie_inside_both_views(
    geometry: tuple[torch.Tensor, torch.Tensor], hs: int, ws: int
) -> None:
    boxes, flips = geometry
    g1, g2, valid = SF.overlap_grids(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], (hs, ws))
    for grid in (g1, g2):
        assert torch.isfinite(grid).all()
        assert (grid[valid].abs() <= 1 + 1e-5).all()
        assert (grid[~valid] == -2).all()
    # Sampling the same view twice: valid grids are identical up to the flip of x.
    same, same2, ok = SF.overlap_grids(boxes[:, 0], flips[:, 0], boxes[:, 0], flips[:, 0], 3)
    assert ok.all()
    assert torch.equal(same, same2)


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(2, 6),
    st.floats(0.05, 2.0),
    st.floats(0.05, 2.0),
    st.integers(0, 2**16),
)
def test_identical_relations_give_the_minimum(
    batch: int, heads: int, rows: int, ts: float, tt: float, seed: int
) -> None:
    # Student logits that equal the teacher's after both temperatures give the teacher's
    # entropy, which no other student reaches (Gibbs' inequality).
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, heads, rows, rows, dtype=torch.float64, generator=gen)
    student = teacher * (ts / tt)
    p = torch.softmax(teacher / tt, -1)
    entropy = -(p * torch.log_softmax(teacher / tt, -1)).sum(-1).mean()
    at_min = SF.relation_cross_entropy(student, teacher, ts, tt)
    torch.testing.assert_close(at_min, entropy)
    other = student + torch.randn(student.shape, dtype=torch.float64, generator=gen)
    assert SF.relation_cross_entropy(other, teacher, ts, tt) >= at_min - 1e-12
