"""Benchmark the SERE losses against the authors' route: interleaved rounds, ratios, memory.

    python benchmarks/run.py                      # every setting; CUDA when there is one
    python benchmarks/run.py --quick              # smoke run on tiny sizes (about a minute)
    python benchmarks/run.py --settings dino_b32 --rounds 9 --stem cpu-dev

For each setting (ViT tokens of a multi-crop batch) and term (spatial, channel, the whole SERE
loss), every implementation first runs one forward+backward step alone in a fresh process
(CPU) or after a warm-up (CUDA), which gives its peak memory and a fingerprint of its loss and
gradients; implementations that compute the same loss must agree before anything is timed.
Then, in this process (glibc's allocator untouched), every implementation takes a warm-up step
and the rounds begin: each round times one sample of every implementation, in an order that
rotates from round to round, and the ratio to the baseline is taken within each round. The
results go to ``<out>/<stem>.json``, ``.md`` and ``.png`` (stem: the device, ``-quick`` for
``--quick``), and a full run rewrites the tables of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import cases
import dino_step
import memory
import record
import report
import stats
import torch

ROOT = record.ROOT
MIN_ROUNDS = 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    built: list[cases.Case], rounds: int, device: torch.device, min_sample_s: float
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, list[float]]]:
    """Seconds per step of every case, one sample per case and round, and steps per sample.

    The third result is the process's CPU seconds per step (``time.process_time``): at one
    thread, far less sensitive than wall time to the load of other processes.

    Every case first takes one untimed warm-up step, always. A sample runs the step ``number``
    times (enough to last ``min_sample_s`` judging by a second, timed warm-up step) and records
    the mean. Round ``r`` starts with case ``r mod len(built)`` and goes on in order, so every
    case is first as often as the others and load that drifts during a round is shared.
    """
    numbers = {}
    for case in built:
        case.step()  # warm-up: first-call set-up of kernels and allocations
        _sync(device)
        tic = time.perf_counter()
        case.step()
        _sync(device)
        numbers[case.impl] = max(1, math.ceil(min_sample_s / (time.perf_counter() - tic)))
    times: dict[str, list[float]] = {case.impl: [] for case in built}
    cpu: dict[str, list[float]] = {case.impl: [] for case in built}
    for r in range(rounds):
        shift = r % len(built)
        for case in built[shift:] + built[:shift]:
            number = numbers[case.impl]
            _sync(device)
            tic, tic_cpu = time.perf_counter(), time.process_time()
            for _ in range(number):
                case.step()
            _sync(device)
            times[case.impl].append((time.perf_counter() - tic) / number)
            cpu[case.impl].append((time.process_time() - tic_cpu) / number)
    return times, numbers, cpu


def _authors_fits(setting: cases.Setting, device: torch.device, args: argparse.Namespace) -> str:
    """Why the authors' route is not run here, or ``""`` when it fits in memory."""
    need = setting.relation_bytes() * args.authors_factor
    avail = record.mem_available() if device.type == "cpu" else None
    if need > args.max_baseline_gb * 2**30 or (avail is not None and need > 0.8 * avail):
        one = setting.relation_bytes() / 2**30
        return (
            f"authors' route not run: it would need about {need / 2**30:.1f} GiB "
            f"({args.authors_factor:g} full relations of {one:.2f} GiB), over the "
            f"{args.max_baseline_gb:g} GiB limit or 80 % of free memory"
        )
    return ""


def run_setting(
    setting: cases.Setting, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Memory, guard and interleaved timing of every term and implementation of one setting."""
    out: dict[str, Any] = {
        "name": setting.name,
        "description": setting.description,
        "group": setting.group,
        "batch": setting.batch,
        "global_tokens": setting.global_side**2,
        "local_views": setting.num_local,
        "local_tokens": setting.local_side**2 if setting.num_local else 0,
        "channels": setting.dim,
        "heads": setting.heads,
        "lattice": {"global": setting.lattice, "local": setting.local_lattice},
        "baseline": setting.baseline,
        "notes": [],
        "terms": {},
    }
    impls = []
    for impl in setting.impls:
        why = _authors_fits(setting, device, args) if impl == cases.AUTHORS else ""
        if why:
            out["notes"].append(why)
        else:
            impls.append(impl)
    if setting.baseline not in impls:
        out["baseline"] = impls[-1]
        out["notes"].append(f"ratios against {impls[-1]}, the baseline {setting.baseline} not run")
    print(f"[{time.strftime('%H:%M:%S')}] {setting.name}: {', '.join(impls)}", flush=True)
    probes: dict[str, dict[str, Any]] = {term: {} for term in setting.terms}
    for impl in impls:
        if device.type == "cpu":
            got = memory.measure_cpu(setting.name, impl, list(setting.terms), args.threads)
            if "error" in got:
                raise RuntimeError(f"{setting.name}: {impl} failed when measured alone: {got}")
            out["memory_process"] = got.get("allocator", "")
        else:
            got = {}
            for term in setting.terms:
                case = cases.build_case(setting, impl, term, device)
                case.step()  # warm-up: cuBLAS workspaces and kernels, not the step's memory
                got[term] = memory.measure_case(case)
                del case
        for term in setting.terms:
            probes[term][impl] = got[term]
            print(
                f"    {term} / {impl}: loss {got[term]['loss']:.6f}, one step "
                f"{got[term]['seconds']:.2f} s, peak {got[term]['peak_bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
    for term in setting.terms:
        name = f"{setting.name}/{term}"
        for group in cases.comparable(impls):
            cases.compare_probes(name, {impl: probes[term][impl] for impl in group})
        gc.collect()
        built = [cases.build_case(setting, impl, term, device) for impl in impls]
        load_before = record.load()
        started = time.perf_counter()
        times, numbers, cpu = time_rounds(built, args.rounds, device, args.min_sample)
        seconds = time.perf_counter() - started
        load_after = record.load()
        base = out["baseline"]
        runs = {}
        for impl in impls:
            peak = probes[term][impl]["peak_bytes"]
            runs[impl] = {
                "seconds": stats.summary(times[impl]),
                "cpu_seconds": stats.summary(cpu[impl]),
                "steps_per_sample": numbers[impl],
                "peak_bytes": peak,
                "loss": probes[term][impl]["loss"],
            }
            if impl != base:
                runs[impl]["speedup"] = stats.ratio_summary(times[base], times[impl])
                runs[impl]["cpu_speedup"] = stats.ratio_summary(cpu[base], cpu[impl])
                base_peak = probes[term][base]["peak_bytes"]
                runs[impl]["memory_ratio"] = peak / base_peak if base_peak > 0 else None
            line = f"    {impl}: {runs[impl]['seconds']['median'] * 1e3:,.1f} ms"
            if impl != base:
                s = runs[impl]["speedup"]
                line += f", {s['median']:.2f}x (IQR {s['q25']:.2f}-{s['q75']:.2f}) vs {base}"
                line += f" (CPU time {runs[impl]['cpu_speedup']['median']:.2f}x)"
                if runs[impl]["memory_ratio"] is not None:
                    line += f", memory {runs[impl]['memory_ratio']:.3f}"
            print(line, flush=True)
        out["terms"][term] = {
            "impls": runs,
            "rounds": args.rounds,
            "guard": "losses and gradient fingerprints agree (rtol 1e-4 / 1e-3) where the "
            "implementations compute the same loss",
            "load_average": {"before": load_before, "after": load_after},
            "timing_seconds": seconds,
        }
        del built
        gc.collect()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings only")
    p.add_argument("--settings", nargs="+", metavar="NAME", help=f"any of {list(cases.SETTINGS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stem", help="file name of the results (default: the device type)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"rounds, at least {MIN_ROUNDS}")
    p.add_argument("--min-sample", type=float, default=0.2, help="seconds per sample, at least")
    p.add_argument(
        "--max-baseline-gb",
        type=float,
        default=16.0,
        help="skip the authors' route where it would need more than this",
    )
    p.add_argument(
        "--authors-factor",
        type=float,
        default=8.0,
        help="the authors' spatial step peaks at about this many full relations (measured: 7.7)",
    )
    p.add_argument("--dino-batch", type=int, help="batch of the DINO step (CPU 8, CUDA 64)")
    p.add_argument("--no-dino-step", action="store_true", help="skip the whole-step benchmark")
    p.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="rewrite the tables between this file's benchmark markers (full runs only)",
    )
    args = p.parse_args(argv)
    if args.rounds < 2 or (args.rounds < MIN_ROUNDS and not args.quick):
        p.error(f"--rounds must be at least {MIN_ROUNDS} (2 with --quick)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
        device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.settings:
        unknown = sorted(set(args.settings) - set(cases.SETTINGS))
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; choose from {list(cases.SETTINGS)}")
        names = list(args.settings)
    else:
        names = list(cases.QUICK if args.quick else cases.FULL)
    full = not args.quick and not args.settings
    stem = args.stem or (device.type + ("-quick" if args.quick else ""))

    results: dict[str, Any] = {
        "schema": 2,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            ["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "full_run": full,
        **record.environment(device),
        "load_average": {"start": record.load()},
    }
    if device.type == "cpu":
        check = memory.validate_cpu(args.threads)
        mem_summary = (
            "CPU: peak RSS growth of one step in a fresh process, after a warm-up step, glibc's "
            "mmap threshold fixed at 64 KiB there, high-water mark reset through "
            "/proc/self/clear_refs"
        )
    else:
        check = {"note": "CUDA caching allocator counters need no validation"}
        mem_summary = "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    print(f"memory method check: {check}", flush=True)
    results["method"] = {
        "timing": (
            f"{args.rounds} interleaved rounds; in each, one sample of every implementation "
            f"(steps of >= {args.min_sample} s in all, the mean per step), the order rotating "
            "from round to round, after an untimed warm-up step of each; forward+backward of the "
            "loss w.r.t. the student tokens and the trainable head parameters, gradients "
            "cleared between steps; ratios per round, then their median, IQR and an "
            "order-statistic interval for the median"
        ),
        "timing_process": "the harness's own process: no mallopt, glibc's defaults",
        "memory": {
            "summary": mem_summary,
            "validation": check,
            "memory_process": memory.ALLOCATOR
            if device.type == "cpu"
            else "CUDA caching allocator",
        },
        "seeds": {"inputs": cases.INPUT_SEED, "weights": cases.WEIGHT_SEED},
    }
    results["settings"] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            results["settings"].append(run_setting(cases.SETTINGS[name], device, args))
        except Exception as exc:  # record it, go on with the other settings
            setting = cases.SETTINGS[name]
            results["settings"].append(
                {"name": name, "description": setting.description, "error": repr(exc)}
            )
            print(f"{name} FAILED: {exc!r}", flush=True)
        # Partial results survive a crash or an interrupted run.
        (args.out / f"{stem}.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.no_dino_step or args.quick:
        results["dino_step"] = {"status": "not run (--quick or --no-dino-step)"}
    else:
        batch = args.dino_batch or (64 if device.type == "cuda" else 8)
        print(f"[{time.strftime('%H:%M:%S')}] DINO step, batch {batch}", flush=True)
        results["dino_step"] = dino_step.measure_dino_step(device, batch=batch, rounds=args.rounds)
    results["load_average"]["end"] = record.load()
    results["wall_time_s"] = time.perf_counter() - start
    results["targets"] = report.evaluate_targets(results)
    report.write(results, args.out, stem)
    (args.out / f"{stem}.partial.json").unlink(missing_ok=True)
    if full and report.update_docs(results, stem, args.docs):
        print(f"updated the {device.type} tables in {args.docs}")
    return results


if __name__ == "__main__":
    main()
