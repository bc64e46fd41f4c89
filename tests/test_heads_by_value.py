"""SERE's heads inside the loss, held by value to a statement of them written here.

Two bugs in the heads passed every other test (issue 23, found by mutating the library): the
teacher branch running the student's projection, and BatchNorm taking its statistics per view
rather than over all the views of one branch. Each changes the loss's value, so the tests below
compute the heads by hand (BatchNorm over every token of the branch, the teacher's own
parameters), feed them to the whole-batch references of ``test_losses.py``, and require the
module's loss to match; the parameters of each head are made to differ (the teacher's from the
student's) and the views to differ in scale, so that either bug moves the value.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_close
from sere_loss import SERELoss
from test_losses import _reference_channel, _reference_spatial

DIM, HEADS, B, L = 12, 3, 3, 2


def _batch_norm(tokens: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """BatchNorm in training: statistics over every row of ``tokens`` ``(rows, C)``, biased."""
    mean, var = tokens.mean(0), tokens.var(0, unbiased=False)
    return (tokens - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def _norm(head: nn.Module) -> nn.BatchNorm1d:
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 1, head
    return norms[0]


def _projection(views: list[torch.Tensor], head: nn.Module) -> list[torch.Tensor]:
    """BatchNorm and ReLU over the tokens of all ``views`` together (one branch)."""
    joined = torch.cat(views).reshape(-1, DIM)
    out = torch.relu(_batch_norm(joined, _norm(head)))
    return list(out.reshape(len(views) * B, -1, DIM).split(B))


def _prediction(views: list[torch.Tensor], head: nn.Module) -> list[torch.Tensor]:
    """Linear without bias, BatchNorm over all the views' tokens, ReLU."""
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    joined = torch.cat(views).reshape(-1, DIM) @ linear.weight.T
    out = torch.relu(_batch_norm(joined, _norm(head)))
    return list(out.reshape(len(views) * B, -1, DIM).split(B))


def _scramble(module: nn.Module, gen: torch.Generator) -> None:
    """Every parameter of every head a value of its own: the teacher's differ from the student's."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _views(gen: torch.Generator, count: int, tokens: int) -> list[torch.Tensor]:
    """Views of different scale and offset, so that statistics per view differ from joint ones."""
    return [
        (1 + 2 * v) * torch.randn(B, tokens, DIM, generator=gen, dtype=torch.float64) + v
        for v in range(count)
    ]


@pytest.mark.parametrize("local", [False, True], ids=["globals", "with-locals"])
def test_sere_heads_are_the_teachers_own_with_statistics_over_each_branch(
    gen: torch.Generator, local: bool
) -> None:
    student, teacher = _views(gen, 2, 49), _views(gen, 2, 49)
    local_views = _views(gen, L, 9) if local else []
    lo = 0.4 * torch.rand(B, 2 + len(local_views), 2, generator=gen, dtype=torch.float64)
    hi = 0.6 + 0.4 * torch.rand(B, 2 + len(local_views), 2, generator=gen, dtype=torch.float64)
    boxes = torch.cat([lo, hi], -1)  # every pair overlaps in [0.4, 0.6]^2
    flips = torch.rand(B, 2 + len(local_views), generator=gen) < 0.5
    sere = SERELoss(
        DIM, num_heads=HEADS, recipe="paper"
    ).double()  # the oracle below: centres, border
    _scramble(sere, gen)
    extra = (torch.cat(local_views),) if local else ()
    _, terms = sere(torch.cat(student), torch.cat(teacher), boxes, flips, *extra, return_terms=True)

    for name in ("spatial", "channel"):
        heads = getattr(sere, name).heads
        t = _projection(teacher, heads.teacher_projection)
        s = _prediction(_projection(student, heads.projection), heads.prediction)
        if local:
            s += _prediction(
                _projection(local_views, heads.local_projection), heads.local_prediction
            )
        if name == "spatial":
            lattices = ((6, 6), (3, 3))  # the token grids: 7 x 7 minus one, and 3 x 3
            expected = _reference_spatial(
                s, t, boxes, flips, points="center", padding="border", lattices=lattices
            )
        else:
            expected = _reference_channel(s, t)
        assert math.isfinite(float(expected.detach()))
        assert_close(terms[name].double(), expected, atol=1e-9, rtol=1e-9)


def test_the_teacher_heads_are_not_the_students(gen: torch.Generator) -> None:
    # The direct statement of the first hole: the teacher's features come from the teacher's
    # projection, whatever the student's holds.
    sere = SERELoss(DIM, num_heads=HEADS).double()
    _scramble(sere, gen)
    tokens = _views(gen, 2, 16)
    for name in ("spatial", "channel"):
        heads = getattr(sere, name).heads
        expected = torch.cat(_projection(tokens, heads.teacher_projection))
        assert_close(heads.teacher(torch.cat(tokens)), expected, atol=1e-9, rtol=1e-9)
