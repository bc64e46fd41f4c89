"""The example trainers run as a user would start them, and resume exactly."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import log_rows, train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAINERS = ("dino_sere", "ibot_sere", "mocov3_sere")
# The method's own loss terms (logged), besides "loss" and SERE's "spatial" and "channel".
METHOD_TERMS = {
    "dino_sere": ("dino",),
    "ibot_sere": ("ibot", "cls", "patch"),
    "mocov3_sere": ("moco",),
}
# What the total is made of, with the default options: (method term, its weight, alpha, beta).
TOTAL = {
    "dino_sere": ("dino", 1.0, 1.0, 1.0),
    "ibot_sere": ("ibot", (4 - 0.2 - 0.5) / 2, 0.2, 0.5),  # the authors' weighting of L_iBOT
    "mocov3_sere": ("moco", 1.0, 1.0, 1.0),
}


def _rows(run: Path) -> list[dict[str, str]]:
    return log_rows(run)


def _train(module: Any, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    return train_tiny(module, data, out, *extra)


@pytest.mark.parametrize("name", TRAINERS)
def test_trains_two_steps_on_an_image_folder(
    examples: Any, name: str, image_folder: Path, tmp_path: Path
) -> None:
    last = _train(getattr(examples, name), image_folder, tmp_path, "--max-steps", "2")
    assert last["step"] == 2
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        for term in ("loss", *METHOD_TERMS[name], "spatial", "channel"):
            assert math.isfinite(float(row[term])), (term, row)
        assert float(row["spatial"]) > 0
        assert float(row["channel"]) > 0
        term, weight, alpha, beta = TOTAL[name]
        total = weight * float(row[term]) + alpha * float(row["spatial"])
        assert float(row["loss"]) == pytest.approx(total + beta * float(row["channel"]), rel=1e-4)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert state["step"] == 2
    assert "sere" in state
    # The loader's wait beside the step's own time, both measured (no workers: the wait is the
    # main process making the batch, never nothing).
    for row in rows:
        assert 0 < float(row["data_seconds"]) < 60
        assert 0 < float(row["seconds"]) < 600


def test_the_run_says_how_long_it_waited_for_data(
    examples: Any, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _train(examples.dino_sere, image_folder, tmp_path, "--max-steps", "2")
    rows = _rows(tmp_path)
    waited = sum(float(r["data_seconds"]) for r in rows)
    total = waited + sum(float(r["seconds"]) for r in rows)
    said = re.search(
        r"the steps waited ([\d.]+) s of ([\d.]+) s for their batches", capsys.readouterr().out
    )
    assert said is not None
    assert float(said.group(1)) == pytest.approx(waited, abs=0.06)
    assert float(said.group(2)) == pytest.approx(total, abs=0.06)


def test_compile_sere_follows_the_device(examples: Any) -> None:
    from sere_loss import SERELoss

    options, distributed = examples.options, examples.distributed
    cpu = distributed.Process(0, 1, torch.device("cpu"))
    cuda = distributed.Process(0, 1, torch.device("cuda"))  # only its type is read
    gpus = distributed.Process(0, 8, torch.device("cuda"))  # one of 8 processes

    def compiled(choice: str, process: Any) -> bool:
        sere = SERELoss(48, num_heads=4)
        args = options.argparse.Namespace(compile_sere=choice)
        done = options.compile_sere(sere, args, process)
        assert done == (sere._compile_options is not None)
        return bool(done)

    assert [compiled("auto", cpu), compiled("auto", cuda)] == [False, True]
    assert [compiled("on", cpu), compiled("off", cuda)] == [True, False]
    assert [compiled("auto", gpus), compiled("on", gpus)] == [False, True]
    assert options.compile_sere(None, options.argparse.Namespace(compile_sere="on"), cpu) is False


@pytest.mark.parametrize("name", TRAINERS)
def test_no_sere_is_the_plain_method(
    examples: Any, name: str, image_folder: Path, tmp_path: Path
) -> None:
    last = _train(getattr(examples, name), image_folder, tmp_path, "--max-steps", "2", "--no-sere")
    assert "spatial" not in last
    assert "channel" not in last
    term = TOTAL[name][0]
    assert last["loss"] == pytest.approx(last[term])  # weight 1: plain iBOT is not scaled
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert "sere" not in state


def test_ibot_paper_weighting(examples: Any, image_folder: Path, tmp_path: Path) -> None:
    last = _train(examples.ibot_sere, image_folder, tmp_path, "--max-steps", "1")
    paper = _train(
        examples.ibot_sere, image_folder, tmp_path / "paper", "--max-steps", "1",
        "--ibot-weight", "paper",
    )  # fmt: skip
    # The same first step (same data and weights), only the total's weighting differs.
    for term in ("ibot", "cls", "patch", "spatial", "channel"):
        assert paper[term] == pytest.approx(last[term], rel=1e-6), term
    expected = paper["ibot"] + 0.2 * paper["spatial"] + 0.5 * paper["channel"]
    assert paper["loss"] == pytest.approx(expected, rel=1e-5)
    assert last["cls"] + last["patch"] == pytest.approx(last["ibot"], rel=1e-6)
    assert 0 < last["masked"] < 1  # some global views were masked, not all patches


@pytest.mark.parametrize("name", TRAINERS)
def test_resume_gives_the_uninterrupted_next_step(
    examples: Any, name: str, image_folder: Path, tmp_path: Path
) -> None:
    # 8 images, batch 4: 2 steps an epoch. Stop mid-epoch 1 (after step 3) and resume; the
    # DataLoader uses a worker, so augmentation seeding must not depend on the process.
    module, workers = getattr(examples, name), ("--workers", "1")
    _train(module, image_folder, tmp_path / "straight", "--max-steps", "4", *workers)
    _train(module, image_folder, tmp_path / "stopped", "--max-steps", "3", *workers)
    _train(module, image_folder, tmp_path / "stopped", "--max-steps", "4", "--resume", *workers)
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "stopped")
    assert [int(r["step"]) for r in resumed] == [1, 2, 3, 4]
    skip = {"step", "epoch", "seconds", "data_seconds"}  # timings, not values
    assert set(straight[3]) - skip >= {"lr", "momentum", "loss", "spatial", "channel"}
    for term in set(straight[3]) - skip:
        assert float(resumed[3][term]) == pytest.approx(float(straight[3][term]), rel=1e-6), term
    # And the run did move: step 4 differs from step 3.
    assert float(straight[3]["loss"]) != float(straight[2]["loss"])


def test_resume_refuses_another_layout(examples: Any, image_folder: Path, tmp_path: Path) -> None:
    _train(examples.dino_sere, image_folder, tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="saved by 1 process"):
        _train(examples.dino_sere, image_folder, tmp_path, "--resume", "--batch-size", "2")
    # A plain DINO checkpoint has no SERE state, and a DINO + SERE one has SERE state that a
    # plain run (and its optimizer) cannot take.
    _train(examples.dino_sere, image_folder, tmp_path / "b", "--no-sere", "--max-steps", "1")
    with pytest.raises(SystemExit, match=r"holds the state of .*this run has .*'sere'"):
        _train(examples.dino_sere, image_folder, tmp_path / "b", "--resume")
    with pytest.raises(SystemExit, match=r"another setup"):
        _train(examples.dino_sere, image_folder, tmp_path, "--resume", "--no-sere")


def test_lightly_example_trains(tmp_path: Path) -> None:
    pytest.importorskip("lightly", reason="the lightly example needs lightly")
    cmd = [sys.executable, str(EXAMPLES / "lightly_dino_sere.py"), "--max-steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    losses = [float(x) for x in re.findall(r"loss (\S+)", out.stdout)]
    assert len(losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in losses)


@pytest.mark.parametrize(
    "name",
    [
        "dino_sere.py",
        "ibot_sere.py",
        "mocov3_sere.py",
        "lightly_dino_sere.py",
        "lightning_dino_sere.py",
        "hf_dinov2_sere.py",
        "hf_dinov3_sere.py",
    ],
)
def test_sere_lines_are_the_whole_difference(name: str) -> None:
    """SERE is the lines marked '# SERE' in each example, as many as the README says."""
    source = (EXAMPLES / name).read_text()
    lines = source.splitlines()
    # The module docstring is prose about SERE: left out by its place in the file (its text,
    # once escapes such as a backslash are read, is not the source's).
    first = ast.parse(source).body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        del lines[first.lineno - 1 : first.end_lineno]
    code = lines
    marked = [line for line in code if "# SERE" in line]
    unmarked = [line for line in code if "# SERE" not in line]
    assert not [line for line in unmarked if re.search(r"\bsere\b|sere_loss", line)]
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert f"{len(marked)} lines marked `# SERE` in `examples/{name}`" in readme
