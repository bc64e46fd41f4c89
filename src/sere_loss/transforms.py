"""Multi-crop augmentation that records where every crop came from.

The spatial term compares two views on their overlap, so it needs each view's crop box in the
original image and whether the view was flipped (paper Sec. 3.2). ``MultiCropTransform`` draws the
crops with ``torchvision.transforms.v2`` (``RandomResizedCrop``'s sampling, ``resized_crop``,
``horizontal_flip`` and the colour transforms) and returns them with that geometry, in the layout
the losses take once a ``DataLoader`` has batched them:

Examples:
    >>> transform = dino_sere_transform(num_local=2)
    >>> crops = transform(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
    >>> [tuple(v.shape) for v in crops.views]
    [(3, 224, 224), (3, 224, 224), (3, 96, 96), (3, 96, 96)]
    >>> crops.boxes.shape, crops.flips.shape  # (V, 4) normalised (x0, y0, x1, y1), (V,) bool
    (torch.Size([4, 4]), torch.Size([4]))

``torch.utils.data.default_collate`` batches ``Crops`` as they are (a list of ``V`` tensors
``(B, 3, H, W)``, boxes ``(B, V, 4)``, flips ``(B, V)``); ``collate_crops`` does the same for
a list of crops and names the result.

Geometry is exact: a view's pixel ``k`` (of ``n``) covers the original span
``x0 + (x1 - x0) * [k, k + 1] / n``, counted from the right when the view is flipped, which is the
convention of ``overlap_grids`` (``grid_sample`` with ``align_corners=False``). The presets follow
the published recipes; their photometric parts can be replaced per crop (``CropSpec``).
To keep a multi-crop pipeline you already have (torchvision v2 or v1, the official DINO
repository's, lightly's ``DINOTransform``), wrap it in ``CropTracker``: same views, same
random draws, and their geometry.

This module needs torchvision; ``import sere_loss`` alone does not import it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import torch

try:
    import torchvision.transforms as v1
except RuntimeError as error:  # a torchvision built against another torch: its ops do not load
    from importlib.metadata import version

    raise ImportError(
        f"torchvision {version('torchvision')} does not work with the installed torch "
        f"{torch.__version__} ({error}): they must be built for each other. Install both into a "
        "fresh virtual environment and let pip choose them together (pip install torch "
        "torchvision, neither pinned), then check with: python -c 'import torchvision'"
    ) from error
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import functional as F1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ._checks import check_boxes, check_int, check_positive_int, check_unit_interval

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropSpec",
    "CropTracker",
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

    What ``MultiCropTransform`` and ``CropTracker`` return for an image; ``default_collate``
    batches it (a ``DataLoader`` gives ``Crops`` of ``(B, ...)`` tensors), and ``to`` moves it.

    Attributes:
        views (list[Tensor]): ``V`` image tensors ``(3, H, W)``, global views first;
            ``(B, 3, H, W)`` once collated.
        boxes (Tensor): ``(V, 4)`` float32 crop boxes ``(x0, y0, x1, y1)`` in the original
            image, normalised to ``[0, 1]``; ``(B, V, 4)`` once collated.
        flips (Tensor): ``(V,)`` bool, ``True`` where the view was flipped horizontally;
            ``(B, V)`` once collated.

    Examples:
        >>> from torch.utils.data import default_collate
        >>> transform = dino_sere_transform()
        >>> image = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8)
        >>> batch = default_collate([transform(image) for _ in range(8)])
        >>> tuple(batch.views[0].shape), tuple(batch.boxes.shape), tuple(batch.flips.shape)
        ((8, 3, 224, 224), (8, 6, 4), (8, 6))
    """

    views: list[Tensor]
    boxes: Tensor
    flips: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Crops:
        """Move views (nested lists of them too) and geometry to ``device``.

        Args:
            device: where to, as ``Tensor.to`` takes it.
            non_blocking: copy asynchronously from pinned memory (as ``Tensor.to``).

        Returns:
            A new ``Crops`` whose views, boxes and flips are on ``device``.
        """

        def moved(views: Any) -> Any:
            if isinstance(views, (list, tuple)):
                return [moved(v) for v in views]
            return views.to(device, non_blocking=non_blocking)

        return Crops(
            moved(self.views),
            self.boxes.to(device, non_blocking=non_blocking),
            self.flips.to(device, non_blocking=non_blocking),
        )


def _check_pixels(value: object, name: str) -> int | tuple[int, int]:
    """A view size: ``n`` (square) or ``(height, width)``; a list is kept as a tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
        height = check_positive_int(value[0], f"{name}[0]")
        return height, check_positive_int(value[1], f"{name}[1]")
    return check_positive_int(value, name)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a checked view size."""
    return (size, size) if isinstance(size, int) else size


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How one view is drawn.

    Attributes:
        size: output size in pixels: ``n`` for a square view, or ``(height, width)``.
        scale: range of the crop's area as a fraction of the image's (``RandomResizedCrop``).
        ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
        flip_last: flip after ``photometric`` instead of right after the crop (MoCo v3's order;
            the recorded flag is the same either way).
        photometric: colour transforms on the ``uint8`` crop, ending in the tensor the model
            takes (``ToDtype`` and ``Normalize`` in the presets). Must not move pixels.
        interpolation: resampling of the crop to ``size``.

    Examples:
        >>> from torchvision.transforms import v2
        >>> to_float = v2.ToDtype(torch.float32, scale=True)
        >>> CropSpec(224, scale=(0.35, 1.0), photometric=to_float).size
        224
    """

    size: int | tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    flip_last: bool = False
    photometric: Photometric = _identity
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _check_pixels(self.size, "size"))
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


def _check_crops(crops: object, spec: type, num_global: int | None) -> tuple[list[Any], int]:
    """Crop specs of class ``spec``, global views first and largest; ``num_global`` resolved.

    ``num_global=None`` counts the crops of the largest area. Shared by ``MultiCropTransform``
    and ``batch_transforms.BatchMultiCrop``.
    """
    name = spec.__name__
    if not isinstance(crops, Sequence) or isinstance(crops, str):
        raise TypeError(f"crops must be a non-empty sequence of {name}, got {crops!r}")
    if not crops:
        raise ValueError(f"crops is empty: give one {name} per view, global views first")
    crops = list(crops)
    for k, crop in enumerate(crops):
        if not isinstance(crop, spec):
            raise TypeError(f"crops[{k}] must be a {name}, got {type(crop).__name__}")
    areas = [math.prod(_hw(c.size)) for c in crops]
    if num_global is None:
        num_global = sum(a == max(areas) for a in areas)
    num_global = check_positive_int(num_global, "num_global")
    if num_global > len(crops):
        raise ValueError(f"num_global={num_global} exceeds the {len(crops)} crops")
    if min(areas[:num_global]) < max(areas[num_global:], default=0):
        raise ValueError(
            f"the {num_global} global crops must come first and be the largest, got sizes "
            f"{[c.size for c in crops]}"
        )
    return crops, num_global


class MultiCropTransform:
    """Draw several views of an image and record their crop boxes and flips.

    Args:
        crops: one ``CropSpec`` per view, global views first.
        num_global: how many of ``crops`` are global views (the teacher's), for the loss's
            ``num_global_views``. Defaults to the views with the largest area in pixels.
        min_overlap: redraw a view's crop until it covers enough of the global views: every
            view after the first must have at least this fraction of its own area inside one
            of the global views drawn before it (a local view: inside any global view; global
            view ``k``: inside one of globals ``0..k-1``). ``0`` (the default) draws each crop
            once, as ``RandomResizedCrop`` does, and the random draws do not change.
        max_tries: how many crops to draw per view at most when ``min_overlap > 0``. When none
            reaches ``min_overlap``, the draw that overlapped most is kept: the spatial term
            then samples a smaller overlap (or masks the pair out if there is none), and
            nothing fails in a data loader.

    Why a redraw here rather than a mask in the loss: a pair that does not overlap teaches the
    spatial term nothing (it adds the constant ``ln S`` under the authors' recipe, or is left
    out of the mean under the paper's), and a mask could only drop more pairs after the crops
    have been drawn and resized. Redrawing the box (cheap: before any pixel is resampled) keeps
    every view useful to the spatial term. The price is a different crop distribution: local
    views lean towards the global ones, which is what the option asks for.

    Call it on a PIL image or a ``(C, H, W)`` tensor; it returns ``Crops``: the views, their
    boxes ``(V, 4)`` and flips ``(V,)``.

    Examples:
        >>> transform = MultiCropTransform(
        ...     [CropSpec(224, (0.35, 1.0))] * 2 + [CropSpec(96, (0.05, 0.35))] * 4,
        ...     min_overlap=0.2,
        ... )
        >>> crops = transform(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8))
        >>> transform.num_local, [tuple(v.shape[1:]) for v in crops.views[1:3]]
        (4, [(224, 224), (96, 96)])
        >>> bool((crops.boxes[:, :2] < crops.boxes[:, 2:]).all())  # (x0, y0) < (x1, y1)
        True
    """

    def __init__(
        self,
        crops: Sequence[CropSpec],
        num_global: int | None = None,
        *,
        min_overlap: float = 0.0,
        max_tries: int = 10,
    ) -> None:
        self.crops, self.num_global = _check_crops(crops, CropSpec, num_global)
        self.min_overlap = check_unit_interval(min_overlap, "min_overlap")
        self.max_tries = check_positive_int(max_tries, "max_tries")

    @property
    def num_local(self) -> int:
        """How many local views each image gives."""
        return len(self.crops) - self.num_global

    def _draw_box(
        self, source: Tensor, spec: CropSpec, globals_: list[tuple[int, int, int, int]]
    ) -> tuple[int, int, int, int]:
        """``RandomResizedCrop``'s sampling of a crop ``(top, left, h, w)``.

        Redrawn until it overlaps one of ``globals_`` by ``min_overlap`` of its area; the best
        of the tries when none does.
        """
        best, best_cover = None, -1.0
        tries = self.max_tries if self.min_overlap > 0 and globals_ else 1
        for _ in range(tries):
            top, left, h, w = v2.RandomResizedCrop.get_params(
                source, list(spec.scale), list(spec.ratio)
            )
            if tries == 1:
                return top, left, h, w
            inside = max(
                max(0, min(left + w, gl + gw) - max(left, gl))
                * max(0, min(top + h, gt + gh) - max(top, gt))
                for gt, gl, gh, gw in globals_
            )
            cover = inside / (h * w)
            if cover > best_cover:
                best, best_cover = (top, left, h, w), cover
            if cover >= self.min_overlap:
                break
        return cast(tuple[int, int, int, int], best)

    def __call__(self, image: object) -> Crops:
        """Draw every view of ``image`` and its geometry."""
        source = _as_image(image)
        height, width = TF.get_size(source)
        views, boxes, flips = [], [], []
        drawn: list[tuple[int, int, int, int]] = []
        for spec in self.crops:
            # RandomResizedCrop's own sampling of the crop, in pixels of the original image.
            top, left, h, w = self._draw_box(source, spec, drawn[: self.num_global])
            drawn.append((top, left, h, w))
            view = TF.resized_crop(
                source, top, left, h, w, list(_hw(spec.size)), spec.interpolation, antialias=True
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
        # Checked where they are made, on the host, so a loss may skip it (set_value_checks).
        geometry = check_boxes(
            torch.tensor(boxes, dtype=torch.float32), "the crop boxes drawn", at_source=True
        )
        return Crops(views, geometry, torch.tensor(flips))

    def __repr__(self) -> str:
        sizes = ["x".join(map(str, _hw(c.size))) for c in self.crops]
        lines = [
            f"  {px}px scale={spec.scale} flip_p={spec.flip_p}"
            for px, spec in zip(sizes, self.crops, strict=True)
        ]
        overlap = f", min_overlap={self.min_overlap}" if self.min_overlap > 0 else ""
        head = f"{type(self).__name__}(num_global={self.num_global}{overlap},\n"
        return head + ",\n".join(lines) + ")"


# Geometry from a pipeline the user already has.

# Transforms that move pixels in ways a crop box and a horizontal flip cannot describe, by name
# in torchvision.transforms (v1) and torchvision.transforms.v2; refused unless they never fire.
_REFUSED = (
    "RandomRotation",
    "RandomAffine",
    "RandomPerspective",
    "ElasticTransform",
    "RandomVerticalFlip",
    "CenterCrop",
    "RandomCrop",
    "FiveCrop",
    "TenCrop",
    "Pad",
    "RandomZoomOut",
    "RandomIoUCrop",
    "AutoAugment",
    "RandAugment",
    "TrivialAugmentWide",
    "AugMix",
)
# Resizing the whole image or a view changes no normalised coordinate.
_RESIZES = ("Resize", "RandomResize", "RandomShortestSize", "ScaleJitter")
# A class of the user's (not torchvision's) whose name says it moves pixels.
_GEOMETRIC_NAME = re.compile(
    r"rotat|affine|perspective|elastic|crop|flip|shear|translat|warp|zoom|pad", re.IGNORECASE
)


def _classes(*names: str) -> tuple[type, ...]:
    found = (getattr(module, name, None) for module in (v1, v2) for name in names)
    return tuple(c for c in found if isinstance(c, type))


def _never_fires(obj: object) -> bool:
    """A random transform with probability 0 (``p`` or ``prob``) is a no-op."""
    p = getattr(obj, "p", getattr(obj, "prob", None))
    return isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0


# Objects that hold no transform: the walk does not look inside them.
_VALUES = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    enum.Enum,
    type,
    Tensor,
    Image.Image,
    torch.Generator,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


def _is_value(obj: object) -> bool:
    """``True`` for numbers, strings, tensors, images, functions and numpy or builtin objects."""
    if obj is None or isinstance(obj, _VALUES):
        return True
    if isinstance(obj, (list, tuple, dict)):
        return False
    return type(obj).__module__.split(".")[0] in ("numpy", "builtins")


class _Call:
    """One call to a tracked object: its crops and flips, or the calls it made in turn."""

    __slots__ = ("calls", "ops", "single", "size")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.ops: list[tuple[Any, ...]] = []
        self.single = True  # returned one image (not a list, tuple or dict of them)
        self.size: tuple[int, ...] | None = None  # (H, W) of the image it returned

    def leaves(self) -> Iterator[tuple[Any, ...]]:
        """Every crop and flip below this call, in the order they ran."""
        yield from self.ops
        for call in self.calls:
            yield from call.leaves()

    def views(self) -> Iterator[_Call]:
        """The outermost calls that returned one image: one view each."""
        for call in self.calls:
            if call.single:
                yield call
            else:
                yield from call.views()


class _Recorder:
    """The tree of calls to the tracked objects during one call of the transform."""

    def __init__(self) -> None:
        self.root = _Call()
        self.stack: list[_Call] = []

    def reset(self) -> None:
        self.root, self.stack = _Call(), []

    def enter(self) -> _Call:
        call = _Call()
        (self.stack[-1] if self.stack else self.root).calls.append(call)
        self.stack.append(call)
        return call

    def exit(self, call: _Call, out: object) -> None:
        self.stack.pop()
        call.single = not isinstance(out, (list, tuple, Mapping))
        call.size = _image_hw(out)


def _geometry(ops: Iterable[tuple[Any, ...]]) -> tuple[tuple[float, float, float, float], bool]:
    """A view's box and flip from its crops and flips, in the order they ran.

    Each axis keeps the map from the current canvas to the original image: a point ``u`` in
    ``[0, 1]`` of the canvas lies at ``a + b * u`` of the original (normalised), ``b < 0`` once
    flipped. A crop of ``[u0, u1]`` makes it ``a + b * u0 + b * (u1 - u0) * u``; a horizontal
    flip ``a + b - b * u``; a resize changes nothing. The box is the image of ``[0, 1]``, the
    flip the sign of ``b``.
    """
    ax, bx, ay, by = 0.0, 1.0, 0.0, 1.0
    for op in ops:
        if op[0] == "flip":
            ax, bx = ax + bx, -bx
        else:
            _, (rows, cols), top, left, height, width = op
            ax, bx = ax + bx * left / cols, bx * width / cols
            ay, by = ay + by * top / rows, by * height / rows
    return (min(ax, ax + bx), ay, max(ax, ax + bx), ay + by), bx < 0


class _TrackedCrop(nn.Module):
    """``RandomResizedCrop`` (v1 or v2) that records which box it cut.

    It makes the calls the original's ``forward`` makes, in the same order, so the random draws
    and the output are the same: v1 ``get_params`` then ``resized_crop``; v2 ``make_params``
    then ``transform`` (``_get_params`` / ``_transform`` before torchvision 0.21).
    """

    def __init__(self, inner: Any, recorder: _Recorder) -> None:
        super().__init__()
        self.inner, self.recorder = inner, recorder

    def forward(self, image: Any) -> Any:
        t: Any = self.inner
        call = self.recorder.enter()
        canvas = tuple(TF.get_size(image))
        if isinstance(t, v2.Transform):
            params = getattr(t, "make_params", None) or t._get_params
            apply = getattr(t, "transform", None) or t._transform
            p = params([image])
            call.ops.append(("crop", canvas, p["top"], p["left"], p["height"], p["width"]))
            out = apply(image, p)
        else:
            top, left, height, width = t.get_params(image, t.scale, t.ratio)
            call.ops.append(("crop", canvas, top, left, height, width))
            out = F1.resized_crop(
                image, top, left, height, width, t.size, t.interpolation, antialias=t.antialias
            )
        self.recorder.exit(call, out)
        return out

    def extra_repr(self) -> str:
        return "tracked"


class _TrackedFlip(nn.Module):
    """``RandomHorizontalFlip`` (v1 or v2) that records when it flipped.

    One ``torch.rand(1)`` against ``p``, as both versions draw it.
    """

    def __init__(self, inner: Any, recorder: _Recorder) -> None:
        super().__init__()
        self.inner, self.recorder = inner, recorder

    def forward(self, image: Any) -> Any:
        t: Any = self.inner
        call = self.recorder.enter()
        out = image
        if isinstance(t, v2.Transform):
            if torch.rand(1) < t.p:
                call.ops.append(("flip",))
                out = (getattr(t, "transform", None) or t._transform)(image, {})
        elif torch.rand(1) < t.p:
            call.ops.append(("flip",))
            out = F1.hflip(image)
        self.recorder.exit(call, out)
        return out

    def extra_repr(self) -> str:
        return "tracked"


class _Tracked(nn.Module):
    """An object of the pipeline that holds a crop or a flip: its calls are recorded."""

    def __init__(self, inner: Callable[..., Any], recorder: _Recorder) -> None:
        super().__init__()
        self.inner, self.recorder = inner, recorder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self.recorder.enter()
        out = self.inner(*args, **kwargs)
        self.recorder.exit(call, out)
        return out

    def extra_repr(self) -> str:
        return "" if isinstance(self.inner, nn.Module) else repr(self.inner)


_TWINS = (_TrackedCrop, _TrackedFlip)


class CropTracker:
    """Keep your multi-crop augmentation and get each view's crop box and flip.

    ``CropTracker(transform)`` copies ``transform`` (any object that turns an image into a list
    of views: torchvision v2 or v1 ``Compose`` pipelines per view, the official DINO
    repository's ``DataAugmentationDINO``, lightly's ``DINOTransform``, a plain list of
    per-view pipelines; or into a dict of them: DINOv2's ``DataAugmentationDINO``) and swaps
    each ``RandomResizedCrop`` and ``RandomHorizontalFlip`` (v1 or v2) in the copy for a twin
    that makes the same calls, so it draws the same random numbers and gives the same pixels,
    and records what it did. Calling the tracker on an image returns ``Crops``: your views,
    their boxes and flips.

    A transform that returns a dict keeps it: the tracker returns the same dict with
    ``"boxes"`` ``(V, 4)`` and ``"flips"`` ``(V,)`` added, for the trainer's own code to read
    the views where it expects them. The views are the distinct images in it (in lists, tuples
    or dicts inside it), in the order it holds them, keys in their order; an image held twice
    (DINOv2's ``global_crops_teacher`` holds the ``global_crops`` again) is one view. A list or
    tuple that holds lists (``(globals, locals)``) is kept as ``Crops.views``. ``default_collate``
    batches the dicts; a trainer's own collate needs ``collate_crops(batch, collate_fn=...)``.

    >>> from torchvision.transforms import v2
    >>> view = lambda px, scale: v2.Compose([
    ...     v2.RandomResizedCrop(px, scale=scale), v2.RandomHorizontalFlip(),
    ...     v2.ToDtype(torch.float32, scale=True)])
    >>> tracker = CropTracker([view(64, (0.4, 1)), view(64, (0.4, 1)), view(32, (0.05, 0.4))])
    >>> crops = tracker(torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8))
    >>> [tuple(v.shape) for v in crops.views], tuple(crops.boxes.shape), tuple(crops.flips.shape)
    ([(3, 64, 64), (3, 64, 64), (3, 32, 32)], (3, 4), (3,))

    How it finds them: it walks the copy's attributes, list, tuple and dict items and module
    children, and records the calls of every object below the top that holds a crop or a flip
    (a ``Compose``, a class of yours, ``DINOViewTransform``, a multi-crop inside a ``Compose``).
    The outermost calls that return one image are the views, in call order; there must be as
    many as the views the transform returns, in the same order (views held in another order
    than they were drawn are refused where their sizes show it). Several crops and flips in
    one view compose (a
    flip before the crop mirrors the box). ``Resize`` anywhere changes no
    normalised coordinate and is allowed. Transforms that move pixels otherwise
    (``RandomRotation``, ``RandomAffine``, ``RandomPerspective``, ``RandomVerticalFlip``,
    ``CenterCrop``, ``RandomCrop``, ``Pad``, the auto-augment policies...) are refused with an
    error that names them and where they sit, unless their probability is 0 (``p=0``, or
    inside ``RandomApply(..., p=0)``, as lightly's default ``RandomVerticalFlip(p=0)`` and
    ``RandomRotate(prob=0)``). A callable the walk cannot see into (DINO's ``GaussianBlur``,
    ``v2.Lambda``) is taken not to move pixels, unless its class name says otherwise (rotate,
    affine, crop, flip, pad...): pass such a class in ``assume_photometric`` if it does not.

    Why swap transforms rather than let torchvision v2 carry ``tv_tensors.BoundingBoxes``
    through the pipeline: v2 clamps boxes to each new canvas, so the full-image box comes out
    of a crop as the crop's own canvas, not as its place in the original; a flip leaves no
    trace on a box of the whole view; v1 transforms and custom callables that take one PIL
    image (DINO's own ``GaussianBlur`` and ``Solarization``) break when a ``Compose`` hands
    them ``(image, boxes)``; and the user's call signature would change. The twins need none
    of that, and the coordinate-image tests check their records pixel by pixel.

    Args:
        transform: the multi-crop transform; it is copied (``copy.deepcopy``) and left as it
            was.
        assume_photometric: classes of yours the tracker may take as not moving pixels,
            though their names suggest they do.

    Returns:
        Called on an image, what the transform returns, as ``Crops(views, boxes, flips)``: the
        very views (the same pixels for the same random state), their boxes ``(V, 4)`` and
        flips ``(V,)``; a transform that returns a dict gives that dict with ``"boxes"`` and
        ``"flips"`` added.

    Raises:
        ValueError: a transform in the pipeline moves pixels in a way a box and a flip cannot
            describe.
        TypeError: no ``RandomResizedCrop`` or ``RandomHorizontalFlip`` was found.

    Examples:
        >>> from torchvision.transforms import v2
        >>> def view(px, scale):  # your own pipeline, one per view
        ...     crop = v2.RandomResizedCrop(px, scale=scale)
        ...     return v2.Compose([crop, v2.RandomHorizontalFlip()])
        >>> tracker = CropTracker([view(224, (0.35, 1.0))] * 2 + [view(96, (0.05, 0.35))] * 4)
        >>> crops = tracker(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8))
        >>> len(crops.views), tuple(crops.boxes.shape), crops.flips.dtype
        (6, (6, 4), torch.bool)
    """

    def __init__(self, transform: object, *, assume_photometric: Sequence[type] = ()) -> None:
        if not isinstance(assume_photometric, Sequence) or not all(
            isinstance(c, type) for c in assume_photometric
        ):
            raise TypeError(
                f"assume_photometric must be a sequence of classes, got {assume_photometric!r}"
            )
        self.recorder = _Recorder()
        self.transform: Any = copy.deepcopy(transform)
        self._trusted = tuple(assume_photometric)
        self._refused: list[str] = []
        self._memo: dict[int, tuple[object, Any]] = {}  # id -> (object, what replaced it)
        self.transform = self._swap(self.transform, "transform", 0)[0]
        if self._refused:
            raise ValueError(
                "CropTracker cannot describe these transforms with a crop box and a horizontal "
                "flip: " + "; ".join(self._refused) + ". Remove them or set their probability "
                "to 0 (a class of yours that does not move pixels: pass it in "
                "assume_photometric)"
            )
        self.tracked: list[str] = []  # where the outermost tracked objects sit
        self._memo = {}
        self.transform = self._place(self.transform, "transform", 0, top=True, under=False)
        del self._memo, self._refused
        if not self._holds_twin(self.transform, set()):
            raise TypeError(
                f"CropTracker found no RandomResizedCrop or RandomHorizontalFlip in {transform!r}"
                "; it looks for them in attributes, list items and child modules"
            )

    # Pass 1: swap crops and flips for twins, refuse what cannot be described.

    def _swap(self, obj: Any, path: str, depth: int) -> tuple[Any, bool]:
        """``obj`` with twins in it, and whether it holds a torchvision transform."""
        if _is_value(obj) or depth > 32 or isinstance(obj, (*_TWINS, _Tracked)):
            return obj, False
        seen = self._memo.get(id(obj))
        if seen is not None and seen[0] is obj:
            return cast(tuple[Any, bool], seen[1])
        name = type(obj).__name__
        torchvision = type(obj).__module__.startswith("torchvision.transforms")
        if isinstance(obj, _classes("RandomResizedCrop")):
            out: Any = _TrackedCrop(obj, self.recorder)
        elif isinstance(obj, _classes("RandomHorizontalFlip")):
            out = _TrackedFlip(obj, self.recorder)
        elif isinstance(obj, _classes("RandomApply")) and _never_fires(obj):
            out = obj
        elif isinstance(obj, _classes(*_REFUSED)) and not _never_fires(obj):
            self._refused.append(f"{name} at {path}")
            out = obj
        elif isinstance(obj, (*_classes(*_RESIZES), *self._trusted)):
            out = obj
        else:
            out, inside = self._walk(obj, path, depth, self._swap)
            leaf = not inside and not torchvision
            if leaf and _GEOMETRIC_NAME.search(name) and not _never_fires(obj):
                self._refused.append(f"{name} at {path} (its name says it moves pixels)")
            self._memo[id(obj)] = (obj, (out, inside or torchvision))
            return out, inside or torchvision
        self._memo[id(obj)] = (obj, (out, True))
        return out, True

    # Pass 2: record the calls of every object that holds a twin, nested ones included.

    def _place(self, obj: Any, path: str, depth: int, *, top: bool, under: bool) -> Any:
        if _is_value(obj) or depth > 32 or isinstance(obj, (*_TWINS, _Tracked)):
            return obj
        seen = self._memo.get(id(obj))
        if seen is not None and seen[0] is obj:
            return seen[1]
        wrap = not top and callable(obj) and self._holds_twin(obj, set())
        if wrap and not under:
            self.tracked.append(path)
        out: Any = _Tracked(obj, self.recorder) if wrap else obj
        self._memo[id(obj)] = (obj, out)

        def visit(item: Any, where: str, level: int) -> tuple[Any, bool]:
            return self._place(item, where, level, top=False, under=under or wrap), False

        new = self._walk(obj, path, depth, visit)[0]
        if new is not obj:  # a tuple, rebuilt
            out = _Tracked(new, self.recorder) if wrap else new
            self._memo[id(obj)] = (obj, out)
        return out

    def _holds_twin(self, obj: Any, seen: set[int]) -> bool:
        if isinstance(obj, _TWINS):
            return True
        if _is_value(obj) or id(obj) in seen or len(seen) > 10_000:
            return False
        seen.add(id(obj))
        return any(self._holds_twin(child, seen) for child in _children(obj))

    @staticmethod
    def _walk(
        obj: Any, path: str, depth: int, visit: Callable[[Any, str, int], tuple[Any, bool]]
    ) -> tuple[Any, bool]:
        """Visit ``obj``'s items or attributes, put back what ``visit`` returns."""
        found = False
        if isinstance(obj, (list, tuple)):
            items = []
            for i, item in enumerate(obj):
                new, inside = visit(item, f"{path}[{i}]", depth + 1)
                items.append(new)
                found |= inside
            if isinstance(obj, list):
                obj[:] = items
                return obj, found
            return (type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)), found
        if isinstance(obj, dict):
            for key, item in list(obj.items()):
                new, inside = visit(item, f"{path}[{key!r}]", depth + 1)
                obj[key] = new
                found |= inside
            return obj, found
        attributes = getattr(obj, "__dict__", None)
        if not isinstance(attributes, dict):
            return obj, False
        for key, item in list(attributes.items()):
            new, inside = visit(item, path if key == "_modules" else f"{path}.{key}", depth + 1)
            if new is not item:
                attributes[key] = new
            found |= inside
        return obj, found

    def __call__(self, image: object) -> Any:
        """Run the transform on ``image``; its views with their boxes and flips.

        Returns:
            ``Crops(views, boxes, flips)`` when the transform returns a list or tuple (kept as
            ``views``); the transform's own dict with ``"boxes"`` and ``"flips"`` added when it
            returns a dict. Tensor subclasses (``tv_tensors.Image``) become plain tensors.
        """
        self.recorder.reset()
        per_view = isinstance(self.transform, (list, tuple))  # a list of per-view pipelines
        if per_view:
            out: Any = [pipeline(image) for pipeline in self.transform]
        else:
            out = self.transform(image)
        calls = list(self.recorder.root.views())
        self.recorder.reset()
        if isinstance(out, _IMAGES):
            raise TypeError(
                "CropTracker needs a multi-crop transform, which returns its views in a list, "
                f"tuple or dict, but the transform returned one image ({type(out).__name__}); to "
                "track a single pipeline as a multi-crop of one view, pass [pipeline]"
            )
        if not isinstance(out, (list, tuple, Mapping)):
            raise TypeError(
                "CropTracker needs a multi-crop transform, which returns its views in a list, "
                f"tuple or dict (nested ones too), but the transform returned {type(out).__name__}"
            )
        if per_view:
            nested = [k for k, view in enumerate(out) if not isinstance(view, _IMAGES)]
            if nested:
                raise TypeError(
                    "CropTracker was given a list of per-view pipelines, but pipeline "
                    f"{nested[0]} returned {type(out[nested[0]]).__name__}, not one image: "
                    "pass a multi-crop transform itself, not in a list"
                )
        found: dict[int, Any] = {}
        _leaves(out, found)
        views = list(found.values())
        if len(calls) != len(views):
            raise ValueError(
                f"the transform returned {len(views)} views (distinct images, in the order it "
                f"holds them) but {len(calls)} calls drew one image each (tracked: "
                f"{', '.join(self.tracked)}); each view must come from one call to an object "
                "that holds its crop and flip"
            )
        drawn = [call.size for call in calls]
        given = [_image_hw(view) for view in views]
        if drawn != given and _same_sizes(drawn, given):
            raise ValueError(
                f"the transform returns views of sizes {given}, in the order it holds them, but "
                f"drew them in the order {drawn}: CropTracker pairs the k-th view it holds with "
                "the k-th one drawn, so hold the views in the order they are drawn"
            )
        geometry = [_geometry(call.leaves()) for call in calls]
        boxes = torch.tensor([box for box, _ in geometry], dtype=torch.float32)
        # Checked where they are made, on the host, so a loss may skip it (set_value_checks).
        check_boxes(boxes, "the crop boxes CropTracker recorded", at_source=True)
        flips = torch.tensor([flip for _, flip in geometry], dtype=torch.bool)
        plain = _plain(out, {})
        if isinstance(out, Mapping):
            taken = [key for key in _GEOMETRY_KEYS if key in out]
            if taken:
                raise ValueError(
                    f"the transform returned a dict that already has {taken}: CropTracker adds the "
                    "views' boxes and flips under the keys 'boxes' and 'flips'"
                )
            return {**plain, "boxes": boxes, "flips": flips}
        return Crops(list(plain), boxes, flips)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tracking {', '.join(self.tracked)})"


# What a transform returns: images (the views) in lists, tuples and dicts, and other values.
_IMAGES = (Tensor, Image.Image, np.ndarray)
_GEOMETRY_KEYS = ("boxes", "flips")


def _image_hw(obj: object) -> tuple[int, ...] | None:
    """``(H, W)`` of an image (a tensor ``(..., H, W)``, a PIL image), else ``None``."""
    if isinstance(obj, Image.Image):
        return obj.height, obj.width
    if isinstance(obj, Tensor) and obj.ndim >= 2:
        return tuple(obj.shape[-2:])
    return None


def _leaves(out: object, found: dict[int, Any], depth: int = 0) -> None:
    """The images in ``out``, each object once, in the order ``out`` holds them.

    Lists and tuples in order, dicts in the order of their keys (DINOv2's
    ``global_crops_teacher`` holds the ``global_crops`` tensors again: the same views).
    """
    if isinstance(out, _IMAGES):
        found.setdefault(id(out), out)
    elif depth < 32 and isinstance(out, (list, tuple)):
        for item in out:
            _leaves(item, found, depth + 1)
    elif depth < 32 and isinstance(out, Mapping):
        for item in out.values():
            _leaves(item, found, depth + 1)


def _same_sizes(a: list[tuple[int, ...] | None], b: list[tuple[int, ...] | None]) -> bool:
    """Whether two lists hold the same known sizes, in any order."""
    known_a = [size for size in a if size is not None]
    known_b = [size for size in b if size is not None]
    return len(known_a) == len(a) and len(known_b) == len(b) and sorted(known_a) == sorted(known_b)


def _plain(out: Any, memo: dict[int, Any]) -> Any:
    """``out`` with every tensor subclass (``tv_tensors.Image``) made a plain tensor.

    The structure is kept, and an object seen twice stays one object.
    """
    if id(out) in memo:
        return memo[id(out)]
    if isinstance(out, Tensor):
        new: Any = out if type(out) is Tensor else out.as_subclass(Tensor)
    elif isinstance(out, list):
        new = [_plain(item, memo) for item in out]
    elif isinstance(out, tuple):
        items = [_plain(item, memo) for item in out]
        new = type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    elif isinstance(out, Mapping):
        new = {key: _plain(item, memo) for key, item in out.items()}
    else:
        new = out
    memo[id(out)] = new
    return new


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, dict):
        return list(obj.values())
    attributes = getattr(obj, "__dict__", None)
    return list(attributes.values()) if isinstance(attributes, dict) else []


def collate_crops(batch: Sequence[Any], collate_fn: Callable[[Any], Any] | None = None) -> Any:
    """Batch ``Crops`` (or ``(Crops, target)`` pairs, as from ``ImageFolder``).

    Without ``collate_fn`` it is ``default_collate``, which keeps the named tuple: views become
    a list of ``V`` tensors ``(B, 3, H, W)``, boxes ``(B, V, 4)``, flips ``(B, V)``. It batches
    the dicts ``CropTracker`` returns for a dict transform the same way, keys included.

    A trainer with a collate of its own, which builds its batch from the keys it knows (DINOv2's
    ``collate_data_and_cast``), would drop the boxes and flips: pass it as ``collate_fn``
    (``functools.partial(collate_crops, collate_fn=collate)``). It makes the batch, and
    ``collate_crops`` adds ``"boxes"`` ``(B, V, 4)`` and ``"flips"`` ``(B, V)`` to the dict it
    returns, in the order of ``batch``.

    Args:
        batch: samples from ``CropTracker``: ``Crops``, dicts holding ``"boxes"`` and
            ``"flips"``, or pairs ``(sample, target)`` of either.
        collate_fn: the trainer's own collate, called on ``batch`` as it is; it must return a
            dict (a mutable mapping).

    Raises:
        TypeError: a sample without boxes and flips, or a ``collate_fn`` that does not return
            a dict.
    """
    batch = list(batch)
    if collate_fn is None:
        return default_collate(batch)
    geometry = [_sample_geometry(sample, k) for k, sample in enumerate(batch)]
    out = collate_fn(batch)
    if not isinstance(out, MutableMapping):
        raise TypeError(
            f"collate_fn returned {type(out).__name__}: collate_crops adds the boxes and flips "
            "to the dict a collate returns. For batches that are not dicts, leave collate_fn "
            "out (default_collate keeps Crops together)"
        )
    out["boxes"] = torch.stack([boxes for boxes, _ in geometry])
    out["flips"] = torch.stack([flips for _, flips in geometry])
    return out


def _sample_geometry(sample: object, k: int) -> tuple[Tensor, Tensor]:
    """The boxes and flips of one sample: ``Crops``, a dict, or ``(either, target)``."""
    for item in (sample, *(sample[:1] if isinstance(sample, (list, tuple)) else ())):
        if isinstance(item, Crops):
            return item.boxes, item.flips
        if isinstance(item, Mapping) and all(key in item for key in _GEOMETRY_KEYS):
            boxes, flips = item["boxes"], item["flips"]
            if isinstance(boxes, Tensor) and isinstance(flips, Tensor):
                return boxes, flips
    raise TypeError(
        f"sample {k} of the batch holds no boxes and flips (got {type(sample).__name__}): make "
        "the dataset's transform a CropTracker, whose samples carry them"
    )


# Published recipes (DINO / iBOT / MoCo v3 augmentations; SERE's crop scales: paper Sec. 4.1).


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
    global_size: int | tuple[int, int],
    local_size: int | tuple[int, int],
    num_local: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
    min_overlap: float,
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
    return MultiCropTransform(crops, num_global=2, min_overlap=min_overlap)


def dino_sere_transform(
    *,
    global_size: int | tuple[int, int] = 224,
    local_size: int | tuple[int, int] = 96,
    num_local: int = 4,
    global_scale: tuple[float, float] = (0.35, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.35),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_overlap: float = 0.0,
) -> MultiCropTransform:
    """DINO's multi-crop with SERE's crop scales: 2 global (0.35, 1) and 4 local (0.05, 0.35).

    Global view 1 is always blurred; global view 2 is blurred with p = 0.1 and solarised with
    p = 0.2; local views are blurred with p = 0.5. Every view: flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale with p = 0.2, bicubic resizing. The paper's
    DINO setting (Sec. 4.1) with its defaults.

    Args:
        global_size: the global views' size in pixels, ``n`` or ``(height, width)`` (224).
        local_size: the local views' size (96).
        num_local: how many local views (4).
        global_scale: the global crops' area range, as a fraction of the image's.
        local_scale: the local crops' area range.
        mean: the normalisation's per-channel mean (ImageNet's).
        std: the normalisation's per-channel standard deviation (ImageNet's).
        min_overlap: redraw a local crop until at least this fraction of its area lies inside
            a global view (0: never), as in ``MultiCropTransform``.

    Returns:
        A ``MultiCropTransform`` that maps an image (PIL, or a ``(3, H, W)`` tensor) to
        ``Crops`` of ``2 + num_local`` views, their boxes ``(V, 4)`` and flips ``(V,)``.

    Examples:
        >>> transform = dino_sere_transform()
        >>> crops = transform(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8))
        >>> [tuple(v.shape) for v in crops.views]
        [(3, 224, 224), (3, 224, 224), (3, 96, 96), (3, 96, 96), (3, 96, 96), (3, 96, 96)]
        >>> crops.boxes.shape, crops.flips.shape
        (torch.Size([6, 4]), torch.Size([6]))
    """
    return _multicrop(
        global_size=global_size,
        local_size=local_size,
        num_local=num_local,
        global_scale=global_scale,
        local_scale=local_scale,
        mean=mean,
        std=std,
        min_overlap=min_overlap,
    )


def ibot_sere_transform(
    *,
    global_size: int | tuple[int, int] = 224,
    local_size: int | tuple[int, int] = 96,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_overlap: float = 0.0,
) -> MultiCropTransform:
    """The iBOT multi-crop with SERE's settings: 2 global (0.4, 1) and 10 local (0.05, 0.4).

    The colour and blur recipe is DINO's (see ``dino_sere_transform``): the authors' iBOT + SERE
    command for ViT-S/16.

    Args:
        global_size: the global views' size in pixels, ``n`` or ``(height, width)`` (224).
        local_size: the local views' size (96).
        num_local: how many local views (10).
        global_scale: the global crops' area range, as a fraction of the image's.
        local_scale: the local crops' area range.
        mean: the normalisation's per-channel mean (ImageNet's).
        std: the normalisation's per-channel standard deviation (ImageNet's).
        min_overlap: as in ``MultiCropTransform`` (0: never redraw).

    Returns:
        A ``MultiCropTransform`` that maps an image to ``Crops`` of ``2 + num_local`` views
        with their boxes and flips.

    Examples:
        >>> transform = ibot_sere_transform()
        >>> crops = transform(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8))
        >>> len(crops.views), tuple(crops.boxes.shape)
        (12, (12, 4))
    """
    return _multicrop(
        global_size=global_size,
        local_size=local_size,
        num_local=num_local,
        global_scale=global_scale,
        local_scale=local_scale,
        mean=mean,
        std=std,
        min_overlap=min_overlap,
    )


def mocov3_transform(
    *,
    size: int | tuple[int, int] = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_overlap: float = 0.0,
) -> MultiCropTransform:
    """MoCo v3's two asymmetric views, scale (0.08, 1), with their geometry recorded.

    View 1: colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale p = 0.2, blur always.
    View 2: the same with blur p = 0.1 and solarisation p = 0.2. As in MoCo v3 the flip comes
    last, after the colour transforms; the flag is recorded all the same.

    Args:
        size: both views' size in pixels, ``n`` or ``(height, width)`` (224).
        scale: the crops' area range, as a fraction of the image's.
        mean: the normalisation's per-channel mean (ImageNet's).
        std: the normalisation's per-channel standard deviation (ImageNet's).
        min_overlap: as in ``MultiCropTransform`` (0: never redraw).

    Returns:
        A ``MultiCropTransform`` that maps an image to ``Crops`` of two global views with their
        boxes ``(2, 4)`` and flips ``(2,)``.

    Examples:
        >>> crops = mocov3_transform()(torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8))
        >>> [tuple(v.shape) for v in crops.views], tuple(crops.boxes.shape)
        ([(3, 224, 224), (3, 224, 224)], (2, 4))
    """
    view1 = _photometric(1.0, 0.0, mean, std)
    view2 = _photometric(0.1, 0.2, mean, std)
    return MultiCropTransform(
        [
            CropSpec(size, scale, flip_last=True, photometric=view1),
            CropSpec(size, scale, flip_last=True, photometric=view2),
        ],
        num_global=2,
        min_overlap=min_overlap,
    )
