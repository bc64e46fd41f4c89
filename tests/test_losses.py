"""The loss modules: pairing, averaging, masking, heads, teacher and input layouts.

The whole-batch references below follow the authors' route as SPEC 4-5 describe it (full N x N
relation per view and head, bilinear sampling of rows and columns, a Python loop over view
pairs), written here from the spec, so the modules are held to an independent statement.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close, random_boxes, random_flips
from sere_loss import (
    ChannelSelfRelationLoss,
    PredictionHead,
    ProjectionHead,
    SERELoss,
    SpatialSelfRelationLoss,
    update_teacher,
)
from sere_loss import functional as SF

DIM, HEADS, B, G, L = 12, 3, 3, 2, 2


def _full_relation(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = tokens.shape
    d = c // heads
    t = tokens.reshape(b, n, heads, d)
    return torch.einsum("bnmd,bkmd->bmnk", t, t) / math.sqrt(d)


def _sample_relation(rel: torch.Tensor, grid: torch.Tensor, hw: tuple[int, int], padding: str):
    b, m, _n, _ = rel.shape
    s = grid.shape[1] * grid.shape[2]

    def cols(r: torch.Tensor) -> torch.Tensor:
        rows = r.shape[2]
        out = F.grid_sample(
            r.reshape(b, m * rows, *hw), grid, padding_mode=padding, align_corners=False
        )
        return out.reshape(b, m, rows, s)

    return cols(cols(rel).transpose(2, 3))


def _ce_per_item(student: torch.Tensor, teacher: torch.Tensor, ts: float, tt: float):
    p = torch.softmax(teacher / tt, dim=-1)
    return -(p * torch.log_softmax(student / ts, dim=-1)).sum(-1).flatten(1).mean(1)


def _reference_spatial(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    boxes: torch.Tensor,
    flips: torch.Tensor,
    *,
    points: str,
    padding: str,
    tt: float = 0.5,
    ts: float = 1.0,
    heads: int = HEADS,
    lattices: tuple[tuple[int, int], tuple[int, int]] = ((13, 13), (6, 6)),
    grids: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Spatial loss by the authors' route; tokens already projected; mean over kept terms.

    ``lattices`` are the (global-global, global-local) lattices, ``grids`` the (global, local)
    token grids (square ones from the token counts when not given)."""
    g = len(teacher)

    def grid(tokens: torch.Tensor, v: int) -> tuple[int, int]:
        if grids is not None:
            return grids[1] if v >= g else grids[0]
        side = math.isqrt(tokens.shape[1])
        return side, side

    terms = []
    for i in range(g):
        for v in range(len(student)):
            if v == i:
                continue
            gi, gv, valid = SF.overlap_grids(
                boxes[:, i], flips[:, i], boxes[:, v], flips[:, v], lattices[v >= g], points
            )
            t_rel = _sample_relation(
                _full_relation(teacher[i], heads), gi, grid(teacher[i], i), padding
            )
            s_rel = _sample_relation(
                _full_relation(student[v], heads), gv, grid(student[v], v), padding
            )
            terms.append(_ce_per_item(s_rel, t_rel, ts, tt)[valid])
    kept = torch.cat(terms)
    return kept.mean() if kept.numel() else kept.sum()


def _reference_channel(
    student: list[torch.Tensor], teacher: list[torch.Tensor], tt: float = 0.1, ts: float = 1.0
) -> torch.Tensor:
    """Channel loss as SPEC 3 and 5 state it: c^T c / N per view, loop over pairs."""
    g = len(teacher)
    losses = []
    for i in range(g):
        t_rel = teacher[i].transpose(1, 2) @ teacher[i] / teacher[i].shape[1]
        for v in range(len(student)):
            if v == i:
                continue
            s_rel = student[v].transpose(1, 2) @ student[v] / student[v].shape[1]
            losses.append(_ce_per_item(s_rel, t_rel, ts, tt).mean())
    return torch.stack(losses).mean()


def _identity_spatial(**kw: object) -> SpatialSelfRelationLoss:
    return SpatialSelfRelationLoss(
        DIM, HEADS, projection=nn.Identity(), prediction=nn.Identity(), **kw
    )


def _views(gen: torch.Generator, n: int, tokens: int, dim: int = DIM) -> list[torch.Tensor]:
    return [torch.randn(B, tokens, dim, dtype=torch.float64, generator=gen) for _ in range(n)]


def _overlapping_geometry(gen: torch.Generator, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Every box holds the centre region [0.4, 0.6]^2, so every pair overlaps.
    lo = 0.4 * torch.rand(B, views, 2, dtype=torch.float64, generator=gen)
    hi = 0.6 + 0.4 * torch.rand(B, views, 2, dtype=torch.float64, generator=gen)
    return torch.cat([lo, hi], -1), random_flips(B, views, gen)


class TestSpatialMatchesAuthorsRoute:
    @pytest.mark.parametrize(("points", "padding"), [("official", "zeros"), ("center", "border")])
    def test_global_and_local_pairs(self, gen: torch.Generator, points: str, padding: str) -> None:
        sg, tg, sl = _views(gen, G, 196), _views(gen, G, 196), _views(gen, L, 36)
        boxes, flips = _overlapping_geometry(gen, G + L)
        loss = _identity_spatial(points=points, padding=padding).double()(sg, tg, boxes, flips, sl)
        expected = _reference_spatial(sg + sl, tg, boxes, flips, points=points, padding=padding)
        assert_close(loss, expected, atol=1e-9, rtol=1e-9)

    def test_three_global_views_some_apart(self, gen: torch.Generator) -> None:
        # Each global view has two global partners on each side and each local view three
        # teachers, so every view's lattices are read together; some pairs do not overlap.
        sg, tg, sl = _views(gen, 3, 49), _views(gen, 3, 49), _views(gen, L, 16)
        boxes = random_boxes(B, 3 + L, min_size=0.15, generator=gen)
        boxes[0, 4] = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)
        boxes[0, :3] = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
        flips = random_flips(B, 3 + L, gen)
        module = _identity_spatial(
            num_global_views=3, points="official", padding="zeros", empty_pairs="mask"
        )
        loss = module.double()(sg, tg, boxes, flips, sl)
        lattices = ((6, 6), (4, 4))  # global grid 7 x 7 minus one; local grid 4 x 4
        expected = _reference_spatial(
            sg + sl, tg, boxes, flips, points="official", padding="zeros", lattices=lattices
        )
        assert_close(loss, expected, atol=1e-9, rtol=1e-9)
        channel = ChannelSelfRelationLoss(
            DIM, num_global_views=3, projection=nn.Identity(), prediction=nn.Identity()
        )
        assert_close(channel.double()(sg, tg, sl), _reference_channel(sg + sl, tg))

    def test_non_overlapping_terms_are_masked_out_of_the_mean(self, gen: torch.Generator) -> None:
        sg, tg, sl = _views(gen, G, 196), _views(gen, G, 196), _views(gen, L, 16)
        boxes = random_boxes(B, G + L, min_size=0.1, generator=gen)
        boxes[0, 2] = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)
        boxes[0, :2] = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
        flips = random_flips(B, G + L, gen)
        module = _identity_spatial(global_lattice=5, local_lattice=3, recipe="paper").double()
        loss = module(sg, tg, boxes, flips, sl)
        # Reference with the module's lattice sizes: recompute via the kept terms.
        terms, masks = [], []
        for i in range(G):
            for v in range(G + L):
                if v == i:
                    continue
                size = 5 if v < G else 3
                views = sg + sl
                gi, gv, valid = SF.overlap_grids(
                    boxes[:, i], flips[:, i], boxes[:, v], flips[:, v], size
                )
                ht, hs = math.isqrt(tg[i].shape[1]), math.isqrt(views[v].shape[1])
                t_rel = _sample_relation(_full_relation(tg[i], HEADS), gi, (ht, ht), "border")
                s_rel = _sample_relation(_full_relation(views[v], HEADS), gv, (hs, hs), "border")
                terms.append(_ce_per_item(s_rel, t_rel, 1.0, 0.5))
                masks.append(valid)
        mask = torch.cat(masks)
        assert not bool(mask.all()), "the geometry should hold a non-overlapping pair"
        assert_close(loss, torch.cat(terms)[mask].mean(), atol=1e-9, rtol=1e-9)


class TestLattices:
    """Default lattices: global token grid minus one per side, and the local token grid."""

    def test_defaults_follow_small_square_grids(self, gen: torch.Generator) -> None:
        # 6 x 6 global and 3 x 3 local tokens (ViT/16 at 96 and 48 px): lattices 5 x 5 and 3 x 3,
        # where fixed defaults of 13 and 6 would have read 169 points off 36 tokens.
        sg, tg, sl = _views(gen, G, 36), _views(gen, G, 36), _views(gen, L, 9)
        boxes, flips = _overlapping_geometry(gen, G + L)
        loss = _identity_spatial().double()(sg, tg, boxes, flips, sl)  # the authors' recipe
        expected = _reference_spatial(
            sg + sl, tg, boxes, flips, points="official", padding="zeros", lattices=((5, 5), (3, 3))
        )
        assert_close(loss, expected, atol=1e-9, rtol=1e-9)
        fixed = _reference_spatial(sg + sl, tg, boxes, flips, points="official", padding="zeros")
        assert not torch.isclose(loss, fixed)

    @pytest.mark.parametrize("points", ["center", "official"])
    def test_defaults_follow_rectangular_grids(self, gen: torch.Generator, points: str) -> None:
        hw_g, hw_l = (4, 6), (2, 3)
        sg, tg, sl = _views(gen, G, 24), _views(gen, G, 24), _views(gen, L, 6)
        boxes, flips = _overlapping_geometry(gen, G + L)
        module = _identity_spatial(points=points, padding="zeros").double()
        loss = module(sg, tg, boxes, flips, sl, global_grid=hw_g, local_grid=hw_l)
        expected = _reference_spatial(
            sg + sl,
            tg,
            boxes,
            flips,
            points=points,
            padding="zeros",
            lattices=((3, 5), (2, 3)),
            grids=(hw_g, hw_l),
        )
        assert_close(loss, expected, atol=1e-9, rtol=1e-9)

    def test_explicit_lattice_denser_than_its_grid_warns_once(self, gen: torch.Generator) -> None:
        sg, tg, sl = _views(gen, G, 49), _views(gen, G, 49), _views(gen, L, 9)
        boxes, flips = _overlapping_geometry(gen, G + L)
        dense = _identity_spatial(global_lattice=13).double()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            dense(sg, tg, boxes, flips, sl)
            dense(sg, tg, boxes, flips, sl)
        assert len(record) == 1
        assert record[0].category is UserWarning
        assert re.search(
            r"global_lattice=\(13, 13\) is denser than the global token grid \(7, 7\)",
            str(record[0].message),
        )
        with pytest.warns(UserWarning, match=r"local_lattice=\(3, 4\) is denser than the local"):
            _identity_spatial(local_lattice=(3, 4)).double()(sg, tg, boxes, flips, sl)
        # As dense as the grid, or sparser: no warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _identity_spatial(global_lattice=7, local_lattice=2).double()(sg, tg, boxes, flips, sl)


class TestChannel:
    def test_matches_reference(self, gen: torch.Generator) -> None:
        sg, tg, sl = _views(gen, G, 49), _views(gen, G, 49), _views(gen, L, 9)
        module = ChannelSelfRelationLoss(
            DIM, projection=nn.Identity(), prediction=nn.Identity()
        ).double()
        assert_close(module(sg, tg, sl), _reference_channel(sg + sl, tg), atol=1e-9, rtol=1e-9)

    def test_reference_backend_relates_in_float32_under_autocast(
        self, gen: torch.Generator
    ) -> None:
        sg, tg, sl = _views(gen, G, 49), _views(gen, G, 49), _views(gen, L, 9)
        expected = _reference_channel(sg + sl, tg)  # float64
        module = ChannelSelfRelationLoss(
            DIM, projection=nn.Identity(), prediction=nn.Identity(), backend="reference"
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module([v.float() for v in sg], [v.float() for v in tg], [v.float() for v in sl])
        assert loss.dtype == torch.float32
        assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)

    def test_default_heads_project_then_predict(self, gen: torch.Generator) -> None:
        sg, tg = _views(gen, G, 16), _views(gen, G, 16)
        module = ChannelSelfRelationLoss(DIM).double()
        heads = module.heads
        s_out = heads.prediction(heads.projection(torch.cat(sg))).split(B)
        t_out = heads.teacher_projection(torch.cat(tg)).split(B)
        expected = _reference_channel(list(s_out), list(t_out))
        assert_close(module(sg, tg), expected, atol=1e-9, rtol=1e-9)


class TestNoOverlap:
    def test_zero_spatial_term_still_reaches_every_head_parameter(self) -> None:
        boxes = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]]).expand(B, 2, 4)
        flips = torch.zeros(B, 2, dtype=torch.bool)
        sere = SERELoss(DIM, num_heads=HEADS, empty_pairs="mask")
        student = torch.randn(2 * B, 16, DIM, requires_grad=True)
        loss, terms = sere(student, torch.randn(2 * B, 16, DIM), boxes, flips, return_terms=True)
        assert terms["spatial"].item() == 0.0
        assert torch.isfinite(loss)
        loss.backward()
        for name, p in sere.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all()
            if name.startswith("spatial.") or ".local_" in name:
                assert torch.count_nonzero(p.grad) == 0, name


class TestTeacher:
    def test_no_gradient_reaches_the_teacher_side(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G + L)
        sere = SERELoss(DIM, num_heads=HEADS).double()
        student = torch.randn(G * B, 49, DIM, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(G * B, 49, DIM, dtype=torch.float64, requires_grad=True)
        local = torch.randn(L * B, 9, DIM, dtype=torch.float64, requires_grad=True)
        sere(student, teacher, boxes, flips, local).backward()
        assert teacher.grad is None
        assert student.grad is not None
        assert local.grad is not None
        for name, p in sere.named_parameters():
            if "teacher" in name:
                assert not p.requires_grad, name
                assert p.grad is None, name

    def test_teacher_starts_as_a_copy_and_follows_by_ema(self) -> None:
        sere = SERELoss(DIM, num_heads=HEADS)
        for term in (sere.spatial, sere.channel):
            assert term is not None
            student = dict(term.heads.projection.named_parameters())
            teacher = dict(term.heads.teacher_projection.named_parameters())
            assert all(torch.equal(student[k], teacher[k]) for k in student)
            with torch.no_grad():
                for p in student.values():
                    p.add_(1.0)
            before = {k: v.clone() for k, v in teacher.items()}
        sere.update_teacher(0.9)
        for term in (sere.spatial, sere.channel):
            assert term is not None
            student = dict(term.heads.projection.named_parameters())
            teacher = dict(term.heads.teacher_projection.named_parameters())
            for k in student:
                expected = 0.9 * (student[k] - 1.0) + 0.1 * student[k]
                assert_close(teacher[k].detach(), expected.detach())
        assert before  # the loop above ran

    def test_free_function_reaches_every_nested_loss(self) -> None:
        # A model that nests the losses (as a LightningModule would), one level deeper too.
        model = nn.ModuleDict(
            {
                "backbone": nn.Linear(4, DIM),
                "sere": SERELoss(DIM, num_heads=HEADS),
                "more": nn.ModuleDict({"channel": ChannelSelfRelationLoss(DIM)}),
            }
        )
        heads = [
            m.heads
            for m in model.modules()
            if isinstance(m, (SpatialSelfRelationLoss, ChannelSelfRelationLoss))
        ]
        assert len(heads) == 3
        with torch.no_grad():
            for h in heads:
                for p in h.projection.parameters():
                    p.add_(torch.randn_like(p))
        student = [[p.detach().clone() for p in h.projection.parameters()] for h in heads]
        teacher = [[p.detach().clone() for p in h.teacher_projection.parameters()] for h in heads]
        assert update_teacher(model, 0.75) == 3
        for h, s_params, t_params in zip(heads, student, teacher, strict=True):
            for p, s_p, t_p in zip(
                h.teacher_projection.parameters(), s_params, t_params, strict=True
            ):
                assert_close(p.detach(), 0.75 * t_p + 0.25 * s_p)

    def test_momentum_one_freezes_and_zero_copies(self) -> None:
        sere = SERELoss(DIM, num_heads=HEADS)
        spatial = sere.spatial
        assert spatial is not None
        bn = spatial.heads.projection[0].bn
        with torch.no_grad():
            bn.weight.fill_(3.0)
        sere.update_teacher(1.0)
        assert torch.equal(spatial.heads.teacher_projection[0].bn.weight, torch.ones(DIM))
        sere.update_teacher(0.0)
        assert torch.equal(spatial.heads.teacher_projection[0].bn.weight, bn.weight.detach())

    def test_running_buffers_are_not_averaged(self) -> None:
        sere = SERELoss(DIM, num_heads=HEADS)
        spatial = sere.spatial
        assert spatial is not None
        spatial.heads.projection[0].bn.running_mean.fill_(5.0)
        sere.update_teacher(0.5)
        assert torch.equal(spatial.heads.teacher_projection[0].bn.running_mean, torch.zeros(DIM))

    def test_teacher_batchnorm_uses_batch_statistics_in_training(self) -> None:
        module = ChannelSelfRelationLoss(DIM)
        x = 10 + 3 * torch.randn(4, 25, DIM)
        out = module.heads.teacher(x)
        # BatchNorm with batch statistics: per-channel mean of the pre-ReLU output is ~0, so
        # about half the values are clipped; running statistics (0, 1) would keep them all.
        assert (out == 0).float().mean() > 0.3


class TestHeads:
    def test_default_heads(self) -> None:
        module = SpatialSelfRelationLoss(DIM, HEADS)
        assert isinstance(module.heads.projection, ProjectionHead)
        assert isinstance(module.heads.prediction, PredictionHead)
        assert module.heads.prediction[0].bias is None

    def test_projection_normalises_over_all_tokens(self) -> None:
        head = ProjectionHead(4)
        x = 2 + 5 * torch.randn(3, 50, 4, dtype=torch.float64)
        out = head.double()(x)
        flat = x.reshape(-1, 4)
        expected = torch.relu(
            (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)
        )
        assert_close(out.reshape(-1, 4), expected, atol=1e-9, rtol=1e-9)

    def test_local_views_use_their_own_heads(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G + L)
        boxes = boxes.float()
        sg, tg = torch.randn(G * B, 16, DIM), torch.randn(G * B, 16, DIM)
        sl = torch.randn(L * B, 9, DIM)
        module = SpatialSelfRelationLoss(DIM, HEADS)
        globals_only = module(sg, tg, boxes[:, :G], flips[:, :G])
        with_local = module(sg, tg, boxes, flips, sl)
        with torch.no_grad():
            module.heads.local_prediction[0].weight.mul_(-1)
        # Global pairs never touch the local heads; global-local pairs do.
        assert_close(module(sg, tg, boxes[:, :G], flips[:, :G]), globals_only)
        assert not torch.isclose(module(sg, tg, boxes, flips, sl), with_local)

    def test_shared_heads_when_local_heads_off(self) -> None:
        module = SpatialSelfRelationLoss(DIM, HEADS, local_heads=False)
        assert not hasattr(module.heads, "local_projection")
        x = torch.randn(2, 9, DIM)
        module.eval()
        assert torch.equal(module.heads.student(x, local=True), module.heads.student(x))

    def test_symmetric_has_no_prediction(self) -> None:
        module = SERELoss(DIM, num_heads=HEADS, symmetric=True)
        for term in (module.spatial, module.channel):
            assert term is not None
            assert isinstance(term.heads.prediction, nn.Identity)
        with pytest.raises(ValueError, match="symmetric=True"):
            SpatialSelfRelationLoss(DIM, HEADS, symmetric=True, prediction=nn.Linear(DIM, DIM))

    def test_custom_projection_with_other_width(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G)
        module = SpatialSelfRelationLoss(
            DIM, 4, projection=nn.Linear(DIM, 8), prediction=nn.Identity()
        )
        loss = module(
            torch.randn(G * B, 16, DIM), torch.randn(G * B, 16, DIM), boxes.float(), flips
        )
        assert torch.isfinite(loss)
        with pytest.raises(ValueError, match="divide by num_heads"):
            SpatialSelfRelationLoss(DIM, 5, projection=nn.Linear(DIM, 8), prediction=nn.Identity())(
                torch.randn(G * B, 16, DIM), torch.randn(G * B, 16, DIM), boxes.float(), flips
            )


class TestInputLayouts:
    def _setup(self, gen: torch.Generator):
        boxes, flips = _overlapping_geometry(gen, G + L)
        module = SERELoss(DIM, num_heads=HEADS).double().eval()
        return module, boxes, flips

    def test_list_equals_concatenated(self, gen: torch.Generator) -> None:
        module, boxes, flips = self._setup(gen)
        sg, tg, sl = _views(gen, G, 16), _views(gen, G, 16), _views(gen, L, 9)
        a = module(sg, tg, boxes, flips, sl)
        b = module(torch.cat(sg), torch.cat(tg), boxes, flips, torch.cat(sl))
        assert_close(a, b)

    def test_prefix_tokens_are_dropped(self, gen: torch.Generator) -> None:
        module, boxes, flips = self._setup(gen)
        sg, tg, sl = (
            torch.cat(v) for v in (_views(gen, G, 16), _views(gen, G, 16), _views(gen, L, 9))
        )
        with_cls = SERELoss(DIM, num_heads=HEADS, num_prefix_tokens=5).double().eval()
        with_cls.load_state_dict(module.state_dict())

        def prefixed(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.randn(x.shape[0], 5, DIM, dtype=x.dtype), x], 1)

        assert_close(
            with_cls(prefixed(sg), prefixed(tg), boxes, flips, prefixed(sl)),
            module(sg, tg, boxes, flips, sl),
        )

    def test_cnn_maps_equal_tokens(self, gen: torch.Generator) -> None:
        module, boxes, flips = self._setup(gen)
        sg, tg = (
            torch.randn(G * B, DIM, 4, 6, dtype=torch.float64),
            torch.randn(G * B, DIM, 4, 6, dtype=torch.float64),
        )
        sl = torch.randn(L * B, DIM, 2, 3, dtype=torch.float64)

        def tok(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2)

        from_maps = module(sg, tg, boxes, flips, sl)
        from_tokens = module(
            tok(sg), tok(tg), boxes, flips, tok(sl), global_grid=(4, 6), local_grid=(2, 3)
        )
        assert_close(from_maps, from_tokens)

    def test_per_call_temperatures(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G)
        sg, tg = torch.cat(_views(gen, G, 16)), torch.cat(_views(gen, G, 16))
        a = SpatialSelfRelationLoss(DIM, HEADS, teacher_temp=0.2, student_temp=0.9).double().eval()
        b = SpatialSelfRelationLoss(DIM, HEADS).double().eval()
        b.load_state_dict(a.state_dict())
        assert_close(
            a(sg, tg, boxes, flips), b(sg, tg, boxes, flips, teacher_temp=0.2, student_temp=0.9)
        )
        assert not torch.isclose(a(sg, tg, boxes, flips), b(sg, tg, boxes, flips))


class TestCombined:
    def test_weighted_sum_of_terms(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G + L)
        sere = SERELoss(DIM, alpha=0.2, beta=0.5, num_heads=HEADS).double().eval()
        sg, tg, sl = (
            torch.cat(v) for v in (_views(gen, G, 16), _views(gen, G, 16), _views(gen, L, 9))
        )
        loss, terms = sere(sg, tg, boxes, flips, sl, return_terms=True)
        assert sere.spatial is not None
        assert sere.channel is not None
        assert_close(terms["spatial"], sere.spatial(sg, tg, boxes, flips, sl))
        assert_close(terms["channel"], sere.channel(sg, tg, sl))
        assert_close(loss, 0.2 * terms["spatial"] + 0.5 * terms["channel"])

    def test_zero_weight_builds_no_term(self) -> None:
        with pytest.warns(UserWarning, match="channel self-relation alone"):
            channel_only = SERELoss(DIM, alpha=0.0, num_heads=HEADS)
        assert channel_only.spatial is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spatial_only = SERELoss(DIM, beta=0.0, num_heads=HEADS)
        assert spatial_only.channel is None
        with pytest.raises(ValueError, match="both 0"):
            SERELoss(DIM, alpha=0.0, beta=0.0)

    def test_views_of_mixed_precision_under_autocast(self, gen: torch.Generator) -> None:
        # Under autocast the views may come in any of float16, bfloat16 and float32 (a student
        # forward under autocast, a teacher outside it): fine, the loss is float32.
        torch.manual_seed(0)
        boxes, flips = _overlapping_geometry(gen, G + L)
        sere = SERELoss(48, num_heads=6)
        sg, tg = torch.randn(G * B, 49, 48).bfloat16(), torch.randn(G * B, 49, 48).half()
        sl = torch.randn(L * B, 9, 48)
        ref = sere(sg.float(), tg.float(), boxes.float(), flips, sl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sere(sg, tg, boxes.float(), flips, sl)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, ref, atol=0.0, rtol=3e-2)

    @pytest.mark.parametrize("dtype", [torch.bfloat16])
    def test_autocast_on_cpu_is_finite_and_close(
        self, gen: torch.Generator, dtype: torch.dtype
    ) -> None:
        torch.manual_seed(0)
        boxes, flips = _overlapping_geometry(gen, G + L)
        sere = SERELoss(48, num_heads=6)
        sg = torch.randn(G * B, 196, 48, requires_grad=True)
        tg, sl = torch.randn(G * B, 196, 48), torch.randn(L * B, 36, 48, requires_grad=True)
        ref = sere(sg, tg, boxes.float(), flips, sl)
        (ref_grad,) = torch.autograd.grad(ref, sg)
        with torch.autocast("cpu", dtype=dtype):
            low = sere(sg, tg, boxes.float(), flips, sl)
        (low_grad,) = torch.autograd.grad(low, sg)
        assert low.dtype == torch.float32
        assert torch.isfinite(low)
        assert torch.isfinite(low_grad).all()
        torch.testing.assert_close(low, ref, atol=0.0, rtol=2e-2)
        cos = F.cosine_similarity(low_grad.flatten(), ref_grad.flatten(), dim=0)
        assert cos > 0.97


@pytest.mark.gradcheck
class TestGradcheck:
    def test_kernels(self) -> None:
        x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: SF.spatial_relation(t, 3), (x,))
        assert torch.autograd.gradcheck(SF.channel_relation, (x,))
        t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([True, False])
        assert torch.autograd.gradcheck(
            lambda a: SF.relation_cross_entropy(a, t, 0.7, 0.3, mask), (s,)
        )
        feats = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        grid = torch.rand(2, 3, 3, 2, dtype=torch.float64) * 1.8 - 0.9
        for padding in ("border", "zeros"):
            assert torch.autograd.gradcheck(
                lambda f, p=padding: SF.sample_region(f, grid, p), (feats,)
            )

    def test_modules_with_identity_heads(self, gen: torch.Generator) -> None:
        boxes, flips = _overlapping_geometry(gen, G + 1)
        spatial = SpatialSelfRelationLoss(
            6,
            2,
            projection=nn.Identity(),
            prediction=nn.Identity(),
            global_lattice=3,
            local_lattice=2,
        ).double()
        channel = ChannelSelfRelationLoss(6, projection=nn.Identity(), prediction=nn.Identity())
        sg = torch.randn(G * B, 9, 6, dtype=torch.float64, requires_grad=True)
        sl = torch.randn(B, 4, 6, dtype=torch.float64, requires_grad=True)
        tg = torch.randn(G * B, 9, 6, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a, b: spatial(a, tg, boxes, flips, b), (sg, sl))
        assert torch.autograd.gradcheck(lambda a, b: channel.double()(a, tg, b), (sg, sl))


class TestDefaultHeads:
    """``num_heads=None``: one spatial head per 64 channels, the head count of ViT-S, B and L."""

    @pytest.mark.parametrize(("dim", "heads"), [(64, 1), (384, 6), (768, 12), (1024, 16)])
    def test_one_head_per_64_channels(self, dim: int, heads: int) -> None:
        assert SpatialSelfRelationLoss(dim).num_heads == heads
        sere = SERELoss(dim)
        assert sere.spatial is not None
        assert sere.spatial.num_heads == heads

    def test_vit_large_width_runs_and_splits_sixteen_ways(self, gen: torch.Generator) -> None:
        # ViT-L: 1024 channels did not divide by the former default of 6 heads.
        torch.manual_seed(0)
        tokens = torch.randn(2 * 2, 16, 1024, generator=gen, dtype=torch.float64)
        boxes = torch.tensor([[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0]], dtype=torch.float64)
        boxes = boxes.expand(2, 2, 4)
        flips = torch.zeros(2, 2, dtype=torch.bool)
        spatial = _identity_spatial_of(1024)
        loss = spatial.double()(tokens, tokens, boxes, flips)
        expected = _reference_spatial(
            list(tokens.split(2)),
            list(tokens.split(2)),
            boxes,
            flips,
            points="official",
            padding="zeros",
            heads=16,
            lattices=((3, 3), (3, 3)),
        )
        assert_close(loss, expected, atol=1e-9, rtol=1e-9)

    def test_other_widths_need_the_heads_given(self) -> None:
        with pytest.raises(ValueError, match=r"dim=96 is not a multiple of 64: pass num_heads"):
            SERELoss(96)
        assert SERELoss(96, num_heads=3).spatial.num_heads == 3  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alpha=0 warns about the channel term alone
            assert SERELoss(96, alpha=0.0).spatial is None  # no spatial term, no heads needed


def _identity_spatial_of(dim: int) -> SpatialSelfRelationLoss:
    return SpatialSelfRelationLoss(dim, projection=nn.Identity(), prediction=nn.Identity())
