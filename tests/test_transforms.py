"""Multi-crop transforms: the recorded geometry checked on images whose pixels encode their own
coordinates, through the losses' sampling, through PIL, collation and the presets' recipes.

Expectations are stated from first principles, never with the code under test: pixel ``k`` of an
``n``-pixel view covers the original span ``x0 + (x1 - x0) * [k, k + 1] / n`` (centre at
``(k + 0.5) / n``), counted from the right when the view is flipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.v2 import InterpolationMode

import sere_loss
from conftest import TOLERANCES
from sere_loss import SERELoss
from sere_loss import functional as SF
from sere_loss.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    CropSpec,
    MultiCropTransform,
    collate_crops,
    dino_sere_transform,
    ibot_sere_transform,
    mocov3_transform,
)

H0, W0 = 240, 320  # coordinate image, deliberately not square

# Float32 rounding of the views' values (all in [0, 1]): the house tolerance.
FLOAT32_ATOL = TOLERANCES[torch.float32]["atol"]
# Antialiased bicubic resizing (a = -0.5, PIL's filter) reproduces a linear ramp exactly when
# upscaling. When downscaling by s it stretches the kernel by s and samples it at the source
# pixels; the normalised weights then keep a small first moment: a residual of at most 0.0293
# source pixels, measured for 16..224 px outputs from up to 1200 px crops (worst near s = 1.4;
# test_resize_premise keeps the premise checked). Allowed: 0.03 source pixels, i.e. 9e-5 of the
# image's width and 1.25e-4 of its height here, on top of float32 rounding.
DOWNSCALE_RESIDUAL_PX = 0.03

PRESETS: dict[str, Callable[..., MultiCropTransform]] = {
    "dino_sere": dino_sere_transform,
    "ibot_sere": ibot_sere_transform,
    "mocov3": mocov3_transform,
}


@pytest.fixture
def seeded() -> Iterator[None]:
    # The transforms draw from torch's global generator; seed it without leaking the state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _keep(image: torch.Tensor) -> torch.Tensor:
    return image


def _geometric_only(transform: MultiCropTransform) -> MultiCropTransform:
    # Everything but the photometric part is kept (sizes, scales, ratios, flip_p, flip_last).
    transform.crops = [dataclasses.replace(spec, photometric=_keep) for spec in transform.crops]
    return transform


def _coordinate_image(height: int = H0, width: int = W0) -> torch.Tensor:
    # Channel 0: normalised x of each pixel centre; channel 1: normalised y; channel 2: 0.5.
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    return torch.stack(
        [
            x[None, :].expand(height, width),
            y[:, None].expand(height, width),
            torch.full((height, width), 0.5, dtype=torch.float64),
        ]
    ).float()


def _centres(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _predict(
    box: torch.Tensor,
    flip: bool,
    n: int | tuple[int, int],
    centres: Callable[[int], torch.Tensor] = _centres,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Original (x, y) at the centres of the columns and rows of an n = (rows, columns) view of
    # ``box`` (an int n: n x n).
    rows, cols = (n, n) if isinstance(n, int) else n
    x0, y0, x1, y1 = box.double().tolist()
    u = centres(cols)
    u = 1.0 - u if flip else u
    return x0 + (x1 - x0) * u, y0 + (y1 - y0) * centres(rows)


def _crop_pixels(box: torch.Tensor, width: int, height: int) -> tuple[int, int]:
    # Crops are whole pixels of the original: the box edges sit on pixel boundaries.
    w = float(box[2] - box[0]) * width
    h = float(box[3] - box[1]) * height
    assert abs(w - round(w)) < 1e-3, f"box width {w} px is not a whole number of pixels"
    assert abs(h - round(h)) < 1e-3, f"box height {h} px is not a whole number of pixels"
    return round(w), round(h)


def _margin(crop: int, n: int) -> int:
    # Output pixels, from each edge, whose bicubic kernel reaches past the crop. The kernel's
    # radius is 2 source pixels, stretched to 2 * s when downscaling by s = crop / n; output
    # pixel i (centre at s * (i + 0.5) source px from the edge) reads only pixels of the crop
    # when s * (i + 0.5) + 0.5 >= radius. Downscaling gives 2; upscaling 1.5 / s - 0.5 rounded
    # up (7 for a 64 px crop resized to 224).
    s = crop / n
    return max(0, math.ceil((2.0 * max(s, 1.0) - 0.5) / s - 0.5))


def _tolerance(crop: int, n: int, extent: int) -> float:
    # Normalised tolerance along one axis of the original image (``extent`` pixels long).
    return FLOAT32_ATOL + (DOWNSCALE_RESIDUAL_PX / extent if crop > n else 0.0)


def _ratio_to_tolerance(
    view: torch.Tensor,
    box: torch.Tensor,
    flip: bool,
    *,
    width: int = W0,
    height: int = H0,
    centres: Callable[[int], torch.Tensor] = _centres,
) -> tuple[float, float]:
    # Worst |value - prediction| over the interior pixels, as a multiple of the tolerance, for
    # the x (channel 0) and y (channel 1) coordinates. Views need not be square.
    ny, nx = view.shape[-2:]
    cw, ch = _crop_pixels(box, width, height)
    mx, my = _margin(cw, nx), _margin(ch, ny)
    xs, ys = _predict(box, flip, (ny, nx), centres)
    cols, rows = slice(mx, nx - mx), slice(my, ny - my)
    err_x = (view[0, rows, cols].double() - xs[None, cols]).abs().max()
    err_y = (view[1, rows, cols].double() - ys[rows, None]).abs().max()
    return (
        float(err_x) / _tolerance(cw, nx, width),
        float(err_y) / _tolerance(ch, ny, height),
    )


def _views_of(transform: MultiCropTransform, image: object, calls: int) -> Iterator[tuple]:
    for _ in range(calls):
        crops = transform(image)
        for v, (view, spec) in enumerate(zip(crops.views, transform.crops, strict=True)):
            yield crops, v, view, spec


def test_resize_premise() -> None:
    # The premise of the tolerance and margin above: the antialiased bicubic filter on a 1-D
    # ramp of source pixel centres, exact when upscaling, within 0.03 px when downscaling.
    for n_out in (96, 224):
        for n_in in [*range(40, n_out, 7), *range(n_out, 3 * n_out, 5)]:
            ramp = torch.arange(n_in, dtype=torch.float64) + 0.5
            out = F.interpolate(
                ramp.view(1, 1, 1, -1), size=(1, n_out), mode="bicubic", antialias=True
            ).view(-1)
            m = _margin(n_in, n_out)
            err = (out - _centres(n_out) * n_in)[m : n_out - m].abs().max()
            assert err <= (DOWNSCALE_RESIDUAL_PX if n_in > n_out else 1e-9), (n_in, n_out)


@pytest.mark.usefixtures("seeded")
class TestCoordinateImage:
    CALLS = 10

    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_views_show_what_the_geometry_predicts(self, preset: str) -> None:
        transform = _geometric_only(PRESETS[preset]())
        image = _coordinate_image()
        seen_flips: set[bool] = set()
        seen_scaling: set[bool] = set()
        for crops, v, view, spec in _views_of(transform, image, self.CALLS):
            assert crops.boxes.dtype == torch.float32
            assert crops.flips.dtype == torch.bool
            assert crops.boxes.shape == (len(transform.crops), 4)
            assert crops.flips.shape == (len(transform.crops),)
            assert view.shape == (3, spec.size, spec.size)
            assert view.dtype == torch.float32
            assert type(view) is torch.Tensor
            box, flip = crops.boxes[v], bool(crops.flips[v])
            seen_flips.add(flip)
            rx, ry = _ratio_to_tolerance(view, box, flip)
            assert rx <= 1, f"view {v}: x off by {rx:.1f} x the tolerance (box {box}, {flip=})"
            assert ry <= 1, f"view {v}: y off by {ry:.1f} x the tolerance (box {box}, {flip=})"
            # A constant channel stays constant everywhere, borders included.
            torch.testing.assert_close(view[2], torch.full_like(view[2], 0.5))
            cw, ch = _crop_pixels(box, W0, H0)
            seen_scaling.update((cw > spec.size, ch > spec.size))
        assert seen_flips == {False, True}, "the draw should hold flipped and unflipped views"
        assert seen_scaling == {False, True}, "the draw should hold up- and downscaled axes"

    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_boxes_follow_the_crop_spec(self, preset: str) -> None:
        transform = _geometric_only(PRESETS[preset]())
        image = _coordinate_image()
        for crops, v, _view, spec in _views_of(transform, image, self.CALLS):
            x0, y0, x1, y1 = crops.boxes[v].tolist()
            assert 0 <= x0 < x1 <= 1
            assert 0 <= y0 < y1 <= 1
            # RandomResizedCrop rounds w = sqrt(A * r) and h = sqrt(A / r) to whole pixels, so
            # the drawn area A and ratio r lie within half a pixel of w and h.
            w, h = _crop_pixels(crops.boxes[v], W0, H0)
            lo_area, hi_area = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
            assert lo_area <= spec.scale[1] * W0 * H0, (w, h, spec.scale)
            assert hi_area >= spec.scale[0] * W0 * H0, (w, h, spec.scale)
            assert (w - 0.5) / (h + 0.5) <= spec.ratio[1], (w, h, spec.ratio)
            assert (w + 0.5) / (h - 0.5) >= spec.ratio[0], (w, h, spec.ratio)

    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_the_comparison_can_fail(self, preset: str) -> None:
        # Mutations of the expected geometry must be caught: ignoring the flip, the half-pixel
        # offset of pixel centres (k / n), and the align_corners=True convention (k / (n - 1)).
        transform = _geometric_only(PRESETS[preset]())
        image = _coordinate_image()
        flipped = 0
        for crops, v, view, _spec in _views_of(transform, image, self.CALLS):
            box, flip = crops.boxes[v], bool(crops.flips[v])
            if flip:
                flipped += 1
                rx, _ = _ratio_to_tolerance(view, box, False)
                assert rx > 100, f"ignoring the flip of view {v} went unnoticed ({rx:.1f})"
            for centres in (
                lambda n: torch.arange(n, dtype=torch.float64) / n,
                lambda n: torch.arange(n, dtype=torch.float64) / (n - 1),
            ):
                rx, ry = _ratio_to_tolerance(view, box, flip, centres=centres)
                assert min(rx, ry) > 3, f"a half-pixel error in view {v} went unnoticed"
        assert flipped > 0

    def test_flip_last_flips_after_the_photometric_part(self) -> None:
        received: list[torch.Tensor] = []

        def record(image: torch.Tensor) -> torch.Tensor:
            received.append(image.clone())
            return image

        image = _coordinate_image()
        for flip_last in (False, True):
            spec = CropSpec(32, (0.5, 1.0), flip_p=1.0, flip_last=flip_last, photometric=record)
            received.clear()
            crops = MultiCropTransform([spec])(image)
            assert crops.flips.tolist() == [True]
            xs, _ = _predict(crops.boxes[0], True, 32)
            # The photometric part sees the flipped view unless flip_last; the output is
            # flipped either way.
            seen = received[0][0, 16].double()
            increasing = bool(seen[-5] > seen[5])
            assert increasing is flip_last
            assert (crops.views[0][0, 16, 5:-5].double() - xs[5:-5]).abs().max() < 1e-3


@pytest.mark.usefixtures("seeded")
class TestWithTheLossesSampling:
    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_both_views_read_the_same_original_point(self, preset: str) -> None:
        # overlap_grids from the recorded geometry, sample_region on each view of the coordinate
        # image: both views must read the lattice's own original coordinates (cell centres of
        # the intersection of the boxes). Points whose bilinear taps reach a view's resampling
        # margin are left out; the rest are exact to the views' tolerance.
        transform = _geometric_only(PRESETS[preset]())
        num_global = transform.num_global
        image = _coordinate_image()
        checked, pairs_with_flips = 0, 0
        for _ in range(4):
            crops = transform(image)
            pairs = SF.view_pairs(num_global, len(crops.views) - num_global)
            for i, j in pairs:
                lattice = 13 if j < num_global else 6
                bi, bj = crops.boxes[i], crops.boxes[j]
                fi, fj = crops.flips[i : i + 1], crops.flips[j : j + 1]
                g1, g2, valid = SF.overlap_grids(bi[None], fi, bj[None], fj, lattice, "center")
                lo = torch.maximum(bi[:2], bj[:2]).double()
                hi = torch.minimum(bi[2:], bj[2:]).double()
                if not bool(lo[0] < hi[0] and lo[1] < hi[1]):
                    assert not bool(valid)
                    continue
                assert bool(valid)
                xs = lo[0] + (hi[0] - lo[0]) * _centres(lattice)
                ys = lo[1] + (hi[1] - lo[1]) * _centres(lattice)
                ex = xs[None, :].expand(lattice, lattice).reshape(-1)
                ey = ys[:, None].expand(lattice, lattice).reshape(-1)
                keep = torch.ones(lattice * lattice, dtype=torch.bool)
                reads, tols = [], []
                for v, grid in ((i, g1), (j, g2)):
                    view, box, flip = crops.views[v], crops.boxes[v].double(), bool(crops.flips[v])
                    n = view.shape[-1]
                    cw, ch = _crop_pixels(crops.boxes[v], W0, H0)
                    # The lattice point in the view's pixel-centre index: u * n - 1/2.
                    u = (ex - box[0]) / (box[2] - box[0])
                    u = 1 - u if flip else u
                    px = u * n - 0.5
                    py = (ey - box[1]) / (box[3] - box[1]) * n - 0.5
                    mx, my = _margin(cw, n), _margin(ch, n)
                    keep &= (px >= mx) & (px <= n - 1 - mx) & (py >= my) & (py <= n - 1 - my)
                    sampled = SF.sample_region(view[None], grid, padding="border")[0]
                    reads.append(sampled.double())
                    tols.append((_tolerance(cw, n, W0), _tolerance(ch, n, H0)))
                if not bool(keep.any()):
                    continue
                pairs_with_flips += bool(fi ^ fj)
                for read, (tx, ty) in zip(reads, tols, strict=True):
                    assert (read[keep, 0] - ex[keep]).abs().max() <= tx, (preset, i, j)
                    assert (read[keep, 1] - ey[keep]).abs().max() <= ty, (preset, i, j)
                (r1, r2), (t1, t2) = reads, tols
                assert (r1[keep, :2] - r2[keep, :2]).abs().max() <= max(t1) + max(t2)
                checked += int(keep.sum())
        assert checked > 200, "too few lattice points were checked for the test to mean anything"
        assert pairs_with_flips > 0, "no pair with one flipped and one unflipped view was checked"


def _pil_coordinate_image(height: int = 200, width: int = 300) -> Image.Image:
    # Red encodes x, green y, on the 0..255 scale: one level is 1.18 px in x, 0.78 px in y.
    red = torch.round(255 * _centres(width))[None, :].expand(height, width)
    green = torch.round(255 * _centres(height))[:, None].expand(height, width)
    blue = torch.full((height, width), 128.0, dtype=torch.float64)
    array = torch.stack([red, green, blue], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


@pytest.mark.usefixtures("seeded")
class TestPILInput:
    def test_views_show_what_the_geometry_predicts(self) -> None:
        # Quantisation (half a level in, half a level out, slightly amplified by the cubic's
        # lobes) stays within 1.5 original pixels; a (H, W) swap or a PIL size bug would not.
        height, width = 200, 300
        image = _pil_coordinate_image(height, width)
        transform = _geometric_only(dino_sere_transform(num_local=4))
        flips: set[bool] = set()
        for crops, v, view, spec in _views_of(transform, image, 6):
            assert view.dtype == torch.uint8
            assert view.shape == (3, spec.size, spec.size)
            box, flip = crops.boxes[v], bool(crops.flips[v])
            flips.add(flip)
            n = spec.size
            cw, ch = _crop_pixels(box, width, height)
            mx, my = _margin(cw, n), _margin(ch, n)
            xs, ys = _predict(box, flip, n)
            cols, rows = slice(mx, n - mx), slice(my, n - my)
            err_x = (view[0, rows, cols].double() / 255 - xs[None, cols]).abs().max() * width
            err_y = (view[1, rows, cols].double() / 255 - ys[rows, None]).abs().max() * height
            assert err_x <= 1.5, f"view {v}: x off by {float(err_x):.2f} px"
            assert err_y <= 1.5, f"view {v}: y off by {float(err_y):.2f} px"
        assert flips == {False, True}

    def test_pil_and_tensor_inputs_agree(self) -> None:
        image = _pil_coordinate_image()
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        assert tensor.shape == (3, 200, 300)
        transform = _geometric_only(dino_sere_transform(num_local=2))
        state = torch.random.get_rng_state()
        from_pil = transform(image)
        torch.random.set_rng_state(state)
        from_tensor = transform(tensor)
        assert torch.equal(from_pil.boxes, from_tensor.boxes)
        assert torch.equal(from_pil.flips, from_tensor.flips)
        for a, b in zip(from_pil.views, from_tensor.views, strict=True):
            assert torch.equal(a, b)

    def test_non_rgb_pil_images_are_converted(self) -> None:
        transform = _geometric_only(mocov3_transform(size=32))
        for mode in ("L", "RGBA"):
            crops = transform(_pil_coordinate_image().convert(mode))
            assert [tuple(v.shape) for v in crops.views] == [(3, 32, 32)] * 2


def _small_transform() -> MultiCropTransform:
    return MultiCropTransform(
        [CropSpec(32, (0.4, 1.0)), CropSpec(32, (0.4, 1.0))]
        + [CropSpec(16, (0.05, 0.4)) for _ in range(3)]
    )


class _Images(Dataset):
    def __init__(self, n: int, transform: MultiCropTransform) -> None:
        gen = torch.Generator().manual_seed(5)
        self.images = [torch.randint(0, 256, (3, 40, 56), generator=gen, dtype=torch.uint8)] * n
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Crops, int]:
        return self.transform(self.images[index]), index % 3


@pytest.mark.usefixtures("seeded")
class TestCollation:
    B, V = 3, 5

    def _check(self, batch: Crops, items: list[Crops]) -> None:
        assert isinstance(batch, Crops)
        assert len(batch.views) == self.V
        for v, views in enumerate(batch.views):
            size = 32 if v < 2 else 16
            assert views.shape == (self.B, 3, size, size)
            for b, item in enumerate(items):
                assert torch.equal(views[b], item.views[v])
        assert batch.boxes.shape == (self.B, self.V, 4)
        assert batch.boxes.dtype == torch.float32
        assert batch.flips.shape == (self.B, self.V)
        assert batch.flips.dtype == torch.bool
        assert torch.equal(batch.boxes, torch.stack([item.boxes for item in items]))
        assert torch.equal(batch.flips, torch.stack([item.flips for item in items]))

    @pytest.mark.parametrize("collate", [collate_crops, default_collate])
    def test_list_of_crops(self, collate: Callable) -> None:
        transform = _small_transform()
        image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
        items = [transform(image) for _ in range(self.B)]
        self._check(collate(items), items)

    @pytest.mark.parametrize("collate", [collate_crops, default_collate])
    def test_list_of_pairs(self, collate: Callable) -> None:
        transform = _small_transform()
        image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
        items = [(transform(image), k) for k in range(self.B)]
        crops, targets = collate(items)
        self._check(crops, [c for c, _ in items])
        assert targets.tolist() == list(range(self.B))

    def test_to_moves_everything(self) -> None:
        crops = _small_transform()(torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8))
        moved = crops.to("cpu")
        assert isinstance(moved, Crops)
        assert all(torch.equal(a, b) for a, b in zip(moved.views, crops.views, strict=True))
        assert torch.equal(moved.boxes, crops.boxes)
        assert torch.equal(moved.flips, crops.flips)

    def test_to_moves_nested_views(self) -> None:
        views = [[torch.zeros(3, 4, 4)], [torch.ones(3, 2, 2), torch.ones(3, 2, 2)]]
        crops = Crops(views, torch.rand(3, 4), torch.zeros(3, dtype=torch.bool))  # type: ignore[arg-type]
        moved = crops.to("meta")
        assert [[v.device.type for v in group] for group in moved.views] == [["meta"], ["meta"] * 2]
        assert moved.boxes.device.type == "meta"

    def test_boxes_are_checked_where_they_are_made(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # A crop that starts above the image (a bad sampler) is caught in the transform, on the
        # host, even where the loss's own value checks are off.
        transform = _small_transform()
        monkeypatch.setattr(
            MultiCropTransform, "_draw_box", lambda self, source, spec, drawn: (-4, 0, 20, 20)
        )
        previous = sere_loss.set_value_checks("off")
        try:
            with pytest.raises(ValueError, match=r"the crop boxes drawn must be normalised"):
                transform(torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8))
        finally:
            sere_loss.set_value_checks(previous)

    def test_data_loader_feeds_the_loss(self) -> None:
        transform = _small_transform()
        transform.crops = [
            dataclasses.replace(s, photometric=lambda t: t.float() / 255) for s in transform.crops
        ]
        loader = DataLoader(
            _Images(4, transform), batch_size=2, num_workers=0, collate_fn=collate_crops
        )
        dim, patch = 12, 8
        embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)  # fake patch tokens
        sere = SERELoss(dim, num_heads=3, global_lattice=4, local_lattice=2)
        batches = 0
        for crops, targets in loader:
            assert targets.shape == (2,)
            tokens = [embed(v).flatten(2).transpose(1, 2) for v in crops.views]
            g = transform.num_global
            assert [tuple(t.shape) for t in tokens] == [(2, 16, dim)] * g + [(2, 4, dim)] * 3
            loss = sere(
                tokens[:g], [t.detach() for t in tokens[:g]], crops.boxes, crops.flips, tokens[g:]
            )
            assert loss.shape == ()
            assert torch.isfinite(loss)
            loss.backward()
            assert embed.weight.grad is not None
            assert torch.isfinite(embed.weight.grad).all()
            batches += 1
        assert batches == 2


def _spec(**override: object) -> CropSpec:
    args: dict = {"size": 32, "scale": (0.2, 1.0)}
    args.update(override)
    return CropSpec(**args)


class TestBadInput:
    @pytest.mark.parametrize(
        ("image", "error", "match"),
        [
            ("cat.jpg", TypeError, "image must be a PIL image"),
            (None, TypeError, "image must be a PIL image"),
            (torch.zeros(40, 56), ValueError, r"image must be a \(3, H, W\)"),
            (torch.zeros(1, 3, 40, 56), ValueError, r"image must be a \(3, H, W\)"),
            (torch.zeros(4, 40, 56), ValueError, r"image must be a \(3, H, W\).*\(4, 40, 56\)"),
            (torch.zeros(3, 0, 56), ValueError, "image must not be empty"),
        ],
    )
    def test_non_images(self, image: object, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            _small_transform()(image)

    @pytest.mark.parametrize(
        ("override", "error", "match"),
        [
            ({"size": 0}, ValueError, "size"),
            ({"size": 32.0}, TypeError, "size"),
            ({"size": True}, TypeError, "size"),
            ({"scale": (0.5, 0.2)}, ValueError, "scale"),
            ({"scale": (0.0, 1.0)}, ValueError, "scale"),
            ({"scale": (0.5, 1.5)}, ValueError, "scale"),
            ({"scale": (0.5,)}, ValueError, "scale"),
            ({"scale": (float("nan"), 1.0)}, ValueError, "scale"),
            ({"scale": 0.5}, ValueError, "scale"),
            ({"scale": ("a", "b")}, ValueError, "scale"),
            ({"ratio": (4 / 3, 3 / 4)}, ValueError, "ratio"),
            ({"ratio": (0.0, 1.0)}, ValueError, "ratio"),
            ({"ratio": (1.0, float("inf"))}, ValueError, "ratio"),
            ({"flip_p": 1.5}, ValueError, "flip_p"),
            ({"flip_p": -0.1}, ValueError, "flip_p"),
            ({"flip_p": "0.5"}, TypeError, "flip_p"),
            ({"photometric": 3}, TypeError, "photometric"),
        ],
    )
    def test_crop_spec(self, override: dict, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            _spec(**override)

    @pytest.mark.parametrize(
        ("crops", "num_global", "error", "match"),
        [
            ([], None, ValueError, "crops is empty"),
            ([_spec(), "crop"], None, TypeError, r"crops\[1\] must be a CropSpec, got str"),
            ([_spec(), _spec()], 3, ValueError, "num_global"),
            ([_spec(), _spec()], 0, ValueError, "num_global"),
            ([_spec(), _spec()], 1.0, TypeError, "num_global"),
            (_spec(), None, TypeError, "crops"),
            ([_spec(size=16), _spec(size=32)], 1, ValueError, "global crops must come first"),
            ([_spec(size=16), _spec(size=32), _spec(size=32)], None, ValueError, "first"),
        ],
    )
    def test_multi_crop(
        self, crops: list, num_global: object, error: type[Exception], match: str
    ) -> None:
        with pytest.raises(error, match=match):
            MultiCropTransform(crops, num_global=num_global)  # type: ignore[arg-type]

    @pytest.mark.parametrize("preset", [dino_sere_transform, ibot_sere_transform])
    def test_negative_num_local(self, preset: Callable[..., MultiCropTransform]) -> None:
        with pytest.raises(ValueError, match="num_local"):
            preset(num_local=-1)
        with pytest.raises(TypeError, match="num_local"):
            preset(num_local=2.5)


class TestInputKinds:
    def test_grayscale_tensor_is_made_rgb(self) -> None:
        gray = torch.randint(0, 256, (1, 40, 56), dtype=torch.uint8)
        torch.manual_seed(0)
        a = _small_transform()(gray)
        torch.manual_seed(0)
        b = _small_transform()(gray.expand(3, -1, -1).clone())
        for va, vb in zip(a.views, b.views, strict=True):
            torch.testing.assert_close(va, vb)

    def test_float_input_is_solarised_like_uint8(self) -> None:
        # The recipes' solarisation threshold (128) is for 8-bit images; float input in [0, 1]
        # is brought to uint8 first, so the same draw gives the same view up to 8-bit rounding
        # (two levels, 2 / 255 / std < 0.04 after normalisation), except for the few pixels that
        # rounding moves across the threshold. Without the conversion, the 1 in 5 solarised
        # views would differ on about half their pixels.
        image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
        transform = dino_sere_transform(global_size=32, local_size=16, num_local=1)
        out = []
        for source in (image, image.float() / 255):
            torch.manual_seed(3)
            out.append(torch.stack([transform(source).views[1] for _ in range(20)]))
        differs = (out[0] - out[1]).abs() > 0.04
        assert differs.float().mean() < 0.02


class TestPresets:
    @pytest.mark.parametrize(
        ("preset", "sizes", "scales", "flip_last"),
        [
            (
                dino_sere_transform,
                [224] * 2 + [96] * 4,
                [(0.35, 1.0)] * 2 + [(0.05, 0.35)] * 4,
                False,
            ),
            (
                ibot_sere_transform,
                [224] * 2 + [96] * 10,
                [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 10,
                False,
            ),
            (mocov3_transform, [224] * 2, [(0.08, 1.0)] * 2, True),
        ],
    )
    def test_recipe(
        self,
        preset: Callable[[], MultiCropTransform],
        sizes: list[int],
        scales: list[tuple[float, float]],
        flip_last: bool,
    ) -> None:
        transform = preset()
        assert transform.num_global == 2
        assert transform.num_local == len(sizes) - 2
        assert [s.size for s in transform.crops] == sizes
        assert [tuple(s.scale) for s in transform.crops] == scales
        for spec in transform.crops:
            assert tuple(spec.ratio) == (3 / 4, 4 / 3)
            assert spec.flip_p == 0.5
            assert spec.flip_last is flip_last
            assert spec.interpolation == InterpolationMode.BICUBIC
        # The two global views are asymmetric (blur always / rarely, solarisation on one).
        assert transform.crops[0].photometric is not transform.crops[1].photometric

    def test_num_global_defaults_to_the_largest_views(self) -> None:
        transform = _small_transform()
        assert (transform.num_global, transform.num_local) == (2, 3)
        assert "num_global=2" in repr(transform)

    @pytest.mark.parametrize("preset", list(PRESETS))
    @pytest.mark.usefixtures("seeded")
    def test_photometric_output_is_normalised(self, preset: str) -> None:
        # A grey image stays grey through jitter, grayscale, blur and solarisation, only its
        # level changes; after ToDtype and Normalize every channel c holds
        # (level / 255 - mean_c) / std_c with one whole level for all three channels.
        # Small views: the photometric pipeline does not depend on the size.
        small = {"mocov3": {"size": 48}}.get(preset, {"global_size": 48, "local_size": 24})
        transform = PRESETS[preset](**small)
        grey = torch.full((3, 200, 300), 128, dtype=torch.uint8)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
        levels = set()
        for _ in range(4):
            crops = transform(grey)
            for view, spec in zip(crops.views, transform.crops, strict=True):
                assert view.dtype == torch.float32
                assert view.shape == (3, spec.size, spec.size)
                assert torch.isfinite(view).all()
                level = (view.double() * std + mean) * 255
                assert (level - level[0, 0, 0]).abs().max() < 1e-3
                assert abs(level[0, 0, 0] - torch.round(level[0, 0, 0])) < 1e-3
                assert 0 <= level[0, 0, 0] <= 255
                levels.add(round(float(level[0, 0, 0])))
        assert len(levels) > 1, "the colour jitter never changed the grey level"

    @pytest.mark.usefixtures("seeded")
    def test_mean_and_std_are_configurable(self) -> None:
        transform = dino_sere_transform(num_local=1, mean=(0.0, 0.0, 0.0), std=(0.5, 0.5, 0.5))
        crops = transform(torch.full((3, 200, 300), 100, dtype=torch.uint8))
        for view in crops.views:
            level = view.double() * 0.5 * 255
            assert (level - level[0, 0, 0]).abs().max() < 1e-3
            assert abs(level[0, 0, 0] - torch.round(level[0, 0, 0])) < 1e-3


@pytest.mark.usefixtures("seeded")
class TestNonSquareViews:
    SPECS = (
        CropSpec((48, 80), (0.3, 1.0), ratio=(1.2, 2.0)),
        CropSpec((80, 48), (0.3, 1.0), ratio=(0.5, 0.8)),
        CropSpec((20, 36), (0.05, 0.3)),
        CropSpec(24, (0.05, 0.3)),
    )

    def test_views_show_what_the_geometry_predicts(self) -> None:
        # The same pixel-by-pixel comparison as for the presets, rows and columns predicted
        # each from their own count: a view resized to (w, h) or read as square would fail.
        transform = MultiCropTransform(self.SPECS, num_global=2)
        image = _coordinate_image()
        flips = set()
        for crops, v, view, spec in _views_of(transform, image, 8):
            rows, cols = spec.size if isinstance(spec.size, tuple) else (spec.size, spec.size)
            assert view.shape == (3, rows, cols)
            box, flip = crops.boxes[v], bool(crops.flips[v])
            flips.add(flip)
            rx, ry = _ratio_to_tolerance(view, box, flip)
            assert max(rx, ry) <= 1, f"view {v}: off by {max(rx, ry):.1f} x the tolerance"
        assert flips == {False, True}

    def test_globals_are_the_largest_by_area(self) -> None:
        # 48 x 80 = 3840 and 80 x 48 px are the largest views; 20 x 36 = 720 and 24 x 24 = 576.
        assert MultiCropTransform(self.SPECS).num_global == 2
        assert "48x80px" in repr(MultiCropTransform(self.SPECS))
        with pytest.raises(ValueError, match="global crops must come first"):
            MultiCropTransform([CropSpec((10, 90), (0.5, 1)), CropSpec(31, (0.5, 1))], 1)

    def test_a_list_size_is_kept_as_a_pair(self) -> None:
        assert CropSpec([30, 40], (0.5, 1.0)).size == (30, 40)  # type: ignore[arg-type]
        assert CropSpec(30, (0.5, 1.0)).size == 30

    @pytest.mark.parametrize(
        ("size", "error", "match"),
        [
            ((0, 32), ValueError, r"size\[0\]"),
            ((32, -1), ValueError, r"size\[1\]"),
            ((32, 32.0), TypeError, r"size\[1\]"),
            ((32, 32, 3), ValueError, r"pair \(height, width\)"),
            ("32", TypeError, "size"),
        ],
    )
    def test_bad_sizes(self, size: object, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            CropSpec(size, (0.5, 1.0))  # type: ignore[arg-type]

    @pytest.mark.parametrize("preset", [dino_sere_transform, ibot_sere_transform])
    def test_presets_take_height_and_width(self, preset: Callable[..., MultiCropTransform]) -> None:
        transform = preset(global_size=(32, 48), local_size=(16, 24), num_local=1)
        crops = transform(torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8))
        assert [tuple(v.shape) for v in crops.views] == [(3, 32, 48)] * 2 + [(3, 16, 24)]
        moco = mocov3_transform(size=(40, 24))
        assert [tuple(v.shape) for v in moco(crops.views[0]).views] == [(3, 40, 24)] * 2


def _cover(box: torch.Tensor, others: torch.Tensor) -> float:
    # The largest fraction of ``box``'s area inside one of ``others``, from the boxes alone.
    x0, y0, x1, y1 = box.double().tolist()
    best = 0.0
    for a0, b0, a1, b1 in others.double().tolist():
        w = max(0.0, min(x1, a1) - max(x0, a0))
        h = max(0.0, min(y1, b1) - max(y0, b0))
        best = max(best, w * h / ((x1 - x0) * (y1 - y0)))
    return best


class _CountDraws:
    """Counts the calls to RandomResizedCrop's sampling of a box (and forwards them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torchvision.transforms import v2

        self.calls = 0
        self.original = v2.RandomResizedCrop.get_params
        monkeypatch.setattr(v2.RandomResizedCrop, "get_params", self)

    def __call__(self, *args: object) -> tuple[int, int, int, int]:
        self.calls += 1
        return self.original(*args)  # type: ignore[no-any-return]


@pytest.mark.usefixtures("seeded")
class TestMinOverlap:
    def test_every_view_overlaps_an_earlier_global_view(self) -> None:
        # Measured on 500 images: without the option a local view misses 0.9 one time in three
        # (the second global view misses 0.8 of the first at scale (0.6, 1) one time in three);
        # with it and 100 tries, none did.
        image = _coordinate_image()
        low_without = 0
        for local, glob in ((0.9, 0.0), (0.0, 0.8)):
            for min_overlap in (max(local, glob), 0.0):
                transform = _geometric_only(
                    dino_sere_transform(
                        global_size=16,  # only the boxes are checked: small views are enough
                        local_size=8,
                        num_local=6,
                        min_overlap=min_overlap,
                        global_scale=(0.6, 1.0) if glob else (0.35, 1.0),
                    )
                )
                transform.max_tries = 100
                for _ in range(20):
                    boxes = transform(image).boxes
                    covers = [_cover(boxes[v], boxes[:2]) for v in range(2, 8)]
                    first = _cover(boxes[1], boxes[:1])
                    if min_overlap:
                        assert first >= glob
                        assert min(covers) >= local
                    else:
                        low_without += first < glob if glob else sum(c < local for c in covers)
        assert low_without > 20, "the test's setting should need redraws without the option"

    def test_zero_draws_each_box_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        count = _CountDraws(monkeypatch)
        dino_sere_transform(global_size=16, local_size=8, num_local=3)(_coordinate_image())
        assert count.calls == 5

    def test_gives_up_after_max_tries_keeping_the_best_draw(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A 90 % local crop never fits inside a 20 % global one: every try fails.
        specs = [CropSpec(32, (0.2, 0.2), flip_p=0.0), CropSpec(16, (0.9, 0.9), flip_p=0.0)]
        transform = MultiCropTransform(specs, num_global=1, min_overlap=1.0, max_tries=7)
        image = _coordinate_image()
        state = torch.random.get_rng_state()
        count = _CountDraws(monkeypatch)
        crops = transform(image)
        assert count.calls == 1 + 7
        # The same draws by hand: the global box, its flip draw, then seven local candidates.
        torch.random.set_rng_state(state)

        def box(spec: CropSpec) -> torch.Tensor:
            top, left, h, w = count.original(image, list(spec.scale), list(spec.ratio))
            return torch.tensor([left / W0, top / H0, (left + w) / W0, (top + h) / H0])

        glob = box(specs[0])
        torch.rand(())
        candidates = [box(specs[1]) for _ in range(7)]
        covers = [_cover(c, glob[None]) for c in candidates]
        assert max(covers) < 1.0
        assert len(set(covers)) > 1, "the candidates should differ in how much they overlap"
        torch.testing.assert_close(crops.boxes[0], glob)
        torch.testing.assert_close(crops.boxes[1], candidates[covers.index(max(covers))])

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"min_overlap": 1.5}, ValueError, "min_overlap"),
            ({"min_overlap": -0.1}, ValueError, "min_overlap"),
            ({"min_overlap": "0.5"}, TypeError, "min_overlap"),
            ({"max_tries": 0}, ValueError, "max_tries"),
            ({"max_tries": 2.0}, TypeError, "max_tries"),
        ],
    )
    def test_bad_options(self, kwargs: dict, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            MultiCropTransform([_spec(), _spec()], **kwargs)


def test_a_torchvision_built_for_another_torch_gets_a_message_that_says_what_to_do() -> None:
    # pip can pair a local CPU-only torch wheel with a registry torchvision built for another
    # torch; torchvision's import then fails deep inside with "operator torchvision::nms does
    # not exist". The transforms say what happened and how to repair it.
    code = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision.transforms":
            raise RuntimeError("operator torchvision::nms does not exist")
sys.meta_path.insert(0, Broken())
try:
    import sere_loss.transforms
except ImportError as error:
    print(error)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.match(
        r"torchvision \S+ does not work with the installed torch \S+ \(operator torchvision::nms "
        r"does not exist\): they must be built for each other\. Install both into a fresh virtual "
        r"environment",
        out.stdout,
    ), out.stdout
