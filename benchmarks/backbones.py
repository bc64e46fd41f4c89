"""SERE's cost per backbone, relative to ViT-S/16, from interleaved rounds on one machine.

    python benchmarks/backbones.py --threads 1                 # writes results/backbones.json
    python benchmarks/backbones.py --rounds 2 --quick          # a smoke run of a few seconds

The settings table of ``docs/performance.md`` gives SERE's time per step for the backbones
people train. Times taken in separate runs of a shared machine do not compare (its load moves),
so this script times every backbone's whole SERE loss (forward and backward, the library's
defaults) in the same rounds, one step each, in an order that rotates from round to round, and
reports each backbone's time per image as a ratio to ViT-S/16's *within each round*: the
median, IQR and order-statistics interval of those ratios (``stats.ratio_summary``), beside the
median times, which hold only for the load of the run. Inputs and head weights come from
``cases.py`` (its settings, seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases
import record
import stats

ROOT = Path(__file__).resolve().parent.parent
# (row of the docs' table, setting of cases.py, implementation): the first is the reference.
BACKBONES = (
    ("ViT-S/16, 2 x 224 + 4 x 96 px", "dino_b32", "library"),
    ("ViT-B/16, 2 x 224 + 4 x 96 px", "vitb_dino_b32", "library"),
    ("ViT-L/16, 2 x 224 + 4 x 96 px", "vitl_dino_b32", "library"),
    ("ViT-L/14, 2 x 224 + 4 x 98 px", "vitl14_dino_b32", "library"),
    ("ResNet-50 layer4, 2 x 224 + 4 x 96 px", "resnet50_dino_b32", "library"),
    ("ViT-S/14, 2 x 518 px, 36 x 36 lattice", "lattice518_b4", "library@36"),
    ("ViT-B/14, 2 x 518 px, 36 x 36 lattice", "lattice518_vitb_b4", "library@36"),
    ("ViT-L/14, 2 x 518 px, 36 x 36 lattice", "lattice518_vitl_b4", "library@36"),
)
QUICK = (("smoke", "quick", "library"), ("smoke, lattice 6", "quick_sweep", "library@6"))


def measure(rows: tuple[tuple[str, str, str], ...], rounds: int) -> dict[str, Any]:
    """Time SERE (forward + backward) for each row, interleaved; ratios per image to the first."""
    device = torch.device("cpu")
    built = []
    for label, name, impl in rows:
        setting = cases.SETTINGS[name]
        case = cases.build_case(setting, impl, "sere", device)
        case.step()  # warm-up, untimed
        built.append((label, setting, impl, case))
    seconds: list[list[float]] = [[] for _ in built]
    loads = [record.load()]
    for r in range(rounds):
        order = list(range(len(built)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for k in order:
            start = time.perf_counter()
            built[k][3].step()
            seconds[k].append(time.perf_counter() - start)
        loads.append(record.load())
        print(f"round {r + 1}/{rounds}: load {loads[-1]}", flush=True)
    reference = [t / built[0][1].batch for t in seconds[0]]
    out = []
    for (label, setting, impl, _), times in zip(built, seconds, strict=True):
        per_image = [t / setting.batch for t in times]
        out.append(
            {
                "backbone": label,
                "setting": setting.name,
                "implementation": impl,
                "batch": setting.batch,
                "dim": setting.dim,
                "heads": setting.heads,
                "seconds": stats.summary(times),
                "per_image_vs_first": stats.ratio_summary(per_image, reference),
            }
        )
    return {"rows": out, "rounds": rounds, "load_average_per_round": loads}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--rounds``, ``--threads``, ``--quick``, ``--out``; writes the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="the smoke settings only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {
        "command": "python " + " ".join(sys.argv),
        "environment": record.environment(torch.device("cpu")),
        **measure(QUICK if args.quick else BACKBONES, args.rounds),
        "minutes": round((time.time() - started) / 60, 1),
    }
    stem = "backbones-quick" if args.quick else "backbones"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    for row in results["rows"]:
        ratio = row["per_image_vs_first"]
        print(
            f"{row['backbone']}: {row['seconds']['median']:.3f} s per step at batch "
            f"{row['batch']}; per image {ratio['median']:.2f}x ViT-S/16 "
            f"(IQR {ratio['q25']:.2f}-{ratio['q75']:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
