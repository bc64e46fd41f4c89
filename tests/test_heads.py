"""SERE's heads start as the authors' do (issue 11, contract item 6).

The authors' prediction layer is a 1x1 ``nn.Conv2d`` that their code never re-initialises, so it
keeps PyTorch's default: uniform in ``(-b, b)`` with ``b = 1 / sqrt(C)`` (``kaiming_uniform_``
with ``a = sqrt(5)`` over ``C`` inputs), a standard deviation of ``b / sqrt(3) = 1 / sqrt(3 C)``,
0.029 at ``C = 384``. Their local heads are separate modules, drawn on their own.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sere_loss import PredictionHead, SpatialSelfRelationLoss
from sere_loss.heads import RelationHeads


def test_prediction_keeps_pytorchs_default_initialisation() -> None:
    torch.manual_seed(0)
    weight = PredictionHead(384)[0].weight.detach()
    bound = 1 / math.sqrt(384)
    assert float(weight.abs().max()) <= bound
    assert float(weight.abs().max()) > 0.99 * bound  # uniform up to the bound, not a normal
    assert float(weight.std()) == pytest.approx(1 / math.sqrt(3 * 384), rel=0.01)
    assert abs(float(weight.std()) - 0.0295) < 0.001  # the figure SPEC 8 quotes


def test_local_heads_are_drawn_independently() -> None:
    torch.manual_seed(0)
    heads = RelationHeads(64)
    glob = heads.prediction[0].weight.detach()
    local = heads.local_prediction[0].weight.detach()
    assert not torch.equal(glob, local)
    assert float(local.abs().max()) <= 1 / math.sqrt(64)
    # Independent draws: correlation of the two weight matrices near 0 (a copy gives 1).
    corr = torch.corrcoef(torch.stack([glob.flatten(), local.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    # Same structure, and their own BatchNorm statistics.
    assert [n for n, _ in heads.prediction.named_parameters()] == [
        n for n, _ in heads.local_prediction.named_parameters()
    ]
    assert heads.local_projection[0].bn is not heads.projection[0].bn


def test_a_custom_head_is_re_initialised_for_local_views() -> None:
    torch.manual_seed(0)
    projection = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad():
        projection[0].weight.fill_(5.0)  # a value no initialiser draws
    loss = SpatialSelfRelationLoss(8, 2, projection=projection, prediction=nn.Identity())
    assert torch.all(loss.heads.projection[0].weight.detach() == 5.0)
    assert float(loss.heads.local_projection[0].weight.detach().abs().max()) <= 1 / math.sqrt(8)
