"""Reproduce, small, what SERE is for: DINO against DINO + SERE, same seeds, evaluated alike.

    python benchmarks/reproduce.py --tier cpu             # 512 steps a run: ~75 min, 2 shared cores
    python benchmarks/reproduce.py --tier cpu --epochs 16 # 2,048 steps a run: ~4 h there
    python benchmarks/reproduce.py --tier gpu             # one GPU, under 10 minutes (estimate)
    python benchmarks/reproduce.py --tier gpu --dry-run   # the GPU plan, run tiny on the CPU
    python benchmarks/reproduce.py --tier smoke           # the whole pipeline in ~40 s (a test)

One command: it generates the data (textured objects of 4 classes with masks,
``examples/seg_data.py``; nothing is downloaded), trains ``examples/dino_sere.py`` with and
without ``--no-sere`` for each seed (the two arms of a seed start from the same weights and see
the same crops: the trainer seeds both from ``--seed``, and a test holds that true), keeps every
epoch's checkpoint, and evaluates them with ``examples/evaluate.py``:

- the paper's Fig. 6 measure (:mod:`sere_loss.diagnostics`) on held-out images, at every epoch
  (the measure over training) and at the end;
- the dense linear probe (mIoU) and k-NN at the end;
- beside every number, the sanity bounds: each seed's random initial weights (the runs' own
  starting point) and the hand-made patch spectrum.

It writes ``results.json`` (every number, the machine, the commit, the seeds, the settings),
``results.md`` (per metric: each arm's mean and standard deviation over seeds, the paired
difference with a 95 % t interval and the count of seeds where SERE is better) and three plots
to ``--out`` (``benchmarks/results/reproduce_<tier>/`` by default). The mIoU difference is
only read when the probe clears its hand-made bound.

Runs are resumable: rerunning the command continues unfinished runs and skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import evaluate  # noqa: E402
import seg_data  # noqa: E402

ARMS = ("dino", "dino_sere")
LABELS = {"dino": "DINO", "dino_sere": "DINO + SERE"}
# Two-sided 95 % quantiles of Student's t with n - 1 degrees of freedom, n = 2 .. 11.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tier:
    """One size of the experiment."""

    train_images: int
    val_images: int
    curve_images: int  # held-out images for the per-epoch invariance curve
    image_size: int
    batch_size: int
    lr: float  # the trainer's --lr: peak lr per 256 images (scaled by batch / 256)
    epochs: int
    warmup_epochs: float
    teacher_temp_warmup_epochs: float
    seeds: tuple[int, ...]
    device: str
    jobs: int  # trainings at once
    threads: int  # torch threads per training
    workers: int  # DataLoader workers per training
    probe_steps: int
    knn_k: int
    diagnostics_every: int
    note: str


TIERS = {
    # 2,048 images, 4 epochs of 128 steps (8,192 images seen per run), 3 seeds x 2 arms, two
    # trainings at a time on one thread each. On the shared 2-core machine a step took 1.8-2.5 s
    # (two runs side by side, load ~5): about 75 min with the evaluation; --epochs 16, about 4 h.
    "cpu": Tier(
        train_images=2048,
        val_images=512,
        curve_images=256,
        image_size=96,
        batch_size=16,
        # 8x DINO's 0.0005: at batch 16, DINO's rate scales to 3e-5, at which the tiny ViT barely
        # leaves its initialisation in 512 steps (measured: the spatial term 3.06 -> 2.98, DINO's
        # loss on its plateau, both arms' relations alike); this gives 2.5e-4.
        lr=0.004,
        epochs=4,
        warmup_epochs=0.5,
        teacher_temp_warmup_epochs=1,
        seeds=(0, 1, 2),
        device="cpu",
        jobs=2,
        threads=1,
        workers=1,
        probe_steps=500,
        knn_k=20,
        diagnostics_every=16,
        note="its honest claim is invariance: too few images are seen for a dense-probe gap",
    ),
    # One GPU: 8,192 images, 12 epochs of 32 steps at batch 256 (98,304 images seen per run),
    # three trainings at a time sharing the GPU and the host's cores (5 loader workers each).
    # The loaders set the pace: at ~10 ms of crops per image and core, ~6.6 min of training.
    "gpu": Tier(
        train_images=8192,
        val_images=1024,
        curve_images=256,
        image_size=96,
        batch_size=256,
        lr=0.0005,  # DINO's: 5e-4 at batch 256
        epochs=12,
        warmup_epochs=2,
        teacher_temp_warmup_epochs=4,
        seeds=(0, 1, 2),
        device="cuda",
        jobs=3,
        threads=2,
        workers=5,
        probe_steps=500,
        knn_k=20,
        diagnostics_every=20,
        note="the probe must clear its hand-made bound before an mIoU difference is read",
    ),
    # The whole pipeline, tiny, for CI.
    "smoke": Tier(
        train_images=32,
        val_images=16,
        curve_images=8,
        image_size=96,
        batch_size=8,
        lr=0.004,
        epochs=2,
        warmup_epochs=1,
        teacher_temp_warmup_epochs=1,
        seeds=(0, 1),
        device="cpu",
        jobs=2,
        threads=1,
        workers=0,
        probe_steps=20,
        knn_k=5,
        diagnostics_every=2,
        note="a smoke test of the pipeline; its numbers mean nothing",
    ),
}


def dry_run_tier(tier: Tier) -> Tier:
    """The same plan at smoke size on the CPU, to check a tier's commands without its device."""
    smoke = TIERS["smoke"]
    return dataclasses.replace(
        smoke, seeds=tier.seeds, jobs=min(tier.jobs, 2),
        note=f"dry run of a tier on the CPU at smoke size; {smoke.note}",
    )  # fmt: skip


# Training ----------------------------------------------------------------------------------------


def train_command(tier: Tier, data: Path, out: Path, seed: int, arm: str) -> list[str]:
    """The trainer's command line for one run."""
    cmd = [sys.executable, str(EXAMPLES / "dino_sere.py"), "--preset", "tiny"]
    cmd += ["--data", str(data), "--device", tier.device, "--seed", str(seed)]
    cmd += ["--batch-size", str(tier.batch_size), "--epochs", str(tier.epochs)]
    cmd += ["--lr", str(tier.lr)]
    cmd += ["--warmup-epochs", str(tier.warmup_epochs)]
    cmd += ["--teacher-temp-warmup-epochs", str(tier.teacher_temp_warmup_epochs)]
    cmd += ["--workers", str(tier.workers), "--output-dir", str(out), "--no-progress"]
    cmd += ["--keep-checkpoints", "--diagnostics-every", str(tier.diagnostics_every), "--resume"]
    return cmd + (["--no-sere"] if arm == "dino" else [])


def _commit() -> str:
    """This checkout's commit, with ``+dirty`` when ``src/`` or ``examples/`` have changes."""
    from record import git

    dirty = git("status", "--porcelain", "--", "src", "examples")
    return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")


def finished(out: Path, tier: Tier, steps: int) -> bool:
    """Whether a run wrote its last checkpoint (``last.json`` at the final step)."""
    last = out / "last.json"
    return last.is_file() and json.loads(last.read_text()).get("step") == steps


def train_all(tier: Tier, data: Path, runs: Path, steps: int, log: Any) -> None:
    """Every (seed, arm) run, ``tier.jobs`` at a time; finished runs are skipped."""
    todo = [
        (seed, arm)
        for seed in tier.seeds
        for arm in ARMS
        if not finished(runs / f"{arm}_s{seed}", tier, steps)
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(tier.threads), "MKL_NUM_THREADS": str(tier.threads)}
    running: list[tuple[subprocess.Popen[bytes], Path, Any, float]] = []
    while todo or running:
        while todo and len(running) < tier.jobs:
            seed, arm = todo.pop(0)
            out = runs / f"{arm}_s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "commit.txt").is_file():  # the code the run started with
                (out / "commit.txt").write_text(_commit() + "\n")
            handle = (out / "train.log").open("ab")
            proc = subprocess.Popen(
                train_command(tier, data, out, seed, arm), stdout=handle, stderr=subprocess.STDOUT,
                env=env, cwd=ROOT,
            )  # fmt: skip
            running.append((proc, out, handle, time.perf_counter()))
            log(f"training {out.name}")
        time.sleep(0.2)
        for item in list(running):
            proc, out, handle, tic = item
            if proc.poll() is None:
                continue
            handle.close()
            running.remove(item)
            if proc.returncode != 0:
                for other, *_ in running:
                    other.terminate()
                tail = (out / "train.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{out.name} failed ({proc.returncode}):\n{tail}")
            log(f"trained {out.name} in {time.perf_counter() - tic:.0f} s")


# Evaluation --------------------------------------------------------------------------------------


def kept_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every kept checkpoint of a run, in order."""
    found = [(int(p.stem.split("-")[1]), p) for p in run.glob("checkpoint-*.pth")]
    return sorted(found)


def evaluate_all(
    tier: Tier, runs: Path, data: evaluate.EvalData, steps_per_epoch: int, log: Any
) -> dict[str, Any]:
    """Bounds, final models (probe, k-NN, invariance) and the invariance at every epoch.

    The teachers (DINO's evaluated model) get every task; the students get the invariance too:
    in a short run the momentum teacher (0.996 -> 1) lags far behind the student that SERE's
    gradients reach.
    """
    preset = None
    finals: dict[str, dict[str, dict[int, evaluate.Extractor]]] = {}
    for which in ("teacher", "student"):
        for arm in ARMS:
            for seed in tier.seeds:
                path = runs / f"{arm}_s{seed}" / "checkpoint.pth"
                vit, info = evaluate.load_checkpoint(path, which)
                preset = info["preset"]
                name = f"{LABELS[arm]} seed {seed} ({which})"
                finals.setdefault(which, {}).setdefault(arm, {})[seed] = evaluate.ViTExtractor(
                    vit, name
                )
    if preset is None:
        raise SystemExit("no runs to evaluate")
    randoms = {s: evaluate.random_extractor(preset, s) for s in tier.seeds}
    spectrum = evaluate.PatchSpectrum(preset["patch"])
    common = {"global_px": preset["global_px"], "device": tier.device, "log": log}
    tasks = ("probe", "knn", "invariance")
    results: dict[str, Any] = {"final": {}, "final_student": {}, "bounds": {}, "curve": {}}
    for seed in tier.seeds:
        keys = ["random", "dino", "dino_sere"]
        models = [randoms[seed], finals["teacher"]["dino"][seed]]
        models.append(finals["teacher"]["dino_sere"][seed])
        if seed == tier.seeds[0]:  # the hand-made feature learns nothing: one seed is enough
            keys.append("spectrum")
            models.append(spectrum)
        out = evaluate.evaluate(
            models, tasks, data, seed=seed, probe_steps=tier.probe_steps, knn_k=tier.knn_k,
            **common,
        )  # fmt: skip
        for task in tasks:
            for key, row in zip(keys, out[task][: len(keys)], strict=True):
                target = results["bounds"] if key in ("random", "spectrum") else results["final"]
                target.setdefault(key, {}).setdefault(task, {})[seed] = row
        results["knn_chance"] = out["knn"][-1]["top1"]
        students = [finals["student"][arm][seed] for arm in ARMS]
        out = evaluate.evaluate(students, ("invariance",), data, seed=seed, **common)
        for arm, row in zip(ARMS, out["invariance"], strict=True):
            results["final_student"].setdefault(arm, {}).setdefault("invariance", {})[seed] = row
    # The invariance over training, on fewer held-out images, at every kept checkpoint, for
    # teachers and students; the seed's random initial weights are its epoch 0.
    curve_data = data.with_val(tier.curve_images)
    for which in ("teacher", "student"):
        for arm in ARMS:
            for seed in tier.seeds:
                kept = kept_checkpoints(runs / f"{arm}_s{seed}")
                extractors: list[evaluate.Extractor] = [randoms[seed]]
                extractors += [
                    evaluate.ViTExtractor(
                        evaluate.load_checkpoint(path, which)[0], f"{arm} {which} step {step}"
                    )
                    for step, path in kept
                ]
                out = evaluate.evaluate(
                    extractors, ("invariance",), curve_data, seed=seed, **common
                )
                steps = [0] + [step for step, _ in kept]
                results["curve"].setdefault(which, {}).setdefault(arm, {})[seed] = [
                    {"step": step, "epoch": step / steps_per_epoch, **row}
                    for step, row in zip(steps, out["invariance"], strict=True)
                ]
    return results


# Statistics and tables ---------------------------------------------------------------------------

# (key, source, task, column, label, better): the numbers the table reports; ``source`` is
# where :func:`evaluate_all` put the models' rows (the bounds are the same for both).
METRICS = [
    ("spatial_controlled", "final", "invariance", "spatial_controlled",
     "spatial relation distance, controlled (Fig. 6), teacher", "lower"),
    ("channel_controlled", "final", "invariance", "channel_controlled",
     "channel relation distance, controlled (Fig. 6), teacher", "lower"),
    ("student_spatial_controlled", "final_student", "invariance", "spatial_controlled",
     "spatial relation distance, controlled, student", "lower"),
    ("student_channel_controlled", "final_student", "invariance", "channel_controlled",
     "channel relation distance, controlled, student", "lower"),
    ("spatial_plain", "final", "invariance", "spatial_plain",
     "spatial relation distance, plain, teacher", "lower"),
    ("student_spatial_plain", "final_student", "invariance", "spatial_plain",
     "spatial relation distance, plain, student", "lower"),
    ("channel_plain", "final", "invariance", "channel_plain",
     "channel relation distance, plain, teacher", "lower"),
    ("spatial_entropy", "final", "invariance", "spatial_entropy",
     "spatial relation row entropy (nats), teacher", "-"),
    ("student_spatial_entropy", "final_student", "invariance", "spatial_entropy",
     "spatial relation row entropy (nats), student", "-"),
    ("miou", "final", "probe", "miou", "dense linear probe mIoU (%), teacher", "higher"),
    ("pixel_acc", "final", "probe", "pixel_acc", "dense linear probe pixel accuracy (%), teacher",
     "higher"),
    ("top1", "final", "knn", "top1", "k-NN top-1 (%), CLS token, teacher", "higher"),
]  # fmt: skip


def paired(a: Sequence[float], b: Sequence[float], better: str) -> dict[str, Any]:
    """Paired difference ``b - a`` over seeds: mean, sd, 95 % t interval, seeds favouring b."""
    diff = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diff)
    mean = statistics.fmean(diff)
    sd = statistics.stdev(diff) if n > 1 else math.nan
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan
    if better == "lower":
        wins = sum(d < 0 for d in diff)
    elif better == "higher":
        wins = sum(d > 0 for d in diff)
    else:
        wins = None
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "wins": wins, "n": n}


def summarise(results: dict[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per metric: bounds, each arm's mean and sd, the paired difference."""
    rows = []
    for key, source, task, column, label, better in METRICS:

        def values(where: dict[str, Any], arm: str, task: str = task, col: str = column) -> list:
            per_seed = where.get(arm, {}).get(task, {})
            return [per_seed[s][col] for s in seeds if s in per_seed]

        dino = values(results[source], "dino")
        sere = values(results[source], "dino_sere")
        row = {"task": task, "metric": key, "label": label, "better": better}
        row["random"] = _stats(values(results["bounds"], "random"))
        row["spectrum"] = _stats(values(results["bounds"], "spectrum"))
        row["dino"], row["dino_sere"] = _stats(dino), _stats(sere)
        row["diff"] = paired(dino, sere, better)
        rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": math.nan, "sd": math.nan, "values": []}
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def _pm(stats: dict[str, Any], digits: int) -> str:
    if math.isnan(stats["mean"]):
        return "n/a"
    sd = "" if math.isnan(stats["sd"]) else f" ± {stats['sd']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{sd}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results page: settings, the table, the probe gate, the machine."""
    tier, seeds = meta["tier"], meta["seeds"]
    lines = [
        f"# DINO vs DINO + SERE, tier `{meta['tier_name']}`",
        "",
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) per arm; the two arms of a seed start "
        "from the same weights and see the same crops. Mean ± standard deviation over seeds; "
        "the difference is DINO + SERE minus DINO, paired by seed, with a 95 % t interval; "
        "'SERE better' counts the seeds where the difference goes the metric's better way. "
        "Bounds: random = each seed's initial weights (the runs' starting point), hand-made = "
        "the patch colour and spectrum feature (seed 0).",
        "",
        f"Data: {tier['train_images']} generated training images, {tier['val_images']} held out "
        f"({tier['image_size']} px, 4 textured classes + background). Trainer: "
        f"`examples/dino_sere.py --preset tiny`, batch {tier['batch_size']}, `--lr {tier['lr']}` "
        f"(peak {tier['lr'] * tier['batch_size'] / 256:.2g}), {tier['epochs']} "
        f"epochs ({meta['steps']} steps, {meta['steps'] * tier['batch_size']} images seen), "
        f"lr warm-up {tier['warmup_epochs']} epochs, teacher temperature warm-up "
        f"{tier['teacher_temp_warmup_epochs']} epochs. Note: {tier['note']}.",
        "",
        "| metric | better | random (lower bound) | hand-made | DINO | DINO + SERE | "
        "difference [95 % CI] | SERE better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        digits = 2 if row["task"] in ("probe", "knn") else 4
        diff = row["diff"]
        lo, hi = diff["ci"]
        ci = "" if math.isnan(lo) else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        wins = "-" if diff["wins"] is None else f"{diff['wins']}/{diff['n']}"
        lines.append(
            f"| {row['label']} | {row['better']} | {_pm(row['random'], digits)} | "
            f"{_pm(row['spectrum'], digits)} | {_pm(row['dino'], digits)} | "
            f"{_pm(row['dino_sere'], digits)} | {diff['mean']:+.{digits}f}{ci} | {wins} |"
        )
    if meta.get("knn_chance") is not None:
        lines += ["", f"k-NN chance (the majority class): {meta['knn_chance']:.2f} %."]
    lines += ["", probe_gate(rows), ""]
    lines += [
        "Trained at commit(s) "
        + ", ".join(sorted({c[:10] for c in meta.get("trained_at", {}).values()}) or ["?"])
        + "; evaluated at the commit below.",
        "",
        f"Machine: {meta['environment']['device']['name']}; torch "
        f"{meta['environment']['versions']['torch']}; commit {meta['environment']['commit'][:10]}"
        f"{' (with uncommitted changes)' if meta['environment']['dirty'] else ''}; "
        f"{meta['wall_s'] / 60:.0f} min wall time; load average at the end "
        f"{meta['load_end']}.",
        "",
        "Plots: `fig6_bars.png` (the Fig. 6 measure per arm, seed dots, bounds), "
        "`invariance_over_training.png`, `probe.png`.",
    ]
    return "\n".join(lines) + "\n"


def probe_gate(rows: list[dict[str, Any]]) -> str:
    """Whether the mIoU difference may be read: the probe must clear its hand-made bound."""
    miou = next(r for r in rows if r["metric"] == "miou")
    bound = miou["spectrum"]["mean"]
    best = max(miou["dino"]["mean"], miou["dino_sere"]["mean"])
    if math.isnan(bound) or math.isnan(best):
        return "Probe gate: not evaluated."
    if best <= bound:
        return (
            f"Probe gate: **not passed**. Neither arm's probe ({best:.2f} mIoU at best) clears "
            f"the hand-made bound ({bound:.2f}): the models have not learnt features a linear "
            "probe can use better than a fixed texture spectrum, so the mIoU difference is not "
            "read."
        )
    return (
        f"Probe gate: passed (best arm {best:.2f} mIoU > hand-made {bound:.2f}); the mIoU "
        "difference can be read."
    )


# Plots -------------------------------------------------------------------------------------------


def plot(
    results: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int], out: Path
) -> None:
    """The three figures; skipped with a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('plots skipped: pip install "sere-loss[plot]"', file=sys.stderr)
        return
    colours = {"dino": "tab:blue", "dino_sere": "tab:orange"}
    by_metric = {r["metric"]: r for r in rows}

    def bars(ax: Any, metric: str, title: str) -> None:
        row = by_metric[metric]
        for k, arm in enumerate(ARMS):
            stats = row[arm]
            ax.bar(k, stats["mean"], color=colours[arm], alpha=0.6, width=0.6)
            ax.scatter([k] * len(stats["values"]), stats["values"], color="black", s=14, zorder=3)
        for key, style, name in (("random", "--", "random init"), ("spectrum", ":", "hand-made")):
            mean = row[key]["mean"]
            if not math.isnan(mean):
                ax.axhline(mean, color="gray", linestyle=style, label=name)
        ax.set_xticks(range(len(ARMS)), [LABELS[a] for a in ARMS])
        diff = row["diff"]
        ax.set_title(f"{title}\nSERE - DINO: {diff['mean']:+.3g} ({diff['wins']}/{diff['n']})",
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)

    fig, axes = plt.subplots(2, 3, figsize=(12, 7), layout="constrained")
    for r, (prefix, who) in enumerate((("", "teacher"), ("student_", "student"))):
        bars(axes[r, 0], f"{prefix}spatial_controlled", f"spatial, controlled, {who}")
        bars(axes[r, 1], f"{prefix}channel_controlled", f"channel, controlled, {who}")
        bars(axes[r, 2], f"{prefix}spatial_plain", f"spatial, plain TV distance, {who}")
    fig.suptitle(
        "Self-relation differences between two views of held-out images (Fig. 6); lower: more "
        "invariant"
    )
    fig.savefig(out / "fig6_bars.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), layout="constrained")
    panels = (
        ("spatial_controlled", "spatial, controlled"),
        ("channel_controlled", "channel, controlled"),
        ("spatial_entropy", "spatial row entropy (sharpness)"),
    )
    for r, which in enumerate(("teacher", "student")):
        for ax, (key, title) in zip(axes[r], panels, strict=True):
            for arm in ARMS:
                runs = results["curve"][which][arm]
                curves = [runs[s] for s in seeds if s in runs]
                for curve in curves:
                    ax.plot([p["epoch"] for p in curve], [p[key] for p in curve],
                            color=colours[arm], alpha=0.3, lw=1)  # fmt: skip
                epochs = [p["epoch"] for p in curves[0]]
                mean = [statistics.fmean(c[i][key] for c in curves) for i in range(len(epochs))]
                ax.plot(epochs, mean, color=colours[arm], lw=2, label=LABELS[arm])
            ax.set_xlabel("epoch")
            ax.set_title(f"{title}, {which}", fontsize=10)
            ax.legend(fontsize=8)
    fig.suptitle("The measure over training (thin: seeds; thick: mean; epoch 0: random init)")
    fig.savefig(out / "invariance_over_training.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), layout="constrained")
    bars(axes[0], "miou", "dense linear probe mIoU (%)")
    bars(axes[1], "top1", "k-NN top-1 (%)")
    fig.suptitle(probe_gate(rows).split(".")[0])
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)


def plot_maps(data: evaluate.EvalData, runs: Path, seed: int, out: Path, count: int = 3) -> None:
    """Fig. 5: a point's relation in two views and its change, DINO beside DINO + SERE.

    The first ``count`` held-out images whose two views share at least half of view 1, the
    lattice point nearest the overlap's centre, seed ``seed``'s final teachers; one figure per
    arm and image (``fig5_<arm>_<k>.png``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return
    from sere_loss.diagnostics import plot_relation_maps, relation_maps
    from sere_loss.transforms import IMAGENET_MEAN, IMAGENET_STD

    models = {}
    for arm in ARMS:
        vit, info = evaluate.load_checkpoint(runs / f"{arm}_s{seed}" / "checkpoint.pth")
        models[arm] = evaluate.ViTExtractor(vit, arm)
    global_px = info["preset"]["global_px"]
    views, boxes, flips, _ = evaluate.crop_pairs(data.val_images[:64], global_px, seed)
    first, second = boxes[:, 0], boxes[:, 1]
    side = torch.minimum(first[:, 2:], second[:, 2:]) - torch.maximum(first[:, :2], second[:, :2])
    shared = side.clamp(min=0).prod(dim=1) / (first[:, 2:] - first[:, :2]).prod(dim=1)
    chosen = [int(i) for i in (shared >= 0.5).nonzero().flatten()[:count]]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for arm, model in models.items():
        for k, i in enumerate(chosen):
            one = views[i : i + 1]
            maps1, maps2 = (model.relation_maps(one[:, v]) for v in (0, 1))
            lattice = (maps1.shape[-2] - 1, maps1.shape[-1] - 1)
            maps = relation_maps(
                maps1, maps2, first[i : i + 1], flips[i : i + 1, 0], second[i : i + 1],
                flips[i : i + 1, 1], (lattice[0] // 2, lattice[1] // 2),
            )  # fmt: skip
            images = tuple((one[0, v] * std + mean).clamp(0, 1) for v in (0, 1))
            title = f"{LABELS[arm]}, seed {seed}, held-out image {i}"
            fig = plot_relation_maps(maps, images=images, title=title)
            fig.savefig(out / f"fig5_{arm}_{k}.png", dpi=100)


# Main --------------------------------------------------------------------------------------------


def estimate(tier: Tier, steps: int) -> str:
    """A rough wall-time estimate of a GPU tier's training, from this machine's crop rate.

    On the tiny ViT a GPU step takes milliseconds, so the CPU loaders that draw the multi-crop
    views set the pace: ``runs * images seen / (loader workers * images per second each)``.
    The crop time is the best of three passes over 16 images (the least disturbed by other
    work on a shared machine).
    """
    from PIL import Image

    from sere_loss.transforms import dino_sere_transform

    data = seg_data.ShapesSegmentation(16, tier.image_size, seed=0)
    # PIL images, as the trainer's ImageFolder gives them.
    images = [Image.fromarray(data[i][0].permute(1, 2, 0).numpy()) for i in range(len(data))]
    transform = dino_sere_transform(global_size=64, local_size=32, num_local=4)
    passes = []
    with torch.random.fork_rng(devices=[]):
        transform(images[0])  # warm-up
        for _ in range(3):
            tic = time.perf_counter()
            for image in images:
                transform(image)
            passes.append((time.perf_counter() - tic) / len(images))
    per_image = min(passes)
    seen = steps * tier.batch_size
    workers = tier.jobs * max(tier.workers, 1)
    runs = len(tier.seeds) * len(ARMS)
    minutes = runs * seen * per_image / workers / 60
    return (
        f"{runs} runs x {steps} steps x batch {tier.batch_size} = {seen} images seen per run. "
        f"The crops take {per_image * 1e3:.1f} ms per image and core here; {tier.jobs} runs at "
        f"once with {tier.workers} loader workers each ({workers} cores) need ~{minutes:.1f} min "
        "of loading at that rate (a GPU step of the tiny ViT is far shorter), plus the data "
        "generation and the evaluation (a few minutes)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    p.add_argument("--dry-run", action="store_true", help="the tier's plan, tiny, on the CPU")
    p.add_argument("--seeds", help="comma-separated, instead of the tier's")
    p.add_argument("--epochs", type=int, help="instead of the tier's; the warm-ups scale with it")
    p.add_argument("--jobs", type=int, help="trainings at once, instead of the tier's")
    p.add_argument("--work", type=Path, help="data and runs (default: runs/reproduce_<tier>)")
    p.add_argument("--out", type=Path, help="results (benchmarks/results/reproduce_<tier>)")
    p.add_argument(
        "--eval-threads", type=int,
        help="torch threads of the evaluation (the tier's per-run threads: on a shared CPU one "
        "thread is far faster than two that wait on each other)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns what ``results.json`` holds."""
    args = parse_args(argv)
    args.command = " ".join(["benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    tier = TIERS[args.tier]
    name = args.tier + ("-dry-run" if args.dry_run else "")
    if args.dry_run:
        tier = dry_run_tier(tier)
    if args.seeds:
        tier = dataclasses.replace(tier, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.epochs:  # a shorter (or longer) run of the same shape: the warm-ups scale with it
        scale = args.epochs / tier.epochs
        tier = dataclasses.replace(
            tier,
            epochs=args.epochs,
            warmup_epochs=tier.warmup_epochs * scale,
            teacher_temp_warmup_epochs=tier.teacher_temp_warmup_epochs * scale,
        )
    if args.jobs:
        tier = dataclasses.replace(tier, jobs=args.jobs)
    if len(tier.seeds) < 2:
        raise SystemExit("need at least 2 seeds for a paired comparison")
    if tier.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--tier {args.tier} needs a GPU and torch sees none; --dry-run runs its plan on the "
            "CPU at smoke size"
        )
    work = args.work or ROOT / "runs" / f"reproduce_{name}"
    # A dry run's numbers mean nothing: they stay beside its runs, out of benchmarks/results.
    results = (
        work / "results" if args.dry_run else ROOT / "benchmarks" / "results" / f"reproduce_{name}"
    )
    out = args.out or results
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.eval_threads or tier.threads)
    try:
        return run(args, tier, name, work, out)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, tier: Tier, name: str, work: Path, out: Path) -> dict[str, Any]:
    """Data, training, evaluation, results."""
    from record import environment

    tic = time.perf_counter()
    # The tree as the experiment starts (before it writes its results into it); the training
    # threads per run are the tier's.
    started_in = environment(torch.device(tier.device)) | {"run_threads": tier.threads}

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - tic:7.1f} s] {line}", flush=True)

    steps_per_epoch = tier.train_images // tier.batch_size
    steps = steps_per_epoch * tier.epochs
    if args.dry_run or args.tier == "gpu":
        full = TIERS[args.tier]
        full_steps = full.epochs * (full.train_images // full.batch_size)
        log(f"plan of --tier {args.tier}: {estimate(full, full_steps)}")
    train_set = seg_data.ShapesSegmentation(tier.train_images, tier.image_size, seed=0)
    data_dir = work / "data" / "train"
    if not (data_dir / "done").is_file():
        log(f"writing {tier.train_images} training images to {data_dir}")
        seg_data.write_image_folder(data_dir, train_set, train_set.num_classes)
        (data_dir / "done").write_text("ok\n")
    train_all(tier, data_dir, work / "runs", steps, log)
    log("evaluating")
    data = evaluate.build_data(
        "generated", (tier.train_images, tier.val_images), tier.image_size, seed=0
    )
    results = evaluate_all(tier, work / "runs", data, steps_per_epoch, log)
    rows = summarise(results, tier.seeds)
    meta = {
        "tier_name": name,
        "tier": dataclasses.asdict(tier),
        "seeds": list(tier.seeds),
        "steps": steps,
        "wall_s": time.perf_counter() - tic,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "environment": started_in,
        "knn_chance": results.get("knn_chance"),
        "trained_at": {
            run.name: (run / "commit.txt").read_text().strip()
            for run in sorted((work / "runs").iterdir())
            if (run / "commit.txt").is_file()
        },
        "command": args.command,
    }
    record = {"meta": meta, "table": rows, "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=1, default=float))
    (out / "results.md").write_text(markdown(rows, meta))
    plot(results, rows, tier.seeds, out)
    plot_maps(data, work / "runs", tier.seeds[0], out)
    log(f"results in {out}")
    print(markdown(rows, meta))
    return record


if __name__ == "__main__":
    main()
