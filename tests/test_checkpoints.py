"""Checkpoints that can be trusted (``training/checkpoints.py``): finite, checksummed, verified.

Each test states a fault (NaN weights checkpointed, a write that fails or reads back wrong, a
damaged file) and checks that the last good checkpoint survives and the message names the file.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import checkpoint
from conftest import train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


def test_a_checkpoint_with_non_finite_values_is_never_written(
    examples: Any, tmp_path: Path
) -> None:
    process = examples.distributed.Process(0, 1, torch.device("cpu"))
    output = examples.rundir.OutputDir(tmp_path, resume=None, process=process)
    checkpointer = examples.checkpoints.Checkpointer(output)
    checkpointer.save({"model": {"w": torch.ones(2)}, "step": 1}, 1)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit, match=r"non-finite values in model\.w\. .*untouched"):
        checkpointer.save({"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 2}, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_a_checkpoint_that_reads_back_wrong_never_replaces_the_last_one(
    examples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = examples.rundir.OutputDir(
        tmp_path, resume=None, process=examples.distributed.Process(0, 1, torch.device("cpu"))
    )
    checkpointer = examples.checkpoints.Checkpointer(output)
    checkpointer.save({"model": {"w": torch.ones(2)}, "step": 1}, 1)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    save = torch.save

    def corrupting_save(state: dict[str, Any], f: Any) -> None:  # the bytes on disk differ
        save({**state, "model": {"w": torch.tensor([2.0, 2.0000002])}}, f)

    monkeypatch.setattr(examples.checkpoints.torch, "save", corrupting_save)
    with pytest.raises(SystemExit, match=r"reads back with another checksum .*untouched"):
        checkpointer.save({"model": {"w": torch.full((2,), 2.0)}, "step": 2}, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert not (tmp_path / "checkpoint.prev.pth").exists()
    output.release()


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_last_one(
    examples: Any, tmp_path: Path
) -> None:
    output = examples.rundir.OutputDir(
        tmp_path, resume=None, process=examples.distributed.Process(0, 1, torch.device("cpu"))
    )
    checkpointer = examples.checkpoints.Checkpointer(output)
    checkpointer.save({"model": {"w": torch.ones(2)}, "step": 1}, 1)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "checkpoint.pth.tmp" / "in-the-way").mkdir(parents=True)  # cannot be written
    with pytest.raises(
        SystemExit, match=rf"cannot write the checkpoint {tmp_path}/checkpoint.pth.tmp .*untouched"
    ):
        checkpointer.save({"model": {"w": torch.zeros(2)}, "step": 2}, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    output.release()


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor record of a ``torch.save`` zip file."""
    with zipfile.ZipFile(path) as archive:
        record = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    with path.open("r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        offset = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_damaged_checkpoints_are_refused_by_name(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_tiny(examples.dino_sere, image_folder, run, "--max-steps", "2")
    flipped, cut = tmp_path / "flipped.pth", tmp_path / "cut.pth"
    shutil.copy(run / "checkpoint.pth", flipped)
    _flip_a_tensor_byte(flipped)
    data = (run / "checkpoint.pth").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit, match=rf"the checkpoint {flipped} fails its checksum"):
        train_tiny(examples.dino_sere, image_folder, run, "--resume", str(flipped))
    with pytest.raises(SystemExit, match=rf"cannot read the checkpoint {cut}: "):
        train_tiny(examples.dino_sere, image_folder, run, "--resume", str(cut))
    assert checkpoint(run)["step"] == 2  # the run's own checkpoint is still there, and whole
