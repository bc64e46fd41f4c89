"""The bookkeeping of a run around a trainer's own step: :class:`Run`.

It owns the loop over iterations, the values logged (averaged over processes, stopped on NaN),
the checkpoints with every process's random state, the stop on SIGTERM or SIGINT
(:mod:`training.preemption`), and ``--resume``: the checks of layout, state and options, of the
run the output directory holds, and ``log.csv`` cut back to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import Checkpointer, peek, plain, rng_state, set_rng_state, verifies
from training.data import ImageReadError, ResumableSampler
from training.distributed import Process, gather
from training.faults import fault_point
from training.preemption import REQUEUE_STATUS, STOP
from training.rundir import CSVLog, OutputDir, format_value, kept_checkpoints, step_ranges


def finite_or_die(values: dict[str, float], step: int) -> None:
    """Stop with a clear message instead of training on NaN (``step`` counted from 0)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(
            f"step {step + 1}: non-finite loss terms {bad}. Stopped before the update, without "
            "saving: the last checkpoint holds finite weights"
        )


_RUN_KEYS = ("rng", "step", "world_size", "batch_size", "steps_per_epoch", "args", "definition",
             "run_id")  # fmt: skip
# Options that do not change what a run computes: --resume may change them freely.
NOT_DEFINING = frozenset(
    {
        "max_steps", "workers", "no_progress", "output_dir", "resume", "allow_changed_options",
        "dist_timeout", "check_images", "device", "precision", "save_every", "keep_checkpoints",
        "replace_bad_images", "compile_sere",
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
    with each process's random state, the progress bar, and the stop on SIGTERM or SIGINT after
    a step that every process agrees on. Only the main process prints and writes ``log.csv``,
    ``checkpoint.pth`` and ``last.json``. A trainer uses it as::

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
        self.fields = ["step", "epoch", *fields, *extra, "data_seconds", "seconds"]
        self.csv: CSVLog | None = None
        self.bar: tqdm[Any] | None = None
        self.row: dict[str, Any] = {}
        self.steps_run = 0
        self.run_id = ""  # set by resume(): new, or the checkpoint's
        self.stopped_by: str | None = None  # what stopped the run before its last step
        self._stop_seen: tuple[int, bool] = (-1, False)  # (step, agreed) from mean()'s reduction
        self._tic = time.perf_counter()
        self._data_seconds = 0.0  # how long the step waited for its batch
        self.waited = {"data": 0.0, "step": 0.0}  # the run's totals, for its closing line
        if process.is_main:
            self._check_disk_space()

    def print(self, *parts: object) -> None:
        """Print on the main process only."""
        if self.process.is_main:
            print(*parts, flush=True)

    def _check_disk_space(self) -> None:
        """Refuse a disk without room for three checkpoints: two kept, and one being written.

        While a save writes ``checkpoint.pth.tmp``, ``checkpoint.pth`` and
        ``checkpoint.prev.pth`` are still there; the oldest goes only once the new one is
        verified. The checkpoints already there count as part of the three.
        """
        tensors: list[Tensor] = []
        for obj in self.state.values():
            if isinstance(obj, nn.Module):
                tensors += list(obj.state_dict().values())
                trained = [p for p in obj.parameters() if p.requires_grad]
                tensors += trained + trained  # an Adam-like optimizer's two moments
        size = sum(t.numel() * t.element_size() for t in tensors)
        have = sum(p.stat().st_size for p in (self.output.checkpoint, self.output.previous)
                   if p.exists())  # fmt: skip
        need = 3 * size - have
        free = shutil.disk_usage(self.output.path).free
        if need > free:
            raise SystemExit(
                f"--output-dir {self.output.path}: {free / 2**30:.2f} GiB free, but a checkpoint "
                f"takes about {size / 2**30:.2f} GiB and a save needs room for three (the last "
                "two and the new one): free some space or choose another --output-dir"
            )

    def resume(self) -> int:
        """Load ``--resume`` into ``state`` and this process's random state.

        Returns the step to go on from: 0 without ``--resume``, or when ``--resume`` alone finds
        no checkpoint of this run yet. A checkpoint that fails its checksum, was saved with
        another layout or other options (unless ``--allow-changed-options`` names them) is
        refused, and so is ``--resume PATH`` into an ``--output-dir`` that holds another run or
        later checkpoints of this one (:meth:`_check_directory`). ``log.csv`` keeps the rows up
        to the checkpoint's step, and the run says which of them it could not keep.
        """
        resume = self.args.resume
        self.run_id = uuid.uuid4().hex
        if resume is None:
            return self._start_log(None, 0)
        path = self.output.checkpoint if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            if self.output.previous.exists():
                raise SystemExit(
                    f"{path} is missing but {self.output.previous} is there (a crash while "
                    f"checkpoints were rotated?): --resume {self.output.previous}"
                )
            kept = kept_checkpoints(self.output.path)
            if kept:
                raise SystemExit(
                    f"{path} is missing but kept checkpoints are there (the newest: "
                    f"{kept[0][1]}, at step {kept[0][0]}): --resume {kept[0][1]}"
                )
            self.print(f"no checkpoint in {self.output.path} yet: starting from step 0")
            return self._start_log(0, 0)
        saved = self.checkpointer.load(path)
        self._check_layout(saved, path)
        self._check_definition(saved, path)
        source = self._check_directory(saved, path)
        for name, obj in self.state.items():
            obj.load_state_dict(saved[name])
        rng = saved["rng"]
        set_rng_state(rng[self.process.rank] if isinstance(rng, list) else rng)
        step: int = saved["step"]
        if source is None:  # this directory's run goes on; a new run starts from another's
            self.run_id = saved.get("run_id") or self.run_id
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
        return self._start_log(step, step, source)

    def _start_log(self, keep_until: int | None, start: int, source: Path | None = None) -> int:
        if not self.process.is_main:
            return start
        self.csv = CSVLog(self.output.log, self.fields, keep_until, source=source)
        read = self.output.log if source is None else source
        if self.csv.damaged:
            self.print(
                f"{read}: line(s) {step_ranges(self.csv.damaged)} are not text that the log can "
                "hold (not UTF-8, or NUL bytes): left out"
            )
        if self.csv.missing:
            self.print(
                f"{read} has no row for step(s) {step_ranges(self.csv.missing)} of the "
                f"{keep_until} before the checkpoint: those rows are lost (the weights are not); "
                "log.csv goes on without them"
            )
        return start

    def _check_directory(self, saved: dict[str, Any], path: Path) -> Path | None:
        """Refuse ``--resume PATH`` where it would overwrite or cut back what a directory holds.

        The usual resume (``--output-dir``'s own ``checkpoint.pth``) passes. Otherwise:

        - a directory that holds no run yet takes a new run that starts from ``PATH``; its
          ``log.csv`` begins with the rows of the log beside ``PATH`` (returned, else ``None``);
        - a directory that holds another run (another run id, or for checkpoints without one,
          ``PATH`` outside it) is refused: the resumed run would overwrite its log, its
          checkpoints and its ``last.json``;
        - a checkpoint of the directory's own run is refused if the directory holds a later
          checkpoint that is whole: the resume would throw the steps after ``PATH`` away. A
          later ``checkpoint.pth`` that fails its checksum is set aside as
          ``checkpoint.damaged.pth``, so that the next save does not keep it as the backup.
        """
        out, step = self.output, int(saved["step"])
        if path.resolve() == out.checkpoint.resolve():
            return None
        held = out.held()
        if not held:
            self.print(
                f"a new run in {out.path}, from {path} (step {step}); the run that wrote it is "
                "left as it is"
            )
            return path.parent / "log.csv"
        inside = path.resolve().parent == out.path.resolve()
        theirs = self._run_id_here()
        same = inside if theirs is None or not saved.get("run_id") else theirs == saved["run_id"]
        if not same:
            raise SystemExit(
                f"--resume {path}: {out.path} holds another run{out.progress()} "
                f"({', '.join(held)}), which resuming there would overwrite. Resume into a new "
                f"--output-dir (--output-dir <new> --resume {path}), or move that run away first"
            )
        later = [(k, f) for k, f in kept_checkpoints(out.path) if k > step]
        for rotated in (out.checkpoint, out.previous):
            info = peek(rotated) if rotated.exists() else None
            if info is not None and info["step"] > step:
                later.append((info["step"], rotated))
        for later_step, later_path in sorted(later, reverse=True):
            if later_path.resolve() == path.resolve() or not verifies(later_path):
                continue
            raise SystemExit(
                f"--resume {path} is at step {step}, but {out.path} holds this run up to step "
                f"{later_step} ({later_path.name}): resuming there would throw away steps "
                f"{step + 1}-{later_step}. To go on from step {step}, resume into a new "
                f"--output-dir (--output-dir <new> --resume {path})"
            )
        if self.process.is_main and out.checkpoint.exists() and not verifies(out.checkpoint):
            damaged = out.path / "checkpoint.damaged.pth"
            os.replace(out.checkpoint, damaged)
            self.print(
                f"{out.checkpoint} is damaged: set aside as {damaged}, so that "
                f"{out.previous} is not replaced by it at the next save"
            )
        return None

    def _run_id_here(self) -> str | None:
        """The run id that the checkpoints in ``--output-dir`` carry (the first readable)."""
        out = self.output
        for candidate in (
            out.checkpoint,
            out.previous,
            *(k for _, k in kept_checkpoints(out.path)),
        ):
            info = peek(candidate) if candidate.exists() else None
            if info is not None and info["run_id"]:
                return str(info["run_id"])
        return None

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
        last step. After a SIGTERM or SIGINT (or, under ``torchrun``, the end of ``torchrun``)
        the step under way finishes, a checkpoint is written, and the iterations end early;
        :meth:`finish` then exits with :data:`~training.preemption.REQUEUE_STATUS`.
        """
        if start >= self.max_steps:
            return
        if self._stop_agreed(start):
            self.stopped_by = STOP.reason or "a signal to another process"
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
            stop = False
            while True:
                waiting = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except ImageReadError as error:  # from a worker: its traceback, then ours
                    text = str(error)
                    message = text[text.rfind("cannot use ") :].splitlines()[0]
                    raise SystemExit(
                        f"step {step + 1}: {message}\nReplace the file with a good image of the "
                        "same name and continue with --resume, or continue with --resume "
                        "--replace-bad-images, which uses the next image in its place (removing "
                        "the file changes the number of images, which a resume refuses)"
                    ) from error
                self._tic = time.perf_counter()
                self._data_seconds = self._tic - waiting
                yield step, epoch, batch
                step += 1
                self.steps_run += 1
                stop = step < self.max_steps and self._stop_agreed(step)
                if stop or step >= self.max_steps or step % self.steps_per_epoch == 0:
                    break
                if self.args.save_every and step % self.args.save_every == 0:
                    self.save(step)
            if stop:
                self.stopped_by = STOP.reason or "a signal to another process"
                self.print(f"{self.stopped_by}: stopping after step {step}, with a checkpoint")
            self.save(step)
            if stop:
                return

    def _stop_agreed(self, step: int) -> bool:
        """Whether every process stops after ``step`` steps: one of them was asked to.

        :meth:`mean` sums the processes' requests in the collective it runs at each step; a
        step without it (or the start) runs one of its own.
        """
        seen_at, agreed = self._stop_seen
        if seen_at == step:
            return agreed
        if not self.process.distributed:
            return STOP.requested
        flag = torch.tensor([float(STOP.requested)], device=self.process.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def diagnose(self, step: int) -> bool:
        """Whether iteration ``step`` logs the relation diagnostics (``--diagnostics-every``).

        Only the main process computes them, from its own share of the batch.
        """
        every = getattr(self.args, "diagnostics_every", 0)
        return bool(every) and self.process.is_main and step % every == 0

    def mean(self, values: dict[str, Tensor], step: int) -> dict[str, float]:
        """Scalars averaged over processes; every process stops together on a NaN or inf.

        The same collective sums the processes' requests to stop (SIGTERM, SIGINT), so that
        they all stop after this step or all go on.
        """
        fault_point("step", step + 1, self.process.rank)
        if not self.process.distributed:
            if not values:
                return {}
            stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
            means = dict(zip(values, stacked.tolist(), strict=True))
        else:
            device = self.process.device
            parts = [v.detach().float().reshape(1).to(device) for v in values.values()]
            parts.append(torch.tensor([float(STOP.requested)], device=device))
            stacked = torch.cat(parts)
            dist.all_reduce(stacked)
            self._stop_seen = (step + 1, bool(stacked[-1].item() > 0))
            means = dict(
                zip(values, (stacked[:-1] / self.process.world_size).tolist(), strict=True)
            )
        finite_or_die(means, step)
        return means

    def log(
        self, step: int, epoch: int, schedules: dict[str, float], values: dict[str, float]
    ) -> None:
        """Record iteration ``step`` (0-based): ``log.csv``, the progress bar, the console."""
        self.row = {"step": step + 1, "epoch": epoch, **schedules, **values}
        # The loader's wait beside the step's own time: a GPU that waits for data shows here.
        self.row["data_seconds"] = self._data_seconds
        self.row["seconds"] = time.perf_counter() - self._tic
        self.waited["data"] += self.row["data_seconds"]
        self.waited["step"] += self.row["seconds"]
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
        saved |= {"run_id": self.run_id or uuid.uuid4().hex}
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
        returns what it holds. A run stopped by a signal writes no ``last.json``: it says where
        its checkpoint is and exits with :data:`~training.preemption.REQUEUE_STATUS`.
        """
        if self.bar is not None:
            self.bar.close()
        if self.stopped_by is not None:
            self._exit_stopped()
        STOP.restore()
        summary = dict(self.row)
        if self.steps_run == 0:
            if self.output.last.exists():
                summary = json.loads(self.output.last.read_text())
        elif self.process.is_main:
            tmp = self.output.last.with_name("last.json.tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.output.last)
            self.print("done:", json.dumps(summary))
            total = self.waited["data"] + self.waited["step"]
            if total > 0:
                self.print(
                    f"the steps waited {self.waited['data']:.1f} s of {total:.1f} s for their "
                    f"batches ({100 * self.waited['data'] / total:.1f} %, log.csv's data_seconds): "
                    "more than a few per cent means the device waits for the loader (raise "
                    "--workers)"
                )
        self.output.release()
        if self.process.distributed:
            dist.destroy_process_group()
        return summary

    def _exit_stopped(self) -> None:
        step = self.row.get("step", None)
        if step is None:
            self.print(
                f"stopped by {self.stopped_by} before its first step: nothing new to save. "
                f"Run the same command with --resume to continue (exit status {REQUEUE_STATUS}: "
                "requeue)"
            )
        else:
            self.print(
                f"stopped by {self.stopped_by} after step {step} of {self.total_steps}: "
                f"{self.output.checkpoint} is written and verified. Run the same command with "
                f"--resume to continue (exit status {REQUEUE_STATUS}: requeue)"
            )
        self.output.release()
        if self.process.distributed:
            dist.barrier()  # none leaves before the checkpoint is written (torchrun would end it)
            dist.destroy_process_group()
        sys.exit(REQUEUE_STATUS)


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
