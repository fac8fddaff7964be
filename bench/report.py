"""Summaries of the raw figures: the printed table, the JSON document and the chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .workloads import Workload

BASELINE = "asyncpg"
BOUNCER = "pgbouncer"
CPU_GROUPS = ("client", "sidecar", "pgbouncer", "postgres")
PGBOUNCER_MISSING = "not installed (apt-get install pgbouncer)"
# Variants whose requests go through the sidecar (targets are checked for these).
SIDECAR_PREFIXES = ("sidecar-", "ar-")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def summarise(
    workloads: list[Workload],
    raw: dict[str, dict[str, list[dict[str, Any]]]],
    variants: list[str],
    missing: dict[str, str],
) -> dict[str, Any]:
    """Per workload and variant: median, min, max, ratio to asyncpg, p99, CPU per op."""
    out: dict[str, Any] = {}
    for w in workloads:
        per_variant: dict[str, Any] = {}
        for name in variants:
            reps = raw.get(w.key, {}).get(name, [])
            if name in missing:
                per_variant[name] = {"status": missing[name]}
                continue
            values = [r["value"] for r in reps if r["value"] is not None and r["ops"]]
            cpu = {
                g: _median([r["cpu_us_per_op"].get(g) for r in reps])
                for g in (*CPU_GROUPS, "total")
            }
            problem = next((r["transport_problem"] for r in reps if "transport_problem" in r), None)
            status = "ok" if values else "failed"
            if problem:
                status = f"failed: {problem}"  # its figures are another transport's
            per_variant[name] = {
                "status": status,
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "p50_us_median": _median([r["p50_us"] for r in reps]),
                "p99_us_median": _median([r["p99_us"] for r in reps]),
                "ops_per_s_median": _median([r["ops_per_s"] for r in reps]),
                "errors": sum(r["errors"] for r in reps),
                "first_error": next((r["first_error"] for r in reps if r["first_error"]), None),
                "cpu_us_per_op_median": {k: v for k, v in cpu.items() if v is not None},
                "other_cores_median": _median([r["other_cores"] for r in reps]),
                "reps": reps,
            }
        baseline = per_variant.get(BASELINE, {})
        bouncer = per_variant.get(BOUNCER, {})
        base_reps = {r["rep"]: r for r in baseline.get("reps", [])}
        for entry in per_variant.values():
            entry["ratio_to_pgbouncer"] = _ratio(entry.get("median"), bouncer.get("median"))
            for field, source in (
                ("ratio_to_asyncpg", "median"),
                ("p99_ratio_to_asyncpg", "p99_us_median"),
            ):
                entry[field] = _ratio(entry.get(source), baseline.get(source))
            entry["cpu_total_ratio_to_asyncpg"] = _ratio(
                entry.get("cpu_us_per_op_median", {}).get("total"),
                baseline.get("cpu_us_per_op_median", {}).get("total"),
            )
            for rep in entry.get("reps", []):
                # Paired with asyncpg's measurement of the same repetition.
                same = base_reps.get(rep["rep"], {})
                rep["ratio_to_asyncpg"] = _ratio(rep["value"], same.get("value"))
                rep["cpu_total_ratio_to_asyncpg"] = _ratio(
                    rep["cpu_us_per_op"].get("total"), same.get("cpu_us_per_op", {}).get("total")
                )
        out[w.key] = {
            "title": w.title,
            "label": w.label or w.key,
            "metric": w.metric,
            "unit": w.unit,
            "concurrency": w.concurrency,
            "better": w.better,
            "variants": per_variant,
        }
    return out


def scatter_ratios(summary: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """Scatter-gather p50 over single-shard p50, per variant (the goal: at most 2x)."""
    out: dict[str, Any] = {}
    single = summary.get("shard-read-c1", {}).get("variants", {})
    for name in variants:
        base = single.get(name, {}).get("median")
        if not base:
            continue
        out[name] = {
            key: summary[key]["variants"][name]["median"] / base
            for key in ("scatter-count-c1", "scatter-top20-c1")
            if key in summary and summary[key]["variants"].get(name, {}).get("median")
        }
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(summary: dict[str, Any], variants: list[str]) -> str:
    lines: list[str] = []
    for key, w in summary.items():
        direction = "lower" if w["better"] == "lower" else "higher"
        lines.append(f"{key}: {w['title']}  [{w['unit']}, {direction} is better]")
        lines.append(
            f"  {'variant':<22}{'median':>10}{'min-max':>20}{'/asyncpg':>10}{'/pgb':>7}"
            f"{'p99 µs':>10}"
            f"   CPU µs/op: {'client':>7}{'sidecar':>8}{'pgb':>6}{'pg':>6}{'total':>7}{'/apg':>6}"
        )
        for name in variants:
            v = w["variants"].get(name, {})
            if v.get("status") != "ok":
                lines.append(f"  {name:<22}{v.get('status', '-'):>10}")
                continue
            cpu = v["cpu_us_per_op_median"]
            span = f"{_fmt(v['min'])}-{_fmt(v['max'])}"
            ratio = v["ratio_to_asyncpg"]
            bouncer = v.get("ratio_to_pgbouncer")
            cpu_ratio = v["cpu_total_ratio_to_asyncpg"]
            errors = f"  ({v['errors']} errors)" if v["errors"] else ""
            lines.append(
                f"  {name:<22}{_fmt(v['median']):>10}{span:>20}"
                f"{(f'{ratio:.2f}' if ratio else '-'):>10}"
                f"{(f'{bouncer:.2f}' if bouncer else '-'):>7}{_fmt(v['p99_us_median']):>10}"
                f"   {'':>11}{_fmt(cpu.get('client')):>7}{_fmt(cpu.get('sidecar')):>8}"
                f"{_fmt(cpu.get('pgbouncer')):>6}{_fmt(cpu.get('postgres')):>6}"
                f"{_fmt(cpu.get('total')):>7}{(f'{cpu_ratio:.1f}' if cpu_ratio else '-'):>6}"
                f"{errors}"
            )
        lines.append("")
    return "\n".join(lines)


# The paste-ready markdown: header lines, the table, CPU per request and the targets.

# Issue 12's targets for this machine kind (README): (key, wording); target_values()
# measures them for every variant through the sidecar (the issue sets the point-read
# ones for the ActiveRecord API, `ar-*`, and the c1 one over the Unix socket).
TARGETS: list[tuple[str, str]] = [
    ("vs-asyncpg", "point read c32 >= 1.0x direct asyncpg"),
    ("c1-added", "point read c1 p50 <= +150 µs over direct asyncpg"),
    ("insert", "insert c32 >= 0.6x direct asyncpg"),
    ("vs-pgbouncer", "point read c32 >= 2x asyncpg through pgbouncer"),
    ("scatter-count", "scatter count p50 within 2x of a single-shard read"),
    ("scatter-top", "scatter ordered limit p50 within 2x of a single-shard read"),
]


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _x(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def rss_text(rss: dict[str, Any]) -> str:
    """'start 61.2 MiB, peak 74.0 MiB, end 73.5 MiB'."""
    return (
        f"start {mib(rss.get('start_mib'))}, peak {mib(rss.get('peak_mib'))}, "
        f"end {mib(rss.get('end_mib'))}"
    )


def idle_text(idle: dict[str, dict[str, float]], group: str = "sidecar") -> str:
    """The sidecar's CPU with no load as % of one core: '0.41% before the run, 0.44% after'."""
    parts = [
        f"{values[group] * 100:.2f}% of a core {when}"
        for when, values in idle.items()
        if values.get(group) is not None
    ]
    return ", ".join(parts) if parts else "-"


def header_lines(meta: dict[str, Any], sidecar: dict[str, Any]) -> list[str]:
    """The run's facts as markdown list items: date, command, machine, versions, method,
    the sidecar's memory and idle CPU, and what was missing."""
    versions = meta.get("versions", {})
    named = {"postgresql": "PostgreSQL"}
    before = " ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = " ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    commit = meta.get("commit") or "?"
    lines = [
        f"- run: {meta['date_utc']}, commit {commit}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpus']} CPUs, load average (1/5/15 min) {before} before, {after} after",
        "- versions: " + ", ".join(f"{named.get(k, k)} {v}" for k, v in versions.items()),
    ]
    if meta.get("soak_s") is not None:
        lines.append(
            f"- method: one workload for {meta['soak_s']:g} s in windows of "
            f"{meta.get('soak_window_s', 10):g} s, the sidecar's RSS sampled after each window"
        )
    else:
        lines.append(
            f"- method: {meta['reps']} reps x {meta['duration_s']:g} s per measurement "
            f"({meta['warmup_s']:g} s warm-up), every variant once per rep (interleaved), "
            f"medians over reps; pools of {meta['pool_size']}"
        )
    lines.append(
        f"- sidecar RSS: {rss_text(sidecar.get('rss', {}))} (peak = VmHWM); idle CPU "
        f"{idle_text(sidecar.get('idle', {}))} (3 s with no load: health probes, timers)"
    )
    if meta.get("other_cores") is not None:
        lines.append(
            f"- noise: processes not started by the benchmark used {meta['other_cores']:.2f} "
            f"of {meta['cpus']} cores during measurements (median)"
        )
    for name, status in meta.get("missing", {}).items():
        lines.append(f"- {name}: {status}")
    return lines


LEGEND = (
    "- variants: `asyncpg` direct pool with a no-op reset (the baseline); "
    "`asyncpg-default-reset` asyncpg's reset on release; `pgbouncer` asyncpg through "
    "pgbouncer (transaction mode); `sidecar-*` the client's DatabaseHandle with hand-made "
    "plans; `ar-*` the ActiveRecord API (`Order.find_by_id(k).using(db).one()`, "
    "`Order(...).save()`, `User.find().count()`), what services call; `tcp`/`uds` loopback "
    "TCP or Unix socket; `http`/`channel` the client transport (no suffix: http)\n"
    "- cells: median; (Nx) = variant / asyncpg (latency: above 1 is slower; throughput: below "
    "1 is slower); at c32 also / pgbouncer (pgb)"
)


def _cell(w: dict[str, Any], name: str) -> str:
    v = w["variants"].get(name, {})
    status = v.get("status", "-")
    if status != "ok":
        errors = f", {v['errors']} errors" if v.get("errors") else ""
        return f"{status}{errors}"
    unit = " µs" if w["metric"] == "latency" else "/s"
    text = f"{_num(v['median'])}{unit}"
    ratios = []
    if name != BASELINE and v.get("ratio_to_asyncpg"):
        ratios.append(_x(v["ratio_to_asyncpg"]))
    if w["concurrency"] >= 32 and name != BOUNCER and v.get("ratio_to_pgbouncer"):
        ratios.append(f"{_x(v['ratio_to_pgbouncer'])} pgb")
    if ratios:
        text += f" ({', '.join(ratios)})"
    if v.get("errors"):
        text += f", {v['errors']} errors"
    return text


def _row_title(key: str, w: dict[str, Any]) -> str:
    return f"{w.get('label') or key} (`{key}`)"


def measured(summary: dict[str, Any], variants: list[str]) -> list[str]:
    """The variants that ran (the others are named in the header lines, not as columns)."""
    return [
        n
        for n in variants
        if any(
            w["variants"].get(n, {}).get("status", "").startswith(("ok", "failed"))
            for w in summary.values()
        )
    ]


def markdown_table(summary: dict[str, Any], variants: list[str]) -> str:
    """Workloads down, variants across: each cell the median and its ratios."""
    variants = measured(summary, variants)
    lines = [
        "| workload | " + " | ".join(variants) + " |",
        "| --- |" + " --- |" * len(variants),
    ]
    for key, w in summary.items():
        cells = [_cell(w, name) for name in variants]
        lines.append(f"| {_row_title(key, w)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_cpu(summary: dict[str, Any], variants: list[str], key: str = "point-c32") -> str:
    """CPU µs per request by process for one workload (medians over reps)."""
    w = summary.get(key)
    if w is None:
        return ""
    groups = [g for g in CPU_GROUPS if any(
        w["variants"].get(n, {}).get("cpu_us_per_op_median", {}).get(g) for n in variants
    )]  # fmt: skip
    lines = [
        f"| CPU µs per request, {key} | " + " | ".join(groups) + " | total |",
        "| --- |" + " --- |" * (len(groups) + 1),
    ]
    for name in variants:
        v = w["variants"].get(name, {})
        if v.get("status") != "ok":
            continue
        cpu = v["cpu_us_per_op_median"]
        cells = [_fmt(cpu.get(g)) for g in (*groups, "total")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median_of(summary: dict[str, Any], key: str, name: str) -> float | None:
    v = summary.get(key, {}).get("variants", {}).get(name, {})
    return v.get("median") if v.get("status") == "ok" else None


def target_values(summary: dict[str, Any], name: str) -> dict[str, tuple[float | None, bool]]:
    """Each target's figure for one variant and whether it is met (figure None: not measured)."""
    single = _median_of(summary, "shard-read-c1", name)
    count = _median_of(summary, "scatter-count-c1", name)
    top = _median_of(summary, "scatter-top20-c1", name)
    point = summary.get("point-c32", {}).get("variants", {}).get(name, {})
    ok = point.get("status") == "ok"
    vs_bouncer = point.get("ratio_to_pgbouncer") if ok else None
    vs_asyncpg = point.get("ratio_to_asyncpg") if ok else None
    c1, c1_base = _median_of(summary, "point-c1", name), _median_of(summary, "point-c1", "asyncpg")
    added = c1 - c1_base if c1 is not None and c1_base is not None else None
    insert = summary.get("insert-c32", {}).get("variants", {}).get(name, {})
    vs_insert = insert.get("ratio_to_asyncpg") if insert.get("status") == "ok" else None
    scatter_count = _ratio(count, single)
    scatter_top = _ratio(top, single)
    return {
        "vs-asyncpg": (vs_asyncpg, vs_asyncpg is not None and vs_asyncpg >= 1.0),
        "c1-added": (added, added is not None and added <= 150.0),
        "insert": (vs_insert, vs_insert is not None and vs_insert >= 0.6),
        "vs-pgbouncer": (vs_bouncer, vs_bouncer is not None and vs_bouncer >= 2.0),
        "scatter-count": (scatter_count, scatter_count is not None and scatter_count <= 2.0),
        "scatter-top": (scatter_top, scatter_top is not None and scatter_top <= 2.0),
    }


def markdown_targets(summary: dict[str, Any], variants: list[str]) -> str:
    """The targets, met or missed, for every variant that goes through the sidecar."""
    through = [n for n in variants if n.startswith(SIDECAR_PREFIXES)]
    values = {n: target_values(summary, n) for n in through}
    through = [n for n in through if any(v is not None for v, _ in values[n].values())]
    if not through:
        return ""
    lines = ["| target | " + " | ".join(through) + " |", "| --- |" + " --- |" * len(through)]
    for key, text in TARGETS:
        if all(values[n][key][0] is None for n in through):
            continue
        cells = []
        for name in through:
            value, met = values[name][key]
            if value is None:
                cells.append("-")
                continue
            shown = f"+{value:.0f} µs" if key == "c1-added" else _x(value)
            cells.append(f"{'met' if met else 'missed'} ({shown})")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_soak(soak: dict[str, Any]) -> str:
    rss = soak["rss"]
    met = soak["rss_target_met"]
    verdict = "-" if met is None else ("met" if met else "missed")
    low, high = soak["window_ops_per_s_min"], soak["window_ops_per_s_max"]
    problem = f" ({soak['transport_problem']})" if soak.get("transport_problem") else ""
    spread = f" (windows {_fmt(low)}-{_fmt(high)}/s)" if low is not None else ""
    return "\n".join(
        [
            "| soak | result |",
            "| --- | --- |",
            f"| {soak['workload']} through {soak['variant']}, {soak['elapsed_s']:g} s | "
            f"{_fmt(soak['ops_per_s'])}/s{spread}, {soak['errors']} errors{problem} |",
            f"| sidecar RSS | {rss_text(rss)} |",
            f"| sidecar RSS < {soak['rss_target_mib']:g} MiB | {verdict} |",
        ]
    )


def markdown(document: dict[str, Any], variants: list[str]) -> str:
    """Everything the README's performance section pastes, self-contained."""
    parts = ["\n".join(header_lines(document["meta"], document["sidecar"]))]
    if document.get("workloads"):
        parts.append(LEGEND)
        parts.append(markdown_table(document["workloads"], variants))
        for block in (
            markdown_cpu(document["workloads"], variants),
            markdown_targets(document["workloads"], variants),
        ):
            if block:
                parts.append(block)
    if document.get("soak"):
        parts.append(markdown_soak(document["soak"]))
    return "\n\n".join(parts)


def metric_totals(text: str, wanted: dict[str, str]) -> dict[str, float]:
    """Prometheus text: the sum over labels of each wanted metric ({key: metric name})."""
    totals = dict.fromkeys(wanted, 0.0)
    names = {metric: key for key, metric in wanted.items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            totals[names[name]] += float(line.rsplit(" ", 1)[1])
    return totals


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _cpu_panel(ax: Any, w: dict[str, Any], variants: list[str], colors: list[str]) -> None:
    """CPU microseconds per request, stacked by process, for one workload."""
    names = [n for n in variants if w["variants"].get(n, {}).get("status") == "ok"]
    bottoms = [0.0] * len(names)
    for i, group in enumerate(CPU_GROUPS):
        heights = [w["variants"][n]["cpu_us_per_op_median"].get(group) or 0.0 for n in names]
        if not any(heights):
            continue
        ax.bar(range(len(names)), heights, bottom=bottoms, label=group, color=colors[i + 4])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(list(range(len(names))), names, rotation=30, ha="right", fontsize=8)
    ax.set_title("point-c32: CPU µs per request, by process", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7)


def chart(path: Path, summary: dict[str, Any], variants: list[str], title: str) -> str | None:
    """A PNG of the table (median bars, min-max whiskers); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: `pip install matplotlib` to get the chart"
    keys = list(summary)
    cols = 4
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys, strict=False):
        w = summary[key]
        names, medians, lows, highs, shades = [], [], [], [], []
        for i, name in enumerate(variants):
            v = w["variants"].get(name, {})
            if v.get("status") != "ok":
                continue
            names.append(name)
            medians.append(v["median"])
            lows.append(v["median"] - v["min"])
            highs.append(v["max"] - v["median"])
            shades.append(colors[i % len(colors)])
        xs = range(len(names))
        ax.bar(xs, medians, yerr=[lows, highs], color=shades, capsize=3)
        for x, name in zip(xs, names, strict=True):
            ratio = w["variants"][name]["ratio_to_asyncpg"]
            if ratio:
                ax.annotate(
                    f"{ratio:.2f}x",
                    (x, medians[x] + highs[x]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{key} ({w['unit']}, {w['better']} is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.12)
    spare = list(axes.flat)[len(keys) :]
    if spare and "point-c32" in summary:
        _cpu_panel(spare.pop(0), summary["point-c32"], variants, colors)
    for ax in spare:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
