"""Runs a user can trust with a week of GPUs (issue 11): each case of its "Why", and kills.

Each test states a fault the trainers met before (a new run overwriting an old one, NaN weights
checkpointed, a resume that silently changed the run or doubled the log, unreadable images,
damaged checkpoints, a hung process) and checks that the trainer now refuses with a message that
names the file or option, or does the right thing. The trainers run in this process on the tiny
preset (8 images, batch 4: 2 steps an epoch, a checkpoint at each epoch's end); the kills run in
a child process, which the test hook ``EXAMPLES_TEST_FAULT`` makes die at a chosen point.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import log_rows, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TINY = ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--no-progress"]
TINY += ["--check-images", "1"]


def _steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in log_rows(run)]


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock, by name."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != "run.lock"}


def _checkpoint(run: Path, name: str = "checkpoint.pth") -> dict[str, Any]:
    state: dict[str, Any] = torch.load(run / name, map_location="cpu", weights_only=True)
    return state


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def _child(script: str, data: Path, out: Path, *extra: str, fault: str) -> subprocess.Popen[str]:
    """A trainer in a child process (its own session), with the test fault ``fault``."""
    cmd = [sys.executable, str(EXAMPLES / script), "--data", str(data), *TINY]
    env = {**os.environ, "EXAMPLES_TEST_FAULT": fault}
    return subprocess.Popen(
        [*cmd, "--output-dir", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class _Output:
    """A child's output, read as it comes by a thread, so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines = proc, []
        self._event, self._text = threading.Event(), ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._text and self._text in line:
                self._event.set()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Until a line holds ``text``; the test fails if none does in ``timeout`` seconds."""
        self._text = text
        if not any(text in line for line in self.lines) and not self._event.wait(timeout):
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the child never printed {text!r}:\n{self.text()[-3000:]}")

    def text(self) -> str:
        """All the output so far (all of it once the child has ended)."""
        if self.proc.poll() is not None:
            self._thread.join(timeout=10)
        return "".join(self.lines)


# Case 1: a new run in an existing output directory ------------------------------------------


def test_a_new_run_refuses_a_directory_that_holds_a_run(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "3")
    before = _files(tmp_path)
    with pytest.raises(SystemExit, match=r"holds a run at step 3 .*--resume.*another --output-dir"):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "1")
    assert _files(tmp_path) == before  # checkpoint, log and last.json untouched


def test_one_live_run_per_directory_and_a_killed_one_does_not_block(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    child = _child("dino_sere.py", image_folder, tmp_path, "--max-steps", "4", fault="hang:step:1")
    try:
        _Output(child).wait_for("EXAMPLES_TEST_FAULT: hang")  # it holds the directory, mid-step 1
        with pytest.raises(SystemExit, match=rf"in use by a live run \(pid {child.pid} on "):
            train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "2")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    # SIGKILL left no way to clean up; the lock went with the process all the same.
    last = train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "2")
    assert last["step"] == 2
    assert _steps(tmp_path) == [1, 2]


# Case 2: non-finite values never reach a checkpoint -----------------------------------------


def test_an_inf_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(
    examples: Any, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finite loss with an inf gradient at step 4, the end of epoch 2: the update and the
    # checkpoint right after it are where NaN weights used to slip through.
    unscale, calls = torch.amp.GradScaler.unscale_, []

    def corrupting_unscale(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        unscale(self, optimizer)
        calls.append(1)
        if len(calls) == 4:
            optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", corrupting_unscale)
    with pytest.raises(
        SystemExit,
        match=r"step 4: non-finite gradients \(NaN or inf\) in MultiCropModel\[0\]\.backbone\.",
    ):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4")
    saved = _checkpoint(tmp_path)
    assert saved["step"] == 2
    assert _all_finite(saved)
    assert _steps(tmp_path) == [1, 2, 3]  # a resume goes on from step 2 (the kill tests)


def test_fp16_skips_an_inf_step_as_the_grad_scaler_means_to(examples: Any) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)  # a group without names
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = (weight * torch.tensor([1.0, float("inf"), 1.0])).sum()
    assert not examples.optim.optimizer_step(loss, optimizer, scaler, step=0)  # skipped, no error
    assert torch.equal(weight.detach(), torch.ones(3))
    assert scaler.get_scale() == 2.0  # the scaler backed off
    # The same gradient without a scaler (fp32, bf16) stops the run.
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    loss = (weight * torch.tensor([1.0, float("inf"), 1.0])).sum()
    with pytest.raises(SystemExit, match=r"step 1: non-finite gradients .* in parameter 0"):
        examples.optim.optimizer_step(loss, optimizer, disabled, step=0)


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


# Case 3: --resume and the options that define a run -----------------------------------------


def test_resume_refuses_changed_options_unless_allowed(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    dino = examples.dino_sere
    train_tiny(dino, image_folder, tmp_path, "--max-steps", "2")
    for change, name in [
        (["--lr", "0.001"], "lr"),
        (["--seed", "1"], "seed"),
        (["--epochs", "3"], "epochs"),
        (["--teacher-temp", "0.04", "0.06"], "teacher_temp"),
        (["--recipe", "paper"], "recipe"),
    ]:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(
            SystemExit,
            match=rf"options differ .*{flag} .*\(checkpoint: .*--allow-changed-options {name}\b",
        ):
            train_tiny(dino, image_folder, tmp_path, "--resume", "--max-steps", "3", *change)
    with pytest.raises(SystemExit, match=r"--allow-changed-options lr_max: no such option"):
        train_tiny(dino, image_folder, tmp_path, "--resume", "--allow-changed-options", "lr_max")
    # Options that do not change what the run computes may change; a named change is allowed.
    train_tiny(
        dino, image_folder, tmp_path, "--resume", "--max-steps", "3", "--check-images", "0",
        "--dist-timeout", "5",
    )  # fmt: skip
    last = train_tiny(
        dino, image_folder, tmp_path, "--resume", "--max-steps", "4", "--lr", "0.001",
        "--allow-changed-options", "lr",
    )  # fmt: skip
    assert last["step"] == 4
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_resume_refuses_data_that_changes_the_steps_per_epoch(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    for path in sorted(image_folder.rglob("*.png"))[:4]:
        (small / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, small / path.parent.name / path.name)
    run = tmp_path / "run"
    train_tiny(examples.dino_sere, image_folder, run, "--max-steps", "2")
    before = _files(run)
    # Not even an explicit allowance makes 1 step per epoch (4 images) continue 2 (8 images).
    with pytest.raises(SystemExit, match=r"saved with 2 steps per epoch; this run's data gives 1"):
        train_tiny(
            examples.dino_sere, small, run, "--resume", "--allow-changed-options", "data",
            "dataset_size",
        )  # fmt: skip
    assert _files(run) == before


def test_resuming_a_finished_run_changes_nothing(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = train_tiny(examples.dino_sere, image_folder, tmp_path, "--epochs", "1")
    before = _files(tmp_path)
    again = train_tiny(examples.dino_sere, image_folder, tmp_path, "--epochs", "1", "--resume")
    assert "is finished (step 2 of 2): nothing to do" in capsys.readouterr().out
    assert again == json.loads(before["last.json"]) == json.loads(json.dumps(done))
    assert _files(tmp_path) == before  # last.json, log.csv and the checkpoints as they were


# Case 4: log.csv holds each step once ----------------------------------------------------------


def test_the_log_holds_each_step_once_after_a_resume(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    # A crash after step 3 was logged leaves the checkpoint of step 2 (end of epoch 1) and a
    # log of 3 rows; here the run goes to step 3 and the step-2 checkpoint is put back.
    dino = examples.dino_sere
    train_tiny(dino, image_folder, tmp_path / "a", "--max-steps", "2")
    saved = (tmp_path / "a" / "checkpoint.pth").read_bytes()
    train_tiny(dino, image_folder, tmp_path / "a", "--max-steps", "3", "--resume")
    (tmp_path / "a" / "checkpoint.pth").write_bytes(saved)
    train_tiny(dino, image_folder, tmp_path / "a", "--max-steps", "4", "--resume")
    assert _steps(tmp_path / "a") == [1, 2, 3, 4]


# Kills: at any point, a resumed run loses at most the steps since the last checkpoint ---------


@pytest.fixture(scope="module")
def straight_run(
    examples: Any, image_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Four steps without interruption, to compare the resumed runs with."""
    out = tmp_path_factory.mktemp("straight")
    train_tiny(examples.dino_sere, image_folder, out, "--max-steps", "4")
    return out


@pytest.mark.parametrize(
    ("fault", "logged"),
    [("kill:step:4", [1, 2, 3]), ("kill:save:4", [1, 2, 3, 4])],
    ids=["during-a-step", "during-a-save"],
)
def test_a_killed_run_resumes_from_its_last_good_checkpoint(
    examples: Any,
    image_folder: Path,
    tmp_path: Path,
    straight_run: Path,
    fault: str,
    logged: list[int],
) -> None:
    child = _child("dino_sere.py", image_folder, tmp_path, "--max-steps", "4", fault=fault)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, out[-3000:]
    assert _steps(tmp_path) == logged
    if fault.startswith("kill:save"):  # the new checkpoint was cut in half while being written
        assert (tmp_path / "checkpoint.pth.tmp").stat().st_size > 0
    # The checkpoint of step 2 (end of epoch 1) is whole: it loads and passes its checksum.
    process = examples.distributed.Process(0, 1, torch.device("cpu"))
    output = examples.rundir.OutputDir(tmp_path, resume="auto", process=process)
    assert examples.checkpoints.Checkpointer(output).load(tmp_path / "checkpoint.pth")["step"] == 2
    output.release()
    last = train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4", "--resume")
    assert last["step"] == 4
    assert _steps(tmp_path) == [1, 2, 3, 4]  # each step once
    resumed, straight = log_rows(tmp_path), log_rows(straight_run)
    for row, reference in zip(resumed[2:], straight[2:], strict=True):
        for term in ("lr", "loss", "dino", "spatial", "channel"):
            assert float(row[term]) == pytest.approx(float(reference[term]), rel=1e-6), term
    assert not (tmp_path / "checkpoint.pth.tmp").exists()
    assert _checkpoint(tmp_path, "checkpoint.prev.pth")["step"] == 2  # the previous one is kept


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


# Case 6: the output directory and damaged checkpoints --------------------------------------------


@contextlib.contextmanager
def _unwritable(directory: Path) -> Iterator[None]:
    """``directory`` where no file can be created: read-only, or immutable for root."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        undo = ["chmod", "755", str(directory)]
    else:  # root writes through permissions; the immutable attribute stops it
        made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make a directory unwritable here: {made.stderr!r}")
        undo = ["chattr", "-i", str(directory)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_an_unwritable_output_dir_stops_the_run_before_it_starts(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with _unwritable(out), pytest.raises(SystemExit, match=rf"--output-dir {out}: cannot write"):
        train_tiny(examples.dino_sere, image_folder, out, "--max-steps", "2")
    assert not any(out.iterdir())


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


def test_an_unwritable_checkpoint_path_stops_the_run_before_it_starts(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "checkpoint.pth.tmp" / "in-the-way").mkdir(parents=True)  # cannot be written
    with pytest.raises(
        SystemExit, match=rf"cannot write checkpoints there \({tmp_path}/checkpoint"
    ):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
    assert not (tmp_path / "log.csv").exists()


def test_a_disk_without_room_for_two_checkpoints_is_refused(
    examples: Any, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    with pytest.raises(SystemExit, match=rf"--output-dir {tmp_path}: 0.00 GiB free, but"):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "1")


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
    assert _checkpoint(run)["step"] == 2  # the run's own checkpoint is still there, and whole


# Case 7: a hung process ---------------------------------------------------------------------------


@pytest.mark.distributed
def test_a_hung_process_fails_the_run_after_dist_timeout(
    image_folder: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(EXAMPLES / "dino_sere.py"), "--data", str(image_folder), *TINY, "--device", "cpu"]
    cmd += ["--batch-size", "2", "--max-steps", "2", "--output-dir", str(tmp_path)]
    cmd += ["--dist-timeout", "0.1"]  # 6 seconds
    env = {**os.environ, "EXAMPLES_TEST_FAULT": "hang:step:1:1"}  # process 1 hangs in step 1
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    output = _Output(child)
    try:
        output.wait_for("EXAMPLES_TEST_FAULT: hang")
        hung_at = time.monotonic()
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    waited, out = time.monotonic() - hung_at, output.text()
    assert child.returncode != 0, out[-3000:]
    assert waited < 60, f"the run ended {waited:.0f} s after the hang; the timeout is 6 s"
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]


def test_a_filesystem_without_locks_warns_on_stderr_and_runs(
    examples: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import errno
    import fcntl

    def no_locks(*args: Any) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    output = examples.rundir.OutputDir(
        tmp_path, resume=None, process=examples.distributed.Process(0, 1, torch.device("cpu"))
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(
        r"warning: cannot lock .*run\.lock \(.*No locks available\); nothing stops", captured.err
    )
    assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert output.path == tmp_path
