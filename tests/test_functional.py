"""The kernels against independent statements of the paper's formulas.

Every expected value here is computed by explicit loops or by hand from the paper (Eq. 2-5) and
SPEC.md, not by calling the library twice.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close
from sere_loss import functional as SF


def _loop_spatial(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. 2 per head with loops: A[b, m, s, t] = <x_s, x_t> over head m's channels / sqrt(C/M)."""
    b, s, c = x.shape
    d = c // heads
    out = torch.empty(b, heads, s, s, dtype=x.dtype)
    for i in range(b):
        for m in range(heads):
            for p in range(s):
                for q in range(s):
                    dot = sum(
                        float(x[i, p, m * d + k]) * float(x[i, q, m * d + k]) for k in range(d)
                    )
                    out[i, m, p, q] = dot / math.sqrt(d)
    return out


def _loop_channel(x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with loops: A[b, i, j] = sum_n x[n, i] x[n, j] / N."""
    b, n, c = x.shape
    out = torch.empty(b, c, c, dtype=x.dtype)
    for k in range(b):
        for i in range(c):
            for j in range(c):
                out[k, i, j] = sum(float(x[k, t, i]) * float(x[k, t, j]) for t in range(n)) / n
    return out


def _row_ce(student: list[float], teacher: list[float], ts: float, tt: float) -> float:
    """Cross-entropy of one row, from the definitions of softmax and log-softmax."""
    t_max = max(v / tt for v in teacher)
    t_exp = [math.exp(v / tt - t_max) for v in teacher]
    p = [e / sum(t_exp) for e in t_exp]
    s_max = max(v / ts for v in student)
    log_z = s_max + math.log(sum(math.exp(v / ts - s_max) for v in student))
    return -sum(pi * (v / ts - log_z) for pi, v in zip(p, student, strict=True))


def _per_item_ce(student: torch.Tensor, teacher: torch.Tensor, ts: float, tt: float) -> list[float]:
    rows_s = student.reshape(student.shape[0], -1, student.shape[-1])
    rows_t = teacher.reshape(teacher.shape[0], -1, teacher.shape[-1])
    return [
        sum(_row_ce(rs.tolist(), rt.tolist(), ts, tt) for rs, rt in zip(bs, bt, strict=True))
        / len(bs)
        for bs, bt in zip(rows_s, rows_t, strict=True)
    ]


class TestSpatialRelation:
    @pytest.mark.parametrize(("batch", "points", "channels", "heads"), [(2, 5, 6, 3), (1, 4, 8, 1)])
    def test_matches_loops(self, batch: int, points: int, channels: int, heads: int) -> None:
        x = torch.randn(batch, points, channels, dtype=torch.float64)
        assert_close(SF.spatial_relation(x, heads), _loop_spatial(x, heads))

    def test_scale_is_per_head_dim_not_full_dim(self) -> None:
        # SPEC 2: (C/M)^-0.5 as in the authors' code, not the paper's sqrt(C).
        x = torch.ones(1, 2, 12, dtype=torch.float64)
        logits = SF.spatial_relation(x, 6)
        assert logits[0, 0, 0, 1].item() == pytest.approx(2 / math.sqrt(2))

    def test_heads_see_disjoint_channel_groups(self) -> None:
        x = torch.zeros(1, 3, 6, dtype=torch.float64)
        x[0, :, 2:4] = torch.randn(3, 2, dtype=torch.float64)  # only head 1 of 3 has signal
        logits = SF.spatial_relation(x, 3)
        assert logits[0, 0].abs().max() == 0
        assert logits[0, 2].abs().max() == 0
        assert logits[0, 1].abs().max() > 0


class TestChannelRelation:
    def test_matches_loops(self) -> None:
        x = torch.randn(2, 7, 5, dtype=torch.float64)
        assert_close(SF.channel_relation(x), _loop_channel(x))

    def test_matches_authors_scaling(self) -> None:
        # SPEC 3: the authors divide z by sqrt(N) and take z z^T: the same logits.
        x = torch.randn(3, 36, 4, dtype=torch.float64)
        z = x.transpose(1, 2) / 6.0
        assert_close(SF.channel_relation(x), z @ z.transpose(1, 2))


class TestRelationCrossEntropy:
    @pytest.mark.parametrize(("ts", "tt"), [(1.0, 1.0), (1.0, 0.5), (0.7, 0.1)])
    def test_matches_definition(self, ts: float, tt: float) -> None:
        s = torch.randn(3, 2, 4, 5, dtype=torch.float64)
        t = torch.randn(3, 2, 4, 5, dtype=torch.float64)
        expected = sum(_per_item_ce(s, t, ts, tt)) / 3
        got = SF.relation_cross_entropy(s, t, student_temp=ts, teacher_temp=tt)
        assert got.item() == pytest.approx(expected, rel=1e-12)

    def test_mask_and_reductions(self) -> None:
        s = torch.randn(4, 3, 3, dtype=torch.float64)
        t = torch.randn(4, 3, 3, dtype=torch.float64)
        per_item = _per_item_ce(s, t, 1.0, 0.5)
        mask = torch.tensor([True, False, True, False])
        kw = {"teacher_temp": 0.5, "mask": mask}
        mean = SF.relation_cross_entropy(s, t, **kw)
        assert mean.item() == pytest.approx((per_item[0] + per_item[2]) / 2, rel=1e-12)
        total = SF.relation_cross_entropy(s, t, **kw, reduction="sum")
        assert total.item() == pytest.approx(per_item[0] + per_item[2], rel=1e-12)
        items = SF.relation_cross_entropy(s, t, **kw, reduction="none")
        expected = torch.tensor([per_item[0], 0.0, per_item[2], 0.0], dtype=torch.float64)
        assert_close(items, expected)

    def test_nothing_kept_is_connected_zero(self) -> None:
        s = torch.randn(2, 3, 3, requires_grad=True)
        t = torch.randn(2, 3, 3)
        loss = SF.relation_cross_entropy(s, t, mask=torch.zeros(2, dtype=torch.bool))
        assert loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert s.grad is not None
        assert torch.equal(s.grad, torch.zeros_like(s))

    def test_teacher_gets_no_gradient(self) -> None:
        s = torch.randn(2, 3, 3, requires_grad=True)
        t = torch.randn(2, 3, 3, requires_grad=True)
        SF.relation_cross_entropy(s, t).backward()
        assert t.grad is None
        assert s.grad is not None

    def test_minimum_is_teacher_entropy(self) -> None:
        # Gibbs: CE(p, q) >= H(p), equality iff q = p. With t_s = 1 and t_t = 0.5 the student
        # matches when its logits are the teacher's divided by 0.5.
        t = torch.randn(2, 3, 6, dtype=torch.float64)
        p = torch.softmax(t / 0.5, -1)
        entropy = -(p * p.log()).sum(-1).mean()
        at_min = SF.relation_cross_entropy(t / 0.5, t, teacher_temp=0.5)
        assert at_min.item() == pytest.approx(entropy.item(), rel=1e-12)
        for _ in range(5):
            other = t / 0.5 + 0.3 * torch.randn_like(t)
            assert SF.relation_cross_entropy(other, t, teacher_temp=0.5) > at_min

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_inputs_compute_in_float32(self, dtype: torch.dtype) -> None:
        s = torch.randn(2, 4, 4)
        t = torch.randn(2, 4, 4)
        ref = SF.relation_cross_entropy(s.to(dtype).float(), t.to(dtype).float(), teacher_temp=0.1)
        got = SF.relation_cross_entropy(s.to(dtype), t.to(dtype), teacher_temp=0.1)
        assert got.dtype == torch.float32
        assert_close(got, ref)

    def test_under_autocast_the_result_is_float32(self) -> None:
        s = torch.randn(2, 4, 4)
        t = torch.randn(2, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = SF.relation_cross_entropy(s, t, teacher_temp=0.1)
        assert got.dtype == torch.float32
        assert_close(got, SF.relation_cross_entropy(s, t, teacher_temp=0.1))


def _manual_bilinear(features: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear read, align_corners=False, from its definition (pixel centres at k + 0.5)."""
    b, c, h, w = features.shape
    _, hs, ws, _ = grid.shape
    out = torch.zeros(b, hs * ws, c, dtype=features.dtype)
    for i in range(b):
        for r in range(hs):
            for q in range(ws):
                gx, gy = grid[i, r, q].tolist()
                x = ((gx + 1) * w - 1) / 2
                y = ((gy + 1) * h - 1) / 2
                if padding == "border":
                    x = min(max(x, 0.0), w - 1.0)
                    y = min(max(y, 0.0), h - 1.0)
                x0, y0 = math.floor(x), math.floor(y)
                acc = torch.zeros(c, dtype=features.dtype)
                for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                    for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                        if 0 <= xx < w and 0 <= yy < h:
                            acc += wx * wy * features[i, :, yy, xx]
                out[i, r * ws + q] = acc
    return out


class TestSampleRegion:
    @pytest.mark.parametrize("padding", ["border", "zeros"])
    def test_matches_definition(self, padding: str) -> None:
        feats = torch.randn(2, 3, 5, 4, dtype=torch.float64)
        grid = torch.rand(2, 3, 2, 2, dtype=torch.float64) * 2.4 - 1.2  # some points outside
        assert_close(SF.sample_region(feats, grid, padding), _manual_bilinear(feats, grid, padding))

    def test_pixel_centres_read_pixels_exactly(self) -> None:
        feats = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        centres = (torch.arange(4, dtype=torch.float64) + 0.5) / 4 * 2 - 1
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        out = SF.sample_region(feats, grid)
        assert_close(out, feats.flatten(2).transpose(1, 2))

    def test_grid_dtype_follows_features(self) -> None:
        feats = torch.randn(1, 2, 4, 4)
        grid = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
        assert SF.sample_region(feats, grid).dtype == torch.float32


class TestViewPairs:
    def test_dino_setting(self) -> None:
        pairs = SF.view_pairs(2, 4)
        assert pairs[:2] == [(0, 1), (1, 0)]
        assert sorted(pairs[2:]) == [(i, v) for i in range(2) for v in range(2, 6)]
        assert len(pairs) == 2 + 2 * 4

    def test_no_same_view_no_local_local(self) -> None:
        for g in range(1, 4):
            for loc in range(0, 4):
                for i, v in SF.view_pairs(g, loc):
                    assert i < g
                    assert i != v


class TestPairedRelationCrossEntropy:
    def test_every_pair_equals_its_own_row_cross_entropy(self, gen: torch.Generator) -> None:
        # Views: 2 teacher (global) views, 2 + 3 student views, batch 3, relations 5 x 5.
        student = torch.randn(5, 3, 5, 5, generator=gen, dtype=torch.float64)
        teacher = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
        pairs = SF.view_pairs(2, 3)
        got = SF.paired_relation_cross_entropy(student, teacher, pairs, 0.7, 0.1)
        assert got.shape == (len(pairs), 3)
        for k, (i, v) in enumerate(pairs):
            want = _per_item_ce(student[v], teacher[i], 0.7, 0.1)
            assert_close(got[k], torch.tensor(want, dtype=torch.float64))

    def test_heads_count_as_rows(self, gen: torch.Generator) -> None:
        student = torch.randn(3, 2, 4, 6, 6, generator=gen, dtype=torch.float64)
        teacher = torch.randn(2, 2, 4, 6, 6, generator=gen, dtype=torch.float64)
        got = SF.paired_relation_cross_entropy(student, teacher, [(1, 2)])
        want = SF.relation_cross_entropy(student[2], teacher[1], reduction="none")
        assert_close(got[0], want)

    def test_teacher_gets_no_gradient_and_autocast_keeps_float32(self) -> None:
        student = torch.randn(2, 2, 4, 4, requires_grad=True)
        teacher = torch.randn(2, 2, 4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = SF.paired_relation_cross_entropy(student, teacher, [(0, 1), (1, 0)])
        assert out.dtype == torch.float32
        out.sum().backward()
        assert teacher.grad is None
        assert student.grad is not None

    @pytest.mark.parametrize(
        ("pairs", "match"), [([], "pairs"), ([(2, 0)], "pairs"), ([(0, 5)], "pairs")]
    )
    def test_bad_pairs(self, pairs: list[tuple[int, int]], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            SF.paired_relation_cross_entropy(
                torch.randn(3, 1, 2, 2), torch.randn(2, 1, 2, 2), pairs
            )

    def test_shapes_must_agree(self) -> None:
        with pytest.raises(ValueError, match="must agree"):
            SF.paired_relation_cross_entropy(
                torch.randn(3, 1, 2, 2), torch.randn(2, 2, 2, 2), [(0, 1)]
            )


def _f64_spatial_ce(s: torch.Tensor, t: torch.Tensor, heads: int, ts: float, tt: float):
    """Eq. 2-3 in float64, head by head and item by item: the mean row cross-entropy."""
    d = s.shape[-1] // heads
    items = []
    for b in range(s.shape[0]):
        per_head = []
        for m in range(heads):
            xs, xt = (v[b, :, m * d : (m + 1) * d].double() for v in (s, t))
            a_s, a_t = xs @ xs.T / math.sqrt(d), xt @ xt.T / math.sqrt(d)
            rows = -(torch.softmax(a_t / tt, -1) * torch.log_softmax(a_s / ts, -1)).sum(-1)
            per_head.append(rows.mean())
        items.append(torch.stack(per_head).mean())
    return torch.stack(items).mean()


def _f64_channel_ce(s: torch.Tensor, t: torch.Tensor, ts: float, tt: float) -> torch.Tensor:
    """Eq. 4-5 in float64, item by item: c^T c / N per view, the mean row cross-entropy."""
    items = []
    for b in range(s.shape[0]):
        xs, xt = s[b].double(), t[b].double()
        a_s, a_t = xs.T @ xs / xs.shape[0], xt.T @ xt / xt.shape[0]
        rows = -(torch.softmax(a_t / tt, -1) * torch.log_softmax(a_s / ts, -1)).sum(-1)
        items.append(rows.mean())
    return torch.stack(items).mean()


class TestFloat32Maths:
    """Every backend relates float16 features in float32: at a feature scale of ~30 with 64
    channels the float16 logits overflow (the reference path used to return NaN)."""

    @staticmethod
    def _features(gen: torch.Generator, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = (30 * torch.randn(2, tokens, 64, generator=gen) for _ in range(2))
        return s.half(), t.half()

    @pytest.mark.parametrize("heads", [1, 4])
    @pytest.mark.parametrize("backend", ["reference", "chunked"])
    def test_spatial_half_features(self, gen: torch.Generator, backend: str, heads: int) -> None:
        s, t = self._features(gen, 36)
        expected = _f64_spatial_ce(s, t, heads, 1.0, 0.5)
        loss = SF.spatial_relation_cross_entropy(s, t, heads, 1.0, 0.5, backend=backend)
        assert loss.dtype == torch.float32
        assert_close(loss, expected, atol=1e-4, rtol=1e-5)

    @pytest.mark.parametrize("backend", ["reference", "chunked"])
    def test_channel_half_features(self, gen: torch.Generator, backend: str) -> None:
        big = self._features(gen, 49)
        small = tuple(v / 30 for v in big)  # scale 1: a loss far from 0
        for s, t in (big, small):
            expected = _f64_channel_ce(s, t, 1.0, 0.1)
            loss = SF.channel_relation_cross_entropy(s, t, 1.0, 0.1, backend=backend)
            assert_close(loss, expected, atol=1e-4, rtol=1e-5)
        assert expected > 1.0

    def test_reference_ignores_autocast(self, gen: torch.Generator) -> None:
        # float32 features under a bfloat16 autocast: the relations stay float32, so the loss
        # matches the float64 statement to float32 precision, not bfloat16's.
        s, t = (torch.randn(2, 36, 64, generator=gen) for _ in range(2))
        expected = _f64_spatial_ce(s, t, 4, 1.0, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = SF.spatial_relation_cross_entropy(s, t, 4, 1.0, 0.5, backend="reference")
            channel = SF.channel_relation_cross_entropy(s, t, 1.0, 0.1, backend="reference")
        assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        assert_close(channel, _f64_channel_ce(s, t, 1.0, 0.1), atol=1e-5, rtol=1e-5)
