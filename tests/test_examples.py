"""The example trainers run as a user would start them, and resume exactly."""

from __future__ import annotations

import ast
import csv
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TERMS = ("loss", "dino", "spatial", "channel")


@pytest.fixture(scope="module")
def dino_sere() -> Iterator[Any]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import dino_sere

        yield dino_sere
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small RGB images of mixed sizes in two classes, as ImageFolder wants them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for i in range(8):
        h, w = (48, 72) if i % 2 else (80, 60)
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels.numpy()).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def _train(module: Any, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["--data", str(data), "--preset", "tiny", "--batch-size", "4", "--workers", "0"]
    result: dict[str, Any] = module.main([*argv, "--no-progress", "--output-dir", str(out), *extra])
    return result


def test_trains_two_steps_on_an_image_folder(
    dino_sere: Any, image_folder: Path, tmp_path: Path
) -> None:
    last = _train(dino_sere, image_folder, tmp_path, "--max-steps", "2")
    assert last["step"] == 2
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        for term in TERMS:
            assert math.isfinite(float(row[term])), (term, row)
    # The total is DINO plus alpha = beta = 1 times each SERE term.
    total = sum(float(rows[-1][t]) for t in ("dino", "spatial", "channel"))
    assert float(rows[-1]["loss"]) == pytest.approx(total, rel=1e-4)
    assert (tmp_path / "checkpoint.pth").is_file()


def test_no_sere_is_plain_dino(dino_sere: Any, image_folder: Path, tmp_path: Path) -> None:
    last = _train(dino_sere, image_folder, tmp_path, "--max-steps", "2", "--no-sere")
    assert "spatial" not in last
    assert "channel" not in last
    assert last["loss"] == pytest.approx(last["dino"])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert "sere" not in state


def test_resume_gives_the_uninterrupted_next_step(
    dino_sere: Any, image_folder: Path, tmp_path: Path
) -> None:
    # 8 images, batch 4: 2 steps an epoch. Stop mid-epoch 1 (after step 3) and resume; the
    # DataLoader uses a worker, so augmentation seeding must not depend on the process.
    common = ("--workers", "1")
    _train(dino_sere, image_folder, tmp_path / "straight", "--max-steps", "4", *common)
    _train(dino_sere, image_folder, tmp_path / "stopped", "--max-steps", "3", *common)
    _train(dino_sere, image_folder, tmp_path / "stopped", "--max-steps", "4", "--resume", *common)
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "stopped")
    assert [int(r["step"]) for r in resumed] == [1, 2, 3, 4]
    for term in ("lr", "wd", "momentum", "teacher_temp", *TERMS):
        assert float(resumed[3][term]) == pytest.approx(float(straight[3][term]), rel=1e-6), term
    # And the run did move: step 4 differs from step 3.
    assert float(straight[3]["loss"]) != float(straight[2]["loss"])


def test_command_line_runs_on_synthetic_data(tmp_path: Path) -> None:
    cmd = [sys.executable, str(EXAMPLES / "dino_sere.py"), "--preset", "tiny", "--max-steps", "1"]
    cmd += ["--batch-size", "4", "--output-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "done:" in out.stdout
    assert len(_rows(tmp_path)) == 1


def test_sere_lines_are_the_whole_difference() -> None:
    """SERE is the lines marked '# SERE' in the trainer, as many as the README says."""
    source = (EXAMPLES / "dino_sere.py").read_text()
    docstring = ast.get_docstring(ast.parse(source), clean=False) or ""
    code = source.replace(docstring, "", 1).splitlines()
    marked = [line for line in code if "# SERE" in line]
    unmarked = [line for line in code if "# SERE" not in line]
    assert not [line for line in unmarked if re.search(r"\bsere\b|sere_loss", line)]
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert f"{len(marked)} lines marked `# SERE`" in readme


def test_gradient_clipping_is_per_parameter() -> None:
    """DINO clips each parameter's gradient norm on its own, not the global norm."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import common
    finally:
        sys.path.remove(str(EXAMPLES))
    big, small = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    common.clip_gradients([big, small], 1.0)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(small.grad, torch.tensor([0.1, 0.0]))  # under the bound: kept
