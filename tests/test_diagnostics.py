"""sere_loss.diagnostics: the Fig. 6 measure and the Fig. 5 maps against loop-level statements.

The geometry used throughout is chosen so that the lattice points fall exactly on token
centres, so the statement in the tests can index tokens by hand instead of sampling: view 1
covers the whole image on a 4 x 4 token grid; view 2 covers its right half, x in [0.5, 1], on a
4 x 2 grid (flipped or not). The overlap is view 2; a 4 x 2 lattice of cell centres sits at
x = 0.625, 0.875 (columns 2 and 3 of view 1; columns 0 and 1 of view 2, reversed when it is
flipped) and y = (r + 0.5) / 4 (row r of both).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sere_loss import diagnostics
from sere_loss.diagnostics import (
    RelationInvariance,
    match_entropy,
    plot_relation_maps,
    relation_invariance,
    relation_maps,
)

FULL = [0.0, 0.0, 1.0, 1.0]
RIGHT_HALF = [0.5, 0.0, 1.0, 1.0]
TOL = {"rel": 1e-9, "abs": 1e-12}


def _geometry(flips2: list[bool]) -> tuple[torch.Tensor, ...]:
    batch = len(flips2)
    boxes1 = torch.tensor([FULL] * batch, dtype=torch.float64)
    boxes2 = torch.tensor([RIGHT_HALF] * batch, dtype=torch.float64)
    return boxes1, torch.zeros(batch, dtype=torch.bool), boxes2, torch.tensor(flips2)


def _lattice_tokens(maps1: torch.Tensor, maps2: torch.Tensor, b: int, flipped: bool):
    """Lattice point s = 2 r + c read by hand: (row r, col 2 + c) of view 1 and (r, c) of view 2
    (col 1 - c when view 2 is flipped). Lists of S lists of C floats."""
    x1, x2 = [], []
    for r in range(4):
        for c in range(2):
            x1.append(maps1[b, :, r, 2 + c].tolist())
            x2.append(maps2[b, :, r, 1 - c if flipped else c].tolist())
    return x1, x2


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def _entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def _tv(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def _matched(row: list[float], fraction: float) -> list[float]:
    """softmax(row / tau) with the temperature tau found by plain bisection on log tau."""
    target = fraction * math.log(len(row))
    lo, hi = -60.0, 60.0  # log tau: entropy grows with tau
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _entropy(_softmax([v / math.exp(mid) for v in row])) > target:
            hi = mid
        else:
            lo = mid
    return _softmax([v / math.exp(0.5 * (lo + hi)) for v in row])


def _spatial_rows(x: list[list[float]], heads: int, temp: float) -> list[list[float]]:
    """Rows of the spatial relation logits, head-major: X_m X_m^T / sqrt(D) / temp."""
    dim = len(x[0]) // heads
    rows = []
    for m in range(heads):
        for i in range(len(x)):
            rows.append(
                [
                    sum(x[i][m * dim + d] * x[j][m * dim + d] for d in range(dim))
                    / math.sqrt(dim)
                    / temp
                    for j in range(len(x))
                ]
            )
    return rows


def _channel_rows(tokens: list[list[float]], temp: float) -> list[list[float]]:
    """Rows of c^T c / N / temp over the N tokens of a whole view."""
    n, ch = len(tokens), len(tokens[0])
    return [[sum(t[i] * t[j] for t in tokens) / n / temp for j in range(ch)] for i in range(ch)]


def _measures(rows1, rows2, rows_next, fraction):
    """Per-image plain TV, entropy, matched TV (same image) and matched TV (next image)."""
    plain = [_tv(_softmax(a), _softmax(b)) for a, b in zip(rows1, rows2, strict=True)]
    ent = [
        0.5 * (_entropy(_softmax(a)) + _entropy(_softmax(b)))
        for a, b in zip(rows1, rows2, strict=True)
    ]
    m1 = [_matched(a, fraction) for a in rows1]
    same = [_tv(p, _matched(b, fraction)) for p, b in zip(m1, rows2, strict=True)]
    other = [_tv(p, _matched(b, fraction)) for p, b in zip(m1, rows_next, strict=True)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return mean(plain), mean(ent), mean(same), mean(other)


def _maps(batch: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps1 = torch.randn(batch, channels, 4, 4, generator=gen, dtype=torch.float64)
    maps2 = torch.randn(batch, channels, 4, 2, generator=gen, dtype=torch.float64)
    return maps1, maps2


@pytest.mark.parametrize(("heads", "temp", "fraction"), [(1, 1.0, 0.5), (2, 0.7, 0.3)])
def test_matches_a_loop_level_statement(heads: int, temp: float, fraction: float) -> None:
    flips2 = [False, True, True]
    maps1, maps2 = _maps(len(flips2), 4)
    maps2 = maps2 * 2.0  # view 2 sharper than view 1, so plain and controlled part ways
    out = relation_invariance(
        maps1, maps2, *_geometry(flips2), lattice=(4, 2), num_heads=heads, temperature=temp,
        entropy=fraction,
    )  # fmt: skip
    spatial = [_spatial_rows(_lattice_tokens(maps1, maps2, b, f)[0], heads, temp) for b, f in
               enumerate(flips2)]  # fmt: skip
    spatial2 = [_spatial_rows(_lattice_tokens(maps1, maps2, b, f)[1], heads, temp) for b, f in
                enumerate(flips2)]  # fmt: skip

    def whole(maps: torch.Tensor, b: int) -> list[list[float]]:
        return maps[b].flatten(1).T.tolist()  # the view's N tokens, each C floats

    channel = [_channel_rows(whole(maps1, b), temp) for b in range(3)]
    channel2 = [_channel_rows(whole(maps2, b), temp) for b in range(3)]
    for b in range(3):
        nxt = (b + 1) % 3
        plain, ent, same, other = _measures(spatial[b], spatial2[b], spatial2[nxt], fraction)
        assert float(out.spatial_plain[b]) == pytest.approx(plain, **TOL)
        assert float(out.spatial_entropy[b]) == pytest.approx(ent, **TOL)
        assert float(out.spatial_same[b]) == pytest.approx(same, rel=1e-7)
        assert float(out.spatial_other[b]) == pytest.approx(other, rel=1e-7)
        plain, ent, same, other = _measures(channel[b], channel2[b], channel2[nxt], fraction)
        assert float(out.channel_plain[b]) == pytest.approx(plain, **TOL)
        assert float(out.channel_entropy[b]) == pytest.approx(ent, **TOL)
        assert float(out.channel_same[b]) == pytest.approx(same, rel=1e-7)
        assert float(out.channel_other[b]) == pytest.approx(other, rel=1e-7)
    summary = out.summary()
    assert summary["pairs"] == 3
    expected = out.spatial_same.sum() / out.spatial_other.sum()
    assert summary["spatial_controlled"] == pytest.approx(float(expected), **TOL)
    assert summary["channel_plain"] == pytest.approx(float(out.channel_plain.mean()), **TOL)


def test_tokens_with_a_prefix_give_the_same_as_maps() -> None:
    flips2 = [False, True]
    maps1, maps2 = _maps(2, 8)
    by_maps = relation_invariance(maps1, maps2, *_geometry(flips2), lattice=(4, 2))

    def tokens(maps: torch.Tensor) -> torch.Tensor:  # (B, 1 + N, C) with a CLS token first
        cls = torch.randn(maps.shape[0], 1, maps.shape[1], dtype=maps.dtype)
        return torch.cat([cls, maps.flatten(2).transpose(1, 2)], dim=1)

    by_tokens = relation_invariance(
        tokens(maps1), tokens(maps2), *_geometry(flips2), lattice=(4, 2), num_prefix_tokens=1,
        grid2=(4, 2),
    )  # fmt: skip
    for field in ("spatial_plain", "spatial_same", "channel_plain", "channel_other"):
        torch.testing.assert_close(getattr(by_tokens, field), getattr(by_maps, field))


def _invariant_views(batch: int = 4) -> tuple[torch.Tensor, ...]:
    """View 2 = the same image, same box, flipped: its tokens are view 1's, mirrored."""
    gen = torch.Generator().manual_seed(3)
    maps1 = torch.randn(batch, 12, 5, 5, generator=gen)
    flips2 = torch.tensor([True, False] * (batch // 2))
    maps2 = torch.where(flips2[:, None, None, None], maps1.flip(-1), maps1)
    boxes = torch.tensor([FULL] * batch)
    return maps1, maps2, boxes, torch.zeros(batch, dtype=torch.bool), boxes, flips2


@pytest.mark.parametrize("heads", [1, 3])
def test_views_invariant_by_construction_give_zero(heads: int) -> None:
    out = relation_invariance(*_invariant_views(), num_heads=heads).summary()
    for key in ("spatial_plain", "spatial_controlled", "channel_plain", "channel_controlled"):
        assert out[key] == pytest.approx(0.0, abs=1e-6), key
    # A sub-crop whose tokens are view 1's tokens (the right half, mirrored for flipped items):
    # the spatial relations on the overlap agree exactly, the whole views' channels do not.
    flips2 = [True, False, True]
    maps1, _ = _maps(3, 4)
    half = maps1[..., 2:]
    maps2 = torch.where(torch.tensor(flips2)[:, None, None, None], half.flip(-1), half)
    crop = relation_invariance(maps1, maps2, *_geometry(flips2), lattice=(4, 2)).summary()
    assert crop["spatial_plain"] == pytest.approx(0.0, abs=1e-12)
    assert crop["spatial_controlled"] == pytest.approx(0.0, abs=1e-12)
    assert crop["channel_plain"] > 1e-3


def test_sharpening_moves_the_plain_measure_not_the_controlled_one() -> None:
    gen = torch.Generator().manual_seed(5)
    maps1 = torch.randn(6, 16, 6, 6, generator=gen, dtype=torch.float64)
    maps2 = maps1 + 0.7 * torch.randn(6, 16, 6, 6, generator=gen, dtype=torch.float64)
    boxes = torch.tensor([FULL] * 6, dtype=torch.float64)
    flips = torch.zeros(6, dtype=torch.bool)
    base = relation_invariance(maps1, maps2, boxes, flips, boxes, flips).summary()
    # The same relations, sharper: every logit times 4 (features times 2), or a temperature.
    scaled = relation_invariance(2 * maps1, 2 * maps2, boxes, flips, boxes, flips).summary()
    tempered = relation_invariance(
        maps1, maps2, boxes, flips, boxes, flips, temperature=0.25
    ).summary()
    for sharper in (scaled, tempered):
        assert sharper["spatial_entropy"] < base["spatial_entropy"] - 0.3
        assert abs(sharper["spatial_plain"] - base["spatial_plain"]) > 0.02
        assert abs(sharper["channel_plain"] - base["channel_plain"]) > 0.02
        for key in ("spatial_controlled", "channel_controlled"):
            assert sharper[key] == pytest.approx(base[key], rel=1e-9), key


def test_the_controlled_measure_reads_one_for_unrelated_views_and_grows_with_noise() -> None:
    gen = torch.Generator().manual_seed(7)
    batch = 64
    maps1 = torch.randn(batch, 16, 6, 6, generator=gen, dtype=torch.float64)
    boxes = torch.tensor([FULL] * batch, dtype=torch.float64)
    flips = torch.zeros(batch, dtype=torch.bool)
    values = []
    for noise in (0.1, 0.5, 2.0):
        maps2 = maps1 + noise * torch.randn(maps1.shape, generator=gen, dtype=torch.float64)
        values.append(relation_invariance(maps1, maps2, boxes, flips, boxes, flips).summary())
    spatial = [v["spatial_controlled"] for v in values]
    assert spatial == sorted(spatial)
    assert spatial[0] < 0.2
    unrelated = torch.randn(maps1.shape, generator=gen, dtype=torch.float64)
    chance = relation_invariance(maps1, unrelated, boxes, flips, boxes, flips).summary()
    assert chance["spatial_controlled"] == pytest.approx(1.0, abs=0.05)
    assert chance["channel_controlled"] == pytest.approx(1.0, abs=0.05)


def test_match_entropy_reaches_the_target_whatever_the_scale() -> None:
    gen = torch.Generator().manual_seed(9)
    rows = torch.randn(5, 7, 30, generator=gen, dtype=torch.float64)
    for fraction in (0.2, 0.5, 0.9):
        out = match_entropy(rows, fraction)
        log_p = out.log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        torch.testing.assert_close(entropy, torch.full_like(entropy, fraction * math.log(30)))
        torch.testing.assert_close(match_entropy(rows * 1e3, fraction), out)
        torch.testing.assert_close(match_entropy(rows * 1e-3 + 5.0, fraction), out)
    # A constant row stays uniform; a row whose maximum is tied 20 ways stays at its ties.
    flat = match_entropy(torch.ones(1, 10), 0.5)
    torch.testing.assert_close(flat.softmax(-1), torch.full((1, 10), 0.1, dtype=torch.float64))
    tied = torch.cat([torch.ones(20), torch.zeros(10)]).unsqueeze(0)
    probs = match_entropy(tied, 0.5).softmax(-1)
    torch.testing.assert_close(probs[0, :20], torch.full((20,), 0.05, dtype=torch.float64))


def test_cat_joins_batches() -> None:
    parts = [relation_invariance(*_invariant_views()) for _ in range(2)]
    joined = RelationInvariance.cat(parts)
    assert joined.spatial_plain.shape == (8,)
    assert joined.summary()["pairs"] == 8
    with pytest.raises(TypeError, match="non-empty list"):
        RelationInvariance.cat([])


def test_non_overlapping_pairs_are_left_out() -> None:
    maps1, maps2, boxes1, flips1, _, flips2 = _invariant_views()
    boxes2 = boxes1.clone()
    boxes1 = torch.tensor([[0.0, 0.0, 0.4, 1.0]] * 4)
    boxes2 = torch.tensor([[0.6, 0.0, 1.0, 1.0]] * 2 + [[0.0, 0.0, 1.0, 1.0]] * 2)
    out = relation_invariance(maps1, maps2, boxes1, flips1, boxes2, flips2)
    assert out.valid.tolist() == [False, False, True, True]
    assert torch.isnan(out.spatial_plain[:2]).all()
    assert torch.isfinite(out.spatial_plain[2:]).all()
    assert out.summary()["pairs"] == 2
    assert torch.isfinite(out.channel_plain).all()


def test_relation_maps_match_the_loop_level_statement() -> None:
    flips2 = [False, True]
    maps1, maps2 = _maps(2, 6, seed=11)
    for item, flipped in enumerate(flips2):
        point = (2, 1)
        maps = relation_maps(
            maps1, maps2, *_geometry(flips2), point, item=item, lattice=(4, 2), num_heads=2,
        )  # fmt: skip
        x1, x2 = _lattice_tokens(maps1, maps2, item, flipped)
        s = point[0] * 2 + point[1]

        def row(query: list[float], keys: list[list[float]], dim: int = 3) -> list[float]:
            per_head = []
            for m in range(2):
                dots = [sum(query[m * dim + d] * k[m * dim + d] for d in range(dim)) for k in keys]
                per_head.append(_softmax([v / math.sqrt(dim) for v in dots]))
            return [0.5 * (a + b) for a, b in zip(*per_head, strict=True)]

        view1 = row(x1[s], maps1[item].flatten(1).T.tolist())
        view2 = row(x2[s], maps2[item].flatten(1).T.tolist())
        torch.testing.assert_close(maps.view1.flatten(), torch.tensor(view1, dtype=torch.float64))
        torch.testing.assert_close(maps.view2.flatten(), torch.tensor(view2, dtype=torch.float64))
        over1, over2 = row(x1[s], x1), row(x2[s], x2)
        torch.testing.assert_close(maps.overlap1.flatten(), torch.tensor(over1).double())
        torch.testing.assert_close(maps.difference.flatten(), torch.tensor(over1).double()
                                   - torch.tensor(over2).double())  # fmt: skip
        assert maps.view1.shape == (4, 4)
        assert maps.view2.shape == (4, 2)
        # The point: x = 0.875, y = 0.625; in view 2 at u = 0.75 (0.25 flipped).
        assert maps.point1 == pytest.approx((0.875, 0.625))
        assert maps.point2 == pytest.approx((0.25 if flipped else 0.75, 0.625))
        assert maps.overlap_box1 == pytest.approx((0.5, 0.0, 1.0, 1.0))
        assert maps.overlap_box2 == pytest.approx((1.0, 0.0, 0.0, 1.0) if flipped else FULL)


def test_relation_maps_of_invariant_views_do_not_differ() -> None:
    maps = relation_maps(*_invariant_views(), (1, 3), item=0)
    assert maps.difference.abs().max() < 1e-6
    assert float(maps.overlap1.sum()) == pytest.approx(1.0)
    # view 2 is view 1 mirrored, so its map is view 1's mirrored.
    torch.testing.assert_close(maps.view2, maps.view1.flip(-1))


def test_plot_draws_the_panels(tmp_path) -> None:
    maps = relation_maps(*_invariant_views(), (1, 3), item=0)
    fig = plot_relation_maps(maps, images=(torch.rand(3, 40, 40), torch.rand(40, 40, 3)))
    assert len([ax for ax in fig.axes if ax.images]) == 5
    fig.savefig(tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 1000
    assert len(plot_relation_maps(maps, title="t").axes) >= 3
    with pytest.raises(ValueError, match="images must be None or a pair"):
        plot_relation_maps(maps, images=(torch.rand(3, 8, 8),))
    with pytest.raises(ValueError, match=r"images\[1\] must be an image"):
        plot_relation_maps(maps, images=(torch.rand(3, 8, 8), torch.rand(8, 8)))


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    maps = relation_maps(*_invariant_views(), (0, 0), item=1)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "sere-loss\[plot\]"'):
        plot_relation_maps(maps)


def test_importing_the_package_does_not_import_matplotlib() -> None:
    import subprocess

    code = "import sys, sere_loss.diagnostics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _call(**override: object) -> None:
    maps1, maps2, boxes1, flips1, boxes2, flips2 = _invariant_views()
    args: dict[str, object] = {
        "features1": maps1, "features2": maps2, "boxes1": boxes1, "flips1": flips1,
        "boxes2": boxes2, "flips2": flips2,
    }  # fmt: skip
    options = {k: override.pop(k) for k in list(override) if k not in args}
    args |= override
    relation_invariance(**args, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ({"features1": torch.randn(4, 12, 5)}, ValueError, "features1 has 12 patch tokens"),
        ({"features1": torch.randn(4, 5, 5, 5, 5)}, ValueError, "features1 must be ViT tokens"),
        ({"features2": torch.randn(4, 8, 5, 5)}, ValueError, "agree in the batch B and channels C"),
        ({"features1": torch.zeros(4, 12, 5, 5, dtype=torch.long)}, TypeError, "floating-point"),
        ({"features1": [1.0]}, TypeError, "features1 must be a torch.Tensor"),
        ({"boxes1": torch.rand(4, 3)}, ValueError, r"boxes1 must have shape \(B, 4\)"),
        ({"boxes2": torch.tensor([FULL] * 3)}, ValueError, r"boxes2 must have shape \(4, 4\)"),
        ({"flips2": torch.zeros(3, dtype=torch.bool)}, ValueError, "flips2 must have shape"),
        ({"lattice": 0}, ValueError, r"lattice\[0\] must be >= 1"),
        ({"num_heads": 5}, ValueError, "must divide by num_heads"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"entropy": 1.0}, ValueError, r"entropy must be a fraction .* in \(0, 1\)"),
        ({"points": "corners"}, ValueError, "points must be one of"),
        ({"padding": "reflect"}, ValueError, "padding must be one of"),
    ],
)
def test_bad_input_gets_a_clear_error(override: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**override)


def test_too_few_images_or_overlaps_are_refused() -> None:
    maps1, maps2, boxes1, flips1, boxes2, flips2 = _invariant_views()
    with pytest.raises(ValueError, match="batch of at least 2 images"):
        relation_invariance(maps1[:1], maps2[:1], boxes1[:1], flips1[:1], boxes2[:1], flips2[:1])
    left = torch.tensor([[0.0, 0.0, 0.4, 1.0]] * 4)
    right = torch.tensor([[0.6, 0.0, 1.0, 1.0]] * 3 + [FULL])
    with pytest.raises(ValueError, match="at least 2 pairs of views that overlap, got 1 of 4"):
        relation_invariance(maps1, maps2, left, flips1, right, flips2)
    # A collapsed model: every image's features equal, so no image differs from another.
    same = torch.ones(4, 12, 5, 5)
    with pytest.raises(ValueError, match="controlled measure is undefined"):
        relation_invariance(same, same, boxes1, flips1, boxes2, flips2).summary()


def test_relation_maps_bad_input() -> None:
    views = _invariant_views()
    with pytest.raises(ValueError, match=r"point must be \(row, col\) inside the lattice \(4, 4\)"):
        relation_maps(*views, (4, 0))
    with pytest.raises(ValueError, match="point must be"):
        relation_maps(*views, (1.0, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="item must be < B = 4"):
        relation_maps(*views, (0, 0), item=4)
    with pytest.raises(ValueError, match=r"head must be None or an int in \[0, 3\)"):
        relation_maps(*views, (0, 0), num_heads=3, head=3)
    maps1, maps2, _, flips1, _, flips2 = views
    apart = torch.tensor([[0.6, 0.0, 1.0, 1.0]] * 4)
    with pytest.raises(ValueError, match="views of item 0 do not overlap"):
        relation_maps(maps1, maps2, torch.tensor([[0.0, 0.0, 0.4, 1.0]] * 4), flips1, apart,
                      flips2, (0, 0))  # fmt: skip
    with pytest.raises(TypeError, match="maps must be a RelationMaps"):
        plot_relation_maps("maps")  # type: ignore[arg-type]


def test_public_names() -> None:
    import sere_loss

    assert sere_loss.diagnostics is diagnostics
    assert sorted(diagnostics.__all__) == diagnostics.__all__
