"""The optimisation step and its pieces (``training/optim.py``), against their definitions.

Gradients are checked before the update; clipping, schedules and the teacher's EMA are checked
by value against the formulas their methods publish.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from _trainer_runs import all_finite, checkpoint, steps
from conftest import train_tiny

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


def test_an_inf_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(
    examples: Any, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finite loss with an inf gradient at step 4, the end of epoch 2: the update and the
    # checkpoint right after it are where NaN weights used to slip through.
    unscale, calls = torch.amp.GradScaler.unscale_, []

    def corrupting_unscale(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        unscale(self, optimizer)
        calls.append(1)
        if len(calls) == 4:
            optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", corrupting_unscale)
    with pytest.raises(
        SystemExit,
        match=r"step 4: non-finite gradients \(NaN or inf\) in MultiCropModel\[0\]\.backbone\.",
    ):
        train_tiny(examples.dino_sere, image_folder, tmp_path, "--max-steps", "4")
    saved = checkpoint(tmp_path)
    assert saved["step"] == 2
    assert all_finite(saved)
    assert steps(tmp_path) == [1, 2, 3]  # a resume goes on from step 2 (the kill tests)


def test_fp16_skips_an_inf_step_as_the_grad_scaler_means_to(examples: Any) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)  # a group without names
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = (weight * torch.tensor([1.0, float("inf"), 1.0])).sum()
    assert not examples.optim.optimizer_step(loss, optimizer, scaler, step=0)  # skipped, no error
    assert torch.equal(weight.detach(), torch.ones(3))
    assert scaler.get_scale() == 2.0  # the scaler backed off
    # The same gradient without a scaler (fp32, bf16) stops the run.
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    loss = (weight * torch.tensor([1.0, float("inf"), 1.0])).sum()
    with pytest.raises(SystemExit, match=r"step 1: non-finite gradients .* in parameter 0"):
        examples.optim.optimizer_step(loss, optimizer, disabled, step=0)


def test_gradient_clipping_is_per_parameter(examples: Any) -> None:
    """DINO clips each parameter's gradient norm on its own, not the global norm."""
    big, small = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    examples.optim.clip_gradients([big, small], 1.0)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(small.grad, torch.tensor([0.1, 0.0]))  # under the bound: kept


def test_schedules_follow_the_published_formulas(examples: Any) -> None:
    """MoCo v3's lr and momentum, per iteration at fractional epochs, as its paper states them."""
    epochs, per_epoch, warmup, base, m0 = 5, 4, 2, 0.3, 0.99
    lr = examples.optim.cosine_schedule(base, 0.0, epochs, per_epoch, warmup)
    momentum = examples.optim.cosine_schedule(m0, 1.0, epochs, per_epoch)
    for i in range(epochs * per_epoch):
        e = i / per_epoch
        if e < warmup:
            expected = base * e / warmup
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        assert lr[i] == pytest.approx(expected, abs=1e-12), i
        assert momentum[i] == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * e / epochs)) * 0.01)
    warm = examples.optim.warmup_schedule(0.04, 0.07, 3, 5)
    assert warm == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07])


# The teacher's EMA, by value ------------------------------------------------------------------


def test_ema_update_moves_the_teacher_by_one_minus_m(examples: Any) -> None:
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(0.0)
        student.running_mean.fill_(5.0)
    examples.optim.ema_update(teacher, student, 0.9)
    # teacher = m * teacher + (1 - m) * student: 0.9 * 1 + 0.1 * 0.
    torch.testing.assert_close(teacher.weight.detach(), torch.full((3,), 0.9))
    assert torch.equal(teacher.running_mean, torch.zeros(3))  # buffers are not averaged


@pytest.mark.parametrize(("name", "m0"), [("dino_sere", 0.996), ("ibot_sere", 0.996),
                                          ("mocov3_sere", 0.99)])  # fmt: skip
def test_each_trainer_moves_its_teacher_by_one_minus_m(
    examples: Any, image_folder: Path, tmp_path: Path, name: str, m0: float
) -> None:
    # Steps 1 and 2 kept; a larger lr, no warm-up, so that the student moves visibly.
    extra = ["--max-steps", "2", "--save-every", "1", "--keep-checkpoints"]
    train_tiny(getattr(examples, name), image_folder, tmp_path, *extra, "--lr", "0.05",
               "--warmup-epochs", "0")  # fmt: skip
    first, second = (checkpoint(tmp_path, f"checkpoint-000000{k}.pth") for k in (1, 2))
    # MoCo v3's momentum cosine, per iteration, at step 2 of 4 (tiny: 2 epochs of 2 steps).
    m = 1 - (1 - m0) * 0.5 * (1 + math.cos(math.pi * 1 / 4))
    if name == "mocov3_sere":  # MoCo v3 moves its teacher before the step, by the last student
        student = {k.removeprefix("encoder."): v for k, v in first["student"].items()
                   if k.startswith("encoder.")}  # fmt: skip
    else:  # DINO and iBOT after the step, by the student it gave
        student = second["student"]
    moved = 0
    for key, before in first["teacher"].items():
        if "running_" in key or "num_batches" in key:
            continue  # BatchNorm buffers are the teacher's own
        expected = m * before.double() + (1 - m) * student[key].double()
        torch.testing.assert_close(second["teacher"][key].double(), expected, rtol=1e-6,
                                   atol=1e-6, msg=key)  # fmt: skip
        moved += int(not torch.allclose(before, student[key], rtol=0, atol=1e-5))
    assert moved > 10  # the test can tell m from 1 - m on many tensors
