"""Turn a results file into the targets, a markdown report, the docs' tables and a plot.

    python benchmarks/report.py benchmarks/results/cpu.json            # .md and .png beside it
    python benchmarks/report.py benchmarks/results/cpu.json --docs docs/performance.md

``run.py`` calls the same functions at the end of a run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 2**20
GROUPS = (
    ("targets", "DINO crops at batch 32 (the targets)"),
    ("sizes", "Other crops, batches, widths and resolutions"),
    ("lattice", "Lattice density at high resolution (the library alone, against 13 x 13)"),
)


@dataclass(frozen=True)
class Target:
    """One goal of issue 14: a ratio of ``impl`` to the setting's baseline (the authors' route).

    ``kind`` is ``speedup`` (baseline time / impl time per round, median at least ``bound``) or
    ``memory`` (impl peak / baseline peak, at most ``bound``).
    """

    setting: str
    term: str
    kind: str
    bound: float
    impl: str
    text: str


TARGETS = (
    Target("dino_b32", "sere", "speedup", 2.0, "library",
           "DINO crops, batch 32: whole SERE loss >= 2x faster than the authors' route"),
    Target("dino_b32", "sere", "memory", 1 / 3, "library",
           "DINO crops, batch 32: whole SERE loss peak memory <= 1/3 of the authors'"),
    Target("dino_b32", "sere", "speedup", 2.0, "library:chunked",
           "same, memory-saving mode (backend='chunked'): >= 2x faster"),
    Target("dino_b32", "sere", "memory", 1 / 3, "library:chunked",
           "same, memory-saving mode (backend='chunked'): peak memory <= 1/3"),
    Target("dino_b32", "channel", "speedup", 1.3, "library",
           "DINO crops, batch 32: channel term >= 1.3x faster"),
)  # fmt: skip


def _run(setting: dict[str, Any], term: str, impl: str) -> dict[str, Any] | None:
    run: dict[str, Any] | None = setting.get("terms", {}).get(term, {}).get("impls", {}).get(impl)
    return run


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target against the run's numbers (the median of the per-round ratios)."""
    device = results["device"]["type"].upper()
    settings = {s["name"]: s for s in results["settings"]}
    out = []
    for t in TARGETS:
        row: dict[str, Any] = {"target": f"{device}, {t.text}", "bound": t.bound, "kind": t.kind}
        setting = settings.get(t.setting)
        run = None if setting is None else _run(setting, t.term, t.impl)
        if run is None:
            row.update(value=None, met=None, note=f"{t.setting}/{t.term}/{t.impl} not measured")
        elif t.kind == "speedup":
            s = run["speedup"]
            row.update(
                value=s["median"],
                iqr=(s["q25"], s["q75"]),
                interval=(s["ci_low"], s["ci_high"], s["ci_coverage"]),
                met=bool(s["median"] >= t.bound),
                clears=bool(s["ci_low"] >= t.bound),
            )
            if "cpu_speedup" in run:
                row["cpu"] = run["cpu_speedup"]["median"]
        elif run["memory_ratio"] is None:
            row.update(value=None, met=None, note="the baseline's peak read 0")
        else:
            value = run["memory_ratio"]
            row.update(value=value, met=bool(value <= t.bound), clears=bool(value <= t.bound))
        out.append(row)
    dino = results.get("dino_step", {})
    batch = dino.get("batch", "?")
    row = {
        "target": f"{device}, DINO ViT-S/16 step, batch {batch}: SERE alone <= 3 % of the step",
        "bound": 0.03,
        "kind": "share",
    }
    if dino.get("status") == "measured":
        s = dino["share"]
        row.update(
            value=s["median"],
            iqr=(s["q25"], s["q75"]),
            interval=(s["ci_low"], s["ci_high"], s["ci_coverage"]),
            met=bool(s["median"] <= 0.03),
            clears=bool(s["ci_high"] <= 0.03),
        )
        if "cpu_share" in dino:
            row["cpu"] = dino["cpu_share"]["median"]
    else:
        row.update(value=None, met=None, note=dino.get("status", "not run"))
    out.append(row)
    return out


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def _fmt_ratio(value: float, kind: str) -> str:
    if kind == "speedup":
        return f"{value:.2f}x"
    if kind == "share":
        return f"{100 * value:.2f} %"
    return f"{value:.3f}"


def _fmt_bound(row: dict[str, Any]) -> str:
    if row["kind"] == "speedup":
        return f">= {row['bound']:g}x"
    if row["kind"] == "share":
        return f"<= {100 * row['bound']:g} %"
    return f"<= {row['bound']:.3g}"


def targets_table(targets: list[dict[str, Any]]) -> str:
    """Markdown: target, bound, median, IQR, interval for the median, met."""
    lines = [
        "| target | bound | measured (median) | IQR | interval for the median | met | "
        "in CPU time (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in targets:
        kind = row["kind"]
        if row.get("value") is None:
            lines.append(
                f"| {row['target']} | {_fmt_bound(row)} | - ({row.get('note', '')}) | - | - | "
                "not measured | - |"
            )
            continue
        iqr = "-"
        if "iqr" in row:
            iqr = f"{_fmt_ratio(row['iqr'][0], kind)} - {_fmt_ratio(row['iqr'][1], kind)}"
        interval = "- (one measurement)"
        if "interval" in row:
            low, high, cover = row["interval"]
            interval = f"{_fmt_ratio(low, kind)} - {_fmt_ratio(high, kind)} ({100 * cover:.1f} %)"
        met = "yes" if row["met"] else "**no**"
        if row["met"] and not row.get("clears", True):
            met = "yes (median; the interval reaches past the bound)"
        cpu = _fmt_ratio(row["cpu"], kind) if "cpu" in row else "-"
        lines.append(
            f"| {row['target']} | {_fmt_bound(row)} | {_fmt_ratio(row['value'], kind)} | "
            f"{iqr} | {interval} | {met} | {cpu} |"
        )
    return "\n".join(lines)


def results_table(setting: dict[str, Any]) -> str:
    """Markdown table of one setting: every term and implementation, ratios to the baseline.

    Seven columns, so that it fits the documentation's page: the time's IQR beside its median,
    the speedup's interval beside its median and IQR.
    """
    base = setting.get("baseline", "authors")
    lines = [
        f"| term | implementation | per step: median (IQR) | peak memory | speedup vs {base}: "
        "median (IQR) [interval] | in CPU time | memory vs " + base + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for term, data in setting.get("terms", {}).items():
        for impl, r in data["impls"].items():
            t = r["seconds"]
            peak = r.get("peak_bytes")
            mem = f"{peak / MIB:,.0f} MiB" if peak is not None else "-"
            speed, memr, cpu = "-", "-", "-"
            if "speedup" in r:
                s = r["speedup"]
                speed = (
                    f"{s['median']:.2f}x ({s['q25']:.2f}-{s['q75']:.2f}) "
                    f"[{s['ci_low']:.2f}-{s['ci_high']:.2f}]"
                )
                if "cpu_speedup" in r:
                    cpu = f"{r['cpu_speedup']['median']:.2f}x"
                if r["memory_ratio"] is not None:
                    memr = f"{r['memory_ratio']:.3f}"
            lines.append(
                f"| {term} | {impl} | {_fmt_time(t['median'])} ({_fmt_time(t['iqr'])}) | {mem} | "
                f"{speed} | {cpu} | {memr} |"
            )
    return "\n".join(lines)


def lattice_table(settings: list[dict[str, Any]]) -> list[str]:
    """Cost of each lattice against the baseline lattice of its sweep: time per round, memory."""
    import stats

    lines = [
        "| setting | lattice | points S | spatial term per step | time vs the smallest "
        "(median, IQR) | peak memory | memory vs the smallest |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        data = setting.get("terms", {}).get("spatial")
        if data is None:
            continue
        base = setting["baseline"]
        runs = data["impls"]
        order = sorted(runs, key=lambda impl: int(impl.partition("@")[2] or 0))
        for impl in order:
            side = int(impl.partition("@")[2])
            r, b = runs[impl], runs[base]
            cost = stats.ratio_summary(r["seconds"]["values"], b["seconds"]["values"])
            mem = r["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] > 0 else float("nan")
            lines.append(
                f"| {setting['name']} | {side} x {side} | {side * side} | "
                f"{_fmt_time(r['seconds']['median'])} | {cost['median']:.2f}x "
                f"({cost['q25']:.2f}-{cost['q75']:.2f}) | {r['peak_bytes'] / MIB:,.0f} MiB | "
                f"{mem:.2f}x |"
            )
    return lines


def dino_table(dino: dict[str, Any]) -> list[str]:
    """The whole-step measurement, as markdown lines."""
    if dino.get("status") != "measured":
        return [f"{dino.get('status', 'not run')}."]
    s, o = dino["share"], dino["step_ratio"]
    rows = [
        "| variant | per step (median) | IQR |",
        "|---|---|---|",
        *(
            f"| {label} | {_fmt_time(dino[key]['median'])} | {_fmt_time(dino[key]['iqr'])} |"
            for key, label in (
                ("dino", "DINO"),
                ("dino_sere", "DINO + SERE"),
                ("sere_alone", "SERE alone (forward + backward)"),
            )
        ),
        "",
        f"Batch {dino['batch']}, preset `{dino['preset']}`, {dino['precision']}, "
        f"{dino['rounds']} rounds. Per round, SERE alone is {100 * s['median']:.2f} % of the "
        f"step with SERE (IQR {100 * s['q25']:.2f}-{100 * s['q75']:.2f} %, interval "
        f"{100 * s['ci_low']:.2f}-{100 * s['ci_high']:.2f} %), and the step with SERE takes "
        f"{o['median']:.3f} times the step without (IQR {o['q25']:.3f}-{o['q75']:.3f}).",
    ]
    if "cpu_share" in dino:
        c, co = dino["cpu_share"], dino["cpu_step_ratio"]
        rows[-1] += (
            f" In process CPU time: share {100 * c['median']:.2f} % (IQR "
            f"{100 * c['q25']:.2f}-{100 * c['q75']:.2f} %), ratio {co['median']:.3f}."
        )
    return rows


def _machine_lines(results: dict[str, Any]) -> list[str]:
    dev, ver, thr = results["device"], results["versions"], results["threads"]
    dirty = results.get("dirty", [])
    tree = (
        "clean tree"
        if not dirty
        else f"{len(dirty)} uncommitted path(s): "
        + ", ".join(f"`{line}`" for line in dirty[:8])
        + (" ..." if len(dirty) > 8 else "")
    )
    load = results["load_average"]
    return [
        f"- machine: {dev['name']} ({dev['type']}), {dev['memory_gib']} GiB; torch "
        f"{thr['torch_intra_op']} intra-op / {thr['torch_inter_op']} inter-op threads "
        f"(environment: {thr['env']})",
        f"- torch {ver['torch']}, Python {ver['python']}, sere-loss {ver['sere_loss']}, "
        f"{ver['platform']}",
        f"- commit `{results['commit'][:12]}`, {tree}",
        f"- {results['created']}, {results['wall_time_s'] / 60:.1f} min in all; load average "
        f"(1, 5, 15 min) at the start {load['start']}, at the end {load['end']}",
        f"- allocator: timing in the harness's process ({results['allocator']['libc']}, "
        f"{results['allocator']['mallopt']}); memory in fresh processes "
        f"({results['method']['memory'].get('memory_process', '')})",
        f"- command: `{results['command']}`",
    ]


def markdown(results: dict[str, Any]) -> str:
    """The whole report of one run."""
    out = [
        f"# SERE loss benchmark: {results['device']['name']}",
        "",
        *_machine_lines(results),
        "",
        "Times are the median and IQR of the per-step times over interleaved rounds; speedups are "
        "the median, IQR and an order-statistic interval (its coverage in the targets table) of "
        "the per-round ratios. " + results["method"]["timing"] + ". Peak memory is the extra "
        "over the inputs (" + results["method"]["memory"]["summary"] + ").",
        "",
        "## Targets",
        "",
        targets_table(results["targets"]),
        "",
    ]
    for setting in results["settings"]:
        out += [f"## {setting['name']}: {setting['description']}", ""]
        out += _setting_lines(setting)
    out += ["## Whole DINO ViT-S/16 training step", "", *dino_table(results.get("dino_step", {}))]
    return "\n".join(out) + "\n"


def _setting_lines(setting: dict[str, Any]) -> list[str]:
    if "error" in setting:
        return [f"Failed: `{setting['error']}`", ""]
    lines = [f"- {note}" for note in setting.get("notes", [])]
    loads = [
        f"{term}: {d['load_average']['before'][0]} -> {d['load_average']['after'][0]}"
        for term, d in setting.get("terms", {}).items()
        if d["load_average"]["before"] and d["load_average"]["after"]
    ]
    rounds = {d["rounds"] for d in setting.get("terms", {}).values()}
    lines.append(
        f"- {setting['batch']} images, {setting['channels']} channels, {setting['heads']} heads; "
        f"lattice {setting['lattice']['global']} between the globals"
        + (
            f", {setting['lattice']['local']} with a local view ({setting['local_views']} local "
            "views)"
            if setting.get("local_views")
            else ""
        )
        + f"; {', '.join(map(str, sorted(rounds)))} rounds; 1-min load during timing "
        + "; ".join(loads)
    )
    return [*lines, "", results_table(setting), ""]


def docs_block(results: dict[str, Any], stem: str) -> str:
    """The generated part of ``docs/performance.md`` for one device."""
    lines = [
        f"From [`benchmarks/results/{stem}.json`](../benchmarks/results/{stem}.json) "
        f"(report: [`{stem}.md`](../benchmarks/results/{stem}.md)):",
        "",
        *_machine_lines(results),
        "",
        "#### Targets",
        "",
        targets_table(results["targets"]),
        "",
        f"![speedup and memory against the baseline](../benchmarks/results/{stem}.png)",
        "",
    ]
    for group, title in GROUPS:
        members = [s for s in results["settings"] if s.get("group", "sizes") == group]
        if not members:
            continue
        lines += [f"#### {title}", ""]
        if group == "lattice":
            lines += [*lattice_table(members), ""]
        for setting in members:
            lines += [f"**{setting['name']}**: {setting['description']}", ""]
            lines += _setting_lines(setting)
    lines += [
        "#### Whole DINO ViT-S/16 training step",
        "",
        *dino_table(results.get("dino_step", {})),
    ]
    return "\n".join(lines) + "\n"


def update_docs(results: dict[str, Any], stem: str, path: Path) -> bool:
    """Replace the block between ``<!-- benchmark:<device>:start/end -->`` in ``path``.

    Returns:
        Whether the file had the markers (and was updated).
    """
    if not path.exists():
        return False
    device = results["device"]["type"]
    text = path.read_text()
    start, end = f"<!-- benchmark:{device}:start -->", f"<!-- benchmark:{device}:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{docs_block(results, stem)}{end}{tail}")
    return True


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Speedup (median, IQR whiskers) and memory ratio per case; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    rows = []
    for setting in results["settings"]:
        for term, data in setting.get("terms", {}).items():
            for impl, r in data["impls"].items():
                if "speedup" in r:
                    s = r["speedup"]
                    label = f"{setting['name']} / {term} / {impl} vs {setting['baseline']}"
                    memr = r["memory_ratio"] if r["memory_ratio"] is not None else float("nan")
                    rows.append((label, s["median"], s["q25"], s["q75"], memr))
    if not rows:
        return "nothing to plot (no implementation measured beside a baseline)"
    rows = rows[::-1]
    labels = [r[0] for r in rows]
    ys = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.8), sharey=True)
    ax = axes[0]
    med = [r[1] for r in rows]
    err = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
    ax.barh(ys, med, xerr=err, color="tab:blue", ecolor="black", capsize=2)
    ax.set_title("speedup (median of per-round ratios,\nIQR whiskers; log scale)", fontsize=12)
    axes[1].barh(ys, [r[4] for r in rows], color="tab:orange")
    axes[1].set_title("peak memory / baseline\n(log scale)", fontsize=12)
    for ax, values in ((axes[0], med), (axes[1], [r[4] for r in rows])):
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        for y, v in zip(ys, values, strict=True):
            if v == v:  # not NaN
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=10)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=10)
    fig.suptitle(f"sere-loss benchmark: {results['device']['name']}", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write(results: dict[str, Any], out: Path, stem: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    skipped = plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .md" + ("" if skipped else " and .png"))
    if skipped:
        print(f"plot skipped: {skipped}")
    print(targets_table(results["targets"]))


def main(argv: list[str] | None = None) -> None:
    """Re-render a committed results file (and, with ``--docs``, the docs' tables)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results JSON written by run.py")
    p.add_argument("--docs", type=Path, help="rewrite the tables between this file's markers")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    results["targets"] = evaluate_targets(results)
    stem = args.results.stem
    write(results, args.results.parent, stem)
    if args.docs is not None:
        if not update_docs(results, stem, args.docs):
            raise SystemExit(f"{args.docs} has no benchmark:{results['device']['type']} markers")
        print(f"updated the tables in {args.docs}")


if __name__ == "__main__":
    main()
