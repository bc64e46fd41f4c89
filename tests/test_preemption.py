"""A run stopped by SIGTERM, SIGINT or the end of torchrun (``training/preemption.py``).

The run finishes the step it is in, writes a verified checkpoint, says so, and exits with 75
(EX_TEMPFAIL: "requeue me"); resumed, it gives the losses of a run never stopped. Under
``torchrun`` the processes stop after the same step. The test hook ``EXAMPLES_TEST_FAULT``
sends the signal at a chosen step (``sigterm:step:N[:RANK]``, ``group-sigint:step:N``), so the
tests need no timing; the torchrun tests signal torchrun itself, as a scheduler does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from _trainer_runs import TINY, Output, start_trainer, steps
from conftest import EXAMPLES, log_rows, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

REQUEUE = 75
TERMS = ("lr", "loss", "dino", "spatial", "channel")


@pytest.fixture(scope="module")
def straight(examples: Any, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four steps of DINO never stopped, to compare the stopped runs with."""
    out = tmp_path_factory.mktemp("straight")
    train_tiny(examples.dino_sere, image_folder, out, "--max-steps", "4")
    return out


def _same_rows(run: Path, reference: Path) -> None:
    rows, expected = log_rows(run), log_rows(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, other in zip(rows, expected, strict=True):
        for term in TERMS:
            assert float(row[term]) == pytest.approx(float(other[term]), rel=1e-6), term


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(
    examples: Any,
    image_folder: Path,
    tmp_path: Path,
    straight: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # SIGTERM in the middle of step 3, between epoch ends: it used to end the run at once, and
    # the steps since the last checkpoint (here step 2) were lost.
    monkeypatch.setenv("EXAMPLES_TEST_FAULT", "sigterm:step:3")
    with pytest.raises(SystemExit) as caught:
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4")
    assert caught.value.code == REQUEUE
    out = capsys.readouterr().out
    assert "SIGTERM: stopping after step 3, with a checkpoint" in out
    assert (
        f"stopped by SIGTERM after step 3 of 4: {tmp_path}/checkpoint.pth is written and "
        "verified. Run the same command with --resume to continue (exit status 75: requeue)"
    ) in out
    assert examples.checkpoints.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3
    assert steps(tmp_path) == [1, 2, 3]
    assert not (tmp_path / "last.json").exists()  # not finished
    monkeypatch.delenv("EXAMPLES_TEST_FAULT")
    train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4", "--resume")
    _same_rows(tmp_path, straight)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_loader_workers_included_still_checkpoints(
    image_folder: Path, tmp_path: Path, sig: str
) -> None:
    # A terminal's Ctrl-C (SIGINT) and SLURM's preemption (SIGTERM) signal every process of the
    # job, data loader workers included. Ctrl-C used to print a KeyboardInterrupt traceback and
    # lose the steps since the checkpoint; a worker killed by SIGTERM fails the step.
    child = start_trainer(
        "dino_sere.py", image_folder, tmp_path, "--max-steps", "4", "--workers", "2",
        fault=f"group-{sig.lower()}:step:3",
    )  # fmt: skip
    out, _ = child.communicate(timeout=300)
    assert child.returncode == REQUEUE, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert f"stopped by {sig} after step 3 of 4: " in out, out[-3000:]
    assert steps(tmp_path) == [1, 2, 3]


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(
    examples: Any, image_folder: Path, tmp_path: Path
) -> None:
    child = start_trainer(
        "dino_sere.py", image_folder, tmp_path, "--max-steps", "4",
        fault="sigint:step:3,sigint:step:3",
    )  # fmt: skip
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 130, out[-3000:]
    assert "interrupted (SIGINT): stopped at once, without a checkpoint" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # The checkpoint of the epoch's end (step 2) stands.
    assert examples.checkpoints.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 2


# Under torchrun: two gloo processes ------------------------------------------------------------


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(EXAMPLES / "dino_sere.py"), "--data", str(data), *TINY, "--device", "cpu"]
    cmd += ["--batch-size", "2", "--output-dir", str(out), *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _ranks(agent: int) -> list[int]:
    """The pids of ``agent``'s children (torchrun's processes), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == agent:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_torchrun_signalled_or_killed_stops_every_process_after_one_step(
    examples: Any, image_folder: Path, tmp_path: Path, how: str
) -> None:
    # SIGTERM to torchrun (what SLURM and Kubernetes send) reaches the processes through it;
    # SIGKILL leaves them without a parent, which they used to ignore and train on alone.
    child = _torchrun(image_folder, tmp_path, "--epochs", "20")
    output = Output(child)
    try:
        output.wait_for("step 2 ")
        ranks = _ranks(child.pid)
        assert len(ranks) == 2, ranks
        os.kill(child.pid, getattr(signal, how))
        output.wait_for("is written and verified", timeout=120)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in ranks), output.text()[-3000:]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    text = output.text()
    reason = "SIGTERM" if how == "SIGTERM" else "the end of its parent process (torchrun, pid "
    assert f"stopped by {reason}" in text, text[-3000:]
    saved = examples.checkpoints.load_checkpoint(tmp_path / "checkpoint.pth")
    assert saved["world_size"] == 2
    assert steps(tmp_path) == list(range(1, saved["step"] + 1))
