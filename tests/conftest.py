"""Shared test helpers: one tolerance table, seeded random geometry."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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
    """The example modules (``common``, ``dino_sere``, ``ibot_sere``, ``mocov3_sere``), imported
    as ``python examples/<name>.py`` sees them."""
    pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")
    sys.path.insert(0, str(EXAMPLES))
    try:
        names = ("common", "dino_sere", "ibot_sere", "mocov3_sere")
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
