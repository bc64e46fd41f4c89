"""Checkpoints that can be trusted (``training/checkpoints.py``): finite, checksummed, verified.

Each test states a fault (NaN weights checkpointed, a write that fails or reads back wrong, a
damaged file) and checks that the last good checkpoint survives and the message names the file.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import TINY, checkpoint, flip_a_tensor_byte
from conftest import EXAMPLES, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


def _saved_once(examples: Any, tmp_path: Path) -> tuple[Any, Any, bytes]:
    """A run directory, its checkpointer, and the bytes of a first good checkpoint (step 1)."""
    process = examples.distributed.Process(0, 1, torch.device("cpu"))
    output = examples.rundir.OutputDir(tmp_path, resume=None, process=process)
    checkpointer = examples.checkpoints.Checkpointer(output)
    checkpointer.save({"model": {"w": torch.ones(2)}, "step": 1}, 1)
    return output, checkpointer, (tmp_path / "checkpoint.pth").read_bytes()


def test_a_checkpoint_with_non_finite_values_is_never_written(
    examples: Any, tmp_path: Path
) -> None:
    _, checkpointer, before = _saved_once(examples, tmp_path)
    with pytest.raises(SystemExit, match=r"non-finite values in model\.w\. .*untouched"):
        checkpointer.save({"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 2}, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_a_checkpoint_that_reads_back_wrong_never_replaces_the_last_one(
    examples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, checkpointer, before = _saved_once(examples, tmp_path)
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
    output, checkpointer, before = _saved_once(examples, tmp_path)
    (tmp_path / "checkpoint.pth.tmp" / "in-the-way").mkdir(parents=True)  # cannot be written
    with pytest.raises(
        SystemExit, match=rf"cannot write the checkpoint {tmp_path}/checkpoint.pth.tmp .*untouched"
    ):
        checkpointer.save({"model": {"w": torch.zeros(2)}, "step": 2}, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    output.release()


def test_damaged_checkpoints_are_refused_by_name(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_tiny(examples.dino_sere, image_folder, run, "--max-steps", "2")
    flipped, cut = tmp_path / "flipped.pth", tmp_path / "cut.pth"
    shutil.copy(run / "checkpoint.pth", flipped)
    flip_a_tensor_byte(flipped)
    data = (run / "checkpoint.pth").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit, match=rf"the checkpoint {flipped} fails its checksum"):
        train_tiny(examples.dino_sere, image_folder, run, "--resume", str(flipped))
    with pytest.raises(SystemExit, match=rf"cannot read the checkpoint {cut}: "):
        train_tiny(examples.dino_sere, image_folder, run, "--resume", str(cut))
    assert checkpoint(run)["step"] == 2  # the run's own checkpoint is still there, and whole


# Issue 23 --------------------------------------------------------------------------------------


def test_a_disk_that_fills_during_a_save_gives_a_message_and_no_partial_file(
    image_folder: Path, tmp_path: Path
) -> None:
    # A file size limit makes torch.save fail as a full disk does: DINO used to die of torch's
    # raw "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos", leaving a
    # partial checkpoint.pth.tmp.
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    cmd = [sys.executable, str(EXAMPLES / "dino_sere.py"), "--data", str(image_folder), *TINY]
    cmd += ["--max-steps", "2", "--output-dir", str(tmp_path)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, preexec_fn=small_files, check=False
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.search(
        rf"cannot write the checkpoint {tmp_path}/checkpoint.pth.tmp \(.*; [\d.]+ GiB free there, "
        r"a checkpoint takes about [\d.]+ GiB\)\. No checkpoint was written before\. Free some "
        r"space, then continue with --resume",
        out.stderr,
    ), out.stderr[-3000:]
    assert not (tmp_path / "checkpoint.pth.tmp").exists()


def test_a_zeroed_checkpoint_is_described_without_torchs_advice(
    examples: Any, tmp_path: Path
) -> None:
    zeroed = tmp_path / "checkpoint.pth"
    zeroed.write_bytes(bytes(5000))
    with pytest.raises(SystemExit) as caught:
        examples.checkpoints.load_checkpoint(zeroed)
    message = str(caught.value)
    assert message.startswith(f"cannot read the checkpoint {zeroed}: the file holds zeros, not")
    assert "weights_only" not in message
    assert "likely succeed" not in message


def test_the_other_checkpoints_of_a_run_are_named_when_one_is_damaged(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--epochs", "1", "--keep-checkpoints")
    (tmp_path / "checkpoint.pth").unlink()  # the kept checkpoint-0000002.pth is a hard link
    damaged = tmp_path / "copy.pth"
    shutil.copy(tmp_path / "checkpoint-0000002.pth", damaged)
    flip_a_tensor_byte(damaged)
    kept = tmp_path / "checkpoint-0000002.pth"
    # It used to say "No other checkpoint of this run is known" beside a whole kept one.
    with pytest.raises(
        SystemExit,
        match=rf"fails its checksum .* Other checkpoints of this run may be whole "
        rf"\(checkpoint-0000002\.pth\): --resume {kept}",
    ):
        examples.checkpoints.load_checkpoint(damaged)
    (tmp_path / "alone").mkdir()
    alone = damaged.rename(tmp_path / "alone" / "x.pth")
    with pytest.raises(SystemExit, match=r"No other checkpoint of this run is in "):
        examples.checkpoints.load_checkpoint(alone)
