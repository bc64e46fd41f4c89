"""A whole DINO ViT-S/16 training step with and without SERE, built from the example trainer.

The step is the example trainer's (``examples/dino_sere.py``) without its data loader: the
student's forward over all views, the teacher's over the globals, the DINO loss, SERE's terms
(or not), backward, gradient clipping, AdamW, and the EMA of the teacher and of SERE's teacher
heads, under the trainer's precision (bfloat16 autocast on CUDA). The views are random images
of the preset's sizes, with crop boxes that all overlap, on the device already, so the data
pipeline is not timed. Only CUDA gives the numbers the target is about; elsewhere the
measurement says "not measured".
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TARGET_OVERHEAD = 0.03  # SERE may add at most 3 % to the step


def _load_trainer() -> Any:
    """Import ``examples/dino_sere.py`` (and its ``common``) as modules."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("dino_sere")


def build_step(
    trainer: Any, preset_name: str, batch: int, with_sere: bool, device: torch.device
) -> Callable[[], None]:
    """One training step of the example trainer as a closure (seeded models and views).

    Args:
        trainer: the imported ``dino_sere`` module.
        preset_name: a key of ``trainer.PRESETS`` (``"vit_small"`` for the target).
        batch: images per step.
        with_sere: add SERE's loss (DINO alone otherwise).
        device: where to run.

    Returns:
        A function running one step.
    """
    common = importlib.import_module("common")
    from sere_loss import SERELoss

    preset = trainer.PRESETS[preset_name]
    precision = common.resolve_precision("auto", device)
    torch.manual_seed(0)

    def model(drop_path: float) -> nn.Module:
        backbone = common.build_vit(preset, drop_path)
        head = trainer.DINOHead(
            backbone.embed_dim, preset.out_dim, preset.head_hidden, preset.head_bottleneck
        )
        return trainer.MultiCropModel(backbone, head).to(device)  # type: ignore[no-any-return]

    student, teacher = model(preset.drop_path), model(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    num_views = 2 + preset.num_local
    dino_loss = trainer.DINOLoss(preset.out_dim, num_views).to(device)
    sere = None
    if with_sere:
        dim = student.backbone.embed_dim
        sere = SERELoss(dim).to(device)  # lattices from the token grids
    trained = [student] if sere is None else [student, sere]
    params = common.param_groups(trained)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    flat = [p for group in params for p in group["params"]]

    gen = torch.Generator().manual_seed(1)
    sizes = [preset.global_px] * 2 + [preset.local_px] * preset.num_local
    views = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes]
    lo = 0.3 * torch.rand(batch, num_views, 2, generator=gen)
    hi = 0.7 + 0.3 * torch.rand(batch, num_views, 2, generator=gen)
    boxes = torch.cat([lo, hi], dim=-1).to(device)
    flips = (torch.rand(batch, num_views, generator=gen) < 0.5).to(device)
    student.train()
    teacher.train()

    def step() -> None:
        with common.autocast(device, precision):
            s_logits, s_tokens = student(views)
            with torch.no_grad():
                t_logits, t_tokens = teacher(views[:2])
            loss = dino_loss(s_logits, t_logits, 0.04)
            if sere is not None:
                s_local = s_tokens[1] if len(s_tokens) > 1 else None
                loss = loss + sere(s_tokens[0], t_tokens[0], boxes, flips, s_local)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        common.clip_gradients(flat, 3.0)  # per parameter, as the trainer
        optimizer.step()
        common.ema_update(teacher, student, 0.996)
        if sere is not None:
            sere.update_teacher(0.996)

    return step


def measure_dino_step(
    device: torch.device,
    batch: int = 64,
    preset: str = "vit_small",
    min_run_time: float = 5.0,
    require_cuda: bool = True,
) -> dict[str, Any]:
    """Time the trainer's step with and without SERE; the overhead against the 3 % target.

    Args:
        device: where to run.
        batch: images per step (64 for the target).
        preset: the trainer's preset (``vit_small`` = DINO ViT-S/16, 2 x 224 + 4 x 96).
        min_run_time: seconds of timing per variant and round.
        require_cuda: report "not measured" off CUDA (the target is a CUDA number).

    Returns:
        ``status`` ("measured" or "not measured: <why>") and, when measured, the medians, IQRs
        and the overhead of SERE.
    """
    base: dict[str, Any] = {"batch": batch, "preset": preset, "target_overhead": TARGET_OVERHEAD}
    if require_cuda and device.type != "cuda":
        return {**base, "status": "not measured: needs CUDA"}
    try:
        trainer = _load_trainer()
    except Exception as exc:  # the example and its optional dependencies (timm, tqdm)
        return {**base, "status": f"not measured: cannot import examples/dino_sere.py ({exc!r})"}
    timers = {}
    for name, with_sere in (("dino", False), ("dino_sere", True)):
        step = build_step(trainer, preset, batch, with_sere, device)
        step()  # warm-up: allocations, cuDNN/cuBLAS choices
        timers[name] = benchmark.Timer(
            stmt="step()", globals={"step": step}, label="dino_step", description=name
        )
    # Alternate the two variants so that drifts of the machine reach both alike.
    runs: dict[str, list[benchmark.Measurement]] = {name: [] for name in timers}
    for _ in range(3):
        for name, timer in timers.items():
            runs[name].append(timer.blocked_autorange(min_run_time=min_run_time / 3))
    result = {**base, "status": "measured", "precision": "autocast (trainer's auto)"}
    for name, measurements in runs.items():
        merged = benchmark.Measurement.merge(measurements)[0]
        result[name] = {"median_s": merged.median, "iqr_s": merged.iqr, "n": len(merged.times)}
    overhead = result["dino_sere"]["median_s"] / result["dino"]["median_s"] - 1.0
    result["overhead"] = overhead
    result["met"] = bool(overhead <= TARGET_OVERHEAD) if math.isfinite(overhead) else False
    return result
