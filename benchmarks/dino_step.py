"""SERE's share of a whole DINO ViT-S/16 training step, on the CPU or on CUDA.

    python benchmarks/dino_step.py                          # CPU, batch 8, 7 rounds
    python benchmarks/dino_step.py --device cuda --batch 64
    python benchmarks/dino_step.py --preset tiny --batch 4 --rounds 2 --out /tmp/step.json

The step is the example trainer's (``examples/dino_sere.py``) without its data loader: the
student's forward over all views (2 x 224 + 4 x 96 px), the teacher's over the globals, the
DINO loss (65,536 prototypes), SERE's terms (or not), backward, gradient clipping, AdamW, and
the EMA of the teacher and of SERE's teacher heads, under the trainer's precision (float32 on
the CPU, bfloat16 autocast on CUDA). The views are random images of the preset's sizes, with
crop boxes that all overlap, already on the device.

Each round times, in an order that rotates from round to round: the step without SERE, the
step with SERE, and SERE alone (its forward and backward on the step's tokens, under the same
precision); with ``--compiled``, also the step with a compiled SERE (``SERELoss.compile()``:
one graph, replayed as a CUDA graph on CUDA) and that SERE alone, in the same rounds. Per
round: ``share = SERE alone / step with SERE`` (the target: at most 3 %) and
``overhead = step with SERE / step without - 1``; the record gives their medians, IQRs and an
order-statistic interval for the median, and the seconds the first compiled step took
(compiling included).

``measure_dino_step(device, batch=..., preset=..., rounds=...)`` returns that record as a dict
(``status`` is ``"measured"``, or ``"not measured: <why>"``); the command line writes it as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import record
import stats
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TARGET_SHARE = 0.03  # SERE may take at most 3 % of the step


def _load_trainer() -> Any:
    """Import ``examples/dino_sere.py`` (and the ``training`` package it uses) as modules."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("dino_sere")


def build_steps(
    trainer: Any,
    preset_name: str,
    batch: int,
    device: torch.device,
    sere_options: dict[str, Any] | None = None,
    geometry_device: torch.device | None = None,
    compiled: bool = False,
    compile_options: dict[str, Any] | None = None,
) -> dict[str, Callable[[], None]]:
    """The timed closures: ``dino``, ``dino_sere`` and ``sere_alone`` (and the compiled pair).

    Both steps are built from the same seed (same weights, same views); ``sere_alone`` runs
    SERE's forward and backward on tokens taken from one forward of the SERE model.

    Args:
        trainer: the imported ``dino_sere`` module.
        preset_name: a key of ``trainer.PRESETS`` (``"vit_small"`` for the target).
        batch: images per step.
        device: where to run.
        sere_options: more keyword arguments for ``SERELoss`` (``backend="triton"``, say), for
            profiles that compare its settings.
        geometry_device: where the crop boxes and flips live (default: the CPU, as the
            trainers pass them).
        compiled: also build ``dino_sere_compiled`` and ``sere_alone_compiled``, the same step
            and SERE alone with ``SERELoss.compile()`` (a model and SERE of their own, from the
            same seed).
        compile_options: arguments of ``SERELoss.compile`` (``backend="aot_eager"`` for a quick
            run on the CPU).

    Returns:
        ``{"dino": ..., "dino_sere": ..., "sere_alone": ...}`` (and the compiled pair), each
        running once.
    """
    options = importlib.import_module("training.options")
    optim = importlib.import_module("training.optim")
    from sere_loss import SERELoss

    preset = trainer.PRESETS[preset_name]
    precision = options.resolve_precision("auto", device)
    num_views = 2 + preset.num_local
    gen = torch.Generator().manual_seed(1)
    sizes = [preset.global_px] * 2 + [preset.local_px] * preset.num_local
    views = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes]
    lo = 0.3 * torch.rand(batch, num_views, 2, generator=gen)
    hi = 0.7 + 0.3 * torch.rand(batch, num_views, 2, generator=gen)
    # The crop geometry stays where the loader gives it, on the CPU, as the trainers pass it.
    boxes = torch.cat([lo, hi], dim=-1).to(geometry_device or "cpu")
    flips = (torch.rand(batch, num_views, generator=gen) < 0.5).to(boxes.device)

    def build(
        with_sere: bool, compile_sere: bool = False
    ) -> tuple[Callable[[], None], Any, Any, Any]:
        torch.manual_seed(0)

        def model(drop_path: float) -> nn.Module:
            backbone = options.build_vit(preset, drop_path)
            head = trainer.DINOHead(
                backbone.embed_dim, preset.out_dim, preset.head_hidden, preset.head_bottleneck
            )
            return trainer.MultiCropModel(backbone, head).to(device)  # type: ignore[no-any-return]

        student, teacher = model(preset.drop_path), model(0.0)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        dino_loss = trainer.DINOLoss(preset.out_dim, num_views).to(device)
        sere = None
        if with_sere:
            vit = student.backbone
            heads = vit.blocks[0].attn.num_heads  # the ViT's own, as the trainer passes
            # The lattices follow from the token grids.
            sere = SERELoss(vit.embed_dim, num_heads=heads, **(sere_options or {})).to(device)
            if compile_sere:
                sere.compile(**(compile_options or {}))
        trained = [student] if sere is None else [student, sere]
        params = optim.param_groups(trained)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        flat = [p for group in params for p in group["params"]]
        student.train()
        teacher.train()

        def step() -> None:
            with options.autocast(device, precision):
                s_logits, s_tokens = student(views)
                with torch.no_grad():
                    t_logits, t_tokens = teacher(views[:2])
                loss = dino_loss(s_logits, t_logits, 0.04)
                if sere is not None:
                    s_local = s_tokens[1] if len(s_tokens) > 1 else None
                    loss = loss + sere(s_tokens[0], t_tokens[0], boxes, flips, s_local)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optim.clip_gradients(flat, 3.0)  # per parameter, as the trainer
            optimizer.step()
            optim.ema_update(teacher, student, 0.996)
            if sere is not None:
                sere.update_teacher(0.996)

        return step, student, teacher, sere

    def alone(student: Any, teacher: Any, sere: Any) -> Callable[[], None]:
        with torch.no_grad(), options.autocast(device, precision):
            _, s_tokens = student(views)
            _, t_tokens = teacher(views[:2])
        tokens = [t.detach() for t in (s_tokens[0], t_tokens[0], s_tokens[1])]

        def sere_alone() -> None:
            student_global = tokens[0].detach().requires_grad_()  # a new leaf, no copy
            student_local = tokens[2].detach().requires_grad_()
            with options.autocast(device, precision):
                loss = sere(student_global, tokens[1], boxes, flips, student_local)
            loss.backward()

        return sere_alone

    dino, _, _, _ = build(False)
    dino_sere, student, teacher, sere = build(True)
    steps = {"dino": dino, "dino_sere": dino_sere, "sere_alone": alone(student, teacher, sere)}
    if compiled:
        step, student, teacher, sere = build(True, compile_sere=True)
        steps |= {"dino_sere_compiled": step, "sere_alone_compiled": alone(student, teacher, sere)}
    return steps


def measure_dino_step(
    device: torch.device,
    batch: int = 8,
    preset: str = "vit_small",
    rounds: int = 7,
    compiled: bool = False,
    compile_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time the step without SERE, with SERE, and SERE alone, in interleaved rounds.

    Args:
        device: where to run (CPU or CUDA).
        batch: images per step (8 for the CPU target, 64 on CUDA).
        preset: the trainer's preset (``vit_small`` = DINO ViT-S/16, 2 x 224 + 4 x 96;
            ``tiny`` for a smoke run).
        rounds: timed rounds (7 or more for a claim; 2 for a smoke run).
        compiled: also time the step with a compiled SERE and that SERE alone.
        compile_options: arguments of ``SERELoss.compile`` for it.

    Returns:
        ``status`` ("measured" or "not measured: <why>") and, when measured, the per-step
        seconds of each variant, ``share`` and ``step_ratio`` (per-round summaries),
        ``overhead`` (the median step ratio minus one) and ``met`` (median share <= 3 %);
        with ``compiled``, ``compiled`` holds the same for the compiled SERE, with
        ``compile_seconds`` (the first compiled step, compiling included) and
        ``step_ms_vs_eager`` (compiled step / eager step).
    """
    base: dict[str, Any] = {
        "batch": batch,
        "preset": preset,
        "device": device.type,
        "rounds": rounds,
        "target_share": TARGET_SHARE,
        "threads": record.threads(),
    }
    try:
        trainer = _load_trainer()
        steps = build_steps(trainer, preset, batch, device, compiled=compiled,
                            compile_options=compile_options)  # fmt: skip
    except Exception as exc:  # the example and its optional dependencies (timm, tqdm)
        return {**base, "status": f"not measured: cannot build the trainer's step ({exc!r})"}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(steps)
    first_call: dict[str, float] = {}
    for name in names:  # warm-up, three times: compiling, allocations, the optimizer's state
        sync()
        tic = time.perf_counter()
        steps[name]()
        sync()
        first_call[name] = time.perf_counter() - tic
        steps[name]()
        steps[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    load_before = record.load()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            tic, tic_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - tic_cpu)
    share = stats.ratio_summary(times["sere_alone"], times["dino_sere"])
    step_ratio = stats.ratio_summary(times["dino_sere"], times["dino"])
    overhead = step_ratio["median"] - 1.0
    extra: dict[str, Any] = {}
    if compiled:
        c_share = stats.ratio_summary(times["sere_alone_compiled"], times["dino_sere_compiled"])
        c_ratio = stats.ratio_summary(times["dino_sere_compiled"], times["dino"])
        extra["compiled"] = {
            "share": c_share,
            "step_ratio": c_ratio,
            "overhead": c_ratio["median"] - 1.0,
            "step_ms_vs_eager": stats.ratio_summary(
                times["dino_sere_compiled"], times["dino_sere"]
            ),
            "compile_seconds": first_call["dino_sere_compiled"],
            "met": bool(c_share["median"] <= TARGET_SHARE)
            if math.isfinite(c_share["median"])
            else False,
        }
    return {
        **base,
        "status": "measured",
        "precision": "float32" if device.type == "cpu" else "autocast (the trainer's auto)",
        "load_average": {"before": load_before, "after": record.load()},
        **{name: stats.summary(times[name]) for name in names},
        "cpu_seconds": {name: stats.summary(cpu[name]) for name in names},
        "share": share,
        "step_ratio": step_ratio,
        "cpu_share": stats.ratio_summary(cpu["sere_alone"], cpu["dino_sere"]),
        "cpu_step_ratio": stats.ratio_summary(cpu["dino_sere"], cpu["dino"]),
        "overhead": overhead,
        "met": bool(share["median"] <= TARGET_SHARE) if math.isfinite(share["median"]) else False,
        "first_call_seconds": first_call,
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: measure and print (and write, with ``--out``) the record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="images per step (default: CPU 8, CUDA 64)")
    p.add_argument("--preset", default="vit_small", help="the trainer's preset (vit_small, tiny)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--compiled", action="store_true", help="also time SERE compiled (SERELoss.compile())"
    )
    p.add_argument("--out", type=Path, help="write the record here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    result = {
        **record.environment(device),
        **measure_dino_step(device, batch, args.preset, args.rounds, args.compiled),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = result["status"]
    if result["status"] == "measured":
        s, o = result["share"], result["step_ratio"]
        summary = (
            f"SERE alone: {100 * s['median']:.2f} % of the step (IQR {100 * s['q25']:.2f}-"
            f"{100 * s['q75']:.2f} %); step with SERE / without: {o['median']:.3f} "
            f"(IQR {o['q25']:.3f}-{o['q75']:.3f}); {result['dino_sere']['median']:.2f} s per step; "
            f"in process CPU time: share {100 * result['cpu_share']['median']:.2f} %, ratio "
            f"{result['cpu_step_ratio']['median']:.3f}"
        )
        if "compiled" in result:
            c = result["compiled"]
            summary += (
                f"\ncompiled SERE: {100 * c['share']['median']:.2f} % of the step (IQR "
                f"{100 * c['share']['q25']:.2f}-{100 * c['share']['q75']:.2f} %); step with it / "
                f"without: {c['step_ratio']['median']:.3f}; first step (compiling) "
                f"{c['compile_seconds']:.1f} s"
            )
    print(summary)
    return result


if __name__ == "__main__":
    main()
