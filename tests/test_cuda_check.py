"""``benchmarks/cuda_check.py --dry-run``: every CUDA check, shrunk, runs end to end on a CPU.

The GPU session that runs the real thing has minutes, not hours; this dry run makes sure the
script itself works before then. It also stands in for a command-line run of each trainer on
synthetic data (the trainer checks start them as a user would).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [  # in the order they run: what the GPU-cost issue needs first
    "dino_step",
    "sere_profile",
    "compiled_accuracy",
    "cuda_tests",
    "triton",
    "dino_sere_fp32",
    "ibot_sere_fp32",
    "mocov3_sere_fp32",
    "torchrun_gloo",
    "run_py",
]


@pytest.mark.distributed  # one of its checks is a torchrun launch
def test_dry_run_passes_every_check(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cuda_check.py"), "--dry-run"]
    out = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    record = json.loads((tmp_path / "cuda-check-dry-run.json").read_text())
    checks = {c["name"]: c for c in record["checks"]}
    failed = {n: c["output_tail"][-1500:] for n, c in checks.items() if c["status"] != "passed"}
    assert not failed, f"{out.stdout[-2000:]}\n{failed}"
    assert out.returncode == 0, out.stdout[-2000:]
    assert list(checks) == EXPECTED
    assert record["dry_run"] is True
    assert record["machine"]["commit"]
    assert "torch" in record["machine"]["versions"]
    for trainer in ("dino_sere", "ibot_sere", "mocov3_sere"):
        details = checks[f"{trainer}_fp32"]["details"]
        assert details["step"] == 1
        assert details["spatial"] > 0
        assert details["channel"] > 0
        assert "1 process(es) on cpu fp32" in checks[f"{trainer}_fp32"]["output_tail"]
    assert checks["torchrun_gloo"]["details"]["process_group"] is True
    triton = checks["triton"]["details"]
    assert triton.get("skipped") or len(triton["cases"]) == 6  # 2 cases x fp32, bf16, fp16
    page = (tmp_path / "cuda-check-dry-run.md").read_text()
    assert "| `dino_step` | passed |" in page
    profile = checks["sere_profile"]["details"]
    assert profile["wall_ms"] > 0
    assert profile["top_host"]
    assert isinstance(profile["backends"]["auto"], float)
    assert isinstance(profile["backends"]["triton"], str)  # cannot run on a CPU: reported
    assert profile["compiled"]["wall_ms"] > 0
    step = checks["dino_step"]["details"]
    assert step["compiled"]["compile_seconds"] > 0
    assert 0 < step["compiled"]["share"]["median"] < 1
    accuracy = checks["compiled_accuracy"]["details"]
    assert len(accuracy["rows"]) > 10
    assert all(row["ok"] for row in accuracy["rows"])
    assert "whole SERE loss" in checks["run_py"]["note"]
