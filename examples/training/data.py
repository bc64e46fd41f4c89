"""Data: generated images or an ImageFolder, sampled so that a resumed run sees the same batches.

- :class:`SyntheticImages`: images generated from their index.
- :func:`build_dataset`: ``"synthetic"`` or an ImageFolder whose images keep their bit depth.
- :func:`check_images`: the start-up check that images open and transform.
- :class:`ResumableSampler` and :class:`SeededTransform`: the data order and every random crop
  are functions of ``(seed, epoch, index)``, sharded over processes, so a resumed run sees
  exactly the batches an uninterrupted run would have seen, whatever the number of workers.
- :class:`ImageReadError`: an image that cannot be used, named by its file; with
  ``--replace-bad-images`` it is replaced by the next image that can be used instead.
- :func:`collate_images`: batches of decoded images of one or several sizes (``--device-crops``).
- :func:`prepare`: data set, check and loader as a trainer calls them, from its options.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from training.distributed import Process


class SyntheticImages(Dataset[tuple[Any, int]]):
    """Deterministic synthetic photos: a colour gradient and a few ellipses and rectangles.

    Image ``i`` is a function of ``(seed, i)`` only. Objects give crops something to agree on:
    the spatial term has structure to learn, unlike on noise.

    Args:
        length: number of images.
        size: side in pixels.
        seed: changes every image.
        transform: applied to each ``(3, size, size)`` uint8 image, as torchvision datasets do.
    """

    def __init__(
        self,
        length: int,
        size: int = 256,
        seed: int = 0,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"need length >= 1 and size >= 8, got length={length}, size={size}")
        self.length, self.size, self.seed, self.transform = length, size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.size
        ys, xs = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
        c0, c1 = torch.rand(2, 3, 1, 1, generator=gen)
        angle = torch.rand((), generator=gen) * 2 * math.pi
        ramp = (xs * torch.cos(angle) + ys * torch.sin(angle)).clamp(0, 1)
        img = c0 + (c1 - c0) * ramp
        shapes = int(torch.randint(3, 7, (), generator=gen))
        for k in range(shapes):
            cx, cy, rx, ry = torch.rand(4, generator=gen) * torch.tensor([1, 1, 0.25, 0.25]) + (
                torch.tensor([0, 0, 0.05, 0.05])
            )
            colour = torch.rand(3, 1, 1, generator=gen)
            if k % 2:
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            else:
                inside = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
            img = torch.where(inside, colour, img)
        image = (img * 255).round().to(torch.uint8)
        return (image if self.transform is None else self.transform(image)), shapes


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled indices per epoch, sharded over ranks, able to start mid-epoch.

    Yields ``(epoch, index)`` pairs, so that :class:`SeededTransform` can seed each sample's
    augmentation. The order is a function of ``(seed, epoch)``; every rank gets
    ``len(dataset) // world_size`` samples (the tail is dropped, as ``drop_last``).

    Args:
        length: dataset size.
        seed: seed of the order.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, skipping its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length // self.world_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.length, generator=gen)
        mine = order[: self.length // self.world_size * self.world_size][
            self.rank :: self.world_size
        ]
        for index in mine[self.start :].tolist():
            yield self.epoch, index


class ImageReadError(RuntimeError):
    """An image that cannot be read or transformed; the message names its file."""


def describe_item(dataset: Dataset[Any], index: int) -> str:
    """Where item ``index`` comes from: its file for an ImageFolder, else its index."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and 0 <= index < len(samples):
        return f"image {samples[index][0]}"
    return f"item {index} of {type(dataset).__name__}"


# How many of the following images --replace-bad-images tries in place of one that fails.
REPLACEMENT_TRIES = 100


class SeededTransform(Dataset[tuple[Any, int]]):
    """Apply ``transform`` to ``dataset[index]`` under a seed made of ``(seed, epoch, index)``.

    The global torch RNG is forked, so the caller's random state is untouched. An image that
    fails to load or transform raises :class:`ImageReadError` with its file's name; with
    ``replace_bad``, the next image of the dataset that can be used takes its place (under the
    same seed, so the data order, the batch and an exact resume are unchanged), with a warning
    on stderr.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        transform: Callable[[Any], Any],
        seed: int,
        replace_bad: bool = False,
    ) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.replace_bad = replace_bad

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _item(self, epoch: int, index: int, source: int) -> tuple[Any, int]:
        """Image ``source`` transformed under the seed of ``(epoch, index)``."""
        image, target = self.dataset[source]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(image), target

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        try:
            return self._item(epoch, index, index)
        except Exception as error:
            where, problem = describe_item(self.dataset, index), f"{type(error).__name__}: {error}"
            if not self.replace_bad:
                raise ImageReadError(f"cannot use {where}: {problem}") from error
        length = len(self)
        for offset in range(1, min(length, REPLACEMENT_TRIES + 1)):
            source = (index + offset) % length
            try:
                item = self._item(epoch, index, source)
            except Exception:
                continue
            print(
                f"warning: cannot use {where}: {problem}; replaced by "
                f"{describe_item(self.dataset, source)} "
                "(--replace-bad-images)",
                file=sys.stderr,
                flush=True,
            )
            return item
        raise ImageReadError(
            f"cannot use {where}: {problem}; --replace-bad-images found no usable image among "
            f"the next {REPLACEMENT_TRIES} to replace it"
        )


def ignore_stop_signals(_worker: int = 0) -> None:
    """A DataLoader worker's start: SIGINT and SIGTERM are the main process's to handle.

    A Ctrl-C reaches every process of the terminal's group, and SLURM signals every process of
    a job it preempts: a worker that died of it would fail the step that the main process is
    finishing before it writes its checkpoint (``training.preemption``). (Forked, a worker
    would otherwise run the main process's handlers, which record the signal and go on.) The
    main process ends its workers itself (:func:`_kill_leftover_workers` for those still there
    at its exit).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit: SIGKILL the loader workers still alive (an iterator an exception kept alive).

    multiprocessing's own exit handler sends its daemonic children SIGTERM and waits for them,
    which would wait forever on workers that ignore it. Registered after that handler, this one
    runs first.
    """
    for child in multiprocessing.active_children():
        if child.daemon and child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)


atexit.register(_kill_leftover_workers)


def load_image(path: str) -> Any:
    """Open and decode an image file, keeping its mode (16-bit, float...) for the transform.

    torchvision's default loader converts to 8-bit RGB, which clips 16-bit and float images;
    :mod:`sere_loss.transforms` scales them instead. Decoding here, not lazily, makes a truncated
    file fail in this call.
    """
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image


def build_dataset(data: str, synthetic_length: int, synthetic_size: int) -> Dataset[Any]:
    """``"synthetic"`` or the path of an ``ImageFolder`` (``root/class/image.jpg``)."""
    if data == "synthetic":
        return SyntheticImages(synthetic_length, synthetic_size)
    from torchvision.datasets import ImageFolder

    if not Path(data).is_dir():
        raise SystemExit(f"--data must be 'synthetic' or an ImageFolder directory, got {data!r}")
    try:
        return ImageFolder(data, loader=load_image)
    except (FileNotFoundError, OSError) as error:
        raise SystemExit(f"--data {data}: not an ImageFolder ({error})") from error


class _Probe(Dataset[str]):
    """Item ``i``: ``""`` if image ``indices[i]`` loads and transforms, else what went wrong."""

    def __init__(self, items: SeededTransform, indices: Sequence[int]) -> None:
        self.items, self.indices = items, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        try:
            self.items[0, self.indices[i]]
        except ImageReadError as error:
            return str(error)
        return ""


def check_images(
    dataset: Dataset[Any],
    transform: Callable[[Any], Any],
    process: Process,
    count: int,
    workers: int = 0,
    *,
    replace_bad: bool = False,
) -> None:
    """Start-up check: ``count`` images, spread over the dataset, load and transform.

    ``count = -1`` checks every image (each process its share, with ``workers`` loader
    workers); ``0`` checks none. Every failure is listed with its file before the run stops,
    so a bad file is found before the first step rather than in the middle of an epoch; with
    ``replace_bad`` (``--replace-bad-images``) they are listed in a warning and the run goes
    on. The global random state is left as it was, so the check does not change the initial
    weights.
    """
    length = len(dataset)  # type: ignore[arg-type]
    if count == 0 or length == 0:
        return
    if count < 0 or count >= length:
        indices = list(range(process.rank, length, process.world_size))
    else:
        picked = torch.linspace(0, length - 1, count).round().long().unique()
        indices = picked.tolist()
    probe = _Probe(SeededTransform(dataset, transform, seed=0), indices)
    loader = DataLoader(
        probe, batch_size=None, num_workers=workers if count < 0 else 0,
        worker_init_fn=ignore_stop_signals,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep the run's weights
        failures = [message for message in loader if message]
    if not failures:
        return
    listed = "\n  ".join(failures[:10])
    more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
    if replace_bad:
        if 0 < count < length and not process.is_main:
            return  # every process checked the same images: one warning is enough
        print(
            f"warning: {len(failures)} of the {len(indices)} images checked at start-up cannot "
            f"be used, and --replace-bad-images will replace each by the next image that can:"
            f"\n  {listed}{more}",
            file=sys.stderr,
            flush=True,
        )
        return
    raise SystemExit(
        f"{len(failures)} of the {len(indices)} images checked at start-up cannot be used:\n"
        f"  {listed}{more}\nReplace each with a good image of the same name, or pass "
        "--replace-bad-images to use the next image in its place (--check-images all checks "
        "every image)"
    )


def build_loader(
    dataset: Dataset[Any],
    transform: Callable[[Any], Any],
    process: Process,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    replace_bad: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[DataLoader[Any], ResumableSampler]:
    """This process's loader of augmented batches; content depends on ``seed`` and epoch only.

    ``replace_bad``: an image that cannot be used is replaced by the next one that can
    (:class:`SeededTransform`), rather than stopping the run.
    """
    length = len(dataset)  # type: ignore[arg-type]
    if length // process.world_size < batch_size:
        raise SystemExit(
            f"the dataset has {length} images: too few for a batch of {batch_size} per process "
            f"on {process.world_size} process(es)"
        )
    sampler = ResumableSampler(length, seed, process.rank, process.world_size)
    loader = DataLoader(
        SeededTransform(dataset, transform, seed, replace_bad),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=process.device.type == "cuda",
        drop_last=True,
        collate_fn=collate_fn,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
        # A generator of its own: creating the iterator must not draw from the global RNG,
        # which the model's stochastic depth uses (resume would drift otherwise).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def prepare(
    args: Any,
    preset: Any,
    transform: Callable[[Any], Any],
    process: Process,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[Dataset[Any], DataLoader[Any], ResumableSampler]:
    """A trainer's data: the data set, its images checked, and this process's loader.

    :func:`build_dataset` from ``--data`` (or the preset's synthetic images),
    :func:`check_images` as ``--check-images`` and ``--replace-bad-images`` say, then
    :func:`build_loader` at the preset's batch size and workers with the run's seed.
    """
    dataset = build_dataset(args.data, preset.synthetic_length, preset.synthetic_size)
    check_images(
        dataset, transform, process, args.check_images, preset.workers,
        replace_bad=args.replace_bad_images,
    )  # fmt: skip
    loader, sampler = build_loader(
        dataset, transform, process, batch_size=preset.batch_size, workers=preset.workers,
        seed=args.seed, replace_bad=args.replace_bad_images, collate_fn=collate_fn,
    )  # fmt: skip
    return dataset, loader, sampler


def collate_images(batch: Sequence[tuple[Tensor, Any]]) -> tuple[Tensor | list[Tensor], Tensor]:
    """Batch ``(image, target)`` pairs of decoded images (``--device-crops``).

    Images are stacked ``(B, C, H, W)`` when they share a size, else kept as a list
    (``BatchMultiCrop`` takes either); targets become a tensor.
    """
    images = [image for image, _ in batch]
    targets = torch.as_tensor([target for _, target in batch])
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images), targets
    return images, targets
