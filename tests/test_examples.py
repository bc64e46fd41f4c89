"""The examples run as they are, as a user would start them."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("extra", [[], ["--no-sere"]], ids=["sere", "baseline"])
def test_minimal_dino_sere_trains(extra: list[str]) -> None:
    cmd = [sys.executable, str(EXAMPLES / "minimal_dino_sere.py"), "--steps", "2"]
    cmd += ["--batch-size", "4", "--local-crops", "2", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    for line in lines:
        values = dict(re.findall(r"(\w+) (-?[\d.]+|nan|inf)", line))
        names = {"loss", "dino"} if extra else {"loss", "dino", "spatial", "channel"}
        assert names <= values.keys(), line
        assert all(math.isfinite(float(values[k])) for k in names), line
