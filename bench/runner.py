"""The measurement plan: repetitions x variants x workloads, with CPU accounting.

Variants are interleaved A B A B ... within each repetition and opened afresh for it (pools
and HTTP sessions are created outside the measured time); each measurement is preceded by a
warm-up at the same concurrency. Around every measurement the CPU time of the client, the
sidecar, pgbouncer and all PostgreSQL processes is sampled from /proc.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import procstat
from .variants import Variant
from .workloads import WORKLOADS, Workload, measure, transport_problem, verify


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Plan:
    reps: int
    duration: float
    warmup: float
    workloads: list[Workload]


def _rep_figures(workload: Workload, sample: Any, spent: dict[str, float]) -> dict[str, Any]:
    ops = sample.ops
    p50, p99 = sample.percentile_us(50), sample.percentile_us(99)
    value = p50 if workload.metric == "latency" else sample.ops_per_s
    ours = {k: v for k, v in spent.items() if k != "other"}
    per_op = {k: (v / ops * 1e6 if ops else None) for k, v in ours.items()}
    per_op["total"] = sum(ours.values()) / ops * 1e6 if ops else None
    return {
        "value": value,
        "p50_us": p50,
        "p99_us": p99,
        "ops_per_s": sample.ops_per_s,
        "ops": ops,
        "errors": sample.errors,
        "first_error": sample.first_error,
        "elapsed_s": sample.elapsed,
        "cpu_seconds": spent,
        "cpu_us_per_op": per_op,
        # Cores busy with processes that are not ours: the noise of a shared machine.
        "other_cores": spent.get("other", 0.0) / sample.elapsed if sample.elapsed else None,
    }


async def idle_cpu(groups: procstat.CpuGroups, seconds: float) -> dict[str, float]:
    """CPU cores each process group uses with no load (health probes, timers)."""
    before = groups.sample()
    await asyncio.sleep(seconds)
    spent = procstat.delta(before, groups.sample())
    return {name: value / seconds for name, value in spent.items()}


async def run_plan(
    plan: Plan,
    variants: list[Variant],
    groups: procstat.CpuGroups,
    rss: procstat.RssWatch | None = None,
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, Any]]:
    """Raw figures ``{workload: {variant: [rep, ...]}}`` and each variant's verify() answer.

    A variant that cannot open or answer verify() is left out of the remaining repetitions;
    its answer is ``{"error": ...}``. ``rss`` is sampled after every measurement."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        w.key: {v.name: [] for v in variants} for w in plan.workloads
    }
    answers: dict[str, Any] = {}
    total = plan.reps * len(variants) * len(plan.workloads)
    done = 0
    began = time.monotonic()
    for rep in range(1, plan.reps + 1):
        for variant in variants:
            if "error" in answers.get(variant.name, {}):
                done += len(plan.workloads)
                continue
            try:
                await variant.open()
                if variant.name not in answers:
                    answers[variant.name] = await verify(variant)
            except Exception as exc:
                answers[variant.name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                progress(f"  {variant.name} left out: {answers[variant.name]['error']}")
                await variant.close()
                done += len(plan.workloads)
                continue
            try:
                for workload in plan.workloads:
                    done += 1
                    left = ""
                    if done > 1:
                        per = (time.monotonic() - began) / (done - 1)
                        left = f", ~{per * (total - done + 1):.0f} s left"
                    progress(
                        f"reps {rep}/{plan.reps}: {variant.name} {workload.key} "
                        f"[{done}/{total}{left}]"
                    )
                    seed = rep * 100 + plan.workloads.index(workload)
                    if plan.warmup > 0:
                        await measure(workload, variant, plan.warmup, seed + 50)
                    before = groups.sample()
                    sample = await measure(workload, variant, plan.duration, seed)
                    spent = procstat.delta(before, groups.sample())
                    figures = _rep_figures(workload, sample, spent)
                    figures["rep"] = rep
                    problem = transport_problem(variant)
                    if problem:
                        figures["transport_problem"] = problem
                        progress(f"  {variant.name}: {problem}")
                    raw[workload.key][variant.name].append(figures)
                    if rss is not None:
                        rss.sample()
                    if sample.errors:
                        progress(f"  {sample.errors} errors, first: {sample.first_error}")
            finally:
                await variant.close()
    return raw, answers


__all__ = ["WORKLOADS", "Plan", "idle_cpu", "progress", "run_plan"]
