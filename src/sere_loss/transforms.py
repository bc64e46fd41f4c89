"""Multi-crop augmentation that records where every crop came from.

The spatial term compares two views on their overlap, so it needs each view's crop box in the
original image and whether the view was flipped (SPEC 4). :class:`MultiCropTransform` draws the
crops with ``torchvision.transforms.v2`` (``RandomResizedCrop``'s sampling, ``resized_crop``,
``horizontal_flip`` and the colour transforms) and returns them with that geometry, in the layout
the losses take once a ``DataLoader`` has batched them:

>>> transform = dino_sere_transform(num_local=2)
>>> crops = transform(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
>>> [tuple(v.shape) for v in crops.views]
[(3, 224, 224), (3, 224, 224), (3, 96, 96), (3, 96, 96)]
>>> crops.boxes.shape, crops.flips.shape  # (V, 4) normalised (x0, y0, x1, y1), (V,) bool
(torch.Size([4, 4]), torch.Size([4]))

``torch.utils.data.default_collate`` batches :class:`Crops` as they are (a list of ``V`` tensors
``(B, 3, H, W)``, boxes ``(B, V, 4)``, flips ``(B, V)``); :func:`collate_crops` does the same for
a list of crops and names the result.

Geometry is exact: a view's pixel ``k`` (of ``n``) covers the original span
``x0 + (x1 - x0) * [k, k + 1] / n``, counted from the right when the view is flipped, which is the
convention of ``overlap_grids`` (``grid_sample`` with ``align_corners=False``). The presets follow
the published recipes; their photometric parts can be replaced per crop (:class:`CropSpec`).

This module needs torchvision; ``import sere_loss`` alone does not import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ._checks import check_int, check_positive_int, check_unit_interval

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropSpec",
    "Crops",
    "MultiCropTransform",
    "collate_crops",
    "dino_sere_transform",
    "ibot_sere_transform",
    "mocov3_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Photometric = Callable[[Tensor], Tensor]


def _identity(image: Tensor) -> Tensor:
    return image


class Crops(NamedTuple):
    """The views of one image (or, once collated, of a batch) and their geometry.

    Attributes:
        views: ``V`` image tensors ``(3, H, W)``, global views first; ``(B, 3, H, W)`` once
            collated.
        boxes: ``(V, 4)`` float32 crop boxes ``(x0, y0, x1, y1)`` in the original image,
            normalised to ``[0, 1]``; ``(B, V, 4)`` once collated.
        flips: ``(V,)`` bool, ``True`` where the view was flipped horizontally; ``(B, V)`` once
            collated.
    """

    views: list[Tensor]
    boxes: Tensor
    flips: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Crops:
        """Move views and geometry to ``device``."""
        return Crops(
            [v.to(device, non_blocking=non_blocking) for v in self.views],
            self.boxes.to(device, non_blocking=non_blocking),
            self.flips.to(device, non_blocking=non_blocking),
        )


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How one view is drawn.

    Attributes:
        size: output side in pixels (square views).
        scale: range of the crop's area as a fraction of the image's (``RandomResizedCrop``).
        ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
        flip_last: flip after ``photometric`` instead of right after the crop (MoCo v3's order;
            the recorded flag is the same either way).
        photometric: colour transforms on the ``uint8`` crop, ending in the tensor the model
            takes (``ToDtype`` and ``Normalize`` in the presets). Must not move pixels.
        interpolation: resampling of the crop to ``size``.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    flip_last: bool = False
    photometric: Photometric = _identity
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC

    def __post_init__(self) -> None:
        check_positive_int(self.size, "size")
        for name in ("scale", "ratio"):
            pair = getattr(self, name)
            if (
                not isinstance(pair, Sequence)
                or len(pair) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
                or not 0 < pair[0] <= pair[1]
            ):
                raise ValueError(
                    f"{name} must be a pair (low, high) with 0 < low <= high, got {pair!r}"
                )
        if self.scale[1] > 1:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        check_unit_interval(self.flip_p, "flip_p")
        if not callable(self.photometric):
            raise TypeError(f"photometric must be callable, got {type(self.photometric).__name__}")


_SIXTEEN_BIT = 65535  # the range of 16-bit levels, which other integer images are taken to hold


def _as_image(image: object) -> Tensor:
    """``image`` as a ``(3, H, W)`` tv_tensors image, converted without losing its range.

    - PIL images become 8-bit RGB. 16-bit modes (``"I;16"`` and its byte orders: 16-bit PNGs),
      ``"I"`` (32-bit integers, in which decoders put 16-bit levels) and ``"F"`` (float) are
      scaled from their range to 8 bits, not clipped as ``Image.convert("RGB")`` would: integer
      levels ``v`` in ``[0, 65535]`` become ``round(v * 255 / 65535)``, floats in ``[0, 1]``
      become ``round(x * 255)``. Values outside those ranges are refused. Other modes go through
      ``convert("RGB")`` (8-bit already: ``"L"``, ``"P"``, ``"RGBA"``, ``"CMYK"``...).
    - ``uint8`` tensors pass as they are. Other integer tensors are taken to hold 16-bit levels
      in ``[0, 65535]`` (``uint16``, or ``int32`` as older decoders return 16-bit PNGs) and are
      scaled to 8 bits the same way; values outside that range are refused. Boolean tensors are
      refused.
    - Float tensors pass as they are (torchvision's convention: ``[0, 1]``).
    - One channel becomes three.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            what = f"a PIL image of mode {image.mode!r}"
            if image.mode == "F":
                levels = torch.from_numpy(np.asarray(image).astype(np.float64))
                image = _scaled_to_uint8(levels, 1.0, what).unsqueeze(0)
            else:
                levels = torch.from_numpy(np.asarray(image).astype(np.int64))
                image = _scaled_to_uint8(levels, _SIXTEEN_BIT, what).unsqueeze(0)
        else:
            return cast(Tensor, TF.to_image(image.convert("RGB")))
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"image must be a (3, H, W) or (1, H, W) tensor or a PIL image, got a tensor of "
                f"shape {tuple(image.shape)}"
            )
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
        if image.dtype == torch.bool:
            raise TypeError(
                "image must hold pixel levels (uint8, 16-bit integers or floats in [0, 1]), got "
                "a bool tensor: convert a mask to uint8 levels first"
            )
        if not image.is_floating_point() and image.dtype != torch.uint8:
            levels = image.as_subclass(Tensor).to(torch.int64)
            image = _scaled_to_uint8(levels, _SIXTEEN_BIT, f"a {image.dtype} tensor")
        if image.shape[0] == 1:  # grayscale, as PIL's convert("RGB") would make it
            image = image.expand(3, -1, -1)
        return (
            image if isinstance(image, tv_tensors.Image) else cast(Tensor, tv_tensors.Image(image))
        )
    raise TypeError(f"image must be a PIL image or a (C, H, W) tensor, got {type(image).__name__}")


def _scaled_to_uint8(levels: Tensor, top: float, what: str) -> Tensor:
    """``levels`` (int64 or float64) in ``[0, top]`` as 8-bit levels ``round(v * 255 / top)``."""
    if levels.numel() and not bool(torch.isfinite(levels).all()):
        raise ValueError(f"image is {what} with non-finite values (NaN or inf)")
    low, high = (float(levels.min()), float(levels.max())) if levels.numel() else (0.0, 0.0)
    if low < 0 or high > top:
        expected = "[0, 1]" if top == 1.0 else f"16-bit levels in [0, {int(top)}]"
        raise ValueError(
            f"image is {what} with values in [{low:g}, {high:g}]: expected {expected}, which are "
            "scaled to 8 bits. Bring the image to that range (or to uint8) before the transform"
        )
    return (levels.to(torch.float64) * (255.0 / top)).round().to(torch.uint8)


class MultiCropTransform:
    """Draw several views of an image and record their crop boxes and flips.

    Args:
        crops: one :class:`CropSpec` per view, global views first.
        num_global: how many of ``crops`` are global views (the teacher's), for the loss's
            ``num_global_views``. Defaults to the views with the largest size.

    Call it on a PIL image or a ``(C, H, W)`` tensor; it returns :class:`Crops`.
    """

    def __init__(self, crops: Sequence[CropSpec], num_global: int | None = None) -> None:
        if not isinstance(crops, Sequence) or not crops:
            raise TypeError(f"crops must be a non-empty sequence of CropSpec, got {crops!r}")
        crops = list(crops)
        if not all(isinstance(c, CropSpec) for c in crops):
            raise TypeError(f"crops must be a non-empty sequence of CropSpec, got {crops!r}")
        if num_global is None:
            largest = max(c.size for c in crops)
            num_global = sum(c.size == largest for c in crops)
        num_global = check_positive_int(num_global, "num_global")
        if num_global > len(crops):
            raise ValueError(f"num_global={num_global} exceeds the {len(crops)} crops")
        sizes = [c.size for c in crops]
        if min(sizes[:num_global]) < max(sizes[num_global:], default=0):
            raise ValueError(
                f"the {num_global} global crops must come first and be the largest, got sizes "
                f"{sizes}"
            )
        self.crops = crops
        self.num_global = num_global

    @property
    def num_local(self) -> int:
        """How many local views each image gives."""
        return len(self.crops) - self.num_global

    def __call__(self, image: object) -> Crops:
        """Draw every view of ``image`` and its geometry."""
        source = _as_image(image)
        height, width = TF.get_size(source)
        views, boxes, flips = [], [], []
        for spec in self.crops:
            # RandomResizedCrop's own sampling of the crop, in pixels of the original image.
            top, left, h, w = v2.RandomResizedCrop.get_params(
                source, list(spec.scale), list(spec.ratio)
            )
            view = TF.resized_crop(
                source, top, left, h, w, [spec.size, spec.size], spec.interpolation, antialias=True
            )
            flip = bool(torch.rand(()) < spec.flip_p)
            if flip and not spec.flip_last:
                view = TF.horizontal_flip(view)
            view = spec.photometric(view)
            if flip and spec.flip_last:
                view = TF.horizontal_flip(view)
            views.append(view.as_subclass(Tensor))
            boxes.append((left / width, top / height, (left + w) / width, (top + h) / height))
            flips.append(flip)
        return Crops(views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips))

    def __repr__(self) -> str:
        lines = [f"  {spec.size}px scale={spec.scale} flip_p={spec.flip_p}" for spec in self.crops]
        return f"{type(self).__name__}(num_global={self.num_global},\n" + ",\n".join(lines) + ")"


def collate_crops(batch: Sequence[Any]) -> Any:
    """Batch :class:`Crops` (or ``(Crops, target)`` pairs, as from ``ImageFolder``).

    It is ``default_collate``, which keeps the named tuple: views become a list of ``V`` tensors
    ``(B, 3, H, W)``, boxes ``(B, V, 4)``, flips ``(B, V)``.
    """
    return default_collate(list(batch))


# Published recipes (DINO / iBOT / MoCo v3 augmentations; SPEC 6 for SERE's crop scales).


def _photometric(
    blur_p: float, solarize_p: float, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """One view's colour recipe on the uint8 crop, ending in the normalised float tensor."""
    return v2.Compose(
        [
            # The thresholds (solarisation at 128) are for 8-bit images: float input is brought
            # to uint8 first (a no-op for uint8 and PIL input).
            v2.ToDtype(torch.uint8, scale=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            # PIL's GaussianBlur with radius ~ U(0.1, 2.0) in the recipes; 13 taps cover +-3 sigma.
            v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=blur_p),
            # Left out, not drawn with p = 0, where a recipe has none.
            *([v2.RandomSolarize(threshold=128, p=solarize_p)] if solarize_p > 0 else []),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def _multicrop(
    *,
    global_size: int,
    local_size: int,
    num_local: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> MultiCropTransform:
    num_local = check_int(num_local, "num_local", 0)
    global1 = _photometric(1.0, 0.0, mean, std)
    global2 = _photometric(0.1, 0.2, mean, std)
    local = _photometric(0.5, 0.0, mean, std)
    crops = [
        CropSpec(global_size, global_scale, photometric=global1),
        CropSpec(global_size, global_scale, photometric=global2),
    ]
    crops += [CropSpec(local_size, local_scale, photometric=local) for _ in range(num_local)]
    return MultiCropTransform(crops, num_global=2)


def dino_sere_transform(
    *,
    global_size: int = 224,
    local_size: int = 96,
    num_local: int = 4,
    global_scale: tuple[float, float] = (0.35, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.35),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> MultiCropTransform:
    """DINO's multi-crop with SERE's crop scales: 2 global (0.35, 1) and 4 local (0.05, 0.35).

    Global view 1 is always blurred; global view 2 is blurred with p = 0.1 and solarised with
    p = 0.2; local views are blurred with p = 0.5. Every view: flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale with p = 0.2, bicubic resizing.
    """
    return _multicrop(
        global_size=global_size,
        local_size=local_size,
        num_local=num_local,
        global_scale=global_scale,
        local_scale=local_scale,
        mean=mean,
        std=std,
    )


def ibot_sere_transform(
    *,
    global_size: int = 224,
    local_size: int = 96,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> MultiCropTransform:
    """The iBOT multi-crop with SERE's settings: 2 global (0.4, 1) and 10 local (0.05, 0.4).

    The colour and blur recipe is DINO's (see :func:`dino_sere_transform`).
    """
    return _multicrop(
        global_size=global_size,
        local_size=local_size,
        num_local=num_local,
        global_scale=global_scale,
        local_scale=local_scale,
        mean=mean,
        std=std,
    )


def mocov3_transform(
    *,
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> MultiCropTransform:
    """MoCo v3's two asymmetric views, scale (0.08, 1), with their geometry recorded.

    View 1: colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale p = 0.2, blur always.
    View 2: the same with blur p = 0.1 and solarisation p = 0.2. As in MoCo v3 the flip comes
    last, after the colour transforms; the flag is recorded all the same.
    """
    view1 = _photometric(1.0, 0.0, mean, std)
    view2 = _photometric(0.1, 0.2, mean, std)
    return MultiCropTransform(
        [
            CropSpec(size, scale, flip_last=True, photometric=view1),
            CropSpec(size, scale, flip_last=True, photometric=view2),
        ],
        num_global=2,
    )
