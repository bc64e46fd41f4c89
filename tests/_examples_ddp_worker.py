"""One process of the torchrun launch behind ``test_examples_distributed.py`` (not a test module).

Usage: ``torchrun --standalone --nproc_per_node=2 _examples_ddp_worker.py OUT_DIR``.

It runs the examples' distributed plumbing (``distributed.gather``, ``Run.mean``, ``Run.save`` and
its check that the processes hold the same parameters, DINO's all-reduced centre, MoCo v3's
InfoNCE over gathered keys) on data that every process can generate in full, and saves what it
got to ``OUT_DIR/rank<R>.pt``; the test compares it with the same computation done in one
process on the whole batch. A failure writes ``OUT_DIR/error-rank<R>.txt``. The process ends
with ``os._exit`` (see ``training.distributed.run_main``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import dino_sere  # noqa: E402
import mocov3_sere  # noqa: E402
from training import distributed, runs  # noqa: E402

BATCH = 3  # per process


def full_batch(world_size: int) -> dict[str, torch.Tensor]:
    """The whole batch of every process, the same in each (fixed seed)."""
    gen = torch.Generator().manual_seed(7)
    n = BATCH * world_size
    return {
        "query": torch.randn(n, 8, generator=gen),
        "key": torch.randn(n, 8, generator=gen),
        "teacher": torch.randn(n, 5, generator=gen),
    }


def run(out: Path) -> dict[str, Any]:
    process = distributed.init_process("cpu", timeout_minutes=1)
    rank, world = process.rank, process.world_size
    mine = {k: v[rank * BATCH : (rank + 1) * BATCH] for k, v in full_batch(world).items()}
    result: dict[str, Any] = {"world_size": world}
    result["gathered"] = distributed.gather(torch.tensor([rank, 10 + rank]))
    result["contrastive"] = mocov3_sere.contrastive_loss(mine["query"], mine["key"], 0.2, rank)
    center = torch.zeros(1, 5)
    dino_sere.update_center(center, mine["teacher"], 0.9)
    result["center"] = center

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    args = argparse.Namespace(output_dir=out / "run", max_steps=None, resume=None, no_progress=True)
    state = {"model": model}
    run = runs.Run(
        process, args, state, epochs=1, steps_per_epoch=1, batch_size=BATCH, fields=["a"]
    )
    result["mean"] = run.mean({"a": torch.tensor(float(rank)), "b": torch.tensor(2.0)}, 0)
    torch.manual_seed(100 + rank)  # each process its own random state, saved by rank 0
    run.save(1)
    result["rng"] = torch.get_rng_state()
    with torch.no_grad():  # now the processes disagree: saving must refuse
        model.weight[0, 0] += rank * 1e-3
    try:
        run.save(2)
        result["out_of_sync"] = "saved"
    except RuntimeError as error:
        result["out_of_sync"] = str(error)
    run.finish()
    return result


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    rank = os.environ.get("RANK", "?")
    code = 1
    try:
        result = run(out_dir)
        tmp = out_dir / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, out_dir / f"rank{rank}.pt")
        code = 0
    except BaseException:
        (out_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
