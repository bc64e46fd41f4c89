"""Multi-crop on a batch, on the device the batch lives on, with every crop's geometry.

``sere_loss.transforms`` draws the views of one image at a time on the CPU, in the
``DataLoader``'s workers: 7 to 18 ms per image and core for DINO's six views, which a GPU step
of a small model does not wait that long for. ``BatchMultiCrop`` draws the same views for a
whole batch at once, on whatever device the images are (a GPU), and returns ``Crops`` in the
layout the loaders give (``V`` tensors ``(B, 3, H, W)``, boxes ``(B, V, 4)``, flips ``(B, V)``):

Examples:
    >>> transform = batch_dino_sere_transform(global_size=64, local_size=32, num_local=2)
    >>> images = torch.randint(0, 256, (8, 3, 96, 120), dtype=torch.uint8)  # on a GPU: faster
    >>> crops = transform(images, generator=torch.Generator().manual_seed(0))
    >>> [tuple(v.shape) for v in crops.views]
    [(8, 3, 64, 64), (8, 3, 64, 64), (8, 3, 32, 32), (8, 3, 32, 32)]
    >>> crops.boxes.shape, crops.flips.shape
    (torch.Size([8, 4, 4]), torch.Size([8, 4]))

What is the same as ``sere_loss.transforms`` (the tests compare the two, draw for draw in
distribution): the boxes (``RandomResizedCrop``'s sampling: area and log aspect ratio uniform,
ten tries, the centre-crop fallback, whole pixels), the flips, and DINO's colour recipe per
view (colour jitter 0.4, 0.4, 0.2, 0.1 in a random order with p = 0.8, grayscale p = 0.2,
Gaussian blur of 13 taps with sigma ~ U(0.1, 2) and reflected borders, solarisation at 128 of
255), each drawn per image. What differs, and why:

- Resampling: ``torchvision.ops.roi_align`` (``aligned=True``) averages, in each output pixel,
  bilinear samples spread over the pixel's span of the crop (as many per axis as the crop is
  larger than the view: a box filter when downscaling, bilinear when upscaling), where the CPU
  path resizes with an antialiased bicubic filter. The geometry is the same to float rounding:
  output pixel ``k`` of ``n`` is centred at ``x0 + (x1 - x0) * (k + 0.5) / n`` of the original,
  the convention of ``overlap_grids``; views are a little softer.
- Colours are computed in float and not rounded to 8 bits between operations.
- ``min_overlap`` (redrawing crops) is not offered.

Why torch and ``torchvision.ops`` only, not a library of batched augmentations (kornia, say):
what is needed here is a crop box and a flip per view that the loss can read, drawn as
``RandomResizedCrop`` draws them; ``roi_align`` crops and resizes a batch of boxes in one
call, and the colour operations are a few lines of tensor arithmetic each. A further
dependency would add no capability, and the GPU machines this project measures on cannot
install one.

This module needs torchvision (for ``roi_align``); ``import sere_loss`` alone does not import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import _on_host, check_int, check_positive_int, check_unit_interval
from .transforms import (  # it explains a torchvision built for another torch
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    _as_image,
    _check_crops,
    _check_pixels,
    _hw,
    _scaled_to_uint8,
)

__all__ = [
    "BatchColour",
    "BatchCropSpec",
    "BatchMultiCrop",
    "as_uint8",
    "batch_dino_sere_transform",
]

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's (and PIL's) luma weights


def _check_range(value: object, name: str, low: float, high: float) -> tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
        or not low <= value[0] <= value[1] <= high
    ):
        raise ValueError(
            f"{name} must be a pair of finite numbers (low, high) with {low} <= low <= high <= "
            f"{high}, got {value!r}"
        )
    return float(value[0]), float(value[1])


@dataclasses.dataclass(frozen=True)
class BatchColour:
    """One view's colour recipe, drawn per image.

    The defaults are DINO's, but for ``blur_p`` and ``solarize_p``, which differ between its
    views (``batch_dino_sere_transform`` sets them).

    Attributes:
        jitter_p: probability of the colour jitter.
        brightness, contrast, saturation: jitter factors drawn from ``U(1 - x, 1 + x)``.
        hue: hue shift drawn from ``U(-hue, hue)`` (a fraction of the colour circle).
        grayscale_p: probability of turning the view gray (after the jitter).
        blur_p: probability of the Gaussian blur, ``blur_taps`` taps (odd) of standard
            deviation ``U(*blur_sigma)`` pixels, borders reflected.
        solarize_p: probability of inverting the levels at or above 128 of 255.
        mean, std: the normalisation at the end.
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_taps: int = 13
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            check_unit_interval(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < math.inf
            ):
                raise ValueError(
                    f"{name} must be a finite number >= 0 (ColorJitter's), got {value!r}"
                )
        hue = self.hue
        if isinstance(hue, bool) or not isinstance(hue, (int, float)) or not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be a number in [0, 0.5], got {hue!r}")
        sigma = _check_range(self.blur_sigma, "blur_sigma", 0.0, math.inf)
        if sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma!r}")
        taps = check_positive_int(self.blur_taps, "blur_taps")
        if taps % 2 == 0:
            raise ValueError(f"blur_taps must be odd, got {taps}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, Sequence)
                or len(value) != 3
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in value
                )
                or (name == "std" and min(value) <= 0)
            ):
                raise ValueError(f"{name} must be three finite numbers (std > 0), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))


@dataclasses.dataclass(frozen=True)
class BatchCropSpec:
    """How one view is drawn, for every image of a batch.

    Attributes:
        size: output size in pixels: ``n`` or ``(height, width)``.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (drawn uniform in its logarithm).
        flip_p: probability of a horizontal flip.
        colour: the colour recipe, or ``None`` for the geometry alone (views stay in the
            input's levels, as floats in ``[0, 1]``).
    """

    size: int | tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    colour: BatchColour | None = dataclasses.field(default_factory=BatchColour)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _check_pixels(self.size, "size"))
        scale = _check_range(self.scale, "scale", 0.0, 1.0)
        if scale[0] <= 0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        ratio = _check_range(self.ratio, "ratio", 0.0, math.inf)
        if ratio[0] <= 0:
            raise ValueError(f"ratio must be a pair (low, high) with 0 < low, got {self.ratio!r}")
        check_unit_interval(self.flip_p, "flip_p")
        if self.colour is not None and not isinstance(self.colour, BatchColour):
            raise TypeError(f"colour must be a BatchColour or None, got {self.colour!r}")
        side = min(_hw(self.size))
        if (
            self.colour is not None
            and self.colour.blur_p > 0
            and side <= self.colour.blur_taps // 2
        ):
            raise ValueError(
                f"a {side} px view cannot be blurred with {self.colour.blur_taps} taps (borders "
                f"are reflected): give blur_taps < {2 * side} or blur_p=0"
            )


class BatchMultiCrop:
    """Draw several views of every image of a batch, with their crop boxes and flips.

    Args:
        crops: one ``BatchCropSpec`` per view, global views first.
        num_global: how many of ``crops`` are global views; defaults to those with the largest
            area in pixels.

    Call it on ``(B, C, H, W)`` images (``uint8``, or floats in ``[0, 1]``; ``C`` is 3 or 1),
    or on a list of ``(C, H_i, W_i)`` images of any sizes (each crop is drawn in its own
    image), with an optional ``torch.Generator`` on the images' device (or on ``device``, where
    the call moves them). Everything is drawn and computed on that device, without waiting
    for it; it returns ``Crops`` with views
    ``(B, 3, h, w)`` (float32), boxes ``(B, V, 4)`` (float32, normalised ``(x0, y0, x1, y1)``)
    and flips ``(B, V)`` (bool), all on the images' device.
    """

    def __init__(self, crops: Sequence[BatchCropSpec], num_global: int | None = None) -> None:
        self.crops, self.num_global = _check_crops(crops, BatchCropSpec, num_global)

    @property
    def num_local(self) -> int:
        """How many local views each image gives."""
        return len(self.crops) - self.num_global

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor | Sequence[Tensor],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Crops:
        """Every view of every image, and their geometry.

        On ``device`` when given (the images are moved there first, without waiting), else on
        the images' own device.
        """
        if device is not None:
            if isinstance(images, Tensor):
                images = images.to(device, non_blocking=True)
            elif isinstance(images, Sequence) and not isinstance(images, str):
                images = [i.to(device, non_blocking=True) if isinstance(i, Tensor) else i
                          for i in images]  # fmt: skip
        batch, heights, widths = _stack(images)
        device = batch.device
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
        if generator is not None and not _same_device(generator.device, device):
            raise ValueError(
                f"generator is on {generator.device} but the images are on {device}: give a "
                f"torch.Generator(device={str(device)!r})"
            )

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

        from torchvision.ops import roi_align  # here, once .transforms has checked torchvision

        n = len(batch)
        views, boxes, flips = [], [], []
        for spec in self.crops:
            top, left, h, w = _draw_boxes(heights, widths, spec.scale, spec.ratio, rand)
            rois = torch.stack([torch.arange(n, device=device, dtype=torch.float64), left, top,
                                left + w, top + h], dim=1)  # fmt: skip
            view = roi_align(
                batch, rois.float(), list(_hw(spec.size)), spatial_scale=1.0, sampling_ratio=-1,
                aligned=True,
            )  # fmt: skip
            flip = rand(n) < spec.flip_p
            view = torch.where(flip[:, None, None, None], view.flip(-1), view)
            if spec.colour is not None:
                view = _apply_colour(view, spec.colour, _draw_colour(n, spec.colour, rand))
            views.append(view)
            box = torch.stack([left / widths, top / heights, (left + w) / widths,
                               (top + h) / heights], dim=1)  # fmt: skip
            boxes.append(box.float())
            flips.append(flip)
        return Crops(views, torch.stack(boxes, dim=1), torch.stack(flips, dim=1))

    def __repr__(self) -> str:
        lines = [
            f"  {'x'.join(map(str, _hw(c.size)))}px scale={c.scale} flip_p={c.flip_p}"
            + (
                ""
                if c.colour is None
                else f" blur_p={c.colour.blur_p} solarize_p={c.colour.solarize_p}"
            )
            for c in self.crops
        ]
        return f"{type(self).__name__}(num_global={self.num_global},\n" + ",\n".join(lines) + ")"


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` alike when the index is left out on one side."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def as_uint8(image: object) -> Tensor:
    """An image as a ``DataLoader`` should hand it to ``BatchMultiCrop``: ``(3, H, W)`` uint8.

    PIL images of any mode and tensors are read as ``sere_loss.transforms`` reads them (16-bit
    and float levels scaled to 8 bits, not clipped; one channel made three), so that the two
    paths see the same levels. Use it as the dataset's transform; the loader's workers then
    only decode.
    """
    levels = _as_image(image).as_subclass(Tensor)
    if levels.is_floating_point():  # [0, 1] as the PIL "F" images: outside it, or NaN, refused
        levels = _scaled_to_uint8(levels.double(), 1.0, f"a {levels.dtype} tensor")
    return levels.contiguous()


def _check_unit_levels(image: Tensor, what: str) -> None:
    """Float levels must lie in ``[0, 1]`` (NaN refused), as ``set_value_checks`` says where."""
    on_host = _on_host(image)
    if on_host is None or image.numel() == 0:
        return
    inside = ((image >= 0) & (image <= 1)).all()  # False for NaN
    if not on_host:
        torch._assert_async(
            inside,
            f"{what} must hold float levels in [0, 1] (checked on the device; scale 0-255 "
            "levels by 1/255 or give uint8)",
        )
        return
    if not bool(inside):
        lo, hi = image.nan_to_num(nan=math.inf).min(), image.nan_to_num(nan=-math.inf).max()
        nan = " and NaN" if bool(image.isnan().any()) else ""
        raise ValueError(
            f"{what} must hold float levels in [0, 1], got values in [{float(lo):.4g}, "
            f"{float(hi):.4g}]{nan}: scale 0-255 levels by 1/255, or give uint8"
        )


def _levels(image: Tensor, what: str) -> Tensor:
    """``(..., C, H, W)`` uint8 or float levels as floats in ``[0, 1]`` with 3 channels."""
    if image.shape[-3] not in (1, 3) or min(image.shape[-2:]) < 1:
        raise ValueError(
            f"{what} must have 3 or 1 channels and not be empty, got shape {tuple(image.shape)}"
        )
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif image.is_floating_point():
        image = image.float()
        _check_unit_levels(image, what)
    else:
        raise TypeError(
            f"{what} must be uint8 or floats in [0, 1], got {image.dtype}: scale other integer "
            "levels to uint8 first"
        )
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:])


def _stack(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Float images ``(B, 3, H, W)`` in ``[0, 1]``, and each image's own height and width.

    A list of images of several sizes is padded to the largest by repeating its last row and
    column: ``roi_align`` then reads at a crop's far edge what it reads from the image alone
    (it clamps there), so each crop sees its own image only.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(
                f"images must be (B, C, H, W) with B >= 1, or a list of (C, H, W) tensors, got a "
                f"tensor of shape {tuple(images.shape)}"
            )
        batch = _levels(images, "images")
        n, _, height, width = batch.shape

        # Filled on the device: a copy from the host would wait for the device's queue.
        def full(value: int) -> Tensor:
            return torch.full((n,), float(value), device=batch.device, dtype=torch.float64)

        return batch, full(height), full(width)
    if not isinstance(images, Sequence) or not images:
        raise TypeError(
            f"images must be a (B, C, H, W) tensor or a non-empty list of (C, H, W) tensors, got "
            f"{type(images).__name__}"
        )
    items = []
    for k, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{k}] must be a (C, H, W) tensor, got {got}")
        if image.device != images[0].device:
            raise ValueError(f"images[{k}] is on {image.device}, images[0] on {images[0].device}")
        items.append(_levels(image, f"images[{k}]"))
    height = max(i.shape[1] for i in items)
    width = max(i.shape[2] for i in items)
    padded = [
        F.pad(i[None], (0, width - i.shape[2], 0, height - i.shape[1]), mode="replicate")[0]
        for i in items
    ]
    sizes = torch.tensor([i.shape[1:] for i in items], dtype=torch.float64)
    sizes = sizes.to(items[0].device, non_blocking=True)
    return torch.stack(padded), sizes[:, 0], sizes[:, 1]


Draw = Callable[..., Tensor]  # uniform float64 draws in [0, 1) of the given shape


def _draw_boxes(
    heights: Tensor, widths: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
    rand: Draw, tries: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``RandomResizedCrop``'s sampling for every image: ``(top, left, height, width)`` pixels.

    Up to ``tries`` draws of an area ``U(*scale)`` of the image's and an aspect ratio
    ``exp(U(log ratio))``, rounded to whole pixels; the first that fits is placed uniformly
    over the positions that keep it inside. When none fits, the largest centred crop with the
    ratio clamped to ``ratio``.
    """
    n = len(heights)
    height, width = heights[:, None], widths[:, None]
    area = height * width * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * rand(n, tries))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.float64).argmax(dim=1, keepdim=True)  # the first that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(rand(n) * (heights - h + 1)).clamp(max=heights - h)
    left = torch.floor(rand(n) * (widths - w + 1)).clamp(max=widths - w)
    # The fallback: the whole image, or its largest centred crop of the nearest allowed ratio.
    image_ratio = widths / heights
    tall, wide = image_ratio < ratio[0], image_ratio > ratio[1]
    fw = torch.where(wide, torch.round(heights * ratio[1]).clamp(min=1), widths)
    fh = torch.where(tall, torch.round(widths / ratio[0]).clamp(min=1), heights)
    found = fits.any(dim=1)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.where(found, top, torch.floor((heights - fh) / 2))
    left = torch.where(found, left, torch.floor((widths - fw) / 2))
    return top, left, h, w


def _gray(x: Tensor) -> Tensor:
    """Luma ``(n, 1, h, w)`` of RGB ``(n, 3, h, w)``."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b)[:, None]


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``adjust_brightness`` with a factor per view ``(n, 1, 1, 1)``."""
    return (x * factor).clamp(0, 1)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``adjust_contrast``: a blend with the view's mean luma."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    """``adjust_saturation``: a blend with the view's luma."""
    return _blend(x, _gray(x), factor)


def _solarize(x: Tensor) -> Tensor:
    """``solarize`` at 128 of 255: levels at or above it inverted."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    high, low = x.amax(dim=1), x.amin(dim=1)
    span = high - low
    flat = span == 0
    s = torch.where(high > 0, span / torch.where(high > 0, high, 1), 0)
    safe = torch.where(flat, 1, span)
    h = torch.where(
        high == r, (g - b) / safe, torch.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    h = torch.where(flat, 0, (h / 6) % 1.0)
    return torch.stack([h, s, high], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(dim=1)
    h6 = h * 6
    sector = torch.floor(h6)
    f = h6 - sector
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    sector = (sector.long() % 6)[:, None]
    # (r, g, b) in each of the six sectors of the hue circle.
    r = torch.stack([v, q, p, p, t, v], dim=1).gather(1, sector)[:, 0]
    g = torch.stack([t, v, v, q, p, p], dim=1).gather(1, sector)[:, 0]
    b = torch.stack([p, p, t, v, v, q], dim=1).gather(1, sector)[:, 0]
    return torch.stack([r, g, b], dim=1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Each image's hues turned by ``shift`` ``(n, 1, 1)`` of the circle (torchvision's way)."""
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift) % 1.0
    return _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def _blur(x: Tensor, sigma: Tensor, taps: int) -> Tensor:
    """Gaussian blur of each image with its own ``sigma`` ``(n,)``, borders reflected."""
    n, c, height, width = x.shape
    offsets = torch.arange(taps, device=x.device, dtype=x.dtype) - taps // 2
    kernel = torch.softmax(-(offsets**2) / (2 * sigma[:, None].to(x.dtype) ** 2), dim=1)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, taps)
    pad = taps // 2
    flat = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.view(n, c, height, width)


class ColourDraw(NamedTuple):
    """What the colour recipe drew for each of ``n`` views (all ``(n,)`` tensors).

    ``order`` ``(n, 4)``: the jitter's operations in the order applied (0 brightness,
    1 contrast, 2 saturation, 3 hue, as ``ColorJitter``'s ``fn_idx``).
    """

    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def _draw_colour(n: int, c: BatchColour, rand: Draw) -> ColourDraw:
    """Every random choice of the colour recipe ``c`` for ``n`` views, as torchvision draws them."""

    def factor(spread: float) -> Tensor:  # U(max(0, 1 - spread), 1 + spread)
        low = max(0.0, 1 - spread)
        return low + (1 + spread - low) * rand(n)

    return ColourDraw(
        jitter=rand(n) < c.jitter_p,
        brightness=factor(c.brightness),
        contrast=factor(c.contrast),
        saturation=factor(c.saturation),
        hue=c.hue * (2 * rand(n) - 1),
        order=rand(n, 4).argsort(dim=1),  # a random permutation per view
        grayscale=rand(n) < c.grayscale_p,
        blur=rand(n) < c.blur_p,
        sigma=c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * rand(n),
        solarize=rand(n) < c.solarize_p,
    )


def _apply_colour(x: Tensor, c: BatchColour, d: ColourDraw) -> Tensor:
    """The colour recipe ``c`` with the draws ``d`` on float views ``(n, 3, h, w)``.

    Views are in ``[0, 1]``: jitter, grayscale, blur, solarisation, then the normalisation.
    """
    n = len(x)

    def per_view(values: Tensor) -> Tensor:
        return values.to(x.dtype).view(n, 1, 1, 1)

    jitter = per_view(d.jitter) > 0
    brightness, contrast, saturation = (
        per_view(f) for f in (d.brightness, d.contrast, d.saturation)
    )

    def cheap(x: Tensor, op: Tensor) -> Tensor:
        """Each view's operation ``op`` (0 brightness, 1 contrast, 2 saturation, else none)."""
        op = op.view(n, 1, 1, 1)
        x = _brightness(x, torch.where(jitter & (op == 0), brightness, 1.0))
        x = _contrast(x, torch.where(jitter & (op == 1), contrast, 1.0))
        return _saturation(x, torch.where(jitter & (op == 2), saturation, 1.0))

    # ColorJitter's order, with the costly hue turned once: the operations before it in each
    # view's order, the hue, then those after it.
    hue_at = (d.order == 3).to(torch.int64).argmax(dim=1)
    none = torch.full_like(hue_at, -1)
    for position in range(3):
        x = cheap(x, torch.where(hue_at > position, d.order[:, position], none))
    turn = torch.where(d.jitter, d.hue, 0.0).to(x.dtype).view(n, 1, 1)
    x = torch.where(turn[:, None] != 0, _adjust_hue(x, turn), x)
    for after in range(1, 4):
        at = (hue_at + after).clamp(max=3)
        op = d.order.gather(1, at[:, None])[:, 0]
        x = cheap(x, torch.where(hue_at + after <= 3, op, none))
    x = torch.where(per_view(d.grayscale) > 0, _gray(x).expand_as(x), x)
    if c.blur_p > 0:
        x = torch.where(per_view(d.blur) > 0, _blur(x, d.sigma, c.blur_taps), x)
    if c.solarize_p > 0:
        x = torch.where(per_view(d.solarize) > 0, _solarize(x), x)
    return torch.stack([(x[:, k] - c.mean[k]) / c.std[k] for k in range(3)], dim=1)


def batch_dino_sere_transform(
    *,
    global_size: int | tuple[int, int] = 224,
    local_size: int | tuple[int, int] = 96,
    num_local: int = 4,
    global_scale: tuple[float, float] = (0.35, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.35),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> BatchMultiCrop:
    """``sere_loss.transforms.dino_sere_transform``'s views, drawn for a batch on its device.

    2 global views (``global_scale``) and ``num_local`` local ones (``local_scale``). Global
    view 1 is always blurred; global view 2 is blurred with p = 0.1 and solarised with
    p = 0.2; local views are blurred with p = 0.5. Every view: flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale with p = 0.2.
    """
    num_local = check_int(num_local, "num_local", 0)
    norm = {"mean": mean, "std": std}  # BatchColour checks them and names them
    global1 = BatchColour(blur_p=1.0, **norm)  # type: ignore[arg-type]
    global2 = BatchColour(blur_p=0.1, solarize_p=0.2, **norm)  # type: ignore[arg-type]
    local = BatchColour(blur_p=0.5, **norm)  # type: ignore[arg-type]
    crops = [
        BatchCropSpec(global_size, global_scale, colour=global1),
        BatchCropSpec(global_size, global_scale, colour=global2),
    ]
    crops += [BatchCropSpec(local_size, local_scale, colour=local) for _ in range(num_local)]
    return BatchMultiCrop(crops, num_global=2)
