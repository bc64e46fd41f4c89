"""Images of any bit depth reach the crops at their levels, or are refused (issue 11, case 5).

``Image.convert("RGB")`` clips 16-bit and float images to 0..255, so a 16-bit PNG trained as a
white image. The expected 8-bit levels below are worked out by hand: ``v * 255 / 65535`` rounded
for 16-bit levels (65535 -> 255, 32896 -> 128, 40000 -> 155.6 -> 156), ``x * 255`` rounded for
floats in [0, 1].
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sere_loss.transforms import CropSpec, MultiCropTransform, _as_image

LEVELS16 = [[0, 257, 32896], [40000, 65279, 65535]]
LEVELS8 = torch.tensor([[0, 1, 128], [156, 254, 255]], dtype=torch.uint8)


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_subclass(torch.Tensor)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(np.array(LEVELS16, dtype=np.uint16)),  # mode I;16
        lambda: Image.fromarray(np.array(LEVELS16, dtype=np.int32)),  # mode I
        lambda: Image.frombytes("I;16B", (3, 2), np.array(LEVELS16, dtype=">u2").tobytes()),
        lambda: torch.tensor([LEVELS16], dtype=torch.uint16),
        lambda: torch.tensor([LEVELS16], dtype=torch.int32),
        lambda: torch.tensor([LEVELS16] * 3, dtype=torch.int64),
    ],
    ids=["pil-I;16", "pil-I", "pil-I;16B", "uint16", "int32", "int64-rgb"],
)
def test_16_bit_levels_are_scaled_to_8_bits(make: object) -> None:
    image = _as_image(make())  # type: ignore[operator]
    assert image.dtype == torch.uint8
    assert torch.equal(_plain(image), LEVELS8.expand(3, 2, 3))


def test_a_16_bit_png_file_keeps_its_levels() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.array(LEVELS16, dtype=np.uint16)).save(buffer, format="PNG")
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    assert reopened.mode.startswith("I")  # a 16-bit PNG, as Pillow opens it
    assert torch.equal(_plain(_as_image(reopened)), LEVELS8.expand(3, 2, 3))
    assert reopened.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # what used to happen


def test_float_images_in_0_1_are_scaled() -> None:
    values = np.array([[0.0, 0.1, 0.5], [0.61, 0.999, 1.0]], dtype=np.float32)
    expected = torch.tensor([[0, 26, 128], [156, 255, 255]], dtype=torch.uint8)  # x * 255
    assert torch.equal(_plain(_as_image(Image.fromarray(values))), expected.expand(3, 2, 3))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), r"values in \[0, 70000\]"),
        (Image.fromarray(np.array([[-1, 5]], dtype=np.int32)), r"values in \[-1, 5\]"),
        (Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)), r"expected \[0, 1\]"),
        (Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)), "non-finite"),
        (torch.tensor([[[0, 65536]]], dtype=torch.int32), r"int32 tensor .*16-bit levels"),
    ],
    ids=["I-too-large", "I-negative", "F-not-0-1", "F-nan", "int32-too-large"],
)
def test_levels_out_of_range_are_refused(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _as_image(image)


def test_bool_tensors_are_refused() -> None:
    with pytest.raises(TypeError, match="bool tensor"):
        _as_image(torch.ones(1, 2, 2, dtype=torch.bool))


def test_8_bit_and_float_input_are_unchanged() -> None:
    pixels = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(_plain(_as_image(pixels)), pixels)
    floats = torch.rand(3, 4, 5)
    assert torch.equal(_plain(_as_image(floats)), floats)
    gray = Image.fromarray(pixels[0].numpy())  # mode L
    assert torch.equal(_plain(_as_image(gray)), pixels[0].expand(3, 4, 5))


def test_a_16_bit_image_is_cropped_at_its_levels() -> None:
    image = Image.fromarray(np.full((20, 30), 12850, dtype=np.uint16))  # 12850 / 257 = 50
    crop = MultiCropTransform([CropSpec(8, (0.5, 1.0), flip_p=0.0)])
    view = crop(image).views[0]
    assert torch.equal(view, torch.full((3, 8, 8), 50, dtype=torch.uint8))
