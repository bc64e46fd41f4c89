"""One rank of the two-process gloo run behind ``test_distributed.py`` (not a test module).

Usage: ``python _ddp_worker.py RANK WORLD_SIZE INIT_METHOD OUT_DIR``.

Every scenario builds the same tiny student (a linear "backbone" on fixed random inputs, plus
:class:`sere_loss.SERELoss`), keeps a non-DDP copy of it to compute this rank's local gradient,
then trains the original inside ``DistributedDataParallel`` (no ``find_unused_parameters``).
What the parent test compares is written with ``torch.save`` to ``OUT_DIR/<scenario>-rank<R>.pt``
(through a temporary name and ``os.replace``, so a file is either complete or absent). A failure
writes its traceback to ``OUT_DIR/error-rank<R>.txt`` and exits with status 1; success writes
``OUT_DIR/done-rank<R>`` and exits with 0. The process always ends with ``os._exit``: with gloo
the interpreter's own shutdown sometimes aborts ("terminate called without an active
exception") after all the work is done.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import sere_loss
from sere_loss import SERELoss, TokenTap

DIM = 24  # channels C of the tokens
IN_DIM = 16  # channels of the fixed random inputs the backbone maps to tokens
NUM_HEADS = 6
BATCH = 4  # images per rank
GLOBAL_GRID = 7  # 7 x 7 tokens per global view
LOCAL_GRID = 4  # 4 x 4 tokens per local view
NUM_LOCAL = 2
LR = 0.1
TEACHER_MOMENTUM = 0.9
MODEL_SEED = 0
DATA_SEED = 1000  # plus the rank: every rank sees different data
PG_TIMEOUT_S = 30  # a collective that waits longer raises instead of hanging

# Two global crops that share no pixel: the spatial term has no pair to compare.
DISJOINT_BOXES = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]])


class Student(nn.Module):
    """A linear backbone on precomputed inputs, its frozen teacher copy, and the SERE loss."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.backbone = nn.Linear(IN_DIM, DIM)
        self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
        self.sere = SERELoss(DIM, alpha=alpha, beta=beta, num_heads=NUM_HEADS)

    def forward(
        self, inputs: Tensor, boxes: Tensor, flips: Tensor, local_inputs: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        student = self.backbone(inputs)
        with torch.no_grad():
            teacher = self.teacher(inputs)
        local = None if local_inputs is None else self.backbone(local_inputs)
        return self.sere(student, teacher, boxes, flips, local, return_terms=True)


def make_batch(rank: int, *, overlap: bool, local: bool) -> dict[str, Any]:
    """This rank's fixed batch: 2 global views, optionally ``NUM_LOCAL`` local views.

    With ``overlap`` every crop starts in ``[0, 0.3]`` and is at least 0.5 wide and high, so
    every pair of views overlaps; without it the two global crops are ``DISJOINT_BOXES``.
    """
    gen = torch.Generator().manual_seed(DATA_SEED + rank)
    views = 2 + (NUM_LOCAL if local else 0)
    inputs = torch.randn(2 * BATCH, GLOBAL_GRID**2, IN_DIM, generator=gen)
    local_inputs = torch.randn(NUM_LOCAL * BATCH, LOCAL_GRID**2, IN_DIM, generator=gen)
    start = 0.3 * torch.rand(BATCH, views, 2, generator=gen)
    size = 0.5 + 0.2 * torch.rand(BATCH, views, 2, generator=gen)
    boxes = torch.cat([start, start + size], dim=-1).clamp(max=1.0)
    if not overlap:
        if local:
            raise ValueError("the disjoint batches have no local views")
        boxes = DISJOINT_BOXES.expand(BATCH, 2, 4).clone()
    flips = torch.rand(BATCH, views, generator=gen) < 0.5
    return {
        "inputs": inputs,
        "boxes": boxes,
        "flips": flips,
        "local_inputs": local_inputs if local else None,
    }


def trainable_grads(module: nn.Module) -> dict[str, Tensor]:
    """The gradients of the trainable parameters; one that got none is left out."""
    return {
        name: p.grad.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def all_params(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def detach_terms(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in terms.items()}


def run_scenario(
    rank: int,
    *,
    steps: int,
    overlap: bool,
    local: bool,
    alpha: float = 1.0,
    beta: float = 1.0,
    update_teacher: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    """Train ``steps`` SGD steps in DDP on this rank's fixed batch; return what to compare.

    ``compiled`` compiles the student's SERE (``SERELoss.compile``, with AOTAutograd alone:
    the same forward and backward graphs as inductor's, compiled in seconds) before DDP wraps it.
    """
    torch.manual_seed(MODEL_SEED)
    model = Student(alpha, beta)
    reference = copy.deepcopy(model)  # the same initial model, never wrapped in DDP
    if compiled:
        model.sere.compile(backend="aot_eager")
    batch = make_batch(rank, overlap=overlap, local=local)
    result: dict[str, Any] = {"initial": all_params(model)}

    local_loss, local_terms = reference(**batch)
    local_loss.backward()
    result["local_loss"] = local_loss.detach().clone()
    result["local_terms"] = detach_terms(local_terms)
    result["local_grads"] = trainable_grads(reference)

    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    losses, step_grads, step_terms = [], [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, terms = ddp(**batch)
        loss.backward()
        losses.append(loss.detach().clone())
        step_terms.append(detach_terms(terms))
        if len(step_grads) < 2:
            step_grads.append(trainable_grads(model))
        optimizer.step()
    result["losses"] = torch.stack(losses)
    result["terms"] = step_terms
    result["ddp_grads"] = step_grads
    result["final"] = all_params(model)
    if update_teacher:
        # The free function, on the DDP wrapper itself: it finds the heads inside the student.
        moved = sere_loss.update_teacher(ddp, TEACHER_MOMENTUM)
        if moved != 2:
            raise RuntimeError(f"update_teacher moved {moved} sets of heads, expected 2")
        result["after_teacher_update"] = all_params(model)
    return result


def run_tap_scenario(rank: int) -> dict[str, Any]:
    """One DINO + SERE step with TokenTap on a DDP-wrapped multi-crop student.

    The tap is on the DDP wrapper itself; the loss takes only SERE's value (the head's output
    enters times 0), so the backbone's gradient comes through the tapped tokens alone.
    """
    from _tiny_models import MultiCrop, TinyViT

    torch.manual_seed(MODEL_SEED)
    student = MultiCrop(TinyViT(), nn.Linear(24, 5))
    teacher = copy.deepcopy(student).requires_grad_(False)
    sere = SERELoss(24, num_heads=3)
    reference, reference_sere = copy.deepcopy(student), copy.deepcopy(sere)
    gen = torch.Generator().manual_seed(DATA_SEED + rank)
    crops = [torch.randn(BATCH, 3, 16, 16, generator=gen) for _ in range(2)]
    crops += [torch.randn(BATCH, 3, 8, 8, generator=gen) for _ in range(2)]
    start = 0.3 * torch.rand(BATCH, 4, 2, generator=gen)
    boxes = torch.cat([start, start + 0.5 + 0.2 * torch.rand(BATCH, 4, 2, generator=gen)], -1)
    flips = torch.rand(BATCH, 4, generator=gen) < 0.5
    t_tap = TokenTap(teacher)

    def step(model: nn.Module, loss_module: nn.Module) -> Tensor:
        with TokenTap(model) as tap:
            out = model(crops)
            with torch.no_grad():
                teacher(crops[:2])
            s_maps, (t_maps,) = tap.pop(), t_tap.pop()
        loss = loss_module(s_maps[0], t_maps, boxes.clamp(max=1.0), flips, s_maps[1])
        return loss + 0.0 * out.sum()  # type: ignore[no-any-return]

    result: dict[str, Any] = {}
    local_loss = step(reference, reference_sere)
    local_loss.backward()
    result["local_loss"] = local_loss.detach().clone()
    result["local_grads"] = trainable_grads(nn.ModuleDict({"s": reference, "sere": reference_sere}))
    ddp, sere_ddp = DistributedDataParallel(student), DistributedDataParallel(sere)
    loss = step(ddp, sere_ddp)
    loss.backward()
    result["loss"] = loss.detach().clone()
    result["ddp_grads"] = trainable_grads(nn.ModuleDict({"s": student, "sere": sere}))
    return result


# name -> options of run_scenario; run in this order by every rank.
SCENARIOS: dict[str, dict[str, Any]] = {
    "train": {"steps": 20, "overlap": True, "local": True, "update_teacher": True},
    "train_compiled": {"steps": 3, "overlap": True, "local": True, "compiled": True},
    "disjoint_rank0": {"steps": 2, "overlap": None, "local": False},
    "disjoint_both": {"steps": 2, "overlap": False, "local": False},
    "spatial_only_disjoint_both": {"steps": 2, "overlap": False, "local": False, "beta": 0.0},
}


def save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    rank, world_size, init_method, out = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    for name, options in SCENARIOS.items():
        options = dict(options)
        if options["overlap"] is None:  # disjoint on rank 0 only
            options["overlap"] = rank != 0
        save(run_scenario(rank, **options), out / f"{name}-rank{rank}.pt")
    save(run_tap_scenario(rank), out / f"tap-rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    dist.destroy_process_group()
    (out / f"done-rank{rank}").write_text("done\n")
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except BaseException:
        rank_name = sys.argv[1] if len(sys.argv) > 1 else "unknown"
        error = Path(sys.argv[4]) / f"error-rank{rank_name}.txt" if len(sys.argv) > 4 else None
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        if error is not None:
            error.write_text(text)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
