"""Turn a results dict into the targets, a markdown report and a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cases import AUTHORS

MIB = 2**20


@dataclass(frozen=True)
class Target:
    """One goal of issue 5: a ratio between two implementations in one run.

    ``kind`` is ``speedup`` (baseline median / impl median, at least ``bound``) or ``memory``
    (impl peak / baseline peak, at most ``bound``). ``impl`` and ``baseline`` are roles:
    ``library``, ``fused``, ``reference`` or ``authors``.
    """

    device: str
    setting: str
    term: str
    kind: str
    bound: float
    impl: str
    baseline: str
    text: str


TARGETS = (
    Target("cpu", "dino_b32", "spatial", "speedup", 3.0, "library", "authors",
           "CPU, DINO crops, batch 32: spatial term >= 3x faster than the authors' route"),
    Target("cpu", "dino_b32", "sere", "speedup", 2.0, "library", "authors",
           "CPU, DINO crops, batch 32: whole SERE loss >= 2x faster"),
    Target("cpu", "dino_b32", "sere", "memory", 1 / 3, "library", "authors",
           "CPU, DINO crops, batch 32: whole SERE loss peak memory <= 1/3"),
    Target("cpu", "g448_b32", "spatial", "speedup", 10.0, "library", "authors",
           "CPU, 2x448 globals, batch 32: spatial term >= 10x faster"),
    Target("any", "full518_b16", "spatial", "memory", 0.1, "fused", "reference",
           "518 px full-token relation, batch 16: fused peak memory <= 1/10 of the reference's"),
)  # fmt: skip
DINO_STEP_TEXT = "CUDA, DINO ViT-S/16 step, batch 64: SERE adds <= 3 %"


def _role_label(setting: dict[str, Any], role: str) -> str | None:
    labels: dict[str, str] = setting.get("roles", {})
    return labels.get(role, role if role in (AUTHORS, "library") else None)


def ratio(setting: dict[str, Any], term: str, kind: str, impl: str, baseline: str) -> float | None:
    """``baseline / impl`` median time (speedup) or ``impl / baseline`` peak memory, or None."""
    runs = setting.get("terms", {}).get(term, {}).get("impls", {})
    a, b = runs.get(impl, {}), runs.get(baseline, {})
    key = "median_s" if kind == "speedup" else "peak_bytes"
    if a.get(key) is None or b.get(key) is None or not a[key] or not b[key]:
        return None
    return float(b[key] / a[key]) if kind == "speedup" else float(a[key] / b[key])


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target that applies to this device against the run's numbers."""
    device = results["device"]["type"]
    settings = {s["name"]: s for s in results["settings"]}
    out = []
    for t in TARGETS:
        row: dict[str, Any] = {"target": t.text, "bound": t.bound, "kind": t.kind}
        setting = settings.get(t.setting)
        if t.device not in ("any", device):
            row.update(value=None, met=None, note=f"a {t.device} target; this run is on {device}")
        elif setting is None:
            row.update(value=None, met=None, note=f"setting {t.setting} not run")
        else:
            impl, base = _role_label(setting, t.impl), _role_label(setting, t.baseline)
            value = (
                None if impl is None or base is None else ratio(setting, t.term, t.kind, impl, base)
            )
            if value is None:
                row.update(value=None, met=None, note=f"{t.impl} or {t.baseline} not measured")
            else:
                met = value >= t.bound if t.kind == "speedup" else value <= t.bound
                row.update(value=value, met=bool(met), impl=impl, baseline=base)
        out.append(row)
    dino = results.get("dino_step", {})
    row = {"target": DINO_STEP_TEXT, "bound": 0.03, "kind": "overhead"}
    if dino.get("status") == "measured":
        row.update(value=dino["overhead"], met=dino["met"])
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


def _fmt_value(row: dict[str, Any]) -> str:
    value = row.get("value")
    if value is None:
        return "-"
    if row["kind"] == "speedup":
        return f"{value:.2f}x"
    if row["kind"] == "overhead":
        return f"{100 * value:+.1f} %"
    return f"{value:.3f} ({1 / value:.1f}x less)" if value else "0"


def _fmt_bound(row: dict[str, Any]) -> str:
    if row["kind"] == "speedup":
        return f">= {row['bound']:g}x"
    if row["kind"] == "overhead":
        return f"<= {100 * row['bound']:g} %"
    return f"<= {row['bound']:.3g}"


def targets_table(targets: list[dict[str, Any]]) -> str:
    """Markdown table: target, bound, measured, met."""
    lines = ["| target | bound | measured | met |", "|---|---|---|---|"]
    for row in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[row.get("met")]
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['target']} | {_fmt_bound(row)} | {_fmt_value(row)}{note} | {met} |")
    return "\n".join(lines)


def results_table(setting: dict[str, Any]) -> str:
    """Markdown table of one setting: every term and implementation, with ratios.

    The ratios are against the authors' route, and against the library's materialised
    reference backend where the setting has one.
    """
    bases = [AUTHORS]
    if "reference" in setting.get("roles", {}):
        bases.append(setting["roles"]["reference"])
    head = "| term | implementation | median | IQR | runs | peak memory |"
    rule = "|---|---|---|---|---|---|"
    for base in bases:
        head += f" speedup vs {base} | memory vs {base} |"
        rule += "---|---|"
    lines = [head, rule]
    for term, data in setting.get("terms", {}).items():
        for impl, r in data["impls"].items():
            peak = r.get("peak_bytes")
            mem = f"{peak / MIB:,.0f} MiB" if peak is not None else "-"
            line = (
                f"| {term} | {impl} | {_fmt_time(r.get('median_s'))} | "
                f"{_fmt_time(r.get('iqr_s'))} | {r.get('runs', '-')} | {mem} |"
            )
            for base in bases:
                speed = ratio(setting, term, "speedup", impl, base) if impl != base else None
                memr = ratio(setting, term, "memory", impl, base) if impl != base else None
                line += f" {'-' if speed is None else f'{speed:.2f}x'} |"
                line += f" {'-' if memr is None else f'{memr:.3f}'} |"
            lines.append(line)
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole report of one run."""
    dev, ver = results["device"], results["versions"]
    dirty = ""
    if results["dirty"]:
        dirty = f" with uncommitted changes in {', '.join(results['dirty'])}"
    out = [
        f"# SERE loss benchmark: {dev['name']}",
        "",
        f"- commit `{results['commit']}`{dirty}",
        f"- device: {dev['name']} ({dev['type']}), {dev['threads']} torch threads",
        f"- torch {ver['torch']}, Python {ver['python']}, sere-loss {ver['sere_loss']}",
        f"- run on {results['created']}, {results['wall_time_s'] / 60:.1f} min in all; "
        f"load average before/after: {results['load_average']['start']} / "
        f"{results['load_average']['end']}",
        f"- command: `{results['command']}`",
        "",
        "Times are the median and interquartile range of forward+backward steps "
        "(torch.utils.benchmark, the implementations timed in alternation). Peak memory is the "
        "extra over the inputs (" + results["method"]["memory"]["summary"] + ").",
        "",
        "## Targets",
        "",
        targets_table(results["targets"]),
        "",
    ]
    for setting in results["settings"]:
        out += [f"## {setting['name']}: {setting['description']}", ""]
        if "error" in setting:
            out += [f"Failed: `{setting['error']}`", ""]
            continue
        for note in setting.get("notes", []):
            out += [f"- {note}"]
        if setting.get("notes"):
            out += [""]
        out += [results_table(setting), ""]
    dino = results.get("dino_step", {})
    out += ["## Whole DINO ViT-S/16 training step", ""]
    if dino.get("status") == "measured":
        out += [
            "| variant | median | IQR |",
            "|---|---|---|",
            f"| DINO | {_fmt_time(dino['dino']['median_s'])} | "
            f"{_fmt_time(dino['dino']['iqr_s'])} |",
            f"| DINO + SERE | {_fmt_time(dino['dino_sere']['median_s'])} | "
            f"{_fmt_time(dino['dino_sere']['iqr_s'])} |",
            "",
            f"SERE adds {100 * dino['overhead']:+.1f} % (batch {dino['batch']}).",
        ]
    else:
        out += [f"{dino.get('status', 'not run')}."]
    return "\n".join(out) + "\n"


def docs_block(results: dict[str, Any], stem: str) -> str:
    """The generated part of ``docs/performance.md`` for one device: machine, tables, plot."""
    dev = results["device"]
    lines = [
        f"Machine: {dev['name']} ({dev['type']}, {dev['threads']} torch threads), torch "
        f"{results['versions']['torch']}, commit `{results['commit'][:10]}`"
        + (" plus uncommitted changes" if results["dirty"] else "")
        + f", {results['created']}, {results['wall_time_s'] / 60:.0f} min; load average "
        f"{results['load_average']['start'].split()[0]} at the start. Full data: "
        f"[`benchmarks/results/{stem}.json`](../benchmarks/results/{stem}.json).",
        "",
        targets_table(results["targets"]),
        "",
        f"![speedup and memory vs the authors' route](../benchmarks/results/{stem}.png)",
        "",
    ]
    for setting in results["settings"]:
        lines += [f"**{setting['name']}**: {setting['description']}", ""]
        if "error" in setting:
            lines += [f"Failed: `{setting['error']}`", ""]
            continue
        lines += [f"- {note}" for note in setting.get("notes", [])]
        if setting.get("notes"):
            lines += [""]
        lines += [results_table(setting), ""]
    return "\n".join(lines)


def update_docs(results: dict[str, Any], stem: str, path: Path) -> bool:
    """Replace the block between ``<!-- benchmark:<stem>:start/end -->`` in ``path``.

    Returns:
        Whether the file had the markers (and was updated).
    """
    if not path.exists():
        return False
    text = path.read_text()
    start, end = f"<!-- benchmark:{stem}:start -->", f"<!-- benchmark:{stem}:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{docs_block(results, stem)}\n{end}{tail}")
    return True


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Bar chart of speedup and memory ratio vs the authors' route; None, or why it was skipped."""
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
            for impl in data["impls"]:
                if impl == AUTHORS:
                    continue
                speed = ratio(setting, term, "speedup", impl, AUTHORS)
                mem = ratio(setting, term, "memory", impl, AUTHORS)
                if speed is not None or mem is not None:
                    rows.append((f"{setting['name']} / {term} / {impl}", speed, mem))
    if not rows:
        return "nothing to plot (no implementation measured beside the authors' route)"
    labels = [r[0] for r in rows][::-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.6), sharey=True)
    panels = (
        (axes[0], [r[1] for r in rows][::-1], "speedup vs the authors' route (x, log)"),
        (axes[1], [r[2] for r in rows][::-1], "peak memory / the authors' route (log)"),
    )
    for ax, values, title in panels:
        ys = range(len(labels))
        vals = [v if v is not None else float("nan") for v in values]
        ax.barh(list(ys), vals, color="tab:blue")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        for y, v in zip(ys, vals, strict=True):
            if v == v:  # not NaN
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    axes[0].set_yticks(list(range(len(labels))))
    axes[0].set_yticklabels(labels, fontsize=7)
    fig.suptitle(f"sere-loss vs the authors' route: {results['device']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
