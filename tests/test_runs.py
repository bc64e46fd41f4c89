"""A run's directory and its bookkeeping (``training/rundir.py``, ``training/runs.py``).

Each test states a fault the trainers met (a new run overwriting an old one, a resume that
silently changed the run or doubled the log, a killed run) and checks that the trainer now
refuses with a message that names the file or option, or does the right thing. The trainers run
in this process on the tiny preset (8 images, batch 4: 2 steps an epoch, a checkpoint at each
epoch's end); the kills run in a child process, which the test hook ``EXAMPLES_TEST_FAULT``
makes die at a chosen point.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import Output, checkpoint, files, flip_a_tensor_byte, start_trainer, steps
from conftest import log_rows, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


# Case 1: a new run in an existing output directory ------------------------------------------


def test_a_new_run_refuses_a_directory_that_holds_a_run(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "3")
    before = files(tmp_path)
    with pytest.raises(SystemExit, match=r"holds a run at step 3 .*--resume.*another --output-dir"):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "1")
    assert files(tmp_path) == before  # checkpoint, log and last.json untouched


def test_one_live_run_per_directory_and_a_killed_one_does_not_block(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    child = start_trainer(
        "dino_sere.py", image_folder, tmp_path, "--max-steps", "4", fault="hang:step:1"
    )
    try:
        Output(child).wait_for("EXAMPLES_TEST_FAULT: hang")  # it holds the directory, mid-step 1
        with pytest.raises(SystemExit, match=rf"in use by a live run \(pid {child.pid} on "):
            train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "2")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    # SIGKILL left no way to clean up; the lock went with the process all the same.
    last = train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "2")
    assert last["step"] == 2
    assert steps(tmp_path) == [1, 2]


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
    assert steps(tmp_path) == [1, 2, 3, 4]


def test_resume_refuses_data_that_changes_the_steps_per_epoch(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    for path in sorted(image_folder.rglob("*.png"))[:4]:
        (small / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, small / path.parent.name / path.name)
    run = tmp_path / "run"
    train_tiny(examples.dino_sere, image_folder, run, "--max-steps", "2")
    before = files(run)
    # Not even an explicit allowance makes 1 step per epoch (4 images) continue 2 (8 images).
    with pytest.raises(SystemExit, match=r"saved with 2 steps per epoch; this run's data gives 1"):
        train_tiny(
            examples.dino_sere, small, run, "--resume", "--allow-changed-options", "data",
            "dataset_size",
        )  # fmt: skip
    assert files(run) == before


def test_resuming_a_finished_run_changes_nothing(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = train_tiny(examples.dino_sere, image_folder, tmp_path, "--epochs", "1")
    before = files(tmp_path)
    again = train_tiny(examples.dino_sere, image_folder, tmp_path, "--epochs", "1", "--resume")
    assert "is finished (step 2 of 2): nothing to do" in capsys.readouterr().out
    assert again == json.loads(before["last.json"]) == json.loads(json.dumps(done))
    assert files(tmp_path) == before  # last.json, log.csv and the checkpoints as they were


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
    assert steps(tmp_path / "a") == [1, 2, 3, 4]


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
    child = start_trainer("dino_sere.py", image_folder, tmp_path, "--max-steps", "4", fault=fault)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, out[-3000:]
    assert steps(tmp_path) == logged
    if fault.startswith("kill:save"):  # the new checkpoint was cut in half while being written
        assert (tmp_path / "checkpoint.pth.tmp").stat().st_size > 0
    # The checkpoint of step 2 (end of epoch 1) is whole: it loads and passes its checksum.
    process = examples.distributed.Process(0, 1, torch.device("cpu"))
    output = examples.rundir.OutputDir(tmp_path, resume="auto", process=process)
    assert examples.checkpoints.Checkpointer(output).load(tmp_path / "checkpoint.pth")["step"] == 2
    output.release()
    last = train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4", "--resume")
    assert last["step"] == 4
    assert steps(tmp_path) == [1, 2, 3, 4]  # each step once
    resumed, straight = log_rows(tmp_path), log_rows(straight_run)
    for row, reference in zip(resumed[2:], straight[2:], strict=True):
        for term in ("lr", "loss", "dino", "spatial", "channel"):
            assert float(row[term]) == pytest.approx(float(reference[term]), rel=1e-6), term
    assert not (tmp_path / "checkpoint.pth.tmp").exists()
    assert checkpoint(tmp_path, "checkpoint.prev.pth")["step"] == 2  # the previous one is kept


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


def test_an_unwritable_checkpoint_path_stops_the_run_before_it_starts(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "checkpoint.pth.tmp" / "in-the-way").mkdir(parents=True)  # cannot be written
    with pytest.raises(
        SystemExit, match=rf"cannot write checkpoints there \({tmp_path}/checkpoint"
    ):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
    assert not (tmp_path / "log.csv").exists()


def test_a_disk_without_room_for_three_checkpoints_is_refused(
    examples: Any, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A save writes the new checkpoint while the last two are still there: with room for two,
    # every run used to start and then die at its first save.
    train_tiny(examples.dino_sere, image_folder, tmp_path / "ref", "--max-steps", "1")
    size = (tmp_path / "ref" / "checkpoint.pth").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=int(2.5 * size)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"--output-dir {out}: 0.0\d GiB free, but .*three"):
        train_tiny(examples.dino_sere, image_folder, out, "--max-steps", "1")
    assert not (out / "log.csv").exists()


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


# Issue 23: --resume never overwrites or cuts back what a directory holds -----------------------


def test_resume_never_overwrites_another_run_or_cuts_back_a_finished_one(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dino, a, b = examples.dino_sere, tmp_path / "a", tmp_path / "b"
    train_tiny(dino, image_folder, a, "--keep-checkpoints")  # finished: steps 1-4, kept 2 and 4
    train_tiny(dino, image_folder, b, "--max-steps", "1")
    before = files(a)
    # Another run's checkpoint into a: it used to overwrite a's log, last.json and checkpoints.
    with pytest.raises(SystemExit, match=rf"--resume {b}/checkpoint.pth: {a} holds another run"):
        train_tiny(dino, image_folder, a, "--resume", str(b / "checkpoint.pth"), "--max-steps", "2")
    # a's own earlier checkpoint: it used to cut the log back to step 2 and rotate step 4 away.
    kept = a / "checkpoint-0000002.pth"
    with pytest.raises(
        SystemExit, match=rf"--resume {kept} is at step 2, but {a} holds this run up to step 4 "
    ):
        train_tiny(dino, image_folder, a, "--resume", str(kept))
    assert files(a) == before
    # The way that works: a new directory, which starts from a's rows up to step 2.
    capsys.readouterr()
    train_tiny(dino, image_folder, tmp_path / "c", "--resume", str(kept), "--max-steps", "3")
    assert f"a new run in {tmp_path / 'c'}, from {kept} (step 2)" in capsys.readouterr().out
    assert steps(tmp_path / "c") == [1, 2, 3]
    assert log_rows(tmp_path / "c")[:2] == log_rows(a)[:2]
    assert log_rows(tmp_path / "c")[2]["loss"] == log_rows(a)[2]["loss"]  # the same step 3
    # ... and is a run of its own: it cannot be resumed into a either.
    with pytest.raises(SystemExit, match=r"holds another run"):
        train_tiny(dino, image_folder, a, "--resume", str(tmp_path / "c" / "checkpoint.pth"))
    assert files(a) == before


def test_resuming_from_the_previous_checkpoint_sets_a_damaged_one_aside(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    dino = examples.dino_sere
    train_tiny(dino, image_folder, tmp_path, "--max-steps", "4")  # checkpoint 4, previous 2
    flip_a_tensor_byte(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match=r"fails its checksum .*--resume .*checkpoint.prev.pth"):
        train_tiny(dino, image_folder, tmp_path, "--resume", "--max-steps", "4")
    train_tiny(
        dino, image_folder, tmp_path, "--resume", str(tmp_path / "checkpoint.prev.pth"),
        "--max-steps", "4",
    )  # fmt: skip
    # The save at step 4 used to rotate the damaged file into checkpoint.prev.pth, the only
    # backup; the backup is still the whole checkpoint of step 2.
    ck = examples.checkpoints
    assert ck.load_checkpoint(tmp_path / "checkpoint.prev.pth")["step"] == 2
    assert ck.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 4
    assert not ck.verifies(tmp_path / "checkpoint.damaged.pth")
    assert steps(tmp_path) == [1, 2, 3, 4]


def test_log_rows_lost_before_the_checkpoint_are_reported(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
    lines = (tmp_path / "log.csv").read_bytes().splitlines(keepends=True)
    (tmp_path / "log.csv").write_bytes(lines[0] + lines[2])  # row of step 1 gone
    capsys.readouterr()
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "3")
    out = capsys.readouterr().out
    assert f"{tmp_path}/log.csv has no row for step(s) 1 of the 2 before the checkpoint" in out
    assert steps(tmp_path) == [2, 3]


def test_a_log_line_that_is_not_utf8_is_left_out_and_said(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
    log = tmp_path / "log.csv"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[1].replace(b",", b"\xff,", 1) + lines[2])
    # Every start and resume in the directory used to die of a UnicodeDecodeError.
    with pytest.raises(SystemExit, match=rf"--output-dir {tmp_path} holds a run at step 2 "):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "3")
    capsys.readouterr()
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--resume", "--max-steps", "3")
    out = capsys.readouterr().out
    assert f"{log}: line(s) 2 are not text that the log can hold" in out
    assert "has no row for step(s) 1 of the 2" in out
    assert steps(tmp_path) == [2, 3]


def test_a_log_without_rows_does_not_hold_a_run(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    # A run that failed in its first step leaves the header of log.csv and nothing else; the
    # corrected command used to be refused until --resume was added.
    (tmp_path / "log.csv").write_text("step,epoch,loss\n")
    last = train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "1")
    assert last["step"] == 1


def test_a_log_that_cannot_be_written_stops_the_run_with_a_message(
    examples: Any, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    format_value = examples.rundir.format_value

    def full_disk(value: Any) -> str:  # log.csv's writes call it: they fail at step 2
        if isinstance(value, int) and value == 2:
            raise OSError(28, "No space left on device")
        return format_value(value)

    monkeypatch.setattr(examples.rundir, "format_value", full_disk)
    with pytest.raises(
        SystemExit,
        match=rf"cannot write step 2 to the log {tmp_path}/log.csv \(No space left on device\)\. ",
    ):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
