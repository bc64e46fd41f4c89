"""Images with per-pixel classes, generated or read from a VOC-style folder, for dense probes.

- :class:`ShapesSegmentation`: 1 to 3 textured objects of 4 classes on a textured background,
  each image a function of ``(seed, index)``. A class is a texture (horizontal stripes,
  vertical stripes, checks, dots) with a random period, tilt and pair of colours, so neither
  colour nor shape gives it away: a probe has to see the texture. Shapes (ellipse, rectangle,
  triangle) and sizes are random; later objects occlude earlier ones.
- :class:`VOCSegmentationFolder`: PASCAL VOC's layout (``JPEGImages/``, ``SegmentationClass/``
  palette PNGs whose indices are the classes, 255 ignored, ``ImageSets/Segmentation/*.txt``).
- :func:`write_voc` and :func:`write_image_folder` save a dataset in those layouts, so that the
  trainers (which read an ImageFolder) and any VOC tool see the same images.

Every dataset gives ``(image, mask)``: a ``(3, H, W)`` uint8 tensor and an ``(H, W)`` int64 tensor.
:func:`image_label` turns a mask into one class per image (its largest object's), for k-NN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IGNORE = 255  # VOC's label for pixels that count in no class


class ShapesSegmentation(Dataset[tuple[Tensor, Tensor]]):
    """Generated images with masks: textured objects of 4 classes on a textured background.

    Args:
        length: number of images.
        size: side in pixels.
        seed: changes every image (use different seeds for the train and val splits).
        transform: applied to each uint8 image, as torchvision datasets do (the mask is not
            transformed).
    """

    CLASSES = ("background", "horizontal stripes", "vertical stripes", "checks", "dots")

    def __init__(
        self,
        length: int,
        size: int = 96,
        seed: int = 0,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if length < 1 or size < 16:
            raise ValueError(f"need length >= 1 and size >= 16, got length={length}, size={size}")
        self.length, self.size, self.seed, self.transform = length, size, seed, transform

    @property
    def num_classes(self) -> int:
        """Classes including the background (0)."""
        return len(self.CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        image, mask = self.sample(index)
        return (image if self.transform is None else self.transform(image)), mask

    def sample(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``index``: ``(3, S, S)`` uint8 and its mask ``(S, S)`` int64."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 17)
        n = self.size
        ys, xs = torch.meshgrid(
            (torch.arange(n) + 0.5) / n, (torch.arange(n) + 0.5) / n, indexing="ij"
        )
        image = _background(xs, ys, gen)
        mask = torch.zeros(n, n, dtype=torch.int64)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            cls = int(torch.randint(1, self.num_classes, (), generator=gen))
            inside = _shape(xs, ys, gen)
            pattern = _texture(cls, xs * n, ys * n, gen)  # in pixels, so periods are in pixels
            dark, light = _colour_pair(gen)
            colour = dark[:, None, None] + (light - dark)[:, None, None] * pattern
            image = torch.where(inside, colour, image)
            mask = torch.where(inside, torch.tensor(cls), mask)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _background(xs: Tensor, ys: Tensor, gen: torch.Generator) -> Tensor:
    """A smooth colour field: two colours blended along a random direction, with soft blobs."""
    c0, c1 = torch.rand(2, 3, 1, 1, generator=gen)
    angle = _uniform(gen, 0, 2 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle) + 1) / 3
    image = c0 + (c1 - c0) * ramp
    for _ in range(3):
        cx, cy, r = _uniform(gen, 0, 1), _uniform(gen, 0, 1), _uniform(gen, 0.15, 0.4)
        blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
        image = image + 0.25 * (torch.rand(3, 1, 1, generator=gen) - 0.5) * blob
    return image


def _shape(xs: Tensor, ys: Tensor, gen: torch.Generator) -> Tensor:
    """A random ellipse, rectangle or triangle ``(S, S)`` bool."""
    kind = int(torch.randint(0, 3, (), generator=gen))
    cx, cy = _uniform(gen, 0.2, 0.8), _uniform(gen, 0.2, 0.8)
    rx, ry = _uniform(gen, 0.12, 0.3), _uniform(gen, 0.12, 0.3)
    if kind == 0:
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    if kind == 1:
        return ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
    # A triangle with its apex up or down: inside when below both slanted edges.
    apex = 1.0 if float(torch.rand((), generator=gen)) < 0.5 else -1.0
    v = (ys - cy) / ry * apex  # -1 at the apex, 1 at the base
    return (v >= -1) & (v <= 1) & ((xs - cx).abs() <= rx * (v + 1) / 2)


def _texture(cls: int, px: Tensor, py: Tensor, gen: torch.Generator) -> Tensor:
    """Class ``cls``'s pattern in [0, 1] at pixel coordinates ``(px, py)``.

    Period 7 to 11 px, tilt within 15 degrees of the class's axis, random phase: horizontal
    stripes (1), vertical stripes (2), checks (3), dots (4).
    """
    period = _uniform(gen, 7.0, 11.0)
    tilt = math.radians(_uniform(gen, -15.0, 15.0))
    phase_u, phase_v = _uniform(gen, 0, 2 * math.pi), _uniform(gen, 0, 2 * math.pi)
    u = px * math.cos(tilt) + py * math.sin(tilt)  # along the tilted x axis
    v = -px * math.sin(tilt) + py * math.cos(tilt)  # along the tilted y axis
    wave_u = torch.sin(2 * math.pi * u / period + phase_u)
    wave_v = torch.sin(2 * math.pi * v / period + phase_v)
    if cls == 1:
        return (wave_v > 0).float()
    if cls == 2:
        return (wave_u > 0).float()
    if cls == 3:
        return (wave_u * wave_v > 0).float()
    return ((wave_u + 1) * (wave_v + 1) > 2.2).float()  # round dots on a lattice


def _colour_pair(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two random colours at least 0.35 apart in mean intensity."""
    dark = torch.rand(3, generator=gen) * 0.5
    light = (dark + _uniform(gen, 0.35, 0.5) + 0.15 * torch.rand(3, generator=gen)).clamp(0, 1)
    return (dark, light) if float(torch.rand((), generator=gen)) < 0.5 else (light, dark)


def image_label(mask: Tensor, num_classes: int) -> int:
    """One class per image: the object class with the most pixels (0 when there is none)."""
    counts = torch.bincount(mask[mask != IGNORE].flatten(), minlength=num_classes)[:num_classes]
    counts[0] = 0
    return int(counts.argmax()) if int(counts.sum()) else 0


class VOCSegmentationFolder(Dataset[tuple[Tensor, Tensor]]):
    """A split of a folder in PASCAL VOC's segmentation layout.

    ``root/ImageSets/Segmentation/<split>.txt`` lists image ids; the image is
    ``root/JPEGImages/<id>.jpg`` (or ``.png``), its classes ``root/SegmentationClass/<id>.png``,
    a palette (or grayscale) PNG whose pixel values are class indices, 255 for "ignore".

    Args:
        root: the folder.
        split: ``"train"``, ``"val"`` or any list in ``ImageSets/Segmentation``.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(
                f"{listing} not found: a VOC-style folder has JPEGImages/, SegmentationClass/ and "
                "ImageSets/Segmentation/<split>.txt"
            )
        self.listing = listing
        self.ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"{listing} lists no images")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        name = self.ids[index]
        jpg = self.root / "JPEGImages" / f"{name}.jpg"
        path = jpg if jpg.is_file() else jpg.with_suffix(".png")
        if not path.is_file():
            raise FileNotFoundError(
                f"image {name!r} of {self.listing} not found: neither {jpg} nor {path} exists"
            )
        masks = self.root / "SegmentationClass" / f"{name}.png"
        if not masks.is_file():
            raise FileNotFoundError(f"image {name!r} of {self.listing} has no mask {masks}")
        with Image.open(path) as img:
            image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
        with Image.open(masks) as seg:
            if seg.mode not in ("P", "L"):
                raise ValueError(
                    f"{masks}: expected a palette (P) or grayscale (L) PNG of class ids, got mode "
                    f"{seg.mode}"
                )
            mask = torch.from_numpy(np.array(seg)).long()
        if mask.shape != image.shape[1:]:
            raise ValueError(
                f"{masks} is {mask.shape[1]} x {mask.shape[0]} px but its image {path} is "
                f"{image.shape[2]} x {image.shape[1]} px: a mask must have its image's size"
            )
        return image, mask


def voc_palette() -> list[int]:
    """VOC's colour map: class ``k``'s RGB from the bits of ``k`` (768 values)."""
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc(root: str | Path, splits: dict[str, Dataset[tuple[Tensor, Tensor]]]) -> Path:
    """Save datasets of ``(image, mask)`` as one VOC-style folder, a split each.

    Images go to ``JPEGImages/<split>_<index>.png`` (lossless, so textures survive; the reader
    takes ``.jpg`` or ``.png``), masks to ``SegmentationClass/`` as palette PNGs.
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, dataset in splits.items():
        ids = []
        for index in range(len(dataset)):  # type: ignore[arg-type]
            image, mask = dataset[index]
            name = f"{split}_{index:06d}"
            pixels = Image.fromarray(image.permute(1, 2, 0).numpy())
            pixels.save(root / "JPEGImages" / f"{name}.png")
            seg = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
            seg.putpalette(palette)
            seg.save(root / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_image_folder(
    root: str | Path, dataset: Dataset[tuple[Tensor, Tensor]], num_classes: int
) -> Path:
    """Save the images as an ``ImageFolder`` (``root/<label>/<index>.png``), for the trainers.

    The folder name is :func:`image_label` of the mask; PNG keeps the pixels exact.
    """
    root = Path(root)
    for index in range(len(dataset)):  # type: ignore[arg-type]
        image, mask = dataset[index]
        folder = root / f"{image_label(mask, num_classes):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:06d}.png")
    return root


def split_sizes(text: str) -> Sequence[int]:
    """``"2048,512"`` -> ``(2048, 512)``: train and val image counts (``--images``)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(
            f"--images: expected 'TRAIN,VAL', two image counts >= 1 such as 1024,256, got {text!r}"
        )
    return parts
