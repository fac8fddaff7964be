"""``--soak SECONDS``: one workload for a long time, watching the sidecar's memory.

The workload runs in windows (10 s by default, each a normal bounded measurement); after
each window the sidecar's resident set is sampled, so a leak shows as a rising RSS while
the throughput stays flat. The issue's check: point reads at c32 through the ActiveRecord
channel variant for 10 minutes, sidecar RSS < 150 MiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import procstat
from .variants import Variant
from .workloads import Workload, measure, transport_problem

RSS_TARGET_MIB = 150.0
WINDOW_S = 10.0


async def soak(
    variant: Variant,
    workload: Workload,
    seconds: float,
    rss: procstat.RssWatch,
    log: Callable[[str], None],
    window: float = WINDOW_S,
) -> dict[str, Any]:
    """Run ``workload`` on ``variant`` for ``seconds``; figures per window and overall."""
    windows: list[dict[str, Any]] = []
    rss.sample()  # before any load
    await variant.open()
    try:
        began = time.monotonic()
        index = 0
        while (left := seconds - (time.monotonic() - began)) > 0.05:
            sample = await measure(workload, variant, min(window, left), seed=9000 + index)
            index += 1
            now = rss.sample()
            windows.append(
                {
                    "t_s": round(time.monotonic() - began, 1),
                    "ops": sample.ops,
                    "ops_per_s": sample.ops_per_s,
                    "p50_us": sample.percentile_us(50),
                    "p99_us": sample.percentile_us(99),
                    "errors": sample.errors,
                    "first_error": sample.first_error,
                    "rss_mib": now,
                }
            )
            log(
                f"soak {windows[-1]['t_s']:>7.1f} s: {sample.ops_per_s:,.0f}/s, "
                f"{sample.errors} errors, sidecar RSS "
                + (f"{now:.1f} MiB" if now is not None else "unknown")
            )
        elapsed = time.monotonic() - began
        problem = transport_problem(variant)
    finally:
        await variant.close()
    found = soak_summary(variant.name, workload.key, seconds, elapsed, windows, rss.summary())
    found["transport_problem"] = problem
    return found


def soak_summary(
    variant: str,
    workload: str,
    asked_s: float,
    elapsed_s: float,
    windows: list[dict[str, Any]],
    rss: dict[str, Any],
) -> dict[str, Any]:
    """The overall figures of a soak and whether the RSS target was met (pure)."""
    ops = sum(w["ops"] for w in windows)
    rates = [w["ops_per_s"] for w in windows if w["ops"]]
    peak = rss.get("peak_mib")
    return {
        "variant": variant,
        "workload": workload,
        "asked_s": asked_s,
        "elapsed_s": round(elapsed_s, 1),
        "ops": ops,
        "ops_per_s": ops / elapsed_s if elapsed_s > 0 else 0.0,
        "window_ops_per_s_min": min(rates) if rates else None,
        "window_ops_per_s_max": max(rates) if rates else None,
        "errors": sum(w["errors"] for w in windows),
        "first_error": next((w["first_error"] for w in windows if w["first_error"]), None),
        "rss": rss,
        "rss_target_mib": RSS_TARGET_MIB,
        "rss_target_met": None if peak is None else peak < RSS_TARGET_MIB,
        "windows": windows,
    }
