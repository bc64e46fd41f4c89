"""Shared test helpers: one tolerance table, seeded random geometry."""

from __future__ import annotations

import csv
import importlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The modules of examples/training/, the trainers' shared package.
TRAINING_MODULES = (
    "checkpoints", "data", "distributed", "faults", "optim", "options", "rundir", "runs",
)  # fmt: skip

# One tolerance table (kornia's habit): absolute and relative tolerance per dtype.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.bfloat16: {"atol": 7.8e-3, "rtol": 7.8e-3},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **override: float) -> None:
    tol = dict(TOLERANCES[actual.dtype])
    tol.update(override)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def random_boxes(
    batch: int,
    views: int = 1,
    *,
    min_size: float = 0.2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Random crop boxes ``(batch, views, 4)`` inside the unit square, sides >= ``min_size``."""
    size = min_size + (1 - min_size) * torch.rand(batch, views, 2, generator=generator, dtype=dtype)
    start = (1 - size) * torch.rand(batch, views, 2, generator=generator, dtype=dtype)
    return torch.cat([start, start + size], dim=-1).clamp(0, 1)


def random_flips(
    batch: int, views: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.rand(batch, views, generator=generator) < 0.5


@pytest.fixture(scope="session")
def examples() -> Iterator[SimpleNamespace]:
    """The trainers (``dino_sere``, ``ibot_sere``, ``mocov3_sere``) and the modules of the
    ``training`` package they share (``runs``, ``checkpoints``, ``data``...), imported as
    ``python examples/<name>.py`` sees them."""
    pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")
    sys.path.insert(0, str(EXAMPLES))
    try:
        trainers = ("dino_sere", "ibot_sere", "mocov3_sere")
        modules = {name: importlib.import_module(name) for name in trainers}
        for name in TRAINING_MODULES:
            modules[name] = importlib.import_module(f"training.{name}")
        yield SimpleNamespace(**modules)
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """A trainer run in the test process catches SIGTERM and SIGINT; put pytest's back after."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
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


def train_tiny(module: Any, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run a trainer's ``main`` in this process: tiny preset, batch 4, no workers, no bar.

    The start-up check opens one image (``--check-images 1``) unless ``extra`` says otherwise.
    """
    argv = ["--data", str(data), "--preset", "tiny", "--batch-size", "4", "--workers", "0"]
    argv += ["--check-images", "1"]
    result: dict[str, Any] = module.main([*argv, "--no-progress", "--output-dir", str(out), *extra])
    return result


def log_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's ``log.csv``."""
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))
