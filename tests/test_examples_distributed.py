"""The example trainers under ``torchrun``: two gloo processes on the CPU.

``torchrun --standalone --nproc_per_node=2`` starts each trainer as a user would on two GPUs,
with ``--device cpu``. The trainers end their processes with ``os._exit`` after a distributed
run (``training.distributed.run_main``), which avoids gloo's occasional abort at interpreter
exit, so a non-zero exit status here is a real failure.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import TINY, Output

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def _torchrun(script: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "EXAMPLES_TEST_FAULT": fault}
    out = subprocess.run(
        [*cmd, str(script), *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
        env=env,
    )  # fmt: skip
    # A process stopped by a signal exits with 75, which torchrun reports as its failure.
    expected = 1 if fault.startswith("sigterm") else 0
    assert out.returncode == expected, (
        f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    )
    return out


def _train(name: str, out: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    args = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--workers", "0"]
    return _torchrun(
        EXAMPLES / f"{name}.py", *args, "--no-progress", "--output-dir", str(out), *extra,
        fault=fault,
    )  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_plumbing_matches_one_process_on_the_whole_batch(examples: Any, tmp_path: Path) -> None:
    _torchrun(ROOT / "tests" / "_examples_ddp_worker.py", str(tmp_path))
    errors = sorted(tmp_path.glob("error-rank*.txt"))
    assert not errors, "\n".join(e.read_text() for e in errors)
    results: list[dict[str, Any]] = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)
    ]
    from _examples_ddp_worker import full_batch

    whole = full_batch(2)
    # One process, the whole batch: InfoNCE over 6 queries and 6 keys is the mean of the two
    # processes' losses, each over its 3 queries against all 6 keys.
    single = examples.mocov3_sere.contrastive_loss(whole["query"], whole["key"], 0.2, rank=0)
    both = (results[0]["contrastive"] + results[1]["contrastive"]) / 2
    torch.testing.assert_close(both, single)
    assert not torch.allclose(results[0]["contrastive"], results[1]["contrastive"])
    center = torch.zeros(1, 5)
    examples.dino_sere.update_center(center, whole["teacher"], 0.9)
    for r in results:
        assert r["world_size"] == 2
        assert r["gathered"].tolist() == [0, 10, 1, 11]
        torch.testing.assert_close(r["center"], center)
        assert r["mean"] == pytest.approx({"a": 0.5, "b": 2.0})
        assert "parameters differ" in r["out_of_sync"]
    # Rank 0 saved the first checkpoint with both processes' random states; the refused second
    # one left it as it was.
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert saved["step"] == 1
    assert saved["world_size"] == 2
    for rank in range(2):
        assert torch.equal(saved["rng"][rank]["cpu"], results[rank]["rng"])


def test_dino_trains_with_two_processes_and_resumes_exactly(tmp_path: Path) -> None:
    out = _train("dino_sere", tmp_path / "straight", "--max-steps", "3")
    assert "2 process(es) on cpu" in out.stdout
    assert out.stdout.count("done:") == 1  # only the main process prints
    # Process 1 alone gets SIGTERM in step 2: both processes stop after step 2 (they agree in
    # the collective of the step), with a checkpoint, and exit with 75.
    stopped = _train(
        "dino_sere", tmp_path / "stopped", "--max-steps", "3", fault="sigterm:step:2:1"
    )
    assert "a signal to another process: stopping after step 2, with a checkpoint" in stopped.stdout
    assert "exitcode  : 75" in stopped.stderr, stopped.stderr[-3000:]
    assert [int(r["step"]) for r in _rows(tmp_path / "stopped")] == [1, 2]
    _train("dino_sere", tmp_path / "stopped", "--max-steps", "3", "--resume")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "stopped")
    assert [int(r["step"]) for r in straight] == [1, 2, 3]  # one row per step: rank 0 logs
    assert [int(r["step"]) for r in resumed] == [1, 2, 3]
    for term in ("lr", "wd", "momentum", "loss", "dino", "spatial", "channel"):
        assert float(resumed[2][term]) == pytest.approx(float(straight[2][term]), rel=1e-6), term
    state = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    assert state["world_size"] == 2
    assert len(state["rng"]) == 2
    assert not any(k.startswith("module.") for k in state["student"])  # no DDP prefix


@pytest.mark.parametrize("name", ["ibot_sere", "mocov3_sere"])
def test_ibot_and_mocov3_train_with_two_processes(name: str, tmp_path: Path) -> None:
    out = _train(name, tmp_path, "--max-steps", "2")
    assert "2 process(es) on cpu" in out.stdout
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["spatial"]) > 0
        assert float(row["channel"]) > 0


def test_fingerprints_of_all_modules_land_on_the_process_device(examples: Any) -> None:
    # The sync check concatenates every module's fingerprint on the process's device. A module
    # without parameters (DINO's loss and its centre) once gave a CPU tensor, and the first
    # checkpoint of a CUDA run under torchrun failed in torch.cat (found by the CUDA check).
    meta = torch.device("meta")
    with_params = examples.runs.fingerprint(torch.nn.Linear(3, 2), meta)
    without = examples.runs.fingerprint(examples.dino_sere.DINOLoss(5, 2), meta)
    assert with_params.device == meta
    assert with_params.shape == (4,)
    assert without.device == meta
    assert without.shape == (0,)
    assert torch.cat([with_params, without]).shape == (4,)
    values = examples.runs.fingerprint(torch.nn.Linear(3, 2), torch.device("cpu"))
    assert values.dtype == torch.float64


@pytest.mark.parametrize(
    ("message", "explained"),
    [
        (
            "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation",
            True,
        ),
        (
            "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7) ran for 600000 ms",
            True,
        ),
        ("CUDA out of memory", False),
    ],
)
def test_a_timed_out_collective_is_explained(
    examples: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    message: str,
    explained: bool,
) -> None:
    # torch's own message names the collective, not what to do: run_main adds that line,
    # under torchrun only, and the error still ends the process.
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")

    def main(_argv: list[str]) -> None:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match=message[:20].replace("[", r"\[")):
        examples.distributed.run_main(main)
    err = capsys.readouterr().err
    assert ("process 1: a collective waited longer than --dist-timeout" in err) is explained


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
    output = Output(child)
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
