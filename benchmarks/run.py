"""Benchmark the SERE losses against the authors' route: time, peak memory, targets.

    python benchmarks/run.py                # every setting, on CUDA when there is one
    python benchmarks/run.py --quick        # smoke run, tiny sizes, about a minute
    python benchmarks/run.py --settings dino_b32 g448_b32 --device cpu

For each setting (ViT-S tokens of a multi-crop batch) and term (spatial, channel, the whole
SERE loss), every implementation first runs one forward+backward step on its own, which gives
its peak memory and a fingerprint of its loss and gradients; the fingerprints must agree (the
library and the authors' route compute the same loss) before anything is timed. Then the
implementations are timed in alternation with torch.utils.benchmark, and the results go to
``<out>/<device>.json``, ``.md`` and ``.png`` (``<device>-quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cases
import dino_step
import memory
import report
import torch
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.05  # a timed sample runs the step often enough to last at least this long
WARMUP_BELOW_S = 2.0  # steps faster than this get an untimed warm-up before timing


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.rstrip()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Device, versions and commit of this run."""
    import sere_loss

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {
            "type": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "host_cpu": _cpu_name(),
            "threads": threads,
        }
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        dev = {
            "type": "cpu",
            "name": f"{_cpu_name()}, {os.cpu_count()} cores",
            "cores": os.cpu_count(),
            "memory_gib": round(total / 2**30, 1),
            "threads": threads,
        }
    status = _git("status", "--porcelain", "--", "src", "examples")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sere_loss": sere_loss.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": [line[3:] for line in status.splitlines() if line.strip()],
        "device": dev,
        "versions": versions,
    }


def time_cases(
    built: list[cases.Case],
    step_s: list[float],
    min_run_time: float,
    min_rounds: int,
    max_rounds: int,
    threads: int,
) -> list[benchmark.Measurement]:
    """Time the cases in alternation; one merged Measurement per case.

    Each round takes one sample of every case (the order reversed every other round, so that
    drifts of a shared machine reach all alike). A sample runs the step ``number`` times, enough
    to last ``SAMPLE_S``; the rounds run until every case has about ``min_run_time`` seconds of
    samples, within ``[min_rounds, max_rounds]``.
    """
    timers, numbers = [], []
    for case, seconds in zip(built, step_s, strict=True):
        timers.append(
            benchmark.Timer(
                stmt="step()",
                globals={"step": case.step},
                num_threads=threads,
                label=case.setting.name,
                sub_label=case.impl,
                description=case.term,
            )
        )
        numbers.append(max(1, math.ceil(SAMPLE_S / max(seconds, 1e-6))))
        if seconds < WARMUP_BELOW_S:
            case.step()
    per_round = max(n * s for n, s in zip(numbers, step_s, strict=True))
    rounds = min(max_rounds, max(min_rounds, math.ceil(min_run_time / per_round)))
    samples: list[list[benchmark.Measurement]] = [[] for _ in built]
    for r in range(rounds):
        order = list(range(len(built)))
        for k in order if r % 2 == 0 else order[::-1]:
            samples[k].append(timers[k].timeit(numbers[k]))
    return [benchmark.Measurement.merge(s)[0] for s in samples]


def run_setting(setting: cases.Setting, device: torch.device, args: argparse.Namespace) -> dict:
    """Guard, memory and timing of every term and implementation of one setting."""
    out: dict[str, Any] = {
        "name": setting.name,
        "description": setting.description,
        "batch": setting.batch,
        "global_tokens": setting.global_side**2,
        "local_views": setting.num_local,
        "local_tokens": setting.local_side**2 if setting.num_local else 0,
        "channels": setting.dim,
        "heads": setting.heads,
        "lattice": {"global": setting.global_lattice, "local": setting.local_lattice},
        "notes": [],
        "roles": {},
        "terms": {},
    }
    impls: list[str] = []
    for impl in setting.impls:
        try:
            label, _ = cases.resolve_impl(impl, device)
        except cases.Unavailable as exc:
            out["notes"].append(f"{impl} not run: {exc}")
            continue
        if impl == cases.FUSED:
            out["roles"]["fused"] = label
        if impl == cases.REFERENCE:
            out["roles"]["reference"] = label
        if impl == cases.AUTHORS:
            need = setting.relation_bytes() * args.authors_factor
            avail = _mem_available() if device.type == "cpu" else None
            if need > args.max_baseline_gb * 2**30 or (avail is not None and need > 0.8 * avail):
                one = setting.relation_bytes() / 2**30
                out["notes"].append(
                    f"authors' route not run: it would need about {need / 2**30:.1f} GiB "
                    f"({args.authors_factor:g} full relations of {one:.2f} GiB), over the "
                    f"{args.max_baseline_gb:g} GiB limit or 80 % of free memory"
                )
                continue
        impls.append(impl)
    probes: dict[str, dict[str, dict[str, Any]]] = {term: {} for term in setting.terms}
    print(f"[{time.strftime('%H:%M:%S')}] {setting.name}: {', '.join(impls)}", flush=True)
    for impl in impls:
        label, _ = cases.resolve_impl(impl, device)
        if device.type == "cpu":
            got = memory.measure_cpu(setting.name, impl, list(setting.terms), args.threads)
            if "error" in got:
                raise RuntimeError(f"{setting.name}: {impl} failed when measured alone: {got}")
        else:
            got = {}
            for term in setting.terms:
                case = cases.build_case(setting, impl, term, device)
                case.step()  # warm-up: cuBLAS workspaces and kernels, not the step's memory
                got[term] = memory.measure_case(case)
                del case
        for term in setting.terms:
            probes[term][label] = got[term]
            print(
                f"    {term} / {label}: loss {got[term]['loss']:.6f}, one step "
                f"{got[term]['seconds']:.2f} s, peak {got[term]['peak_bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
    for term in setting.terms:
        name = f"{setting.name}/{term}"
        print(f"[{time.strftime('%H:%M:%S')}] timing {name}", flush=True)
        cases.compare_probes(name, probes[term])
        gc.collect()
        built = [cases.build_case(setting, impl, term, device) for impl in impls]
        load_before = _load()
        min_rounds = args.min_rounds if setting.rounds is None else setting.rounds
        measured = time_cases(
            built,
            [probes[term][c.impl]["seconds"] for c in built],
            args.min_run_time,
            min(min_rounds, args.max_rounds),
            args.max_rounds,
            args.threads,
        )
        runs = {}
        for case, m in zip(built, measured, strict=True):
            p = probes[term][case.impl]
            runs[case.impl] = {
                "median_s": m.median,
                "iqr_s": m.iqr,
                "runs": len(m.times),
                "times_s": list(m.times),
                "peak_bytes": p["peak_bytes"],
                "loss": p["loss"],
            }
            print(
                f"    {case.impl}: {m.median * 1e3:,.1f} ms median, IQR {m.iqr * 1e3:,.1f} ms, "
                f"{len(m.times)} samples",
                flush=True,
            )
        out["terms"][term] = {
            "impls": runs,
            "guard": "losses and gradient fingerprints agree (rtol 1e-4 / 1e-3)",
            "load_average": {"before": load_before, "after": _load()},
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
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds timed per case")
    p.add_argument("--min-rounds", type=int, default=3, help="samples per case, at least")
    p.add_argument("--max-rounds", type=int, default=15, help="samples per case, at most")
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
    p.add_argument("--dino-batch", type=int, default=64, help="batch of the CUDA DINO step")
    p.add_argument("--no-dino-step", action="store_true", help="skip the whole-step benchmark")
    p.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="refresh the tables between this file's benchmark markers (full runs only)",
    )
    return p.parse_args(argv)


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
    if args.quick:
        args.min_run_time, args.max_rounds = min(args.min_run_time, 0.5), min(args.max_rounds, 5)

    results: dict[str, Any] = {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/run.py", *(argv or sys.argv[1:])]),
        **environment(device, args.threads),
        "load_average": {"start": _load()},
    }
    has_backend, fused = cases.backend_support(device)
    results["library_backends"] = {"backend_option": has_backend, "fused": fused}
    if device.type == "cpu":
        check = memory.validate_cpu(args.threads)
        summary = (
            "CPU: peak RSS growth of one step in a fresh process, glibc mmap threshold fixed "
            "at 64 KiB, high-water mark reset through /proc/self/clear_refs"
        )
    else:
        check = {"note": "CUDA caching allocator counters need no validation"}
        summary = "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    print(f"memory method check: {check}", flush=True)
    results["method"] = {
        "timing": (
            "torch.utils.benchmark.Timer.timeit, implementations in alternation, samples of "
            f">= {SAMPLE_S} s, {args.min_rounds}-{args.max_rounds} per case, ~{args.min_run_time} "
            "s per case; median and IQR of the per-step times; forward+backward of the loss "
            "w.r.t. the student tokens and the trainable head parameters, gradients cleared "
            "between steps"
        ),
        "memory": {"summary": summary, "validation": check},
        "seeds": {"inputs": cases.INPUT_SEED, "weights": cases.WEIGHT_SEED},
    }
    stem = device.type + ("-quick" if args.quick else "")
    results["settings"] = []
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
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.no_dino_step or args.quick:
        results["dino_step"] = {"status": "not run (--quick or --no-dino-step)"}
    else:
        results["dino_step"] = dino_step.measure_dino_step(device, batch=args.dino_batch)
    results["load_average"]["end"] = _load()
    results["wall_time_s"] = time.perf_counter() - start
    results["targets"] = report.evaluate_targets(results)
    write(results, args.out, stem)
    (args.out / f"{stem}.partial.json").unlink(missing_ok=True)
    if not args.quick and not args.settings and report.update_docs(results, stem, args.docs):
        print(f"updated the {stem} tables in {args.docs}")
    return results


def write(results: dict[str, Any], out: Path, stem: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(results))
    skipped = report.plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .md" + ("" if skipped else " and .png"))
    if skipped:
        print(f"plot skipped: {skipped}")
    print(report.targets_table(results["targets"]))


if __name__ == "__main__":
    main()
