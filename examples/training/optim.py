"""Schedules and the optimisation step.

:func:`cosine_schedule` and :func:`warmup_schedule` give one value per iteration;
:func:`param_groups` decides what weight decay applies to; :func:`optimizer_step` refuses
non-finite gradients before the update; :func:`ema_update` moves a momentum teacher;
:func:`clip_gradients` and :func:`cancel_last_layer_gradients` are DINO's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.0,
) -> list[float]:
    """One value per iteration: linear warm-up from ``warmup_start``, then cosine to ``final``."""
    total = epochs * steps_per_epoch
    warmup = min(int(warmup_epochs * steps_per_epoch), total)
    values = [warmup_start + (base - warmup_start) * i / warmup for i in range(warmup)]
    rest = total - warmup
    values += [
        final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)
    ]
    return values


def warmup_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> list[float]:
    """One value per iteration: linear from ``start`` to ``end``, then ``end``.

    DINO's and iBOT's teacher temperatures warm up this way over ``warmup_steps``.
    """
    warm = min(warmup_steps, total_steps)
    return [start + (end - start) * i / warm for i in range(warm)] + [end] * (total_steps - warm)


def param_groups(
    modules: Iterable[nn.Module], *, decay_biases: bool = False, decay_all: bool = False
) -> list[dict[str, Any]]:
    """AdamW groups: the decayed parameters, then the others (weight decay 0).

    Weight matrices (every tensor of 2 or more dimensions: position embeddings, tokens...) are
    decayed; norm scales and other vectors are not; biases are decayed with ``decay_biases``
    (the authors' SERE code) and not otherwise (DINO's and iBOT's own rule). ``decay_all``
    decays every parameter (MoCo v3). Each group also lists its parameters' ``names``, for
    error messages.
    """
    decay: dict[str, list[Any]] = {"params": [], "names": []}
    no_decay: dict[str, list[Any]] = {"params": [], "names": []}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            is_bias = name.endswith(".bias")
            decayed = decay_all or param.ndim >= 2 or (is_bias and decay_biases)
            group = decay if decayed else no_decay
            group["params"].append(param)
            group["names"].append(f"{type(module).__name__}[{index}].{name}")
    return [decay, {**no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` over parameters; buffers are left alone."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients(params: Iterable[Tensor], max_norm: float) -> None:
    """DINO's and iBOT's clipping: each parameter's gradient norm to at most ``max_norm``.

    Per parameter, not over all of them at once (``clip_grad_norm_``): that is the recipe whose
    numbers the paper reports.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _clip(grads, torch._foreach_norm(grads), max_norm)


def _clip(grads: list[Tensor], norms: Sequence[Tensor], max_norm: float) -> None:
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None) -> None:
    """Set this iteration's learning rate, and weight decay if given.

    The learning rate goes to every group, the weight decay to the first (the decayed group of
    :func:`param_groups`; the other keeps 0).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    if weight_decay is not None:
        optimizer.param_groups[0]["weight_decay"] = weight_decay


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    step: int,
    clip_grad: float = 0.0,
    freeze_last_layer: nn.Module | None = None,
) -> bool:
    """Backward, unscale, a check of the gradients, per-parameter clipping, step.

    Non-finite gradients (NaN or inf) never reach the weights. In fp16 the grad scaler skips
    such a step and lowers its scale, as it is meant to (returns ``False``). In fp32 and bf16
    they mean the run diverged: it stops before the update, naming the parameters, with no
    checkpoint written, so the last one still holds finite weights. With ``freeze_last_layer``,
    that module's last layer loses its gradients just before the update (DINO's and iBOT's first
    epoch). ``step`` (0-based) is for the message. Returns whether the weights were updated.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    named = [
        (name, p)
        for group in optimizer.param_groups
        for name, p in zip(_names(group), group["params"], strict=True)
        if p.grad is not None
    ]
    grads = [p.grad for _, p in named if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    finite = torch.isfinite(torch.stack(norms)) if grads else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        if scaler.is_enabled():
            scaler.step(optimizer)  # skipped by the scaler, which lowers its scale
            scaler.update()
            return False
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise SystemExit(
            f"step {step + 1}: non-finite gradients (NaN or inf) in {listed}. Stopped before the "
            "update, without saving: the last checkpoint holds finite weights. Resume from it "
            "(perhaps with a lower --lr or another --precision)"
        )
    if clip_grad > 0:
        _clip(grads, norms, clip_grad)
    if freeze_last_layer is not None:
        cancel_last_layer_gradients(freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()
    return True


def _names(group: dict[str, Any]) -> list[str]:
    names = group.get("names")
    if isinstance(names, list) and len(names) == len(group["params"]):
        return names
    return [f"parameter {i}" for i in range(len(group["params"]))]


def cancel_last_layer_gradients(module: nn.Module, name: str = "last_layer") -> None:
    """DINO's trick for the first epoch(s): drop the prototypes' gradients."""
    for pname, param in module.named_parameters():
        if name in pname:
            param.grad = None
