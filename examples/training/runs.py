"""The bookkeeping of a run around a trainer's own step: :class:`Run`.

It owns the loop over iterations, the values logged (averaged over processes, stopped on NaN),
the checkpoints with every process's random state, and ``--resume``: the checks of layout,
state and options, and ``log.csv`` cut back to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import Checkpointer, plain, rng_state, set_rng_state
from training.data import ImageReadError, ResumableSampler
from training.distributed import Process, gather
from training.faults import fault_point
from training.rundir import CSVLog, OutputDir, format_value


def finite_or_die(values: dict[str, float], step: int) -> None:
    """Stop with a clear message instead of training on NaN (``step`` counted from 0)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(
            f"step {step + 1}: non-finite loss terms {bad}. Stopped before the update, without "
            "saving: the last checkpoint holds finite weights"
        )


_RUN_KEYS = ("rng", "step", "world_size", "batch_size", "steps_per_epoch", "args", "definition")
# Options that do not change what a run computes: --resume may change them freely.
NOT_DEFINING = frozenset(
    {
        "max_steps", "workers", "no_progress", "output_dir", "resume", "allow_changed_options",
        "dist_timeout", "check_images", "device", "precision", "save_every", "keep_checkpoints",
    }
)  # fmt: skip


def run_definition(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """What defines a run, by option name: the options, the preset's values, the config.

    ``--device`` and ``--precision`` count as what they resolved to (the config's ``device`` and
    ``precision``), the preset's fields as their values after the command line's overrides.
    """
    preset = config.get("preset", {})
    definition = {
        k: plain(v) for k, v in vars(args).items() if k not in NOT_DEFINING and k not in preset
    }
    definition |= {k: plain(v) for k, v in preset.items() if k not in NOT_DEFINING}
    definition |= {k: plain(v) for k, v in config.items() if k != "preset"}
    return definition


class Run:
    """The bookkeeping of one training run around a trainer's own step.

    It owns the loop over iterations (epochs, ``--max-steps``, a resume mid-epoch), the values
    logged (averaged over processes, stopped on NaN), checkpoints of every object in ``state``
    with each process's random state, and the progress bar. Only the main process prints and
    writes ``log.csv``, ``checkpoint.pth`` and ``last.json``. A trainer uses it as::

        run = Run(process, args, state, output=output, epochs=..., steps_per_epoch=..., ...)
        for step, epoch, batch in run.iterations(loader, sampler, run.resume()):
            ...  # the method's step
            run.log(step, epoch, schedules, run.mean(values, step))
        return run.finish()

    Args:
        process: this process.
        args: the command line of :func:`add_run_arguments`.
        state: what a checkpoint holds, by name: the modules themselves (not their DDP
            wrappers), the optimizer, the grad scaler, stateful losses.
        output: the checked output directory (from :func:`setup`); made from ``args`` if
            ``None``.
        epochs: the schedules' length.
        steps_per_epoch: iterations per epoch (of every process).
        batch_size: images per process and iteration.
        fields: the columns of ``log.csv`` after ``step`` and ``epoch``.
        config: saved with each checkpoint and part of the run's definition (the preset, the
            resolved precision, the dataset's size).
    """

    def __init__(
        self,
        process: Process,
        args: argparse.Namespace,
        state: dict[str, Any],
        *,
        output: OutputDir | None = None,
        epochs: int,
        steps_per_epoch: int,
        batch_size: int,
        fields: Sequence[str],
        config: dict[str, Any] | None = None,
    ) -> None:
        self.process, self.args, self.state = process, args, state
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.total_steps = epochs * steps_per_epoch
        self.max_steps = min(args.max_steps or self.total_steps, self.total_steps)
        self.config = {**(config or {}), "device": process.device.type}
        self.definition = run_definition(args, self.config)
        if output is None:
            output = OutputDir(Path(args.output_dir), resume=args.resume, process=process)
        self.output = output
        self.output_dir = output.path
        self.checkpointer = Checkpointer(output)
        extra = list(DIAGNOSTICS) if getattr(args, "diagnostics_every", 0) else []
        self.fields = ["step", "epoch", *fields, *extra, "seconds"]
        self.csv: CSVLog | None = None
        self.bar: tqdm[Any] | None = None
        self.row: dict[str, Any] = {}
        self.steps_run = 0
        self._tic = time.perf_counter()
        if process.is_main:
            self._check_disk_space()

    def print(self, *parts: object) -> None:
        """Print on the main process only."""
        if self.process.is_main:
            print(*parts, flush=True)

    def _check_disk_space(self) -> None:
        """Refuse a disk without room for the checkpoints this run keeps (two, one written)."""
        tensors: list[Tensor] = []
        for obj in self.state.values():
            if isinstance(obj, nn.Module):
                tensors += list(obj.state_dict().values())
                trained = [p for p in obj.parameters() if p.requires_grad]
                tensors += trained + trained  # an Adam-like optimizer's two moments
        size = sum(t.numel() * t.element_size() for t in tensors)
        have = sum(p.stat().st_size for p in (self.output.checkpoint, self.output.previous)
                   if p.exists())  # fmt: skip
        need = 2 * size - have
        free = shutil.disk_usage(self.output.path).free
        if need > free:
            raise SystemExit(
                f"--output-dir {self.output.path}: {free / 2**30:.2f} GiB free, but a checkpoint "
                f"takes about {size / 2**30:.2f} GiB and the run keeps two: free some space or "
                "choose another --output-dir"
            )

    def resume(self) -> int:
        """Load ``--resume`` into ``state`` and this process's random state.

        Returns the step to go on from: 0 without ``--resume``, or when ``--resume`` alone finds
        no checkpoint of this run yet. A checkpoint that fails its checksum, was saved with
        another layout or other options (unless ``--allow-changed-options`` names them) is
        refused. ``log.csv`` keeps the rows up to the checkpoint's step.
        """
        resume = self.args.resume
        if resume is None:
            return self._start_log(None, 0)
        path = self.output.checkpoint if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            if self.output.previous.exists():
                raise SystemExit(
                    f"{path} is missing but {self.output.previous} is there (a crash while "
                    f"checkpoints were rotated?): --resume {self.output.previous}"
                )
            self.print(f"no checkpoint in {self.output.path} yet: starting from step 0")
            return self._start_log(0, 0)
        saved = self.checkpointer.load(path)
        self._check_layout(saved, path)
        self._check_definition(saved, path)
        for name, obj in self.state.items():
            obj.load_state_dict(saved[name])
        rng = saved["rng"]
        set_rng_state(rng[self.process.rank] if isinstance(rng, list) else rng)
        step: int = saved["step"]
        if step >= self.total_steps:
            self.print(
                f"the run in {path} is finished (step {step} of {self.total_steps}): nothing to "
                "do. To train it longer, pass a larger --epochs with --allow-changed-options "
                "epochs"
            )
            return step
        if step >= self.max_steps:
            self.print(f"{path} is at step {step}, --max-steps is {self.max_steps}: nothing to do")
            return step
        self.print(f"resumed from step {step} ({path})")
        return self._start_log(step, step)

    def _start_log(self, keep_until: int | None, start: int) -> int:
        if self.process.is_main:
            self.csv = CSVLog(self.output.log, self.fields, keep_until)
        return start

    def _check_layout(self, saved: dict[str, Any], path: Path) -> None:
        layout = (saved.get("world_size", 1), saved.get("batch_size", self.batch_size))
        if layout != (self.process.world_size, self.batch_size):
            raise SystemExit(
                f"{path} was saved by {layout[0]} process(es) with a batch of {layout[1]} each; "
                f"this run has {self.process.world_size} with {self.batch_size}. Exact resume "
                "needs the same layout (the data order and the schedules depend on it)"
            )
        steps = saved.get("steps_per_epoch", self.steps_per_epoch)
        if steps != self.steps_per_epoch:
            raise SystemExit(
                f"{path} was saved with {steps} steps per epoch; this run's data gives "
                f"{self.steps_per_epoch} ({self.definition.get('dataset_size', '?')} images). "
                "Resume with the checkpoint's --data (the step counter, the data order and the "
                "schedules depend on it)"
            )
        held = sorted(set(saved) - set(self.config) - set(_RUN_KEYS))
        if held != sorted(self.state):
            raise SystemExit(
                f"{path} holds the state of {held}, this run has {sorted(self.state)}: it was "
                "saved by another setup (with or without SERE, say)"
            )

    def _check_definition(self, saved: dict[str, Any], path: Path) -> None:
        before: dict[str, Any] = saved.get("definition", {})
        now = self.definition
        allowed = set(self.args.allow_changed_options or [])
        unknown = sorted(allowed - set(before) - set(now))
        if unknown:
            raise SystemExit(
                f"--allow-changed-options {' '.join(unknown)}: no such option; the run's options "
                f"are {', '.join(sorted(now))}"
            )
        missing = object()
        changed = {
            name: (before.get(name, missing), now.get(name, missing))
            for name in sorted(set(before) | set(now))
            if before.get(name, missing) != now.get(name, missing)
        }

        def describe(name: str) -> str:
            old, new = (("(none)" if v is missing else repr(v)) for v in changed[name])
            return f"{_option(self.args, name)} {new} (checkpoint: {old})"

        refused = [name for name in changed if name not in allowed]
        if refused:
            raise SystemExit(
                f"--resume {path}: options differ from the checkpoint's: "
                f"{'; '.join(describe(n) for n in refused)}. Resume with the checkpoint's "
                f"values, or pass --allow-changed-options {' '.join(refused)} to change them on "
                "purpose (schedules and data then follow the new values from the resumed step)"
            )
        if changed:
            self.print("resuming with changed options:", "; ".join(map(describe, changed)))

    def iterations(
        self, loader: Iterable[Any], sampler: ResumableSampler, start: int
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(step, epoch, batch)`` from ``start`` to ``max_steps``.

        ``step`` counts from 0. A checkpoint is written at the end of each epoch and after the
        last step.
        """
        if start >= self.max_steps:
            return
        self.bar = tqdm(
            total=self.max_steps, initial=start, dynamic_ncols=True,
            disable=self.args.no_progress or not self.process.is_main,
        )  # fmt: skip
        step = start
        while step < self.max_steps:
            epoch = step // self.steps_per_epoch
            sampler.set_epoch(epoch, start=step % self.steps_per_epoch * self.batch_size)
            batches = iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except ImageReadError as error:  # from a worker: its traceback, then ours
                    text = str(error)
                    message = text[text.rfind("cannot use ") :].splitlines()[0]
                    raise SystemExit(
                        f"step {step + 1}: {message}\nReplace or remove the file, then continue "
                        f"with --resume (from the last checkpoint, at step "
                        f"{step - step % self.steps_per_epoch} or later)"
                    ) from error
                self._tic = time.perf_counter()
                yield step, epoch, batch
                step += 1
                self.steps_run += 1
                if step >= self.max_steps or step % self.steps_per_epoch == 0:
                    break
                if self.args.save_every and step % self.args.save_every == 0:
                    self.save(step)
            self.save(step)

    def diagnose(self, step: int) -> bool:
        """Whether iteration ``step`` logs the relation diagnostics (``--diagnostics-every``).

        Only the main process computes them, from its own share of the batch.
        """
        every = getattr(self.args, "diagnostics_every", 0)
        return bool(every) and self.process.is_main and step % every == 0

    def mean(self, values: dict[str, Tensor], step: int) -> dict[str, float]:
        """Scalars averaged over processes; every process stops together on a NaN or inf."""
        fault_point("step", step + 1, self.process.rank)
        if not values:
            return {}
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        if self.process.distributed:
            dist.all_reduce(stacked)
            stacked /= self.process.world_size
        means = dict(zip(values, stacked.tolist(), strict=True))
        finite_or_die(means, step)
        return means

    def log(
        self, step: int, epoch: int, schedules: dict[str, float], values: dict[str, float]
    ) -> None:
        """Record iteration ``step`` (0-based): ``log.csv``, the progress bar, the console."""
        self.row = {"step": step + 1, "epoch": epoch, **schedules, **values}
        self.row["seconds"] = time.perf_counter() - self._tic
        if self.csv is not None:
            self.csv.write(self.row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if self.args.no_progress:
            self.print(" ".join(f"{k} {format_value(v)}" for k, v in self.row.items()))

    def save(self, step: int) -> None:
        """Checkpoint ``state`` after ``step`` iterations, with every process's random state.

        With several processes it first checks that they hold the same parameters: DDP keeps
        them equal, so a difference is a bug, and a checkpoint of one process would hide it.
        """
        rng: list[Any] = [rng_state()]
        if self.process.distributed:
            self._check_in_sync()
            rng = [None] * self.process.world_size
            dist.all_gather_object(rng, rng_state())
        if not self.process.is_main:
            return
        saved = {name: obj.state_dict() for name, obj in self.state.items()}
        saved |= {"rng": rng, "step": step, "world_size": self.process.world_size}
        saved |= {"batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}
        saved |= {"args": plain(vars(self.args)), "definition": self.definition}
        saved |= plain(self.config)
        self.checkpointer.save(saved, step)
        if getattr(self.args, "keep_checkpoints", False):
            self.checkpointer.keep(step)

    def _check_in_sync(self) -> None:
        names = [name for name, obj in self.state.items() if isinstance(obj, nn.Module)]
        prints = [fingerprint(self.state[name], self.process.device) for name in names]
        local = torch.cat(prints)
        everyone = gather(local.unsqueeze(0))
        same = torch.isclose(everyone, local.expand_as(everyone), rtol=1e-6, atol=1e-9).all(dim=0)
        parts = same.split([len(p) for p in prints])
        differ = [name for name, part in zip(names, parts, strict=True) if not part.all()]
        if differ:
            raise RuntimeError(
                f"the processes' parameters differ in {differ}: DDP keeps a trained module's "
                "parameters equal in every process, so wrap each one with distribute()"
            )

    def finish(self) -> dict[str, Any]:
        """Close the bar, write ``last.json``, leave the process group; the last row logged.

        A run that had nothing to do (resumed at its end) leaves ``last.json`` as it was and
        returns what it holds.
        """
        if self.bar is not None:
            self.bar.close()
        summary = dict(self.row)
        if self.steps_run == 0:
            if self.output.last.exists():
                summary = json.loads(self.output.last.read_text())
        elif self.process.is_main:
            tmp = self.output.last.with_name("last.json.tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.output.last)
            self.print("done:", json.dumps(summary))
        self.output.release()
        if self.process.distributed:
            dist.destroy_process_group()
        return summary


def _option(args: argparse.Namespace, name: str) -> str:
    """How the user sets ``name``: ``--flag`` for an option, else where it comes from."""
    if hasattr(args, name):
        return "--" + name.replace("_", "-")
    if name == "dataset_size":
        return "dataset_size (the number of images in --data)"
    return f"{name} (set by --preset)"


def fingerprint(module: nn.Module, device: torch.device) -> Tensor:
    """The sum and the sum of squares of each parameter, in float64 on ``device``: ``(2 * P,)``.

    A module without parameters (DINO's loss, with its centre buffer) gives an empty tensor on
    ``device`` too, so the fingerprints of all modules concatenate wherever they live.
    """
    stats = [
        (p.detach().double().sum(), p.detach().double().square().sum()) for p in module.parameters()
    ]
    if not stats:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([t for pair in stats for t in pair]).to(device)


# The columns --diagnostics-every adds to log.csv: sere_loss.diagnostics' controlled measures
# (0: the two views relate alike, 1: no more alike than two images), the plain distances, and
# the spatial relations' row entropy (their sharpness).
DIAGNOSTICS = ("inv_spatial", "inv_channel", "inv_spatial_plain", "inv_channel_plain",
               "inv_spatial_entropy")  # fmt: skip


@torch.no_grad()
def relation_diagnostics(tokens: Tensor, boxes: Tensor, flips: Tensor) -> dict[str, float]:
    """How alike the two global views relate their patches and channels (paper Fig. 6).

    Args:
        tokens: patch tokens of the two global views, concatenated ``(2 * B, N, C)`` on a
            square grid (a teacher's, say).
        boxes: ``(B, V, 4)`` crop boxes of all views, globals first.
        flips: ``(B, V)``.

    Returns:
        :data:`DIAGNOSTICS` as floats, or nothing when fewer than 2 pairs overlap (the columns
        stay empty at that step).
    """
    from sere_loss.diagnostics import relation_invariance
    from sere_loss.functional import overlap_grids

    first, second = tokens.detach().float().chunk(2)
    geometry = boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1]
    if int(overlap_grids(*geometry, lattice=1)[2].sum()) < 2:
        return {}  # the controlled measure compares each overlapping pair with another
    out = relation_invariance(first, second, *(g.to(tokens.device) for g in geometry)).summary()
    values = (out["spatial_controlled"], out["channel_controlled"], out["spatial_plain"])
    values += (out["channel_plain"], out["spatial_entropy"])
    return dict(zip(DIAGNOSTICS, values, strict=True))
