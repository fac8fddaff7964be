"""Summaries of the raw figures: the printed table, the JSON document and the chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .workloads import Workload

BASELINE = "asyncpg"
CPU_GROUPS = ("client", "sidecar", "pgbouncer", "postgres")


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
            per_variant[name] = {
                "status": "ok" if values else "failed",
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
        base_reps = {r["rep"]: r for r in baseline.get("reps", [])}
        for entry in per_variant.values():
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
            f"  {'variant':<22}{'median':>10}{'min-max':>20}{'/asyncpg':>10}{'p99 µs':>10}"
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
            cpu_ratio = v["cpu_total_ratio_to_asyncpg"]
            errors = f"  ({v['errors']} errors)" if v["errors"] else ""
            lines.append(
                f"  {name:<22}{_fmt(v['median']):>10}{span:>20}"
                f"{(f'{ratio:.2f}' if ratio else '-'):>10}{_fmt(v['p99_us_median']):>10}"
                f"   {'':>11}{_fmt(cpu.get('client')):>7}{_fmt(cpu.get('sidecar')):>8}"
                f"{_fmt(cpu.get('pgbouncer')):>6}{_fmt(cpu.get('postgres')):>6}"
                f"{_fmt(cpu.get('total')):>7}{(f'{cpu_ratio:.1f}' if cpu_ratio else '-'):>6}"
                f"{errors}"
            )
        lines.append("")
    return "\n".join(lines)


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
