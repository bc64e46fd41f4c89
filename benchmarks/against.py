"""SERE's loss, forward and backward, in this tree against the same loss at another commit.

A change that is meant not to cost anything (a refactor, a check moved, a path made
compilable) is held to the loss before it: both versions of ``sere_loss`` are imported into one
process (the other from a temporary ``git worktree``), build the same ``SERELoss`` from the
same seed, are checked to give the same loss, and are timed in interleaved rounds on the
inputs of ``cases.py``'s settings, as ``run.py`` times its cases (``run.time_rounds``). The
figure is the median of the per-round ratios (this tree / the other), with its IQR and an
interval for the median (``stats.py``)::

    python benchmarks/against.py --ref main --threads 1                  # the default: dino_b32
    python benchmarks/against.py --ref v0.1.0 --settings dino_b32 g448_b8 --backends auto chunked

It writes ``results/against-<ref>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from cases import SETTINGS, Case, Setting, make_inputs
from record import environment, git, load
from run import time_rounds
from stats import ratio_summary
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent


def import_tree(name: str, src: Path) -> ModuleType:
    """``src/sere_loss`` imported as the top-level package ``name``."""
    init = src / "sere_loss" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{init.parent} does not exist at that commit: no sere_loss to time")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(src / "sere_loss")]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"{src}: no sere_loss package there")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The recipes written out, since the trees' defaults may differ (the library's default was the
# paper's text until the authors' recipe became it): both trees get the same three settings.
RECIPES = {
    "authors": {"points": "official", "padding": "zeros", "empty_pairs": "uniform"},
    "paper": {"points": "center", "padding": "border", "empty_pairs": "mask"},
}


def this_tree() -> ModuleType:
    """The ``sere_loss`` of this checkout (refused if Python would import another one)."""
    import sere_loss

    here = (ROOT / "src" / "sere_loss").resolve()
    if Path(sere_loss.__file__).resolve().parent != here:
        raise SystemExit(
            f"sere_loss is imported from {Path(sere_loss.__file__).parent}, not from this "
            f"checkout's {here}: install it editable (pip install -e .) or set PYTHONPATH=src"
        )
    return sere_loss


def compare(
    libraries: dict[str, ModuleType],
    setting: Setting,
    backend: str,
    recipe: str,
    rounds: int,
    min_sample: float,
) -> dict[str, Any]:
    """Interleaved rounds of one setting and backend (``run.time_rounds``): both, each round."""
    inputs = make_inputs(setting, torch.device("cpu"))
    losses = {}
    for name, library in libraries.items():
        torch.manual_seed(0)
        try:
            losses[name] = library.SERELoss(
                setting.dim, num_heads=setting.heads, backend=backend, **RECIPES[recipe]
            )
        except TypeError as error:  # an older SERELoss without one of the settings
            where = "this tree" if name == "this" else "the other commit"
            raise SystemExit(
                f"{where}'s SERELoss does not take backend={backend!r} with the {recipe!r} recipe "
                f"written out ({error}): choose a newer --ref"
            ) from error

    def call(loss: Callable[..., Tensor]) -> Callable[[], Tensor]:
        return lambda: loss(
            inputs.student_global,
            inputs.teacher_global,
            inputs.boxes,
            inputs.flips,
            inputs.student_local,
        )

    leaves = inputs.leaves()
    built = [Case(setting, name, "sere", call(loss), leaves) for name, loss in losses.items()]
    this, other = (case.step() for case in built)
    if not torch.allclose(this, other, rtol=1e-5, atol=1e-6):
        raise SystemExit(
            f"{setting.name}, backend={backend!r}, recipe {recipe!r}: the two trees give "
            f"different losses ({float(this):.6g} here, {float(other):.6g} at the other "
            "commit): a timing of two different computations says nothing"
        )
    times, numbers, cpu = time_rounds(built, rounds, torch.device("cpu"), min_sample)
    return {
        "setting": setting.name,
        "description": setting.description,
        "backend": backend,
        "recipe": recipe,
        "loss": float(this),
        "seconds": times,
        "cpu_seconds": cpu,
        "steps_per_sample": numbers,
        "ratio": ratio_summary(times["this"], times["other"]),
    }


def markdown(record: dict[str, Any]) -> str:
    """The table: time here, time there, ratio (this / other) with its spread."""
    env = record["environment"]
    lines = [
        f"# This tree against {record['ref']} ({record['ref_commit'][:10]})",
        "",
        f"SERE's whole loss, forward and backward, on {env['device']['name']}, "
        f"{record['threads']} torch thread(s), {record['rounds']} interleaved rounds "
        f"(each sample the mean of steps lasting {record['min_sample']} s or more); this tree "
        f"at {env['commit'][:10]}"
        f"{' with uncommitted changes' if env['dirty'] else ''}, torch "
        f"{env['versions']['torch']}; load average {record['load_start']} at the start, "
        f"{record['load_end']} at the end. A ratio below 1 is faster here.",
        "",
        "| setting | backend | recipe | here | there | here / there | IQR | interval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        ratio = row["ratio"]
        here, there = (
            sorted(row["seconds"][k])[len(row["seconds"][k]) // 2] for k in ("this", "other")
        )
        lines.append(
            f"| {row['setting']} | {row['backend']} | {row['recipe']} | {1e3 * here:.1f} ms | "
            f"{1e3 * there:.1f} ms | {ratio['median']:.3f} | "
            f"{ratio['q25']:.3f}-{ratio['q75']:.3f} | "
            f"{ratio['ci_low']:.3f}-{ratio['ci_high']:.3f} ({100 * ratio['ci_coverage']:.1f} %) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: compare, write the record, print its table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ref", required=True, help="the commit, branch or tag to compare against")
    p.add_argument("--settings", nargs="+", default=["dino_b32"], choices=sorted(SETTINGS))
    p.add_argument(
        "--backends", nargs="+", default=["auto", "chunked"],
        choices=["auto", "reference", "dense", "chunked", "triton"],
    )  # fmt: skip
    p.add_argument("--recipes", nargs="+", default=["authors", "paper"], choices=sorted(RECIPES))
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds, at least 5")
    p.add_argument("--min-sample", type=float, default=0.2, help="seconds per sample, at least")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.rounds < 5 or not args.min_sample >= 0:
        p.error(
            f"--rounds must be >= 5 and --min-sample >= 0, got {args.rounds} and {args.min_sample}"
        )
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:  # before the timing, not after it
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        p.error(f"--out {args.out}: cannot write there ({error})")
    ref_commit = git("rev-parse", "--verify", f"{args.ref}^{{commit}}")
    if ref_commit == "unknown":
        p.error(f"--ref {args.ref!r} is not a commit of this repository")
    started, load_start = environment(torch.device("cpu")), load()

    def stop(signum: int, frame: object) -> None:  # SIGTERM, SIGHUP: clean up as Ctrl-C does
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree)]
        try:
            subprocess.run([*add, ref_commit], check=True)
            other = import_tree("sere_loss_other", tree / "src")
            libraries = {"this": this_tree(), "other": other}
            rows = []
            for name in args.settings:
                for backend, recipe in itertools.product(args.backends, args.recipes):
                    setting = SETTINGS[name]
                    row = compare(libraries, setting, backend, recipe, args.rounds, args.min_sample)
                    ratio = row["ratio"]["median"]
                    print(f"{name} {backend} {recipe}: here / there {ratio:.3f}", flush=True)
                    rows.append(row)
        finally:  # also after a failed or interrupted add, which leaves a prunable entry
            remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)]
            subprocess.run(remove, check=False, capture_output=True)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    record = {
        "ref": args.ref,
        "ref_commit": ref_commit,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "min_sample": args.min_sample,
        "environment": started,
        "load_start": load_start,
        "load_end": load(),
        "rows": rows,
    }
    stem = "against-" + "".join(c if c.isalnum() or c in "-." else "_" for c in args.ref)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
