"""Multi-crop on a batch (``sere_loss.batch_transforms``): the geometry on images whose pixels
encode their coordinates, the box sampling against torchvision's ``RandomResizedCrop``, each
colour operation against torchvision's, and the whole recipe in distribution against the CPU
path (``sere_loss.transforms``).

Expectations are stated from first principles: ``roi_align`` (``aligned=True``) gives output
pixel ``k`` of ``n`` the mean of bilinear samples spread symmetrically over its span of the box,
so on a linear ramp it reads the ramp at the span's centre, ``x0 + (x1 - x0) * (k + 0.5) / n``,
exactly, wherever its samples stay within the outer pixel centres (beyond them the image's
edge value is repeated).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import TOLERANCES
from sere_loss import batch_transforms as BT
from sere_loss.batch_transforms import (
    BatchColour,
    BatchCropSpec,
    BatchMultiCrop,
    batch_dino_sere_transform,
)
from sere_loss.transforms import IMAGENET_MEAN, IMAGENET_STD, CropSpec, dino_sere_transform
from test_transforms import _centres, _coordinate_image, _crop_pixels, _predict

H0, W0 = 240, 320


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine two that wait on each other are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ATOL = TOLERANCES[torch.float32]["atol"]


def _geometric(transform: BatchMultiCrop) -> BatchMultiCrop:
    transform.crops = [dataclasses.replace(spec, colour=None) for spec in transform.crops]
    return transform


def _errors(
    view: torch.Tensor, box: torch.Tensor, flip: bool, height: int, width: int, centres=_centres
) -> tuple[float, float]:
    """Worst |x error| and |y error| over the pixels whose span lies inside the outer pixel
    centres of the image (half a pixel from its edges), in units of float32's tolerance."""
    ny, nx = view.shape[-2:]
    xs, ys = _predict(box, flip, (ny, nx), centres)
    x0, y0, x1, y1 = box.double().tolist()
    # Pixel k's span, in source pixels: [x0 W + k bw, x0 W + (k + 1) bw], bw = (x1 - x0) W / n.
    k = torch.arange(nx, dtype=torch.float64)
    k = nx - 1 - k if flip else k
    left = x0 * width + k * (x1 - x0) * width / nx
    cols = (left >= 0.5) & (left + (x1 - x0) * width / nx <= width - 0.5)
    r = torch.arange(ny, dtype=torch.float64)
    top = y0 * height + r * (y1 - y0) * height / ny
    rows = (top >= 0.5) & (top + (y1 - y0) * height / ny <= height - 0.5)
    err_x = (view[0].double() - xs[None, :])[:, cols].abs().max() if cols.any() else 0.0
    err_y = (view[1].double() - ys[:, None])[rows].abs().max() if rows.any() else 0.0
    return float(err_x) / ATOL, float(err_y) / ATOL


class TestCoordinateImage:
    def test_views_show_what_the_geometry_predicts(self) -> None:
        transform = _geometric(batch_dino_sere_transform(global_size=64, local_size=32))
        images = _coordinate_image().expand(24, -1, -1, -1)
        crops = transform(images, generator=torch.Generator().manual_seed(0))
        assert crops.boxes.shape == (24, 6, 4)
        assert crops.boxes.dtype == torch.float32
        assert crops.flips.shape == (24, 6)
        assert crops.flips.dtype == torch.bool
        assert {bool(f) for f in crops.flips.flatten()} == {False, True}
        for v, view in enumerate(crops.views):
            size = 64 if v < 2 else 32
            assert view.shape == (24, 3, size, size)
            for b in range(24):
                box, flip = crops.boxes[b, v], bool(crops.flips[b, v])
                _crop_pixels(box, W0, H0)  # whole pixels of the original
                rx, ry = _errors(view[b], box, flip, H0, W0)
                assert rx <= 1, f"image {b} view {v}: x off by {rx:.1f} x the tolerance"
                assert ry <= 1, f"image {b} view {v}: y off by {ry:.1f} x the tolerance"
                # A constant channel stays constant everywhere, edges included.
                torch.testing.assert_close(view[b, 2], torch.full_like(view[b, 2], 0.5))

    def test_the_comparison_can_fail(self) -> None:
        # Ignoring the flip, and the two half-pixel slips (k / n, k / (n - 1)), are caught.
        transform = _geometric(batch_dino_sere_transform(global_size=64, local_size=32))
        images = _coordinate_image().expand(8, -1, -1, -1)
        crops = transform(images, generator=torch.Generator().manual_seed(1))
        flipped = 0
        for v, view in enumerate(crops.views):
            for b in range(8):
                box, flip = crops.boxes[b, v], bool(crops.flips[b, v])
                if flip:
                    flipped += 1
                    assert _errors(view[b], box, False, H0, W0)[0] > 100
                for centres in (
                    lambda n: torch.arange(n, dtype=torch.float64) / n,
                    lambda n: torch.arange(n, dtype=torch.float64) / (n - 1),
                ):
                    rx, ry = _errors(view[b], box, flip, H0, W0, centres)
                    assert min(rx, ry) > 3, f"a half-pixel slip in view {v} went unnoticed"
        assert flipped > 0

    def test_a_list_of_sizes_crops_each_image_in_itself(self) -> None:
        # Crops of the whole image or nearly (scale 0.9-1) touch the far edges, where the
        # smaller images are padded: they must read their own edge, not the padding.
        spec = BatchCropSpec(24, (0.9, 1.0), ratio=(0.5, 2.0), colour=None)
        transform = BatchMultiCrop([spec, spec])
        sizes = [(H0, W0), (50, 70), (90, 40)]
        images = []
        for k, (h, w) in enumerate(sizes):
            image = _coordinate_image(h, w)
            image[2] = 0.25 * (k + 1)
            images.append(image)
        for seed in range(4):
            crops = transform(images, generator=torch.Generator().manual_seed(seed))
            for b, (h, w) in enumerate(sizes):
                for v in range(2):
                    view, box, flip = crops.views[v][b], crops.boxes[b, v], bool(crops.flips[b, v])
                    _crop_pixels(box, w, h)
                    assert max(_errors(view, box, flip, h, w)) <= 1, (b, v)
                    torch.testing.assert_close(view[2], torch.full_like(view[2], 0.25 * (b + 1)))

    def test_uint8_and_grayscale_inputs(self) -> None:
        gen = torch.Generator().manual_seed(0)
        gray = torch.randint(0, 256, (2, 1, 40, 50), dtype=torch.uint8, generator=gen)
        transform = BatchMultiCrop([BatchCropSpec(16, (0.5, 1.0), colour=None)])
        crops = transform(gray, generator=torch.Generator().manual_seed(0))
        view = crops.views[0]
        assert view.shape == (2, 3, 16, 16)
        assert torch.equal(view[:, 0], view[:, 1])
        again = transform(gray.float() / 255, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(again.views[0], view)


# RandomResizedCrop's sampling --------------------------------------------------------------------


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def _ks_limit(n: int, m: int, alpha: float = 1e-4) -> float:
    """The distance two samples of one distribution exceed with probability ``alpha``."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


@pytest.mark.parametrize(
    ("size", "scale"),
    [((240, 320), (0.35, 1.0)), ((240, 320), (0.05, 0.35)), ((40, 200), (0.35, 1.0)),
     ((300, 30), (0.2, 1.0))],
)  # fmt: skip
def test_boxes_are_drawn_as_random_resized_crop_draws_them(
    size: tuple[int, int], scale: tuple[float, float]
) -> None:
    """Top, left, height and width: the same distributions as torchvision's sampler, also for
    images so wide or tall that many draws are redrawn or fall back to the centre crop."""
    n = 6000
    height, width = size
    ratio = (3 / 4, 4 / 3)
    image = torch.zeros(1, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cpu = torch.tensor(
            [v2.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)],
            dtype=torch.float64,
        )
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64)

    full = torch.full((n,), 1.0, dtype=torch.float64)
    top, left, h, w = BT._draw_boxes(full * height, full * width, scale, ratio, rand)
    batch = torch.stack([top, left, h, w], dim=1)
    assert torch.equal(batch, batch.round())
    assert bool((top >= 0).all() and (top + h <= height).all())
    assert bool((left >= 0).all() and (left + w <= width).all())
    limit = _ks_limit(n, n)
    for k, name in enumerate(("top", "left", "height", "width")):
        distance = _ks(cpu[:, k], batch[:, k])
        assert distance < limit, f"{name}: KS distance {distance:.3f} >= {limit:.3f}"
    # Crops touch each edge as often (a position range one pixel short never would).
    for name, (a, b) in {"top": (cpu[:, 0], top), "left": (cpu[:, 1], left)}.items():
        extent, side = (height, 2) if name == "top" else (width, 3)
        theirs = float((a + cpu[:, side] == extent).double().mean())
        mine = float((b + batch[:, side] == extent).double().mean())
        assert abs(theirs - mine) < 4 * math.sqrt(max(theirs, 1 / n) / n), (name, theirs, mine)
        theirs, mine = float((a == 0).double().mean()), float((b == 0).double().mean())
        assert abs(theirs - mine) < 4 * math.sqrt(max(theirs, 1 / n) / n), (name, theirs, mine)
    # The centre-crop fallback, when it happens, happens as often.
    centred = (cpu[:, 0] == (height - cpu[:, 2]) // 2) & (cpu[:, 1] == (width - cpu[:, 3]) // 2)
    ours = (top == (height - h) // 2) & (left == (width - w) // 2)
    assert abs(float(centred.double().mean() - ours.double().mean())) < 4 * math.sqrt(0.25 / n)


# Colour: each operation and their composition against torchvision --------------------------------


def _images(n: int = 5, size: tuple[int, int] = (20, 24), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, *size, generator=gen)
    x[0, :, :4] = 0.6  # gray pixels (no hue) and saturated ones
    x[1, 0, :, :5], x[1, 1:, :, :5] = 1.0, 0.0
    return x


def test_each_colour_operation_matches_torchvision() -> None:
    x = _images()
    factors = torch.tensor([0.6, 0.9, 1.0, 1.25, 1.4])
    per = factors.view(-1, 1, 1, 1)
    shifts = torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1])
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    ours = {
        "brightness": BT._brightness(x, per),
        "contrast": BT._contrast(x, per),
        "saturation": BT._saturation(x, per),
        "hue": BT._adjust_hue(x, shifts.view(-1, 1, 1)),
        "grayscale": BT._gray(x).expand_as(x),
        "blur": BT._blur(x, sigmas, 13),
        "solarize": BT._solarize(x),
    }
    for i in range(len(x)):
        f, s = float(factors[i]), float(sigmas[i])
        theirs = {
            "brightness": TF.adjust_brightness(x[i], f),
            "contrast": TF.adjust_contrast(x[i], f),
            "saturation": TF.adjust_saturation(x[i], f),
            "hue": TF.adjust_hue(x[i], float(shifts[i])),
            "grayscale": TF.rgb_to_grayscale(x[i], num_output_channels=3),
            "blur": TF.gaussian_blur(x[i], [13, 13], [s, s]),
            "solarize": TF.solarize(x[i], 128 / 255),
        }
        for name, want in theirs.items():
            torch.testing.assert_close(ours[name][i], want, atol=2 * ATOL, rtol=0, msg=name)


def test_the_recipe_composes_as_torchvision_does() -> None:
    """With the same draws, the batch recipe equals torchvision's transforms image by image:
    ColorJitter in the drawn order, grayscale, blur, solarize, normalisation."""
    colour = BatchColour(blur_p=0.5, solarize_p=0.5)
    x = _images(n=24, seed=1)
    gen = torch.Generator().manual_seed(3)
    draws = BT._draw_colour(
        24, colour, lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)
    )
    out = BT._apply_colour(x, colour, draws)
    jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    call = getattr(jitter, "transform", None) or jitter._transform
    seen = set()
    for i in range(24):
        y = x[i]
        if draws.jitter[i]:
            params = {
                "fn_idx": draws.order[i],
                "brightness_factor": float(draws.brightness[i]),
                "contrast_factor": float(draws.contrast[i]),
                "saturation_factor": float(draws.saturation[i]),
                "hue_factor": float(draws.hue[i]),
            }
            y = call(y, params)
        if draws.grayscale[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if draws.blur[i]:
            y = TF.gaussian_blur(y, [13, 13], [float(draws.sigma[i])] * 2)
        if draws.solarize[i]:
            y = TF.solarize(y, 128 / 255)
        y = TF.normalize(y, list(IMAGENET_MEAN), list(IMAGENET_STD))
        torch.testing.assert_close(out[i], y, atol=1e-4, rtol=0, msg=f"image {i}")
        seen.add((bool(draws.jitter[i]), bool(draws.grayscale[i]), bool(draws.blur[i]),
                  bool(draws.solarize[i])))  # fmt: skip
    assert len(seen) >= 8  # many combinations were exercised
    # The order matters (brightness before or after contrast differ): it is read.
    orders = {tuple(draws.order[i].tolist()) for i in range(24)}
    assert len(orders) > 5


def test_the_draws_follow_the_recipe() -> None:
    """ColorJitter's factors uniform on their ranges, its order a uniform permutation, the
    blur's sigma uniform, and each operation applied with its probability."""
    n = 24_000
    colour = BatchColour(blur_p=0.5, solarize_p=0.2)
    gen = torch.Generator().manual_seed(0)
    d = BT._draw_colour(n, colour, lambda *s: torch.rand(s, generator=gen, dtype=torch.float64))
    uniform = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for values, low, high in (
        (d.brightness, 0.6, 1.4), (d.contrast, 0.6, 1.4), (d.saturation, 0.8, 1.2),
        (d.hue, -0.1, 0.1), (d.sigma, 0.1, 2.0),
    ):  # fmt: skip
        assert _ks(values, low + (high - low) * uniform) < _ks_limit(n, 2001)
    counts = torch.unique(d.order, dim=0, return_counts=True)[1]
    assert len(counts) == 24  # every order of the four operations
    assert (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24)
    for flags, p in ((d.jitter, 0.8), (d.grayscale, 0.2), (d.blur, 0.5), (d.solarize, 0.2)):
        assert abs(float(flags.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


# The whole recipe in distribution against the CPU path -------------------------------------------


def _test_image() -> torch.Tensor:
    """64 x 80, colourful and half bright, so that jitter, grayscale and solarisation show."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    image = torch.stack([xs, ys, 1 - xs * ys]) * 0.8 + 0.2 * (xs > 0.5)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _summaries(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per view: mean level, colourfulness (mean channel spread), share of levels >= 0.6.

    Solarisation leaves no level at or above 0.6, whether the levels are rounded (the CPU
    path) or not; a threshold at 0.5 would count the float path's unrounded levels in
    [0.5, 128 / 255) that solarisation leaves as they are.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = views * std + mean
    return {
        "level": x.mean(dim=(1, 2, 3)),
        "colour": x.std(dim=1).mean(dim=(1, 2)),
        "bright": (x >= 0.6).double().mean(dim=(1, 2, 3)),
    }


def test_the_recipe_matches_the_cpu_path_in_distribution(one_thread: None) -> None:
    n = 800
    image = _test_image()
    cpu_transform = dino_sere_transform(global_size=32, local_size=16, num_local=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cpu = [cpu_transform(image) for _ in range(n)]
    batch = batch_dino_sere_transform(global_size=32, local_size=16, num_local=2)
    ours = batch(image.expand(n, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    limit = _ks_limit(n, n)
    for v in range(4):
        theirs = _summaries(torch.stack([c.views[v] for c in cpu]))
        mine = _summaries(ours.views[v])
        for name in theirs:
            distance = _ks(theirs[name], mine[name])
            assert distance < limit, f"view {v}, {name}: KS {distance:.3f} >= {limit:.3f}"
        flips = torch.stack([c.flips[v] for c in cpu]).double().mean()
        assert abs(float(flips - ours.flips[:, v].double().mean())) < 4 * math.sqrt(0.5 / n)
        area = torch.stack([(c.boxes[v, 2:] - c.boxes[v, :2]).prod() for c in cpu])
        mine_area = (ours.boxes[:, v, 2:] - ours.boxes[:, v, :2]).prod(dim=1)
        assert _ks(area, mine_area) < limit, f"view {v}: box areas"


# Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(3, 8, 8), ValueError, r"\(B, C, H, W\)"),
        (torch.zeros(2, 4, 8, 8), ValueError, "3 or 1 channels"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, "uint8 or floats"),
        ([], TypeError, "non-empty list"),
        ([torch.zeros(3, 8, 8), torch.zeros(8, 8)], ValueError, r"images\[1\] must be a \(C, "),
        ("image", ValueError, r"images\[0\] must be a \(C, H, W\) tensor, got str"),
    ],
)  # fmt: skip
def test_bad_images(images: object, error: type[Exception], match: str) -> None:
    transform = BatchMultiCrop([BatchCropSpec(8, (0.5, 1.0))])
    with pytest.raises(error, match=match):
        transform(images)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scale": (0.0, 1.0)}, ValueError, r"scale must lie in \(0, 1\]"),
        ({"scale": (0.5, 1.5)}, ValueError, "scale must be a pair"),
        ({"ratio": (2.0, 1.0)}, ValueError, "ratio must be a pair"),
        ({"flip_p": 1.5}, ValueError, "flip_p must lie in"),
        ({"colour": "dino"}, TypeError, "colour must be a BatchColour"),
        ({"size": 5, "colour": BatchColour(blur_p=1.0)}, ValueError, "5 px view cannot be blurred"),
        ({"size": (8, 0)}, ValueError, r"size\[1\] must be >= 1"),
    ],
)  # fmt: skip
def test_bad_specs(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BatchCropSpec(**({"size": 8, "scale": (0.5, 1.0)} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"blur_taps": 12}, ValueError, "blur_taps must be odd"),
        ({"hue": 0.7}, ValueError, r"hue must be a number in \[0, 0.5\]"),
        ({"jitter_p": -0.1}, ValueError, "jitter_p must lie in"),
        ({"brightness": -0.5}, ValueError, r"brightness must be a finite number >= 0"),
        ({"mean": 0.5}, ValueError, "mean must be three finite numbers"),
        ({"blur_sigma": (0.0, 1.0)}, ValueError, "blur_sigma must be > 0"),
        ({"std": (1.0, 0.0, 1.0)}, ValueError, "std must be three finite numbers"),
        # values that passed the checks and gave NaN views, or failed inside torch
        ({"contrast": math.inf}, ValueError, r"contrast must be a finite number >= 0"),
        ({"saturation": math.nan}, ValueError, r"saturation must be a finite number >= 0"),
        ({"blur_sigma": (math.inf, math.inf)}, ValueError, "blur_sigma must be a pair of finite"),
        ({"std": (math.nan, 1.0, 1.0)}, ValueError, "std must be three finite numbers"),
        ({"mean": ("a", "b", "c")}, ValueError, "mean must be three finite numbers"),
        ({"std": ("a", "b", "c")}, ValueError, "std must be three finite numbers"),
        ({"hue": -0.1}, ValueError, r"hue must be a number in \[0, 0.5\], got -0.1"),
    ],
)  # fmt: skip
def test_bad_colours(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BatchColour(**kwargs)


def test_globals_come_first_and_are_largest() -> None:
    small, large = BatchCropSpec(8, (0.1, 0.5)), BatchCropSpec(16, (0.5, 1.0))
    with pytest.raises(ValueError, match="global crops must come first"):
        BatchMultiCrop([small, large], num_global=1)
    with pytest.raises(ValueError, match="exceeds the 2 crops"):
        BatchMultiCrop([large, small], num_global=3)
    assert BatchMultiCrop([large, large, small]).num_global == 2
    assert BatchMultiCrop([large, large, small]).num_local == 1
    with pytest.raises(ValueError, match="crops is empty: give one BatchCropSpec per view"):
        BatchMultiCrop([])
    with pytest.raises(TypeError, match=r"crops\[0\] must be a BatchCropSpec, got CropSpec"):
        BatchMultiCrop([CropSpec(16, (0.5, 1.0))])  # the CPU transform's spec


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_crops_never_wait_for_the_device() -> None:
    """On a GPU everything is drawn and computed there: the host never waits, and the views
    equal the same computation on the CPU's copy given the same boxes and draws."""
    transform = batch_dino_sere_transform(global_size=64, local_size=32)
    images = torch.randint(0, 256, (32, 3, 96, 96), dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    transform(images, generator=gen)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops = transform(images, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert crops.views[0].device.type == "cuda"
    assert crops.boxes.device.type == "cuda"
    with pytest.raises(ValueError, match="generator is on cpu but the images are on cuda"):
        transform(images, generator=torch.Generator())
    geometric = _geometric(batch_dino_sere_transform(global_size=64, local_size=32))
    coordinates = _coordinate_image().expand(8, -1, -1, -1).cuda()
    out = geometric(coordinates, generator=torch.Generator(device="cuda").manual_seed(1))
    for v, view in enumerate(out.views):
        for b in range(8):
            box, flip = out.boxes[b, v].cpu(), bool(out.flips[b, v])
            assert max(_errors(view[b].cpu(), box, flip, H0, W0)) <= 1


def test_the_dino_recipe_names_a_bad_normalisation() -> None:
    with pytest.raises(ValueError, match=r"mean must be three finite numbers \(std > 0\), got 0.5"):
        BT.batch_dino_sere_transform(mean=0.5)  # type: ignore[arg-type]
    assert BT.batch_dino_sere_transform(std=[0.5, 0.5, 0.5]).crops[0].colour.std == (0.5,) * 3


@pytest.mark.parametrize("ratio", [(1.0, math.inf), (math.inf, math.inf), (0.5, math.nan)])
def test_infinite_ratios_are_refused(ratio: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="ratio must be a pair of finite numbers"):
        BatchCropSpec(8, (0.1, 0.3), ratio=ratio)


@pytest.mark.parametrize("ratio", [(1e-9, 1e-9), (1e9, 1e9)])
def test_a_ratio_no_crop_can_take_falls_back_to_a_crop_of_at_least_a_pixel(
    ratio: tuple[float, float],
) -> None:
    # No draw fits, and the centred fallback of that ratio rounded to 0 pixels: the boxes had
    # zero width or height, which the loss refused only later.
    images = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    spec = BatchCropSpec(8, (0.1, 0.3), ratio=ratio, colour=None)
    crops = BatchMultiCrop([spec])(images, generator=torch.Generator().manual_seed(0))
    boxes = crops.boxes[:, 0]
    assert bool((boxes[:, 2] > boxes[:, 0]).all() & (boxes[:, 3] > boxes[:, 1]).all()), boxes
    assert torch.isfinite(crops.views[0]).all()


def test_float_images_outside_unit_levels_are_refused() -> None:
    transform = BatchMultiCrop([BatchCropSpec(8, (0.5, 1.0))])
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images must hold float levels in \[0, 1\], got "
                       r"values in \[.*, 255\]: scale 0-255 levels by 1/255"):  # fmt: skip
        transform(images * 255)
    images[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"got values in \[.*\] and NaN"):
        transform(images)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got 0"):
        transform(torch.rand(2, 3, 16, 16), generator=0)


def test_as_uint8_refuses_float_levels_it_would_clip() -> None:
    as_uint8 = BT.as_uint8
    assert as_uint8(torch.full((3, 2, 2), 1.0)).unique().tolist() == [255]
    for bad, what in ((3.0, r"values in \[3, 3\]"), (math.nan, "non-finite")):
        with pytest.raises(ValueError, match=what):
            as_uint8(torch.full((3, 2, 2), bad))
