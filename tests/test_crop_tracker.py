"""CropTracker: geometry recorded from multi-crop pipelines we did not write.

Four kinds of pipeline, as users have them: torchvision v2 ``Compose`` per view with colour
transforms and a custom callable; the classic torchvision (v1) pipeline of the official DINO
repository (written here from its published recipe: per-view ``RandomResizedCrop`` with bicubic
resizing, one flip-and-colour ``Compose`` shared by every view, PIL blur and solarisation
classes drawing from Python's ``random``, ``ToTensor`` and ``Normalize``); DINOv2's, which
returns a dict (written here from its published structure: a crop-and-flip ``Compose`` per
kind of view, then colour ``Compose``s with a blur that subclasses ``RandomApply``, the views
under ``global_crops``, ``global_crops_teacher`` (the same tensors), ``local_crops`` and an
empty ``offsets``); and lightly's ``DINOTransform``. For each: the same seeds give the same
views and leave every random generator in the same state with and without tracking, and the
recorded boxes and flips are checked pixel by pixel on images whose pixels encode their own
coordinates (the helpers and tolerances of ``test_transforms.py``).
"""

from __future__ import annotations

import functools
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms as v1
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import default_collate
from torchvision.transforms import v2

from sere_loss.transforms import Crops, CropTracker, collate_crops
from test_transforms import (
    H0,
    W0,
    _coordinate_image,
    _crop_pixels,
    _margin,
    _pil_coordinate_image,
    _predict,
    _ratio_to_tolerance,
)

BICUBIC = v2.InterpolationMode.BICUBIC


@pytest.fixture
def seeded() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        state, np_state = random.getstate(), np.random.get_state()
        _seed(0)
        yield
        random.setstate(state)
        np.random.set_state(np_state)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _states() -> tuple[Any, ...]:
    return torch.random.get_rng_state(), random.getstate(), repr(np.random.get_state())


# Pipelines, as a user would have them.


class _TorchNoise:
    """A user's own callable drawing from torch's generator (it does not move pixels)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image + 0.01 * torch.randn(image.shape)


def _v2_view(size: int | tuple[int, int], scale: tuple[float, float], photometric: bool) -> Any:
    colour = [
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        _TorchNoise(),
        v2.Normalize([0.5] * 3, [0.25] * 3),
    ]
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *(colour if photometric else [v2.ToDtype(torch.float32)]),
        ]
    )


def _v2_pipeline(photometric: bool = True) -> list[Any]:
    globals_ = [_v2_view(64, (0.35, 1.0), photometric) for _ in range(2)]
    return globals_ + [_v2_view((24, 40), (0.05, 0.35), photometric)] * 3


class _Blur:
    """PIL Gaussian blur with a radius drawn from Python's ``random``, applied with ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return image.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))
        return image


class _Solarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


class DinoStyleAugmentation:
    """The official DINO recipe's structure, in torchvision v1 (see the module docstring).

    With ``photometric=False`` every colour step keeps its place but never fires (p = 0) and
    normalisation is the identity, so the pixels keep their coordinates.
    """

    def __init__(self, local_views: int = 3, photometric: bool = True) -> None:
        on = 1.0 if photometric else 0.0
        shared = v1.Compose(
            [
                v1.RandomHorizontalFlip(p=0.5),
                v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8 * on),
                v1.RandomGrayscale(p=0.2 * on),
            ]
        )
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if photometric else (0, 1)
        finish = v1.Compose([v1.ToTensor(), v1.Normalize(mean, std)])

        def view(px: int, scale: tuple[float, float], *extra: Callable) -> v1.Compose:
            crop = v1.RandomResizedCrop(px, scale=scale, interpolation=Image.BICUBIC)
            return v1.Compose([crop, shared, *extra, finish])

        self.first = view(64, (0.4, 1.0), _Blur(1.0 * on))
        self.second = view(64, (0.4, 1.0), _Blur(0.1 * on), _Solarize(0.2 * on))
        self.local = view(32, (0.05, 0.4), _Blur(0.5 * on))
        self.local_views = local_views

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.first(image), self.second(image)] + [
            self.local(image) for _ in range(self.local_views)
        ]


class _BlurApply(v1.RandomApply):
    """A Gaussian blur applied with probability ``p``, as a ``RandomApply`` subclass.

    DINOv2's blur is built so: it hands ``RandomApply`` the probability of *keeping* the
    image, ``1 - p``, which ``RandomApply`` takes as the probability of blurring.
    """

    def __init__(self, p: float) -> None:
        super().__init__([v1.GaussianBlur(9, sigma=(0.1, 2.0))], p=1 - p)


class DinoV2StyleAugmentation:
    """DINOv2's multi-crop structure, in torchvision v1, returning a dict (see the docstring).

    With ``photometric=False`` no colour step fires and normalisation is the identity, so the
    pixels keep their coordinates.
    """

    def __init__(self, local_views: int = 3, photometric: bool = True) -> None:
        def geometric(px: int, scale: tuple[float, float]) -> v1.Compose:
            crop = v1.RandomResizedCrop(px, scale=scale, interpolation=BICUBIC)
            return v1.Compose([crop, v1.RandomHorizontalFlip(p=0.5)])

        self.geometric_global = geometric(64, (0.32, 1.0))
        self.geometric_local = geometric(32, (0.05, 0.32))
        on = 1.0 if photometric else 0.0
        colour = v1.Compose(
            [
                v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8 * on),
                v1.RandomGrayscale(p=0.2 * on),
            ]
        )
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if photometric else (0, 1)
        finish = v1.Compose([v1.ToTensor(), v1.Normalize(mean, std)])
        solarize = v1.RandomSolarize(threshold=128, p=0.2 * on)
        self.global1 = v1.Compose([colour, _BlurApply(1.0 * on), finish])
        self.global2 = v1.Compose([colour, v1.Compose([_BlurApply(0.1 * on), solarize]), finish])
        self.local = v1.Compose([colour, _BlurApply(0.5 * on), finish])
        self.local_views = local_views

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        first = self.global1(self.geometric_global(image))
        second = self.global2(self.geometric_global(image))
        locals_ = [self.local(self.geometric_local(image)) for _ in range(self.local_views)]
        return {
            "global_crops": [first, second],
            "global_crops_teacher": [first, second],
            "local_crops": locals_,
            "offsets": (),
        }


def _dinov2_views(sample: dict[str, Any]) -> Crops:
    """The views of a DINOv2-style sample in the order the tracker's boxes follow."""
    views = [*sample["global_crops"], *sample["local_crops"]]
    return Crops(views, sample["boxes"], sample["flips"])


def _dinov2_collate(samples: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """A trainer's own collate that builds its batch from the keys it knows, as DINOv2's does:
    the views of one kind stacked view-major (all samples' first view, then their second)."""
    out = {}
    for kind in ("global_crops", "local_crops"):
        count = len(samples[0][0][kind])
        out[f"collated_{kind}"] = torch.stack(
            [sample[kind][i] for i in range(count) for sample, _ in samples]
        )
    return out


def _lightly(photometric: bool = True) -> Any:
    lightly_transforms = pytest.importorskip("lightly.transforms")
    if photometric:
        return lightly_transforms.DINOTransform(
            global_crop_size=64, local_crop_size=32, n_local_views=3
        )
    return lightly_transforms.DINOTransform(
        global_crop_size=64,
        local_crop_size=32,
        n_local_views=3,
        cj_prob=0.0,
        random_gray_scale=0.0,
        gaussian_blur=(0.0, 0.0, 0.0),
        solarization_prob=0.0,
        normalize=None,
    )


def _uint8_image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 90, 120), generator=gen, dtype=torch.uint8)


def _pil_image() -> Image.Image:
    return Image.fromarray(_uint8_image().permute(1, 2, 0).numpy())


PIPELINES: dict[str, tuple[Callable[..., Any], Callable[[], Any]]] = {
    "v2": (_v2_pipeline, _uint8_image),
    "dino_v1": (DinoStyleAugmentation, _pil_image),
    "lightly": (_lightly, _pil_image),
}


@pytest.mark.usefixtures("seeded")
class TestSameDraws:
    @pytest.mark.parametrize("name", list(PIPELINES))
    def test_tracking_changes_no_view_and_no_random_state(self, name: str) -> None:
        build, image = PIPELINES[name]
        transform, source = build(), image()
        tracker = CropTracker(transform)
        for seed in range(4):
            _seed(seed)
            expected = transform(source) if name != "v2" else [t(source) for t in transform]
            after = _states()
            _seed(seed)
            crops = tracker(source)
            assert isinstance(crops, Crops)
            assert len(crops.views) == len(expected)
            for got, want in zip(crops.views, expected, strict=True):
                assert type(got) is torch.Tensor
                assert torch.equal(got, want)
            assert crops.boxes.shape == (len(expected), 4)
            assert crops.flips.shape == (len(expected),)
            assert crops.boxes.dtype == torch.float32
            assert crops.flips.dtype == torch.bool
            now = _states()
            assert torch.equal(now[0], after[0])
            assert now[1:] == after[1:]

    def test_the_users_transform_is_left_as_it_was(self) -> None:
        transform = DinoStyleAugmentation()
        before = repr(transform.first) + repr(transform.local)
        CropTracker(transform)
        assert repr(transform.first) + repr(transform.local) == before
        assert type(transform.first.transforms[0]) is v1.RandomResizedCrop

    def test_pickles_for_data_loader_workers(self) -> None:
        tracker = CropTracker(_v2_pipeline())
        copy = pickle.loads(pickle.dumps(tracker))
        _seed(3)
        a = tracker(_uint8_image())
        _seed(3)
        b = copy(_uint8_image())
        assert torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.flips, b.flips)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))

    def test_default_collate_batches_the_crops(self) -> None:
        tracker = CropTracker(DinoStyleAugmentation(local_views=2))
        items = [(tracker(_pil_image()), k) for k in range(3)]
        crops, targets = default_collate(items)
        assert isinstance(crops, Crops)
        assert [tuple(v.shape) for v in crops.views] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 2
        assert crops.boxes.shape == (3, 4, 4)
        assert crops.flips.shape == (3, 4)
        assert torch.equal(crops.boxes[1], items[1][0].boxes)
        assert targets.tolist() == [0, 1, 2]


def _check_float_views(crops: Crops) -> set[bool]:
    flips = set()
    for v, view in enumerate(crops.views):
        box, flip = crops.boxes[v], bool(crops.flips[v])
        flips.add(flip)
        rx, ry = _ratio_to_tolerance(view, box, flip)
        assert rx <= 1, f"view {v}: x off by {rx:.1f} x the tolerance (box {box}, {flip=})"
        assert ry <= 1, f"view {v}: y off by {ry:.1f} x the tolerance (box {box}, {flip=})"
    return flips


def _pil_error_px(view: torch.Tensor, box: torch.Tensor, flip: bool) -> tuple[float, float]:
    # Views of _pil_coordinate_image (8-bit: red is x, green y) on the [0, 1] scale. Worst
    # error in original pixels over the interior, as test_transforms.TestPILInput measures it.
    height, width = 200, 300
    ny, nx = view.shape[-2:]
    cw, ch = _crop_pixels(box, width, height)
    mx, my = _margin(cw, nx), _margin(ch, ny)
    xs, ys = _predict(box, flip, (ny, nx))
    cols, rows = slice(mx, nx - mx), slice(my, ny - my)
    err_x = (view[0, rows, cols].double() - xs[None, cols]).abs().max() * width
    err_y = (view[1, rows, cols].double() - ys[rows, None]).abs().max() * height
    return float(err_x), float(err_y)


def _check_pil_views(crops: Crops) -> set[bool]:
    flips = set()
    for v, view in enumerate(crops.views):
        box, flip = crops.boxes[v], bool(crops.flips[v])
        flips.add(flip)
        ex, ey = _pil_error_px(view, box, flip)
        assert ex <= 1.5, f"view {v}: x off by {ex:.2f} px (box {box}, {flip=})"
        assert ey <= 1.5, f"view {v}: y off by {ey:.2f} px (box {box}, {flip=})"
    return flips


@pytest.mark.usefixtures("seeded")
class TestDictTransform:
    """DINOv2's augmentation: a dict of views, kept as it is, with the geometry beside it."""

    def test_the_same_dict_and_random_state_with_boxes_and_flips_added(self) -> None:
        transform = DinoV2StyleAugmentation()
        tracker = CropTracker(transform)
        for seed in range(4):
            _seed(seed)
            expected = transform(_pil_image())
            after = _states()
            _seed(seed)
            got = tracker(_pil_image())
            assert list(got) == [*expected, "boxes", "flips"]  # the keys, in their order
            for key in ("global_crops", "global_crops_teacher", "local_crops"):
                assert len(got[key]) == len(expected[key])
                for view, want in zip(got[key], expected[key], strict=True):
                    assert type(view) is torch.Tensor
                    assert torch.equal(view, want)
            assert got["offsets"] == ()
            assert got["global_crops_teacher"][1] is got["global_crops"][1]  # still one object
            assert got["boxes"].shape == (2 + 3, 4)
            assert got["boxes"].dtype == torch.float32
            assert got["flips"].shape == (2 + 3,)
            assert got["flips"].dtype == torch.bool
            now = _states()
            assert torch.equal(now[0], after[0])
            assert now[1:] == after[1:]

    def test_coordinate_image(self) -> None:
        tracker = CropTracker(DinoV2StyleAugmentation(photometric=False))
        assert tracker.tracked == ["transform.geometric_global", "transform.geometric_local"]
        flips: set[bool] = set()
        for _ in range(6):
            sample = tracker(_pil_coordinate_image())
            flips |= _check_pil_views(_dinov2_views(sample))
        assert flips == {False, True}

    def test_the_check_can_fail(self) -> None:
        # The global views' boxes swapped, or the locals': caught pixel by pixel.
        tracker = CropTracker(DinoV2StyleAugmentation(photometric=False))
        crops = _dinov2_views(tracker(_pil_coordinate_image()))
        for a, b in ((0, 1), (2, 3)):
            order = list(range(5))
            order[a], order[b] = b, a
            with pytest.raises(AssertionError, match="off by"):
                _check_pil_views(Crops(crops.views, crops.boxes[order], crops.flips[order]))

    def test_collate_crops_adds_the_geometry_to_the_trainers_own_batch(self) -> None:
        tracker = CropTracker(DinoV2StyleAugmentation(local_views=2))
        samples = [(tracker(_pil_image()), ()) for _ in range(3)]
        collate = functools.partial(collate_crops, collate_fn=_dinov2_collate)
        batch = pickle.loads(pickle.dumps(collate))(samples)  # as a worker gets it
        assert list(batch) == ["collated_global_crops", "collated_local_crops", "boxes", "flips"]
        assert batch["collated_global_crops"].shape == (2 * 3, 3, 64, 64)
        assert batch["boxes"].shape == (3, 4, 4)
        assert batch["flips"].shape == (3, 4)
        for b, (sample, _) in enumerate(samples):
            assert torch.equal(batch["boxes"][b], sample["boxes"])
            assert torch.equal(batch["flips"][b], sample["flips"])
            # view v of sample b is row v * B + b of its kind's stack (view-major)
            assert torch.equal(batch["collated_global_crops"][3 + b], sample["global_crops"][1])
        # default_collate batches the dicts as they are, geometry included
        plain = default_collate([sample for sample, _ in samples])
        assert torch.equal(plain["boxes"], batch["boxes"])
        assert torch.equal(collate_crops([s for s, _ in samples])["flips"], batch["flips"])

    def test_nested_lists_are_kept(self) -> None:
        class Pair:  # (globals, locals): a nested structure, no dict
            def __init__(self) -> None:
                self.inner = DinoV2StyleAugmentation(local_views=2, photometric=False)

            def __call__(self, image: Image.Image) -> tuple[list[Any], list[Any]]:
                out = self.inner(image)
                return out["global_crops"], out["local_crops"]

        crops = CropTracker(Pair())(_pil_coordinate_image())
        assert isinstance(crops, Crops)
        assert [len(group) for group in crops.views] == [2, 2]
        views = [*crops.views[0], *crops.views[1]]
        _check_pil_views(Crops(views, crops.boxes, crops.flips))


@pytest.mark.usefixtures("seeded")
class TestCoordinateImage:
    def test_v2_pipeline(self) -> None:
        tracker = CropTracker(_v2_pipeline(photometric=False))
        flips: set[bool] = set()
        for _ in range(6):
            flips |= _check_float_views(tracker(_coordinate_image()))
        assert flips == {False, True}

    def test_v1_pipeline_on_tensors(self) -> None:
        def view(px: int, scale: tuple[float, float]) -> v1.Compose:
            crop = v1.RandomResizedCrop(px, scale=scale, interpolation=BICUBIC, antialias=True)
            return v1.Compose([crop, v1.RandomHorizontalFlip()])

        tracker = CropTracker([view(64, (0.4, 1)), view(64, (0.4, 1)), view(32, (0.05, 0.4))])
        flips: set[bool] = set()
        for _ in range(8):
            flips |= _check_float_views(tracker(_coordinate_image()))
        assert flips == {False, True}

    def test_dino_style_v1_pipeline(self) -> None:
        tracker = CropTracker(DinoStyleAugmentation(photometric=False))
        flips: set[bool] = set()
        for _ in range(6):
            flips |= _check_pil_views(tracker(_pil_coordinate_image()))
        assert flips == {False, True}

    def test_lightly_dino_transform(self) -> None:
        tracker = CropTracker(_lightly(photometric=False))
        flips: set[bool] = set()
        for _ in range(6):
            flips |= _check_pil_views(tracker(_pil_coordinate_image()))
        assert flips == {False, True}

    def test_the_pil_check_can_fail(self) -> None:
        # A box one pixel off, or the flip ignored, is caught by the 8-bit comparison.
        tracker = CropTracker(DinoStyleAugmentation(photometric=False))
        crops = tracker(_pil_coordinate_image())
        for v, view in enumerate(crops.views):
            box, flip = crops.boxes[v], bool(crops.flips[v])
            shifted = box + torch.tensor([1 / 300, 0, 1 / 300, 0])
            assert max(_pil_error_px(view, shifted, flip)) > 1.5
            if flip:
                assert max(_pil_error_px(view, box, False)) > 10

    def test_flip_before_the_crop_mirrors_the_box(self) -> None:
        # Flip first, then crop: the crop is cut from the mirrored image. Also two flips that
        # cancel, and a crop applied only half the time (the whole image when it is not).
        views = [
            v2.Compose([v2.RandomHorizontalFlip(), v2.RandomResizedCrop(48, (0.3, 1))]),
            v2.Compose(
                [v2.RandomHorizontalFlip(1.0), v2.RandomResizedCrop(32), v2.RandomHorizontalFlip()]
            ),
            v2.Compose(
                [v2.RandomApply([v2.RandomResizedCrop(40, (0.2, 0.5))], p=0.5), v2.Resize(40)]
            ),
        ]
        tracker = CropTracker(views)
        flips: set[bool] = set()
        whole = 0
        for _ in range(10):
            crops = tracker(_coordinate_image())
            flips |= _check_float_views(crops)
            whole += bool(torch.equal(crops.boxes[2], torch.tensor([0.0, 0.0, 1.0, 1.0])))
        assert flips == {False, True}
        assert 0 < whole < 10

    def test_a_multi_crop_inside_a_compose(self) -> None:
        # lightly's transform behind a conversion to PIL, as a dataset of tensors needs it: the
        # tracked DINOTransform returns a list, so its views are the calls inside it.
        transform = v2.Compose([v2.ToPILImage(), _lightly(photometric=False)])
        tracker = CropTracker(transform)
        assert tracker.tracked == ["transform.transforms[1]"]
        image = torch.from_numpy(np.asarray(_pil_coordinate_image()).copy()).permute(2, 0, 1)
        flips: set[bool] = set()
        for _ in range(4):
            crops = tracker(image)
            assert len(crops.views) == 5
            flips |= _check_pil_views(crops)
        assert flips == {False, True}

    def test_a_resize_before_the_crop(self) -> None:
        # The crop is cut in whole pixels of the 2x resized image (half pixels of the original),
        # so the check reads the interior only (4 px margin), to 0.1 original pixel: a box
        # normalised by the wrong canvas would be off by tens of pixels.
        tracker = CropTracker([v2.Compose([v2.Resize((480, 640)), v2.RandomResizedCrop(48)])])
        for _ in range(5):
            crops = tracker(_coordinate_image())
            view, box = crops.views[0], crops.boxes[0]
            xs, ys = _predict(box, False, 48)
            inner = slice(4, 44)
            err_x = (view[0, inner, inner].double() - xs[None, inner]).abs().max() * W0
            err_y = (view[1, inner, inner].double() - ys[inner, None]).abs().max() * H0
            assert max(float(err_x), float(err_y)) < 0.1, (box, float(err_x), float(err_y))


class _MyRotate:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Any) -> Any:
        return image


class TestRefused:
    @pytest.mark.parametrize(
        ("step", "named"),
        [
            (v2.RandomRotation(10), "RandomRotation"),
            (v1.RandomRotation(10), "RandomRotation"),
            (v2.RandomAffine(0, translate=(0.1, 0.1)), "RandomAffine"),
            (v1.RandomPerspective(), "RandomPerspective"),
            (v2.RandomVerticalFlip(), "RandomVerticalFlip"),
            (v2.CenterCrop(20), "CenterCrop"),
            (v1.RandomCrop(20), "RandomCrop"),
            (v2.Pad(4), "Pad"),
            (v2.RandAugment(), "RandAugment"),
            (v2.RandomApply([v2.RandomRotation(10)], p=0.5), "RandomRotation"),
            (_MyRotate(0.5), "_MyRotate"),
        ],
    )
    def test_geometry_it_cannot_describe(self, step: Any, named: str) -> None:
        pipeline = [v2.Compose([v2.RandomResizedCrop(32), step])]
        with pytest.raises(ValueError, match=rf"{named} at transform\[0\]\.transforms\[1\]"):
            CropTracker(pipeline)

    @pytest.mark.parametrize(
        "step",
        [
            v2.RandomVerticalFlip(p=0.0),
            v2.RandomApply([v2.RandomRotation(10)], p=0.0),
            _MyRotate(0.0),
            v2.Resize(20),
            v1.Resize((20, 30)),
        ],
    )
    def test_steps_that_never_move_pixels_are_allowed(self, step: Any) -> None:
        CropTracker([v2.Compose([v2.RandomResizedCrop(32), step])])

    def test_assume_photometric_lets_a_class_through(self) -> None:
        pipeline = [v2.Compose([v2.RandomResizedCrop(32), _MyRotate(0.5)])]
        CropTracker(pipeline, assume_photometric=[_MyRotate])
        with pytest.raises(TypeError, match="assume_photometric"):
            CropTracker(pipeline, assume_photometric=[_MyRotate(0.5)])  # type: ignore[list-item]

    def test_lightly_rotation_is_refused(self) -> None:
        transforms = pytest.importorskip("lightly.transforms")
        with pytest.raises(ValueError, match=r"RandomRotate at transform\.transforms"):
            CropTracker(transforms.DINOTransform(rr_prob=0.5))
        with pytest.raises(ValueError, match=r"RandomVerticalFlip at transform\.transforms"):
            CropTracker(transforms.DINOTransform(vf_prob=0.5))

    def test_no_crop_or_flip(self) -> None:
        with pytest.raises(TypeError, match="found no RandomResizedCrop"):
            CropTracker([v2.Compose([v2.ToDtype(torch.float32)])])

    def test_a_single_pipeline_is_not_a_multi_crop(self) -> None:
        tracker = CropTracker(v2.Compose([v2.RandomResizedCrop(32), v2.RandomHorizontalFlip()]))
        with pytest.raises(
            TypeError, match=r"returned one image \(Tensor\); to track a single pipeline as a "
            r"multi-crop of one view, pass \[pipeline\]"
        ):  # fmt: skip
            tracker(_uint8_image())

    def test_a_dict_transform_in_a_list_says_to_pass_it_as_it_is(self) -> None:
        tracker = CropTracker([DinoV2StyleAugmentation()])
        with pytest.raises(TypeError, match=r"pipeline 0 returned dict, not one image: pass a "
                           r"multi-crop transform itself, not in a list"):  # fmt: skip
            tracker(_pil_image())

    def test_a_transform_that_returns_something_else(self) -> None:
        class Boxed:
            def __init__(self) -> None:
                self.crop = v2.RandomResizedCrop(32)

            def __call__(self, image: Any) -> object:
                return {"views": [self.crop(image)]}.items()

        with pytest.raises(TypeError, match=r"list, tuple or dict \(nested ones too\), but the "
                           r"transform returned dict_items"):  # fmt: skip
            CropTracker(Boxed())(_uint8_image())

    def test_a_dict_that_has_the_keys_already(self) -> None:
        class Keyed(DinoV2StyleAugmentation):
            def __call__(self, image: Image.Image) -> dict[str, Any]:
                return {**super().__call__(image), "flips": None}

        with pytest.raises(ValueError, match=r"already has \['flips'\]: CropTracker adds"):
            CropTracker(Keyed())(_pil_image())

    def test_views_held_in_another_order_than_drawn(self) -> None:
        class LocalsFirst(DinoV2StyleAugmentation):
            def __call__(self, image: Image.Image) -> dict[str, Any]:
                out = super().__call__(image)
                return {"local_crops": out["local_crops"], "global_crops": out["global_crops"]}

        drawn = r"returns views of sizes \[\(32, 32\), .* but drew them in the order \[\(64, 64\), "
        with pytest.raises(ValueError, match=drawn + r".*hold the views in the order they are"):
            CropTracker(LocalsFirst())(_pil_image())

    def test_collate_crops_errors(self) -> None:
        tracker = CropTracker(DinoV2StyleAugmentation(local_views=1))
        samples = [(tracker(_pil_image()), ())]
        with pytest.raises(TypeError, match=r"collate_fn returned tuple: collate_crops adds"):
            collate_crops(samples, collate_fn=lambda batch: tuple(batch))
        with pytest.raises(TypeError, match=r"sample 0 of the batch holds no boxes and flips"):
            collate_crops([({"global_crops": []}, ())], collate_fn=_dinov2_collate)

    def test_views_that_no_pipeline_drew(self) -> None:
        crop = v2.RandomResizedCrop(32)

        class TwoViewsOneCrop:
            def __init__(self) -> None:
                self.crop = crop

            def __call__(self, image: Any) -> list[Any]:
                return [self.crop(image), v2.functional.resize(image, [32, 32])]

        with pytest.raises(ValueError, match=r"returned 2 views \(distinct images, in the order it "
                           r"holds them\) but 1 calls drew one image each"):  # fmt: skip
            CropTracker(TwoViewsOneCrop())(_uint8_image())


def test_boxes_are_in_the_original_image_of_any_shape() -> None:
    # A wide and a tall image: boxes stay inside [0, 1] and the views match them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tracker = CropTracker(_v2_pipeline(photometric=False))
        for h, w in ((H0, W0), (W0, H0)):
            crops = tracker(_coordinate_image(h, w))
            assert bool((crops.boxes >= 0).all() and (crops.boxes <= 1).all())
            for v, view in enumerate(crops.views):
                rx, ry = _ratio_to_tolerance(
                    view, crops.boxes[v], bool(crops.flips[v]), width=w, height=h
                )
                assert max(rx, ry) <= 1
