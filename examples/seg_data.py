"""Images with per-pixel classes, generated or read from a VOC-style folder, for dense probes.

- :class:`ShapesSegmentation`: 1 to 3 textured objects of 4 classes on a textured background,
  each image a function of ``(seed, index)``. A class is a texture (horizontal stripes,
  vertical stripes, checks, dots) with a random period, tilt and pair of colours, so neither
  colour nor shape gives it away: a probe has to see the texture. Shapes (ellipse, rectangle,
  triangle) and sizes are random; later objects occlude earlier ones.
- :class:`FashionScenes`: real photographs of fashion items (Fashion-MNIST's 28 x 28 gray
  silhouettes on black), 1 to 3 per scene on a plain dark background, tinted and scaled; an
  item's pixels above a threshold are its mask, so the masks are exact. 10 classes and the
  background. Read from any folder that holds Fashion-MNIST's four idx files (``.gz`` or not),
  such as Debian's package ``dataset-fashion-mnist`` (:data:`FASHION_MNIST_DEBIAN`); the train
  split's scenes use the train file's items, the val split's the test file's, so no item is in
  both.
- :class:`VOCSegmentationFolder`: PASCAL VOC's layout (``JPEGImages/``, ``SegmentationClass/``
  palette PNGs whose indices are the classes, 255 ignored, ``ImageSets/Segmentation/*.txt``).
- :func:`write_voc` and :func:`write_image_folder` save a dataset in those layouts, so that the
  trainers (which read an ImageFolder) and any VOC tool see the same images.

Every dataset gives ``(image, mask)``: a ``(3, H, W)`` uint8 tensor and an ``(H, W)`` int64 tensor.
:func:`image_label` turns a mask into one class per image (its largest object's), for k-NN.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IGNORE = 255  # VOC's label for pixels that count in no class


class _Scenes(Dataset[tuple[Tensor, Tensor]]):
    """What the generated segmentation data sets share: a length, classes, ``sample(index)``."""

    CLASSES: tuple[str, ...]
    length: int
    transform: Callable[[Tensor], Any] | None

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
        raise NotImplementedError


class ShapesSegmentation(_Scenes):
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


# Fashion-MNIST scenes ----------------------------------------------------------------------------

FASHION_MNIST_DEBIAN = Path(
    "/usr/share/datasets/fashion-mnist"
)  # apt-get install dataset-fashion-mnist
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPES = {0x08: np.uint8}  # the idx format's type codes that Fashion-MNIST uses


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped or not) as a numpy array.

    The header is two zero bytes, a type code (``0x08``: unsigned bytes), the number of
    dimensions, then each dimension as a big-endian 32-bit integer; the data follow.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path}: not an idx file of unsigned bytes (expected the header 00 00 08 <dims>, "
            f"got {raw[:4].hex(' ') or 'nothing'})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape)
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: the header announces {' x '.join(map(str, shape))} = {count} values, the "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=header).reshape(shape)


def is_idx_folder(root: str | Path) -> bool:
    """Whether ``root`` holds Fashion-MNIST's four idx files (each ``.gz`` or not)."""
    return all(
        _idx_path(Path(root), name) is not None for pair in IDX_FILES.values() for name in pair
    )


def _idx_path(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_fashion_mnist(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Items ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of a split of Fashion-MNIST.

    ``split`` is ``"train"`` (the train files) or ``"val"`` (the test files); ``root`` is a
    folder of the idx files.
    """
    root = Path(root)
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {sorted(IDX_FILES)}, got {split!r}")
    paths = [_idx_path(root, name) for name in IDX_FILES[split]]
    if any(p is None for p in paths):
        names = ", ".join(f"{n}[.gz]" for pair in IDX_FILES.values() for n in pair)
        raise FileNotFoundError(
            f"{root} does not hold Fashion-MNIST's idx files ({names}); Debian's package "
            f"dataset-fashion-mnist puts them in {FASHION_MNIST_DEBIAN}"
        )
    images, labels = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{root}: {split} images {images.shape} and labels {labels.shape} do not match: "
            "expected (N, H, W) and (N,)"
        )
    if labels.size and int(labels.max()) >= len(FashionScenes.CLASSES) - 1:
        raise ValueError(f"{paths[1]}: labels must be 0-9, got up to {int(labels.max())}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionScenes(_Scenes):
    """Scenes of 1 to 3 Fashion-MNIST items on a plain dark background, with exact masks.

    Each scene is a function of ``(seed, index)``: a background colour (each channel in
    ``[0, 0.25]``), then for each item a random one of the split's items, scaled 1 to 2 times
    (28 to 56 px, bilinear), tinted by a colour (each channel in ``[0.35, 1]``) and placed
    wholly inside; later items occlude earlier ones. The item's pixels whose gray level is
    above ``THRESHOLD`` are its mask and are drawn; the others show what lies beneath. Class
    ``k + 1`` is Fashion-MNIST's label ``k``; 0 is the background.

    Args:
        root: a folder holding the four idx files.
        split: ``"train"`` (the train file's 60,000 items) or ``"val"`` (the test file's).
        length: number of scenes.
        size: side in pixels (at least 56).
        seed: changes every scene (use different seeds for the train and val splits).
        transform: applied to each uint8 image (the mask is not transformed).
    """

    CLASSES = ("background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
               "shirt", "sneaker", "bag", "ankle boot")  # fmt: skip
    THRESHOLD = 0.1  # gray level (of 1) above which an item's pixel is the item's

    def __init__(
        self,
        root: str | Path,
        split: str,
        length: int,
        size: int = 96,
        seed: int = 0,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if length < 1 or size < 56:
            raise ValueError(f"need length >= 1 and size >= 56, got length={length}, size={size}")
        self.items, self.labels = read_fashion_mnist(root, split)
        if len(self.items) == 0:
            raise ValueError(f"{root}: the {split} split holds no items")
        self.length, self.size, self.seed, self.transform = length, size, seed, transform

    def sample(self, index: int) -> tuple[Tensor, Tensor]:
        """Scene ``index``: ``(3, S, S)`` uint8 and its mask ``(S, S)`` int64."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 29)
        n = self.size
        image = (torch.rand(3, 1, 1, generator=gen) * 0.25).expand(3, n, n).clone()
        mask = torch.zeros(n, n, dtype=torch.int64)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            k = int(torch.randint(0, len(self.items), (), generator=gen))
            side = round(28 * _uniform(gen, 1.0, 2.0))
            item = self.items[k].float()[None, None] / 255
            item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[
                0, 0
            ]
            tint = 0.35 + 0.65 * torch.rand(3, 1, 1, generator=gen)
            top = int(torch.randint(0, n - side + 1, (), generator=gen))
            left = int(torch.randint(0, n - side + 1, (), generator=gen))
            inside = item > self.THRESHOLD
            region = (slice(None), slice(top, top + side), slice(left, left + side))
            image[region] = torch.where(inside, tint * item, image[region])
            mask[region[1:]] = torch.where(inside, int(self.labels[k]) + 1, mask[region[1:]])
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask


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
    root: str | Path,
    dataset: Dataset[tuple[Tensor, Tensor]],
    num_classes: int,
    indices: Sequence[int] | None = None,
) -> Path:
    """Save the images as an ``ImageFolder`` (``root/<label>/<index>.png``), for the trainers.

    The folder name is :func:`image_label` of the mask; PNG keeps the pixels exact.
    ``indices`` (all by default) lets several processes write one dataset, a share each.
    """
    root = Path(root)
    for index in range(len(dataset)) if indices is None else indices:  # type: ignore[arg-type]
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
