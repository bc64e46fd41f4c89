"""SERELoss inside DistributedDataParallel: two CPU processes over gloo.

One module-scoped launch runs ``_ddp_worker.py`` as two ranks (each its own interpreter). Each
rank trains the same tiny student (linear backbone + SERELoss) in DDP without
``find_unused_parameters`` on its own data, and also computes its local gradient with a
non-DDP copy of the same initial model. The ranks save what they saw; the tests here compare the
two ranks' files. A stall (a gradient DDP waits for and never gets) fails the run: the workers'
collectives time out after 30 s and the parent kills them after ``JOIN_TIMEOUT_S``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sere_loss import SERELoss

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD_SIZE = 2
JOIN_TIMEOUT_S = 120.0
GRACE_S = 10.0  # how long the other rank may still run once one has failed
SAME = {"rtol": 1e-6, "atol": 1e-7}  # one value seen by two ranks: equal up to rounding
MEAN = {"rtol": 1e-5, "atol": 1e-5}  # DDP's gradient vs the mean of the local gradients
MOMENTUM = 0.9  # the worker's TEACHER_MOMENTUM
DISJOINT_SCENARIOS = ["disjoint_rank0", "disjoint_both", "spatial_only_disjoint_both"]


@dataclass
class Launch:
    out: Path
    returncodes: list[int | None]
    timed_out: bool
    seconds: float

    def diagnostics(self) -> str:
        lines = [
            f"returncodes={self.returncodes} timed_out={self.timed_out} "
            f"after {self.seconds:.1f} s in {self.out}"
        ]
        for rank in range(WORLD_SIZE):
            for name in (f"error-rank{rank}.txt", f"log-rank{rank}.txt"):
                path = self.out / name
                if path.exists():
                    text = path.read_text(errors="replace")[-4000:]
                    lines.append(f"--- {name} ---\n{text}")
        return "\n".join(lines)

    def load(self, scenario: str) -> list[dict[str, Any]]:
        """Both ranks' results of ``scenario``; fails the test when one is missing."""
        paths = [self.out / f"{scenario}-rank{rank}.pt" for rank in range(WORLD_SIZE)]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            pytest.fail(f"no result for {missing}\n{self.diagnostics()}")
        return [torch.load(p, weights_only=True) for p in paths]


def _launch(out: Path) -> Launch:
    init_method = (out / "rendezvous").as_uri()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    procs = []
    start = time.monotonic()
    for rank in range(WORLD_SIZE):
        cmd = [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), init_method, str(out)]
        with (out / f"log-rank{rank}.txt").open("wb") as log:
            procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
            )
    timed_out = False
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now - start > JOIN_TIMEOUT_S:
                timed_out = True
                break
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_S:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    seconds = time.monotonic() - start
    return Launch(out, [p.returncode for p in procs], timed_out, seconds)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return _launch(tmp_path_factory.mktemp("ddp"))


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str, **tol: float) -> None:
    torch.testing.assert_close(a, b, **(tol or SAME), msg=lambda m: f"{what}: {m}")


def _trainable_names(alpha: float = 1.0, beta: float = 1.0) -> set[str]:
    """Names the worker's student should train: its backbone and every SERE student head."""
    sere = SERELoss(24, alpha=alpha, beta=beta, num_heads=6)
    heads = {f"sere.{n}" for n, p in sere.named_parameters() if p.requires_grad}
    return heads | {"backbone.weight", "backbone.bias"}


def _check_gradients(results: list[dict[str, Any]], names: set[str], *, distinct: bool) -> None:
    """DDP's first-step gradient: the same on both ranks, and the mean of the local ones."""
    ddp = [r["ddp_grads"][0] for r in results]
    local = [r["local_grads"] for r in results]
    for rank in range(WORLD_SIZE):
        for kind, grads in (("DDP", ddp[rank]), ("local", local[rank])):
            missing = sorted(names - set(grads))
            assert not missing, f"rank {rank}: no {kind} gradient for {missing}"
            assert set(grads) == names
    for name in sorted(names):
        for rank in range(WORLD_SIZE):
            assert torch.isfinite(ddp[rank][name]).all(), f"{name} rank {rank}"
            assert torch.isfinite(local[rank][name]).all(), f"{name} rank {rank} (local)"
        _assert_same(ddp[0][name], ddp[1][name], f"DDP gradient of {name} across ranks")
        mean = (local[0][name] + local[1][name]) / 2
        _assert_same(ddp[0][name], mean, f"DDP gradient of {name} vs local mean", **MEAN)
    if distinct:  # the ranks' data differ, so the mean above is of two different gradients
        assert not torch.allclose(local[0]["backbone.weight"], local[1]["backbone.weight"])
    # The DDP forward is the plain forward: each rank's loss is its local loss.
    for r in results:
        _assert_same(r["losses"][0], r["local_loss"], "first DDP loss vs local loss")


def _check_in_sync(results: list[dict[str, Any]], key: str) -> None:
    a, b = results[0][key], results[1][key]
    assert set(a) == set(b)
    for name in sorted(a):
        _assert_same(a[name], b[name], f"{key} parameter {name} across ranks")


def test_ddp_gradients_are_the_mean_of_local_gradients(run: Launch) -> None:
    results = run.load("train")
    names = _trainable_names()
    assert any("local_projection" in n for n in names)  # local heads are among the checked
    _check_gradients(results, names, distinct=True)
    for r in results:
        # Local views were passed: their heads got a real gradient, as did the backbone.
        for name in names:
            if "local_" in name or name == "backbone.weight":
                assert r["local_grads"][name].abs().sum() > 0, name
        assert r["local_terms"]["spatial"] > 0
        assert r["local_terms"]["channel"] > 0


def test_ddp_training_keeps_ranks_in_sync(run: Launch) -> None:
    results = run.load("train")
    _check_in_sync(results, "initial")
    _check_in_sync(results, "final")
    # The second step's gradients (after one SGD step) still agree across ranks.
    for name in sorted(results[0]["ddp_grads"][1]):
        _assert_same(
            results[0]["ddp_grads"][1][name],
            results[1]["ddp_grads"][1][name],
            f"second-step DDP gradient of {name} across ranks",
        )
    final, initial = results[0]["final"], results[0]["initial"]
    # backbone.bias is left out: the heads' BatchNorm removes a per-channel shift of the tokens,
    # so its gradient is rounding noise (about 1e-9).
    for name in _trainable_names() - {"backbone.bias"}:
        assert not torch.allclose(final[name], initial[name]), f"{name} did not train"
    for name in final:
        if name.startswith("teacher") or "teacher_projection" in name:
            assert torch.equal(final[name], initial[name]), f"frozen {name} moved"


def test_ddp_loss_is_finite_and_decreases(run: Launch) -> None:
    results = run.load("train")
    losses = torch.stack([r["losses"] for r in results])  # (ranks, steps)
    assert losses.shape == (WORLD_SIZE, 20)
    assert torch.isfinite(losses).all()
    # The fixed teacher makes this a plain minimisation of the ranks' mean loss; with lr 0.1 it
    # falls by about 0.02 over 20 steps, far above float32 noise.
    mean = losses.mean(dim=0)
    assert mean[-1] < mean[0] - 5e-3, mean.tolist()
    assert (mean[1:] < mean[:-1]).sum() >= 15, mean.tolist()


def test_compiled_sere_under_ddp_trains_as_eager(run: Launch) -> None:
    # SERELoss.compile() inside a DDP-wrapped student: the same losses and gradients, step by
    # step, as the eager run from the same start, and the ranks stay in sync.
    eager, compiled = run.load("train"), run.load("train_compiled")
    names = _trainable_names()
    for rank in range(WORLD_SIZE):
        _assert_same(compiled[rank]["losses"], eager[rank]["losses"][:3], "compiled losses", **MEAN)
        for step in range(2):
            grads = compiled[rank]["ddp_grads"][step]
            assert set(grads) == names
            for name in sorted(names):
                _assert_same(
                    grads[name], eager[rank]["ddp_grads"][step][name], f"{name} step {step}", **MEAN
                )
    _check_in_sync(compiled, "final")


def test_update_teacher_after_ddp_steps(run: Launch) -> None:
    # The worker calls sere_loss.update_teacher(ddp, m) on the DDP wrapper of a student that
    # nests the SERELoss: the free function finds the heads without `.module`.
    results = run.load("train")
    _check_in_sync(results, "after_teacher_update")
    final, after = results[0]["final"], results[0]["after_teacher_update"]
    teacher_names = [n for n in final if "teacher_projection" in n]
    assert teacher_names
    for name in teacher_names:
        student = final[name.replace("teacher_projection", "projection")]
        assert not torch.allclose(after[name], final[name]), f"{name} did not move"
        expected = MOMENTUM * final[name] + (1 - MOMENTUM) * student
        _assert_same(after[name], expected, f"EMA of {name}")
    for name in final:
        if name not in teacher_names:
            assert torch.equal(after[name], final[name]), f"update_teacher changed {name}"


def test_token_tap_under_ddp(run: Launch) -> None:
    # TokenTap on a DDP-wrapped multi-crop student (the worker's run_tap_scenario): the loss
    # is SERE's alone, so the backbone's gradient comes through the tapped tokens. DDP's
    # gradient is the mean of the ranks' local ones, and the blocks got a real gradient.
    results = run.load("tap")
    for r in results:
        _assert_same(r["loss"], r["local_loss"], "DDP loss vs local loss")
    names = set(results[0]["local_grads"])
    assert "s.backbone.blocks.1.mlp.0.weight" in names
    for rank, r in enumerate(results):
        assert set(r["ddp_grads"]) == names == set(r["local_grads"]), rank
    for name in sorted(names):
        ddp = [r["ddp_grads"][name] for r in results]
        _assert_same(ddp[0], ddp[1], f"DDP gradient of {name} across ranks")
        mean = (results[0]["local_grads"][name] + results[1]["local_grads"][name]) / 2
        _assert_same(ddp[0], mean, f"DDP gradient of {name} vs local mean", **MEAN)
    for rank in range(WORLD_SIZE):
        block = results[rank]["local_grads"]["s.backbone.blocks.1.mlp.0.weight"]
        assert block.abs().sum() > 0, rank
    local = [r["local_grads"]["s.backbone.blocks.1.mlp.0.weight"] for r in results]
    assert not torch.allclose(local[0], local[1])  # the ranks' data differ


@pytest.mark.parametrize("scenario", DISJOINT_SCENARIOS)
def test_ddp_no_overlapping_views_does_not_stall(run: Launch, scenario: str) -> None:
    results = run.load(scenario)  # present: the step finished on both ranks
    spatial_only = scenario.startswith("spatial_only")
    names = _trainable_names(beta=0.0) if spatial_only else _trainable_names()
    _check_gradients(results, names, distinct=not spatial_only)
    for rank, r in enumerate(results):
        disjoint = scenario != "disjoint_rank0" or rank == 0
        spatial = r["local_terms"]["spatial"]
        assert (spatial == 0) if disjoint else (spatial > 0), (rank, float(spatial))
        for terms in r["terms"]:
            assert all(math.isfinite(float(v)) for v in terms.values())
        assert torch.isfinite(r["losses"]).all()
        for name, grad in r["ddp_grads"][0].items():
            if "local_" in name:  # no local views: their heads are only touched with zero
                assert torch.count_nonzero(grad) == 0, name
    ddp = results[0]["ddp_grads"][0]
    if scenario != "disjoint_rank0":
        # Nothing overlaps anywhere: the spatial heads get exact zeros, through the graph.
        for name, grad in ddp.items():
            if name.startswith("sere.spatial."):
                assert torch.count_nonzero(grad) == 0, name
    if spatial_only:
        assert torch.count_nonzero(ddp["backbone.weight"]) == 0
    if scenario == "disjoint_rank0":
        # Rank 1's views overlap: the mean gradient of the spatial heads is not zero.
        assert ddp["sere.spatial.heads.projection.0.bn.weight"].abs().sum() > 0
    # A second step runs (DDP raises on it when the first left a reduction unfinished).
    for r in results:
        assert len(r["ddp_grads"]) == 2
    for name in sorted(names):
        _assert_same(
            results[0]["ddp_grads"][1][name],
            results[1]["ddp_grads"][1][name],
            f"second-step DDP gradient of {name} across ranks",
        )


def test_workers_exit_cleanly(run: Launch) -> None:
    assert not run.timed_out, run.diagnostics()
    assert run.returncodes == [0] * WORLD_SIZE, run.diagnostics()
    for rank in range(WORLD_SIZE):
        assert (run.out / f"done-rank{rank}").exists(), run.diagnostics()
        assert not (run.out / f"error-rank{rank}.txt").exists(), run.diagnostics()
