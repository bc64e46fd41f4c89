"""Images that cannot be used, and images of other bit depths (``training/data.py``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import steps
from conftest import EXAMPLES, log_rows, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


# Case 5: images that cannot be used --------------------------------------------------------------


def _folder_with(tmp: Path, source: Path, name: str, content: bytes) -> Path:
    """``source``'s images, one of them replaced by a file ``name`` holding ``content``."""
    root = tmp / "data"
    shutil.copytree(source, root)
    victim = sorted(root.rglob("*.png"))[0]
    victim.unlink()
    (victim.parent / name).write_bytes(content)
    return victim.parent / name


def _truncated_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(3))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def test_a_truncated_jpeg_is_named_at_start_up(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    broken = _folder_with(tmp_path, image_folder, "broken.jpg", _truncated_jpeg())
    with pytest.raises(SystemExit, match=rf"cannot use image {re.escape(str(broken))}: OSError: "):
        train_tiny(
            examples.dino_sere, broken.parent.parent, tmp_path / "run", "--max-steps", "1",
            "--check-images", "16",
        )  # fmt: skip
    assert not (tmp_path / "run" / "log.csv").exists()  # stopped before the first step


def test_a_bad_image_can_be_replaced_from_start_up(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _folder_with(tmp_path, image_folder, "broken.jpg", _truncated_jpeg())
    data, run = broken.parent.parent, tmp_path / "run"
    with pytest.raises(SystemExit, match=r"or pass --replace-bad-images to use the next image"):
        train_tiny(examples.dino_sere, data, run, "--max-steps", "1", "--check-images", "all")
    capsys.readouterr()
    last = train_tiny(
        examples.dino_sere, data, run, "--max-steps", "1", "--check-images", "all",
        "--replace-bad-images",
    )  # fmt: skip
    assert last["step"] == 1
    err = capsys.readouterr().err
    assert "warning: 1 of the 8 images checked at start-up cannot be used, and " in err
    assert f"cannot use image {broken}: OSError: " in err


def test_a_truncated_jpeg_met_mid_epoch_is_named(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    broken = _folder_with(tmp_path, image_folder, "broken.jpg", _truncated_jpeg())
    with pytest.raises(
        SystemExit,
        match=rf"step \d: cannot use image {re.escape(str(broken))}: OSError: .*\n.*--resume",
    ):
        train_tiny(
            examples.dino_sere, broken.parent.parent, tmp_path / "run", "--check-images", "0",
            "--workers", "1", "--max-steps", "2",
        )  # fmt: skip


def test_16_bit_and_float_images_keep_their_levels(examples: Any, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from sere_loss.transforms import _as_image

    levels = np.array([[0, 257, 32896], [40000, 65279, 65535]], dtype=np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(levels).save(tmp_path / "a" / "deep.png")  # a 16-bit grayscale PNG
    Image.fromarray(levels.astype(np.float32) / 65535).save(tmp_path / "a" / "float.tiff")
    dataset = examples.data.build_dataset(str(tmp_path), 1, 8)
    # By hand: v * 255 / 65535 rounded, so 65535 -> 255, 32896 -> 128, 40000 -> 156 (155.6).
    expected = torch.tensor([[0, 1, 128], [156, 254, 255]], dtype=torch.uint8)
    for index in range(len(dataset)):
        image = _as_image(dataset[index][0])
        assert image.dtype == torch.uint8
        assert torch.equal(image.as_subclass(torch.Tensor), expected.expand(3, 2, 3))
    # --device-crops' loader transform reads them the same way.
    from sere_loss.batch_transforms import as_uint8

    for index in range(len(dataset)):
        assert torch.equal(as_uint8(dataset[index][0]), expected.expand(3, 2, 3))
    floats = torch.tensor([[0.0, 0.5, 1.0]]).expand(3, 1, 3)  # float tensors: [0, 1] levels
    assert as_uint8(floats).tolist() == [[[0, 128, 255]]] * 3


def test_decoded_images_are_batched_by_size(examples: Any) -> None:
    """--device-crops' collate: one tensor when the images share a size, else a list."""
    same = [(torch.full((3, 4, 5), k, dtype=torch.uint8), k) for k in range(3)]
    images, targets = examples.data.collate_images(same)
    assert images.shape == (3, 3, 4, 5)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert targets.tolist() == [0, 1, 2]
    mixed = [*same, (torch.zeros(3, 6, 5, dtype=torch.uint8), 7)]
    images, targets = examples.data.collate_images(mixed)
    assert isinstance(images, list)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5)] * 3 + [(3, 6, 5)]
    assert targets.tolist() == [0, 1, 2, 7]


def test_a_bad_image_met_mid_run_is_replaced_on_resume_exactly(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The message used to say "remove it and resume"; the resume was then refused for the
    # changed number of images, with no way on when it changed the steps per epoch.
    broken = _folder_with(tmp_path, image_folder, "broken.jpg", _truncated_jpeg())
    data, run, dino = broken.parent.parent, tmp_path / "run", examples.dino_sere
    common = ["--check-images", "0", "--max-steps", "4"]
    with pytest.raises(SystemExit, match=r"or continue with --resume --replace-bad-images, "):
        train_tiny(dino, data, run, *common)
    capsys.readouterr()
    train_tiny(dino, data, run, *common, "--resume", "--replace-bad-images")
    err = capsys.readouterr().err
    assert re.search(
        rf"warning: cannot use image {re.escape(str(broken))}: OSError: .*; replaced by image "
        rf".*\.png \(--replace-bad-images\)",
        err,
    ), err
    assert steps(run) == [1, 2, 3, 4]
    # The same losses as a run that replaced the image from its start.
    train_tiny(dino, data, tmp_path / "straight", *common, "--replace-bad-images")
    for row, reference in zip(log_rows(run), log_rows(tmp_path / "straight"), strict=True):
        for term in ("loss", "dino", "spatial", "channel"):
            assert float(row[term]) == pytest.approx(float(reference[term]), rel=1e-6), term


def test_a_process_that_leaves_loader_workers_running_still_exits() -> None:
    # Loader workers ignore SIGTERM (the main process stops the run); multiprocessing's exit
    # handler, which sends them SIGTERM and waits, would wait forever for those an exception's
    # traceback kept alive (it hung the test process once).
    code = f"""
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
import torch
from training import data, distributed
process = distributed.Process(0, 1, torch.device("cpu"))
images = data.SyntheticImages(8, 16)
loader, _ = data.build_loader(
    images, lambda x: x.float(), process, batch_size=2, workers=2, seed=0
)
batches = iter(loader)
next(batches)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
