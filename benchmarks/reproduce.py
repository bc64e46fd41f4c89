"""Reproduce, small, what SERE is for: DINO against DINO + SERE, same seeds, evaluated alike.

    python benchmarks/reproduce.py --tier cpu                 # ~1 h on 2 cores (see the tier)
    python benchmarks/reproduce.py --tier gpu --out $OUT      # one H100, 8 minutes, trains only
    python benchmarks/reproduce.py --tier gpu --evaluate DIR  # then, on a CPU: the evaluation
    python benchmarks/reproduce.py --tier gpu --dry-run       # the GPU plan, tiny, on the CPU

The data are scenes of Fashion-MNIST's items with exact masks (``examples/seg_data.py``), read
from ``--data``, any folder of its four idx files (Debian's ``dataset-fashion-mnist`` puts them
in ``/usr/share/datasets/fashion-mnist``, the default); ``--data generated`` takes the generated
textured shapes instead. Per seed the command trains ``examples/dino_sere.py --preset tiny``
with and without ``--no-sere`` (the two arms of a seed start from the same weights and see the
same crops: the trainer seeds both from ``--seed``, and a test holds that true), keeps every
epoch's checkpoint, packs the backbones (teacher and student, fp16, at up to four points of
training) into ``backbones-<step>.pt`` files and the logs into ``train.json``, and evaluates
the packs with ``examples/evaluate.py``: the dense linear probe (mIoU), k-NN and the paper's
Fig. 6 measure on held-out scenes, beside the bounds (each seed's random initial weights, the
hand-made patch spectrum) and a ceiling (the same ViT trained with the labels).

The statistic, fixed before any run: the teachers' probe mIoU, DINO + SERE minus DINO per seed,
its mean with a 95 % t interval and the seeds where DINO + SERE is higher ("wins"); it is read
only if the better arm's mean beats the best bound (the higher of random weights and the
hand-made feature) by at least ``GATE_MARGIN`` mIoU.

The GPU tier fits one command of 8 minutes on one H100, everything included: it writes the
scenes (all cores), measures the multi-crop rates (the CPU loader's and ``--device-crops``'),
starts every run at once for a short calibration, sets the epochs so that training ends on
time, trains with the crops drawn on the GPU, and writes only what the evaluation needs to
``--out`` (at most 8 files of at most 16 MiB). A run still going at the deadline is stopped;
the packs then hold the last epoch every run reached. The evaluation runs on a CPU from those
files (``--evaluate``).

It writes ``results.json`` (every number, the machine, the commit, the seeds, the settings, the
training record), ``results.md`` (the verdict first; per metric each arm's mean and standard
deviation over seeds, the bounds, the ceiling, the paired difference with a 95 % t interval and
the count of seeds where SERE is better) and plots to ``benchmarks/results/reproduce_<tier>/``.
Runs are resumable: rerunning the command continues unfinished runs and skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
GATE_MARGIN = 2.0  # mIoU the better arm must gain over the best bound before a difference is read
PACK_LIMIT = 16 * 2**20  # what one file brought back from the GPU machine may weigh
PACK_POINTS = 4  # points of training whose backbones are packed (the last epoch among them)


@dataclasses.dataclass(frozen=True)
class Tier:
    """One size of the experiment.

    ``epochs = 0`` sets the epochs from a calibration, so that training ends ``budget_s``
    seconds after the command started, less what packing the results takes.
    """

    data: str  # "fashion" (scenes of Fashion-MNIST's items, from --data) or "generated"
    train_images: int  # scenes the trainers read
    eval_images: tuple[int, int]  # the probes' train and held-out scenes
    curve_images: int  # held-out scenes for the invariance over training
    image_size: int
    batch_size: int
    lr: float  # the trainer's --lr: peak lr per 256 images (scaled by batch / 256)
    epochs: int
    warmup: float  # lr warm-up, a fraction of the epochs
    teacher_temp_warmup: float  # teacher temperature warm-up, a fraction of the epochs
    seeds: tuple[int, ...]
    device: str
    jobs: int  # trainings at once
    threads: int  # torch threads per training
    workers: int  # DataLoader workers per training
    device_crops: bool  # --device-crops: the views drawn a batch at a time on the device
    probe_steps: int
    knn_k: int
    diagnostics_every: int
    supervised_steps: int  # the ceiling's training steps (on the evaluating machine)
    calibration_steps: int  # steps of the calibration (epochs = 0); timed after the first third
    budget_s: float  # the whole command's wall time (0: none)
    note: str


TIERS = {
    "cpu": Tier(
        data="fashion",
        train_images=4096,
        eval_images=(2048, 512),
        curve_images=256,
        image_size=96,
        batch_size=32,
        lr=0.004,  # 8x DINO's per-256 rate (5e-4 peak at batch 32): a short run must move
        epochs=4,
        warmup=0.125,
        teacher_temp_warmup=0.25,
        seeds=(0, 1, 2),
        device="cpu",
        jobs=2,
        threads=1,
        workers=0,
        device_crops=True,
        probe_steps=500,
        knn_k=20,
        diagnostics_every=32,
        supervised_steps=1000,
        calibration_steps=0,
        budget_s=0,
        note="a CPU hour: where self-supervised features sit between the floor and the ceiling",
    ),
    # One H100, 8 minutes in all: the epochs come from the calibration.
    "gpu": Tier(
        data="fashion",
        train_images=32768,
        eval_images=(2048, 1024),  # the CPU tier's probe training set, twice its held-out
        curve_images=256,
        image_size=96,
        batch_size=256,
        lr=0.0005,  # DINO's: 5e-4 at batch 256
        epochs=0,
        warmup=0.1,  # DINO's 10 of 100 epochs
        teacher_temp_warmup=0.3,  # DINO's 30 of 100
        seeds=(0, 1, 2, 3),
        device="cuda",
        jobs=8,
        threads=1,
        workers=2,
        device_crops=True,
        probe_steps=500,
        knn_k=20,
        diagnostics_every=50,
        supervised_steps=1000,  # the CPU tier's ceiling, evaluated on the CPU the same way
        calibration_steps=60,
        budget_s=450,
        note="one H100, 8 minutes including data, calibration, training and packing",
    ),
}


def dry_run_tier(tier: Tier) -> Tier:
    """The same plan, tiny, on the CPU: to check a tier's commands without its device or time.

    The calibration (when the tier has one) runs too; the epochs it gives are capped at 2.
    """
    return dataclasses.replace(
        tier, train_images=32, eval_images=(32, 16), curve_images=8, batch_size=8, lr=0.004,
        epochs=tier.epochs and 2, seeds=tier.seeds[:2], device="cpu", jobs=min(tier.jobs, 2),
        workers=0, probe_steps=20, knn_k=5, diagnostics_every=2, supervised_steps=4,
        calibration_steps=tier.calibration_steps and 3,
        budget_s=tier.budget_s and 600,
        note=f"a dry run of the {tier.note.split(':')[0]} plan; its numbers mean nothing",
    )  # fmt: skip


def scenes(tier: Tier, data: str, split: str, count: int, seed: int) -> Any:
    """The tier's scenes: ``(image, mask)`` datasets of ``count`` items."""
    if data == "generated":
        return seg_data.ShapesSegmentation(count, tier.image_size, seed=seed)
    return seg_data.FashionScenes(data, split, count, tier.image_size, seed=seed)


def _write_share(args: tuple[Tier, str, Path, list[int]]) -> None:
    tier, data, root, indices = args
    torch.set_num_threads(1)
    dataset = scenes(tier, data, "train", tier.train_images, seed=0)
    seg_data.write_image_folder(root, dataset, dataset.num_classes, indices)


def write_scenes(tier: Tier, data: str, root: Path, log: Callable[[str], None]) -> None:
    """The training scenes as an ImageFolder (once), written by every core."""
    if (root / "done").is_file():
        return
    tic = time.perf_counter()
    cores = max(1, min(os.cpu_count() or 1, 16))
    shares = [list(range(k, tier.train_images, cores)) for k in range(cores)]
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_write_share, [(tier, data, root, share) for share in shares])
    (root / "done").write_text("ok\n")
    log(f"wrote {tier.train_images} training scenes in {time.perf_counter() - tic:.1f} s")


# Training ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What every run of a tier trains: its epochs and steps."""

    epochs: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        """Steps per run."""
        return self.epochs * self.steps_per_epoch


def train_command(
    tier: Tier, data: Path, out: Path, seed: int, arm: str, epochs: int, max_steps: int = 0
) -> list[str]:
    """The trainer's command line for one run."""
    cmd = [sys.executable, str(EXAMPLES / "dino_sere.py"), "--preset", "tiny"]
    cmd += ["--data", str(data), "--device", tier.device, "--seed", str(seed)]
    cmd += ["--batch-size", str(tier.batch_size), "--epochs", str(epochs), "--lr", str(tier.lr)]
    cmd += ["--warmup-epochs", f"{tier.warmup * epochs:g}"]
    cmd += ["--teacher-temp-warmup-epochs", f"{tier.teacher_temp_warmup * epochs:g}"]
    cmd += ["--workers", str(tier.workers), "--output-dir", str(out), "--no-progress"]
    cmd += ["--keep-checkpoints", "--diagnostics-every", str(tier.diagnostics_every), "--resume"]
    cmd += ["--device-crops"] if tier.device_crops else []
    cmd += ["--max-steps", str(max_steps)] if max_steps else []
    return cmd + (["--no-sere"] if arm == "dino" else [])


def _commit() -> str:
    """This checkout's commit, with ``+dirty`` when ``src/`` or ``examples/`` have changes.

    ``SERE_COMMIT`` instead where it is set: the GPU machine's copy of the tree may carry a
    stale ``.git``, and the caller knows the commit.
    """
    from record import git

    given = os.environ.get("SERE_COMMIT")
    if given:
        return given
    dirty = git("status", "--porcelain", "--", "src", "examples")
    return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")


def finished(out: Path, steps: int) -> bool:
    """Whether a run wrote its last checkpoint (``last.json`` at the final step)."""
    last = out / "last.json"
    return last.is_file() and json.loads(last.read_text()).get("step") == steps


def logged_steps(run: Path) -> int:
    """Rows in a run's ``log.csv`` (its steps so far), 0 before the first."""
    try:
        with (run / "log.csv").open() as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def train_all(
    tier: Tier,
    data: Path,
    runs: Path,
    epochs: int,
    steps: int,
    log: Callable[[str], None],
    *,
    max_steps: int = 0,
    deadline: float = math.inf,
    watch: Callable[[dict[str, int]], None] | None = None,
) -> list[str]:
    """Every (seed, arm) run, ``tier.jobs`` at a time; finished runs are skipped.

    Runs still going at ``deadline`` (a ``time.perf_counter`` value) are stopped and named in
    the list returned; their checkpoints up to their last finished epoch stay. ``watch`` is
    called every 0.2 s with each running run's logged steps.
    """
    target = max_steps or steps
    todo = [(seed, arm) for seed in tier.seeds for arm in ARMS
            if not finished(runs / f"{arm}_s{seed}", target)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(tier.threads), "MKL_NUM_THREADS": str(tier.threads)}
    running: list[tuple[subprocess.Popen[bytes], Path, Any, float]] = []
    stopped: list[str] = []
    while todo or running:
        while todo and len(running) < tier.jobs:
            seed, arm = todo.pop(0)
            out = runs / f"{arm}_s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "commit.txt").is_file():  # the code the run started with
                (out / "commit.txt").write_text(_commit() + "\n")
            handle = (out / "train.log").open("ab")
            command = train_command(tier, data, out, seed, arm, epochs, max_steps)
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT)  # fmt: skip
            running.append((proc, out, handle, time.perf_counter()))
            log(f"training {out.name}")
        time.sleep(0.2)
        if watch is not None:
            watch({out.name: logged_steps(out) for _, out, _, _ in running})
        if time.perf_counter() > deadline:
            for proc, out, handle, _ in running:
                proc.terminate()
                proc.wait()
                handle.close()
                stopped.append(out.name)
                log(f"stopped {out.name} at the deadline, at step {logged_steps(out)}")
            return stopped + [f"{arm}_s{seed}" for seed, arm in todo]
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
    return stopped


def calibrate(tier: Tier, data: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Start ``tier.jobs`` runs at once (both arms) for ``tier.calibration_steps`` steps.

    Returns the start-up time (launch to first step, the slowest run's) and the wall time
    per step of the slowest run once warm (after the first third of the steps), from the
    moments each run's ``log.csv`` grew, polled every 0.2 s.
    """
    cal = work / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    seeds = [tier.seeds[k % len(tier.seeds)] for k in range((tier.jobs + 1) // 2)]
    cal_tier = dataclasses.replace(tier, seeds=tuple(seeds))
    seen: dict[str, list[tuple[float, int]]] = {}
    tic = time.perf_counter()

    def watch(steps: dict[str, int]) -> None:
        now = time.perf_counter() - tic
        for name, count in steps.items():
            history = seen.setdefault(name, [])
            if not history or history[-1][1] != count:
                history.append((now, count))

    steps = tier.calibration_steps
    train_all(cal_tier, data, cal, 1000, 0, lambda line: None, max_steps=steps, watch=watch)
    warm = steps // 3
    per_step, startup = [], []
    for name, history in seen.items():
        first = next((t for t, n in history if n >= 1), math.nan)
        points = [(t, n) for t, n in history if n >= warm]
        if len(points) >= 2 and points[-1][1] > points[0][1]:
            per_step.append((points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1]))
        else:  # steps faster than the polling: the steps' own times, in log.csv
            from training.rundir import CSVLog

            times = [float(r["seconds"]) for r in CSVLog.read(cal / name / "log.csv")[warm:]]
            per_step.append(statistics.median(times) if times else math.nan)
        startup.append(first)
    per_step = [t for t in per_step if not math.isnan(t)]
    if not per_step:
        raise SystemExit(f"the calibration logged too few steps: {seen}")
    out = {
        "runs_at_once": len(seen),
        "steps": steps,
        "step_s": max(per_step),
        "step_s_each": sorted(per_step),
        "startup_s": max((t for t in startup if not math.isnan(t)), default=0.0),
        "wall_s": time.perf_counter() - tic,
    }
    log(f"calibration: {len(seen)} runs at once, {out['step_s'] * 1e3:.0f} ms a step (slowest), "
        f"{out['startup_s']:.0f} s to the first step")  # fmt: skip
    return out


def plan_epochs(
    tier: Tier, cal: dict[str, Any], spent_s: float, reserve_s: float, steps_per_epoch: int
) -> tuple[int, dict[str, Any]]:
    """Epochs that end training ``reserve_s`` before the budget, at the calibrated rate.

    The runs go in ``waves`` of ``tier.jobs``; each wave pays the start-up again. A tenth of
    the time is kept back for what the calibration does not see (each epoch's checkpoint and
    the loaders' restart); the deadline stops what still runs over.
    """
    runs = len(tier.seeds) * len(ARMS)
    waves = math.ceil(runs / tier.jobs)
    left = tier.budget_s - spent_s - reserve_s
    per_wave = left / waves - cal["startup_s"]
    steps = int(0.9 * per_wave / cal["step_s"])
    epochs = max(1, steps // steps_per_epoch)
    plan = {"budget_s": tier.budget_s, "spent_s": spent_s, "reserve_s": reserve_s,
            "waves": waves, "train_s": left, "steps_fit": steps, "epochs": epochs,
            "steps": epochs * steps_per_epoch}  # fmt: skip
    return epochs, plan


def crop_rates(
    tier: Tier, data: str, log: Callable[[str], None], passes: int = 3
) -> dict[str, Any]:
    """Images per second of DINO's multi-crop (the tiny preset's views), both ways, one thread.

    The CPU transform, as a loader worker runs it on PIL images (one core), and
    ``BatchMultiCrop`` on the tier's device at the tier's batch size. Best of ``passes``
    passes (the least disturbed).
    """
    from PIL import Image

    from sere_loss.batch_transforms import batch_dino_sere_transform
    from sere_loss.transforms import dino_sere_transform

    views = {"global_size": 64, "local_size": 32, "num_local": 4}
    dataset = scenes(tier, data, "train", 64, seed=0)
    pil = [Image.fromarray(dataset[i][0].permute(1, 2, 0).numpy()) for i in range(32)]
    device = torch.device(tier.device)
    batch = torch.stack([dataset[i % len(dataset)][0] for i in range(tier.batch_size)]).to(device)
    cpu, gpu = dino_sere_transform(**views), batch_dino_sere_transform(**views)
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def rate(images: int, work: Callable[[], object]) -> float:
        work()  # warm-up
        best = math.inf
        for _ in range(passes):
            sync()
            tic = time.perf_counter()
            work()
            sync()
            best = min(best, time.perf_counter() - tic)
        return images / best

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker has one thread
    try:
        with torch.random.fork_rng(devices=[]):
            per_core = rate(len(pil), lambda: [cpu(image) for image in pil])
        on_device = rate(5 * len(batch), lambda: [gpu(batch, generator=gen) for _ in range(5)])
    finally:
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    out = {"cpu_per_core": per_core, "cpu_all_cores": per_core * cores, "cores": cores,
           "device": str(device), "device_batch": len(batch),
           "device_crops": on_device}  # fmt: skip
    log(f"multi-crop: CPU {per_core:.0f} images/s per core ({per_core * cores:.0f} on all "
        f"{cores}), {device.type} batch of {len(batch)}: {on_device:.0f} images/s")  # fmt: skip
    return out


# Packs: what the evaluation reads ----------------------------------------------------------------


def kept_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every kept checkpoint of a run, in order."""
    found = [(int(p.stem.split("-")[1]), p) for p in run.glob("checkpoint-*.pth")]
    return sorted(found)


def pack_points(common: list[int], count: int = PACK_POINTS) -> list[int]:
    """Up to ``count`` steps spread over ``common`` (all of them if fewer), the last included."""
    if len(common) <= count:
        return list(common)
    picked = {common[round((k + 1) * len(common) / count) - 1] for k in range(count)}
    return sorted(picked)


def pack(tier: Tier, runs: Path, out: Path, log: Callable[[str], None]) -> list[Path]:
    """The backbones of every run (teacher and student, fp16), one file per step.

    ``backbones-<step>.pt`` at up to ``PACK_POINTS`` steps that every run reached, the last
    among them; each file must stay under ``PACK_LIMIT``.
    """
    names = [f"{arm}_s{seed}" for seed in tier.seeds for arm in ARMS]
    kept = {name: dict(kept_checkpoints(runs / name)) for name in names}
    common = sorted(set.intersection(*(set(k) for k in kept.values())))
    if not common:
        raise SystemExit(f"no step has a checkpoint in every run of {runs}: nothing to pack")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("backbones-*.pt"):  # of an earlier run: not to be read with these
        stale.unlink()
    written = []
    for step in pack_points(common):
        entry: dict[str, Any] = {"step": step, "runs": {}}
        for name in names:
            state = torch.load(kept[name][step], map_location="cpu", weights_only=False)
            entry["preset"], entry["steps_per_epoch"] = state["preset"], state["steps_per_epoch"]
            entry["runs"][name] = {
                role: {k[len("backbone.") :]: v.half() for k, v in state[role].items()
                       if k.startswith("backbone.")}
                for role in ("teacher", "student")
            }  # fmt: skip
        path = out / f"backbones-{step:07d}.pt"
        torch.save(entry, path)
        size = path.stat().st_size
        if size > PACK_LIMIT:
            raise SystemExit(f"{path} is {size / 2**20:.1f} MiB, over the 16 MiB a file may weigh")
        written.append(path)
    log(f"packed steps {[int(p.stem.split('-')[1]) for p in written]} of {len(names)} runs")
    return written


def read_packs(folder: Path) -> list[dict[str, Any]]:
    """Every ``backbones-*.pt`` of ``folder``, in step order."""
    paths = sorted(folder.glob("backbones-*.pt"))
    if not paths:
        raise SystemExit(f"{folder}: no backbones-*.pt (run the tier first, or give --evaluate)")
    return [torch.load(p, map_location="cpu", weights_only=True) for p in paths]


def extractor(preset: dict[str, Any], weights: dict[str, torch.Tensor], name: str) -> Any:
    """A packed backbone as ``evaluate.ViTExtractor`` (float32)."""
    vit = evaluate.build_backbone(preset)
    vit.load_state_dict({k: v.float() for k, v in weights.items()})
    return evaluate.ViTExtractor(vit, name)


def training_record(tier: Tier, runs: Path) -> dict[str, Any]:
    """Each run's ``log.csv`` (as columns), the commit it started at, its log's tail."""
    out: dict[str, Any] = {}
    for seed in tier.seeds:
        for arm in ARMS:
            run = runs / f"{arm}_s{seed}"
            if not run.is_dir():
                continue
            from training.rundir import CSVLog

            rows = CSVLog.read(run / "log.csv") if (run / "log.csv").is_file() else []
            columns = {
                key: [_number(r.get(key)) for r in rows] for key in (rows[0] if rows else {})
            }
            tail = (run / "train.log").read_text(errors="replace")[-1500:]
            commit = (
                (run / "commit.txt").read_text().strip() if (run / "commit.txt").is_file() else ""
            )
            out[run.name] = {"log": columns, "commit": commit, "train_log_tail": tail}
    return out


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# Evaluation --------------------------------------------------------------------------------------


def evaluate_all(
    tier: Tier, packs: list[dict[str, Any]], data: evaluate.EvalData, log: Callable[[str], None]
) -> dict[str, Any]:
    """Bounds, ceiling, final models (probe, k-NN, invariance), invariance over training.

    The teachers (DINO's evaluated model) get every task; the students get the invariance too:
    in a short run the momentum teacher lags behind the student that SERE's gradients reach.
    """
    final = packs[-1]
    preset, steps_per_epoch = final["preset"], final["steps_per_epoch"]
    randoms = {s: evaluate.random_extractor(preset, s) for s in tier.seeds}
    spectrum = evaluate.PatchSpectrum(preset["patch"])
    ceiling = evaluate.supervised_extractor(
        preset, data, steps=tier.supervised_steps, seed=tier.seeds[0], log=log
    )
    common = {"global_px": preset["global_px"], "device": "cpu", "log": log}
    tasks = ("probe", "knn", "invariance")
    results: dict[str, Any] = {"final": {}, "final_student": {}, "bounds": {}, "curve": {}}
    results |= {"step": final["step"], "epoch": final["step"] / steps_per_epoch}

    def model(pack: dict[str, Any], arm: str, seed: int, which: str) -> Any:
        name = f"{LABELS[arm]} seed {seed} ({which}, step {pack['step']})"
        return extractor(preset, pack["runs"][f"{arm}_s{seed}"][which], name)

    for seed in tier.seeds:
        keys = ["random", "dino", "dino_sere"]
        models = [randoms[seed], *(model(final, arm, seed, "teacher") for arm in ARMS)]
        if seed == tier.seeds[0]:  # neither learns from the runs: one seed is enough
            keys += ["spectrum", "ceiling"]
            models += [spectrum, ceiling]
        out = evaluate.evaluate(
            models, tasks, data, seed=seed, probe_steps=tier.probe_steps, knn_k=tier.knn_k,
            **common,
        )  # fmt: skip
        for task in tasks:
            for key, row in zip(keys, out[task][: len(keys)], strict=True):
                bound = key in ("random", "spectrum", "ceiling")
                target = results["bounds"] if bound else results["final"]
                target.setdefault(key, {}).setdefault(task, {})[seed] = row
        results["knn_chance"] = out["knn"][-1]["top1"]
        students = [model(final, arm, seed, "student") for arm in ARMS]
        out = evaluate.evaluate(students, ("invariance",), data, seed=seed, **common)
        for arm, row in zip(ARMS, out["invariance"], strict=True):
            results["final_student"].setdefault(arm, {}).setdefault("invariance", {})[seed] = row
    # The invariance over training on fewer held-out scenes, at every packed step, teachers and
    # students; the seed's random initial weights are its step 0.
    curve_data = data.with_val(tier.curve_images)
    for which in ("teacher", "student"):
        for arm in ARMS:
            for seed in tier.seeds:
                extractors = [randoms[seed], *(model(p, arm, seed, which) for p in packs)]
                out = evaluate.evaluate(
                    extractors, ("invariance",), curve_data, seed=seed, **common
                )
                steps = [0] + [p["step"] for p in packs]
                results["curve"].setdefault(which, {}).setdefault(arm, {})[seed] = [
                    {"step": step, "epoch": step / steps_per_epoch, **row}
                    for step, row in zip(steps, out["invariance"], strict=True)
                ]
    return results


# Statistics and tables ---------------------------------------------------------------------------

# (key, source, task, column, label, better): the numbers the table reports, the statistic
# first; ``source`` is where :func:`evaluate_all` put the models' rows (the bounds are the same
# for both arms).
METRICS = [
    ("miou", "final", "probe", "miou", "**dense linear probe mIoU (%), teacher**", "higher"),
    ("pixel_acc", "final", "probe", "pixel_acc", "dense linear probe pixel accuracy (%), teacher",
     "higher"),
    ("top1", "final", "knn", "top1", "k-NN top-1 (%), CLS token, teacher", "higher"),
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
]  # fmt: skip


def paired(a: Sequence[float], b: Sequence[float], better: str) -> dict[str, Any]:
    """Paired difference ``b - a`` over seeds: mean, sd, 95 % t interval, seeds favouring b."""
    diff = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diff)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "ci": [math.nan, math.nan], "wins": None, "n": 0}
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
    """One row per metric: bounds, ceiling, each arm's mean and sd, the paired difference."""
    rows = []
    for key, source, task, column, label, better in METRICS:

        def values(where: dict[str, Any], arm: str, task: str = task, col: str = column) -> list:
            per_seed = where.get(arm, {}).get(task, {})
            return [per_seed[s][col] for s in seeds if s in per_seed]

        dino = values(results[source], "dino")
        sere = values(results[source], "dino_sere")
        row = {"task": task, "metric": key, "label": label, "better": better}
        for bound in ("random", "spectrum", "ceiling"):
            row[bound] = _stats(values(results["bounds"], bound))
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


def probe_gate(rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the mIoU difference may be read, and why.

    The better arm's mean must beat the best bound (random weights or the hand-made feature)
    by ``GATE_MARGIN`` mIoU.
    """
    miou = next(r for r in rows if r["metric"] == "miou")
    bounds = {"random weights": miou["random"]["mean"], "hand-made": miou["spectrum"]["mean"]}
    name, bound = max(bounds.items(), key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
    arm = max(ARMS, key=lambda a: miou[a]["mean"])
    best = miou[arm]["mean"]
    if math.isnan(bound) or math.isnan(best):
        return False, "Probe gate: not evaluated."
    if best < bound + GATE_MARGIN:
        return False, (
            f"Probe gate: **not passed**. The better arm ({LABELS[arm]}, {best:.2f} mIoU) does "
            f"not beat the best bound ({name}, {bound:.2f}) by {GATE_MARGIN:g} mIoU: the "
            "mIoU difference is not read."
        )
    return True, (
        f"Probe gate: passed. The better arm ({LABELS[arm]}, {best:.2f} mIoU) beats the best "
        f"bound ({name}, {bound:.2f}) by {best - bound:.2f} >= {GATE_MARGIN:g} mIoU: the mIoU "
        "difference is read."
    )


def verdict(rows: list[dict[str, Any]]) -> str:
    """The page's first line: the statistic fixed before the run, read or not."""
    miou = next(r for r in rows if r["metric"] == "miou")
    passed, gate = probe_gate(rows)
    diff = miou["diff"]
    lo, hi = diff["ci"]
    figure = (
        f"DINO + SERE minus DINO, teacher probe mIoU: {diff['mean']:+.2f} "
        f"[{lo:+.2f}, {hi:+.2f}] (95 % t interval, {diff['n']} seeds), higher in "
        f"{diff['wins']} of {diff['n']}"
    )
    if not passed:
        return f"**Verdict: not read.** {gate} (For the record: {figure}.)"
    if lo > 0:
        reading = "SERE helps: the interval lies above zero"
    elif hi < 0:
        reading = "SERE hurts: the interval lies below zero"
    else:
        reading = "no difference shown: the interval holds zero"
    return f"**Verdict: {reading}.** {figure}. {gate}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results page: the verdict, the settings, the table, the gate, the machine."""
    tier, seeds, schedule = meta["tier"], meta["seeds"], meta["schedule"]
    seen = schedule["steps"] * tier["batch_size"]
    epochs = schedule["epochs"]
    data = (
        f"{tier['train_images']} training scenes of Fashion-MNIST's items with exact masks "
        f"(`{meta['data']}`; 10 classes and the background, {tier['image_size']} px); the probes "
        f"train on {tier['eval_images'][0]} of them and are scored on {tier['eval_images'][1]} "
        "held-out scenes of the test file's items"
        if tier["data"] == "fashion" and meta["data"] != "generated"
        else f"{tier['train_images']} generated training images (4 textured classes and the "
        f"background, {tier['image_size']} px), probes on {tier['eval_images'][0]} / "
        f"{tier['eval_images'][1]}"
    )
    lines = [
        f"# DINO vs DINO + SERE, tier `{meta['tier_name']}`",
        "",
        verdict(rows),
        "",
        "The statistic, fixed before the run: the teachers' dense-probe mIoU, DINO + SERE "
        "minus DINO per seed, the mean with a 95 % t interval and the seeds where DINO + SERE "
        f"is higher; read only if the better arm beats the best bound by at least "
        f"{GATE_MARGIN:g} mIoU.",
        "",
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) per arm; the two arms of a seed start "
        "from the same weights and see the same crops. Mean ± standard deviation over seeds; "
        "'SERE better' counts the seeds where the difference goes the metric's better way. "
        "Bounds: random = each seed's initial weights (the runs' starting point), hand-made = "
        "the patch colour and spectrum feature; ceiling = the same ViT trained with the labels "
        f"for {tier['supervised_steps']} steps (`evaluate.supervised_extractor`). Bounds and "
        "ceiling of seed 0 but the random weights (every seed's).",
        "",
        f"Data: {data}. Trainer: `examples/dino_sere.py --preset tiny"
        f"{' --device-crops' if tier['device_crops'] else ''}`, batch {tier['batch_size']}, "
        f"`--lr {tier['lr']}` (peak {tier['lr'] * tier['batch_size'] / 256:.2g}), {epochs} "
        f"epochs ({schedule['steps']} steps, {seen:,} images seen per run), lr warm-up "
        f"{tier['warmup'] * epochs:g} epochs, teacher temperature warm-up "
        f"{tier['teacher_temp_warmup'] * epochs:g} epochs. Evaluated at step "
        f"{meta['evaluated_step']}. Note: {tier['note']}.",
        "",
        "The two arms:",
        "",
        "| metric | better | DINO | DINO + SERE | difference [95 % CI] | SERE better |",
        "|---|---|---|---|---|---|",
    ]
    bounds = [
        "",
        "The bounds, on the same scenes and probes:",
        "",
        "| metric | random (lower bound) | hand-made | supervised (ceiling) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        digits = 2 if row["task"] in ("probe", "knn") else 4
        diff = row["diff"]
        lo, hi = diff["ci"]
        ci = "" if math.isnan(lo) else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        wins = "-" if diff["wins"] is None else f"{diff['wins']}/{diff['n']}"
        lines.append(
            f"| {row['label']} | {row['better']} | {_pm(row['dino'], digits)} | "
            f"{_pm(row['dino_sere'], digits)} | {diff['mean']:+.{digits}f}{ci} | {wins} |"
        )
        bounds.append(
            f"| {row['label']} | {_pm(row['random'], digits)} | {_pm(row['spectrum'], digits)} | "
            f"{_pm(row['ceiling'], digits)} |"
        )
    lines += bounds
    if meta.get("knn_chance") is not None:
        lines += ["", f"k-NN chance (the majority class): {meta['knn_chance']:.2f} %."]
    lines += ["", probe_gate(rows)[1], ""]
    train = meta["training"]
    lines += [
        "Trained at commit(s) "
        + ", ".join(sorted({r["commit"][:10] for r in train["runs"].values()}) or ["?"])
        + f" on {train['environment']['device']['name']} (load average "
        f"{train['load_start']} at the start, {train['load_end']} at the end), "
        f"{train['wall_s'] / 60:.1f} min"
        + (f" of a {train['plan']['budget_s']:.0f} s budget" if train.get("plan") else "")
        + (f"; stopped at the deadline: {', '.join(train['stopped'])}" if train["stopped"] else "")
        + ".",
        "",
        f"Evaluated at commit {meta['environment']['commit'][:10]}"
        f"{' (with uncommitted changes)' if meta['environment']['dirty'] else ''} on "
        f"{meta['environment']['device']['name']}, torch "
        f"{meta['environment']['versions']['torch']}, {meta['wall_s'] / 60:.0f} min, load "
        f"average {meta['load_start']} at the start and {meta['load_end']} at the end.",
        "",
        "Plots: `probe.png`, `fig6_bars.png` (the Fig. 6 measure per arm, seed dots, bounds), "
        "`invariance_over_training.png`, `fig5_*.png`.",
    ]
    rates = train.get("crop_rates")
    if rates:
        lines += [
            "",
            f"Multi-crop rates, {train['environment']['device']['name']}: the CPU transform "
            f"{rates['cpu_per_core']:.0f} images/s per core ({rates['cpu_all_cores']:.0f} on all "
            f"{rates['cores']} cores), `BatchMultiCrop` on {rates['device']} at batch "
            f"{rates['device_batch']}: {rates['device_crops']:.0f} images/s.",
        ]
    return "\n".join(lines) + "\n"


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
        for key, style, name in (("random", "--", "random init"), ("spectrum", ":", "hand-made"),
                                 ("ceiling", "-.", "supervised")):  # fmt: skip
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
    fig.suptitle(probe_gate(rows)[1].split(".")[0].replace("*", ""))
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)


def plot_maps(
    data: evaluate.EvalData, pack: dict[str, Any], seed: int, out: Path, count: int = 3
) -> None:
    """Fig. 5: a point's relation in two views and its change, DINO beside DINO + SERE.

    The first ``count`` held-out scenes whose two views share at least half of view 1, the
    lattice point nearest the overlap's centre, seed ``seed``'s final teachers; one figure per
    arm and scene (``fig5_<arm>_<k>.png``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return
    from sere_loss.diagnostics import plot_relation_maps, relation_maps
    from sere_loss.transforms import IMAGENET_MEAN, IMAGENET_STD

    preset = pack["preset"]
    models = {
        arm: extractor(preset, pack["runs"][f"{arm}_s{seed}"]["teacher"], arm) for arm in ARMS
    }
    views, boxes, flips, _ = evaluate.crop_pairs(data.val_images[:64], preset["global_px"], seed)
    first, second = boxes[:, 0], boxes[:, 1]
    side = torch.minimum(first[:, 2:], second[:, 2:]) - torch.maximum(first[:, :2], second[:, :2])
    shared = side.clamp(min=0).prod(dim=1) / (first[:, 2:] - first[:, :2]).prod(dim=1)
    chosen = [int(i) for i in (shared >= 0.5).nonzero().flatten()[:count]]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    import matplotlib.pyplot as plt

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
            title = f"{LABELS[arm]}, seed {seed}, held-out scene {i}"
            fig = plot_relation_maps(maps, images=images, title=title)
            fig.savefig(out / f"fig5_{arm}_{k}.png", dpi=100)
            plt.close(fig)


# Main --------------------------------------------------------------------------------------------

PACK_RESERVE_S = 30.0  # what packing and the margin after the deadline may take on the GPU machine
GPU_CORES = 16  # the GPU machine's cores (scenes are written by all of them)


def estimate(tier: Tier, data: str) -> dict[str, Any]:
    """The GPU tier's wall time by phase on one H100, from measured rates.

    Rates measured here, and in the CUDA check's record of the GPU machine
    (``benchmarks/results/cuda-check.json``).

    Writing the scenes is timed here on one core and shared over the GPU machine's 16; the
    start-up of a trainer is the CUDA check's time for a 3-step trainer run on the GPU; the
    calibration's steps and the training fill the rest of the budget by construction (the
    calibration measures the step time there and sets the epochs from it).
    """
    dataset = scenes(tier, data, "train", 32, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            tic = time.perf_counter()
            seg_data.write_image_folder(folder, dataset, dataset.num_classes)
            per_scene = (time.perf_counter() - tic) / len(dataset)
    finally:
        torch.set_num_threads(threads)
    record = ROOT / "benchmarks" / "results" / "cuda-check.json"
    startup = 25.0  # seconds, where the record is missing
    if record.is_file():
        checks = json.loads(record.read_text()).get("checks", [])
        times = [c.get("seconds") for c in checks if str(c.get("name", "")).startswith("dino_sere")]
        startup = max([t for t in times if isinstance(t, (int, float))], default=startup)
    phases = {
        "start (interpreter, imports)": 10.0,
        "scenes": tier.train_images * per_scene / GPU_CORES,
        "multi-crop rates": 10.0,
        "calibration (start-up and steps)": startup + 30.0,
        "training start-up": startup,
        "packing and margin": PACK_RESERVE_S,
    }
    fixed = sum(phases.values())
    phases["training steps (the rest of the budget)"] = max(0.0, tier.budget_s + 10.0 - fixed)
    return {
        "per_scene_s_here": per_scene,
        "trainer_startup_s_gpu": startup,
        "phases_s": phases,
        "total_s": sum(phases.values()),
        "limit_s": 480.0,
    }


def describe_estimate(est: dict[str, Any]) -> str:
    """The estimate as lines."""
    lines = [f"  {name}: {seconds:.0f} s" for name, seconds in est["phases_s"].items()]
    return (
        "estimate for one H100 (scenes timed here at "
        f"{est['per_scene_s_here'] * 1e3:.1f} ms each on one core, shared over {GPU_CORES}; "
        f"a trainer's start-up {est['trainer_startup_s_gpu']:.0f} s from the CUDA check):\n"
        + "\n".join(lines)
        + f"\n  total: {est['total_s']:.0f} s of {est['limit_s']:.0f} s"
    )


def resolve_data(data: str | None, tier: Tier) -> str:
    """``--data``: ``"generated"``, or a folder of Fashion-MNIST's idx files (Debian's)."""
    if data is None:
        data = "generated" if tier.data == "generated" else str(seg_data.FASHION_MNIST_DEBIAN)
    if data != "generated" and not seg_data.is_idx_folder(data):
        raise SystemExit(
            f"--data {data}: not a folder of Fashion-MNIST's four idx files (train-images-"
            "idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,"
            " each .gz or not). Debian's package dataset-fashion-mnist puts them in "
            f"{seg_data.FASHION_MNIST_DEBIAN}; or give --data generated"
        )
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    p.add_argument("--dry-run", action="store_true", help="the tier's plan, tiny, on the CPU")
    p.add_argument(
        "--data",
        help="a folder of Fashion-MNIST's four idx files (default: Debian's "
        f"{seg_data.FASHION_MNIST_DEBIAN}), or 'generated'",
    )
    p.add_argument(
        "--evaluate", type=Path, metavar="DIR",
        help="evaluate the backbones-*.pt and train.json in DIR (what a GPU run wrote) only",
    )  # fmt: skip
    p.add_argument("--seeds", help="comma-separated, instead of the tier's")
    p.add_argument("--epochs", type=int, help="instead of the tier's (or its calibration's)")
    p.add_argument("--jobs", type=int, help="trainings at once, instead of the tier's")
    p.add_argument("--work", type=Path, help="scenes and runs (default: runs/reproduce_<tier>)")
    p.add_argument(
        "--out", type=Path,
        help="results (benchmarks/results/reproduce_<tier>); on a GPU, where the packs go",
    )  # fmt: skip
    p.add_argument(
        "--eval-threads", type=int,
        help="torch threads of the evaluation (default: the tier's per-run threads: on a "
        "shared CPU one thread is far faster than two that wait on each other)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment (or the part of it this machine does); returns what it wrote."""
    tic = time.perf_counter()
    args = parse_args(argv)
    args.command = " ".join(["benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    tier = TIERS[args.tier]
    name = args.tier + ("-dry-run" if args.dry_run else "")
    if args.dry_run:
        tier = dry_run_tier(tier)
    if args.seeds:
        tier = dataclasses.replace(tier, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.epochs:
        tier = dataclasses.replace(tier, epochs=args.epochs)
    if args.jobs:
        tier = dataclasses.replace(tier, jobs=args.jobs)
    if len(tier.seeds) < 2:
        raise SystemExit("need at least 2 seeds for a paired comparison")
    if tier.device == "cuda" and not args.evaluate and not torch.cuda.is_available():
        raise SystemExit(
            f"--tier {args.tier} trains on a GPU and torch sees none; --dry-run runs its plan on "
            "the CPU, tiny, and --evaluate DIR evaluates what a GPU run wrote"
        )
    data = resolve_data(args.data, tier)
    work = args.work or ROOT / "runs" / f"reproduce_{name}"
    # A dry run's numbers mean nothing: they stay beside its runs, out of benchmarks/results.
    results = (
        work / "results" if args.dry_run else ROOT / "benchmarks" / "results" / f"reproduce_{name}"
    )
    out = args.out or results
    threads = torch.get_num_threads()
    try:
        if args.evaluate:
            return evaluate_packs(args, tier, name, data, args.evaluate, out, tic)
        packs = out if tier.device == "cuda" else work / "packed"
        training = train_tier(args, tier, data, work, packs, tic)
        if tier.device == "cuda":  # the evaluation runs on a CPU, from the packs
            return training
        torch.set_num_threads(args.eval_threads or tier.threads)
        return evaluate_packs(args, tier, name, data, packs, out, time.perf_counter())
    finally:
        torch.set_num_threads(threads)


def train_tier(
    args: argparse.Namespace, tier: Tier, data: str, work: Path, packs: Path, tic: float
) -> dict[str, Any]:
    """Scenes, rates, calibration, training, packs: ``train.json`` and ``backbones-*.pt``."""
    from record import environment, load

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - tic:7.1f} s] {line}", flush=True)

    record: dict[str, Any] = {"commit": _commit(), "command": args.command, "load_start": load()}
    record["tier"] = dataclasses.asdict(tier)
    if tier.budget_s:  # the plan's estimate for one H100, kept beside what happened
        record["estimate"] = estimate(TIERS[args.tier], data)
        log(describe_estimate(record["estimate"]))
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = time.perf_counter() - mark
        mark = time.perf_counter()

    scenes_dir = work / "data" / "train"
    write_scenes(tier, data, scenes_dir, log)  # forks: before CUDA starts in this process
    phase("scenes")
    record["environment"] = environment(torch.device(tier.device))
    record["crop_rates"] = crop_rates(tier, data, log, passes=1 if args.dry_run else 3)
    phase("crop_rates")
    steps_per_epoch = tier.train_images // tier.batch_size
    epochs, plan = tier.epochs, None
    planned = work / "calibration.json"
    if not epochs and planned.is_file():  # a rerun resumes the runs: the same epochs
        saved = json.loads(planned.read_text())
        epochs, plan, record["calibration"] = saved["epochs"], saved["plan"], saved["calibration"]
        log(f"epochs from {planned}: {epochs}")
    elif not epochs:
        cal = calibrate(tier, scenes_dir, work, log)
        phase("calibration")
        spent = time.perf_counter() - tic
        epochs, plan = plan_epochs(tier, cal, spent, PACK_RESERVE_S, steps_per_epoch)
        if args.dry_run:
            epochs = plan["epochs_dry_run"] = min(epochs, 2)
        log(f"plan: {epochs} epochs of {steps_per_epoch} steps ({plan['train_s']:.0f} s left "
            f"for training at {cal['step_s'] * 1e3:.0f} ms a step)")  # fmt: skip
        record["calibration"] = cal
        planned.write_text(json.dumps({"epochs": epochs, "plan": plan, "calibration": cal}))
    record["plan"] = plan
    schedule = Schedule(epochs, steps_per_epoch)
    deadline = tic + tier.budget_s - PACK_RESERVE_S if tier.budget_s else math.inf
    stopped = train_all(tier, scenes_dir, work / "runs", epochs, schedule.steps, log,
                        deadline=deadline)  # fmt: skip
    phase("training")
    record["schedule"] = dataclasses.asdict(schedule) | {"steps": schedule.steps}
    record["stopped"] = stopped
    try:
        written = pack(tier, work / "runs", packs, log)
    finally:  # the record comes back even when nothing could be packed
        phase("packing")
        record |= {"phases_s": phases, "load_end": load()}
        record["runs"] = training_record(tier, work / "runs")
        record["packs"] = sorted(p.name for p in packs.glob("backbones-*.pt"))
        record["wall_s"] = time.perf_counter() - tic
        packs.mkdir(parents=True, exist_ok=True)
        (packs / "train.json").write_text(json.dumps(record, indent=1, default=float))
    log(f"{len(written)} packs and train.json in {packs}: {record['wall_s']:.0f} s in all")
    return record


def evaluate_packs(
    args: argparse.Namespace, tier: Tier, name: str, data: str, folder: Path, out: Path,
    tic: float,
) -> dict[str, Any]:  # fmt: skip
    """The evaluation of what the training wrote in ``folder``; results in ``out``."""
    from record import environment, load

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - tic:7.1f} s] {line}", flush=True)

    training = json.loads((folder / "train.json").read_text())
    packs = read_packs(folder)
    tier = dataclasses.replace(tier, seeds=tuple(training["tier"]["seeds"]))
    started = environment(torch.device("cpu")) | {"run_threads": torch.get_num_threads()}
    load_start = load()
    log("evaluating")
    evaluation = evaluate.build_data(data, tier.eval_images, tier.image_size, seed=0)
    results = evaluate_all(tier, packs, evaluation, log)
    rows = summarise(results, tier.seeds)
    schedule = training["schedule"]
    meta = {
        "tier_name": name,
        "tier": training["tier"],
        "seeds": list(tier.seeds),
        "data": data,
        "schedule": schedule,
        "evaluated_step": packs[-1]["step"],
        "wall_s": time.perf_counter() - tic,
        "load_start": " ".join(f"{x:.2f}" for x in load_start or []),
        "load_end": " ".join(f"{x:.2f}" for x in load() or []),
        "environment": started,
        "knn_chance": results.get("knn_chance"),
        "training": training | {
            "load_start": " ".join(f"{x:.2f}" for x in training.get("load_start") or []),
            "load_end": " ".join(f"{x:.2f}" for x in training.get("load_end") or []),
        },
        "command": args.command,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "table": rows, "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=1, default=float))
    (out / "results.md").write_text(markdown(rows, meta))
    plot(results, rows, tier.seeds, out)
    plot_maps(evaluation, packs[-1], tier.seeds[0], out)
    log(f"results in {out}")
    print(markdown(rows, meta))
    return record


if __name__ == "__main__":
    main()
