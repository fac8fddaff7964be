"""``python -m bench``: the sidecar against direct asyncpg (and pgbouncer), end to end.

Starts the dev topology (primary + streaming replica), loads orders and the 4 user shards,
starts a sidecar (TCP + Unix socket, pools of 10) and pgbouncer when installed, measures
every workload for every variant interleaved over ``--reps`` repetitions, prints a table,
writes JSON and a PNG chart to ``--out``, and stops everything it started, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvloop

from . import procstat, profile, report
from .runner import Plan, idle_cpu, progress, run_plan
from .stack import Stack
from .variants import DirectVariant, SidecarVariant, Variant
from .workloads import WORKLOADS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the sidecar against direct asyncpg and pgbouncer on a local "
        "PostgreSQL topology it starts and stops itself.",
    )
    p.add_argument("--duration", type=float, help="seconds per measurement (default 1.0)")
    p.add_argument("--reps", type=int, help="repetitions, variants interleaved (default 5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per measurement (0.25)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--quick", action="store_true", help="2 reps of 0.3 s: a smoke run")
    p.add_argument("--only", metavar="KEYS", help="comma-separated workload keys (default: all)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also record the sidecar and the client with py-spy (if on PATH) during "
        "sidecar-tcp point-c32",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (0.3 if quick else 1.0)
    args.reps = args.reps or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if quick else 0.25)
    if args.duration <= 0 or args.reps < 1 or args.warmup < 0:
        p.error("--duration and --reps must be positive, --warmup not negative")
    known = {w.key for w in WORKLOADS}
    args.workloads = WORKLOADS
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(keys) - known)
        if unknown:
            p.error(f"unknown workloads {unknown}; known: {sorted(known)}")
        args.workloads = [w for w in WORKLOADS if w.key in keys]
    return args


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping, a second Ctrl-C or a SIGTERM must not leave half the processes up."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _variants(stack: Stack) -> tuple[list[Variant], dict[str, str]]:
    assert stack.sidecar is not None
    variants: list[Variant] = [
        DirectVariant("asyncpg", stack.dsn),
        DirectVariant("asyncpg-default-reset", stack.dsn, default_reset=True),
        SidecarVariant("sidecar-tcp", stack.sidecar.url),
        SidecarVariant("sidecar-uds", stack.sidecar.uds_url),
    ]
    missing: dict[str, str] = {}
    if stack.pgbouncer is not None and stack.topo is not None:
        topo, bouncer = stack.topo, stack.pgbouncer
        variants.append(
            DirectVariant(
                "pgbouncer",
                lambda db: bouncer.dsn(db, topo.user, topo.password),
                statement_cache=False,
            )
        )
    else:
        missing["pgbouncer"] = "not installed"
    return variants, missing


def _versions(stack: Stack) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("asyncpg", "aiohttp", "msgspec", "uvloop", "uvicorn", "starlette"):
        with contextlib.suppress(Exception):
            found[package] = version(package)
    if stack.topo is not None:
        found["postgresql"] = (stack.topo.primary.data_dir / "PG_VERSION").read_text().strip()
    if stack.pgbouncer is not None:
        found["pgbouncer"] = stack.pgbouncer.version()
    return found


def _sidecar_counters(stack: Stack) -> dict[str, Any]:
    """Compile-cache and routing counters from the sidecar's /v1/topology."""
    import json

    assert stack.sidecar is not None
    try:
        with urllib.request.urlopen(stack.sidecar.url + "/v1/topology", timeout=5) as resp:
            doc = json.loads(resp.read())
    except OSError as exc:
        return {"error": str(exc)}
    return {"compile_cache": doc.get("compile_cache"), "routing": doc.get("routing")}


async def _measure_all(
    args: argparse.Namespace, stack: Stack, variants: list[Variant]
) -> dict[str, Any]:
    groups = procstat.CpuGroups(
        single={
            "client": os.getpid(),
            "sidecar": stack.sidecar.pid if stack.sidecar else None,
            "pgbouncer": stack.pgbouncer.pid if stack.pgbouncer else None,
        },
        trees={"postgres": stack.postmaster_pids()},
    )
    progress("bench: measuring idle CPU for 2 s (health probes, timers)")
    idle = await idle_cpu(groups, 2.0)
    plan = Plan(args.reps, args.duration, args.warmup, args.workloads)
    raw, answers = await run_plan(plan, variants, groups)
    result: dict[str, Any] = {"idle_cores": idle, "raw": raw, "answers": answers}
    if args.profile and stack.sidecar is not None and stack.sidecar.pid is not None:
        target = next(w for w in WORKLOADS if w.key == "point-c32")
        tcp = next(v for v in variants if v.name == "sidecar-tcp")
        progress("bench: profiling sidecar and client with py-spy during sidecar-tcp point-c32")
        pids = {"sidecar": stack.sidecar.pid, "client": os.getpid()}
        seconds = max(8.0, args.duration * 8)
        result["profile"] = await profile.profile(pids, tcp, target, seconds, args.out / args.stamp)
    return result


def _check_answers(answers: dict[str, Any]) -> list[str]:
    """Every variant must answer the same: otherwise the comparison is not fair."""
    base = answers.get(report.BASELINE)
    return [
        f"{name} answered {answer}, asyncpg {base}"
        for name, answer in answers.items()
        if base is not None and answer != base
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.stamp = "bench-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # SIGTERM unwinds like Ctrl-C, through every finally below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.monotonic()
    stack = Stack(log=progress)
    try:
        stack.start()
        variants, missing = _variants(stack)
        load_before = os.getloadavg()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            measured = runner.run(_measure_all(args, stack, variants))
        names = [v.name for v in variants] + list(missing)
        summary = report.summarise(args.workloads, measured["raw"], names, missing)
        document = {
            "meta": {
                "started": args.stamp,
                "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
                "reps": args.reps,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "versions": _versions(stack),
                "pool_size": 10,
                "notes": [
                    "ratio_to_asyncpg = variant median / asyncpg median (latency: >1 is slower; "
                    "throughput: <1 is slower)",
                    "direct scatter-gather = 4 concurrent queries on 4 shard pools, merged in "
                    "Python (heapq.merge / sum)",
                    "cpu_us_per_op = CPU seconds of the process group during the measurement / "
                    "successful operations (a transaction counts as one operation)",
                    "other_cores = CPU used by processes not started by the benchmark",
                ],
            },
            "idle_cores": measured["idle_cores"],
            "answers": measured["answers"],
            "sidecar": _sidecar_counters(stack),
            "workloads": summary,
            "scatter_over_single_shard": report.scatter_ratios(summary, names),
        }
        if "profile" in measured:
            document["profile"] = measured["profile"]
        document["meta"]["wall_s"] = round(time.monotonic() - began, 1)
        _print_report(document, names)
        json_path = args.out / f"{args.stamp}.json"
        report.write_json(json_path, document)
        print(f"JSON: {json_path}")
        png_path = args.out / f"{args.stamp}.png"
        title = (
            f"dbsidecar bench {args.stamp[6:]}: {args.reps} reps x {args.duration:g} s, "
            f"{os.cpu_count()} CPUs, pool 10"
        )
        problem = report.chart(png_path, summary, names, title)
        print(f"chart: {problem}" if problem else f"chart: {png_path}")
        return 1 if _check_answers(measured["answers"]) else 0
    except KeyboardInterrupt:
        progress("bench: interrupted; stopping everything")
        return 130
    finally:
        with _signals_ignored():
            stack.stop()


def _print_report(document: dict[str, Any], names: list[str]) -> None:
    meta = document["meta"]
    print(
        f"\n{meta['command']}: {meta['reps']} reps x {meta['duration_s']:g} s per measurement, "
        f"{meta['cpus']} CPUs, load {meta['loadavg_before'][0]:.2f} → "
        f"{meta['loadavg_after'][0]:.2f}; medians, min-max over reps\n"
    )
    print(report.table(document["workloads"], names))
    ratios = document["scatter_over_single_shard"]
    if ratios:
        print("scatter-gather p50 / single-shard p50 (goal ≤ 2x):")
        for name, r in ratios.items():
            parts = ", ".join(f"{k.removesuffix('-c1')} {v:.2f}x" for k, v in r.items())
            print(f"  {name:<22}{parts}")
    others = [
        r["other_cores"]
        for w in document["workloads"].values()
        for v in w["variants"].values()
        for r in v.get("reps", [])
        if r["other_cores"] is not None
    ]
    if others:
        print(
            f"noise: processes not started by the benchmark used {statistics.median(others):.2f} "
            f"cores (median; max {max(others):.2f}) of {meta['cpus']} during measurements"
        )
    idle = document["idle_cores"]
    print(
        "idle CPU (cores, no load): "
        + ", ".join(f"{k} {v:.3f}" for k, v in idle.items() if k != "other")
        + f"; other processes {idle.get('other', 0):.3f}"
    )
    cache = document["sidecar"].get("compile_cache")
    if cache:
        print(f"sidecar compile cache: {cache['hits']} hits, {cache['misses']} misses")
    for problem in _check_answers(document["answers"]):
        print(f"ANSWERS DIFFER: {problem}")
    if "profile" in document:
        print(profile.render(document["profile"]))
    print()


if __name__ == "__main__":
    sys.exit(main())
