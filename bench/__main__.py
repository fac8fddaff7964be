"""``python -m bench``: the sidecar against direct asyncpg (and pgbouncer), end to end.

Starts the dev topology (primary + streaming replica), loads orders and the 4 user shards,
starts a sidecar (TCP + Unix socket, pools of 10) and pgbouncer when installed, measures
every workload for every variant interleaved over ``--reps`` repetitions, prints a table
and a paste-ready markdown block (the README's), writes JSON and a PNG chart to ``--out``,
and stops everything it started, also on Ctrl-C. ``--soak SECONDS`` instead runs point
reads at c32 through the ActiveRecord channel variant for that long, watching the sidecar's
memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shlex
import signal
import statistics
import subprocess
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
from .soak import WINDOW_S as SOAK_WINDOW_S
from .soak import soak
from .stack import POOL_SIZE, Stack
from .variants import (
    ActiveRecordVariant,
    DirectVariant,
    Mode,
    SidecarVariant,
    Variant,
)
from .workloads import WORKLOADS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
# Always measured: the baselines every other figure is a ratio to.
BASELINES = ("asyncpg", "asyncpg-default-reset", "pgbouncer")
# Through the sidecar: (name, API, socket, transport). The first five run by default.
SIDECAR_VARIANTS: list[tuple[str, str, str, Mode]] = [
    ("sidecar-tcp", "handle", "tcp", "http"),
    ("sidecar-uds", "handle", "uds", "http"),
    ("sidecar-uds-channel", "handle", "uds", "channel"),
    ("ar-uds-http", "ar", "uds", "http"),
    ("ar-uds-channel", "ar", "uds", "channel"),
    ("sidecar-tcp-channel", "handle", "tcp", "channel"),
    ("ar-tcp-http", "ar", "tcp", "http"),
    ("ar-tcp-channel", "ar", "tcp", "channel"),
]
DEFAULT_VARIANTS = [name for name, *_ in SIDECAR_VARIANTS[:5]]
SOAK_VARIANT = "ar-uds-channel"
IDLE_S = 3.0


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
        "--variants",
        metavar="NAMES",
        help="comma-separated sidecar variants (default: "
        f"{','.join(DEFAULT_VARIANTS)}; also known: "
        f"{','.join(n for n, *_ in SIDECAR_VARIANTS[5:])}); {', '.join(BASELINES)} always run",
    )
    p.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help=f"instead of the table: point-c32 through {SOAK_VARIANT} for SECONDS, reporting the "
        "sidecar's RSS at start, peak and end "
        "(the issue's check: 600 s, RSS < 150 MiB)",
    )
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
    if args.soak is not None and args.soak <= 0:
        p.error("--soak takes a positive number of seconds")
    known_variants = [name for name, *_ in SIDECAR_VARIANTS]
    args.variant_names = DEFAULT_VARIANTS
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = sorted(set(names) - set(known_variants) - set(BASELINES))
        if unknown:
            p.error(f"unknown variants {unknown}; known: {known_variants}")
        args.variant_names = [n for n in known_variants if n in names]
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


def _variants(stack: Stack, wanted: list[str]) -> tuple[list[Variant], dict[str, str]]:
    """The baselines, then the wanted sidecar variants in the order of SIDECAR_VARIANTS,
    then pgbouncer; and the ones that cannot run, with the reason."""
    assert stack.sidecar is not None
    variants: list[Variant] = [
        DirectVariant("asyncpg", stack.dsn),
        DirectVariant("asyncpg-default-reset", stack.dsn, default_reset=True),
    ]
    missing: dict[str, str] = {}
    for name, api, socket, mode in SIDECAR_VARIANTS:
        if name not in wanted:
            continue
        url = stack.sidecar.uds_url if socket == "uds" else stack.sidecar.url
        kind = ActiveRecordVariant if api == "ar" else SidecarVariant
        variants.append(kind(name, url, mode))
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
        missing["pgbouncer"] = report.PGBOUNCER_MISSING
    return variants, missing


def _commit() -> str | None:
    """The checkout's commit, and whether files differ from it (other work in progress)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    changed = " (with uncommitted changes)" if dirty.stdout.strip() else ""
    return head.stdout.strip() + changed


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
    """Compile-cache and routing counters from the sidecar's /v1/topology; channel frames
    and coalesced reads from its /metrics (0 where the sidecar has no such metric)."""
    import json

    assert stack.sidecar is not None
    try:
        with urllib.request.urlopen(stack.sidecar.url + "/v1/topology", timeout=5) as resp:
            doc = json.loads(resp.read())
        with urllib.request.urlopen(stack.sidecar.ops + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    return {
        "compile_cache": doc.get("compile_cache"),
        "routing": doc.get("routing"),
        **report.metric_totals(
            metrics,
            {
                "channel_frames": "dbsidecar_channel_frames_total",
                "coalesced_plans": "dbsidecar_coalesced_plans_total",
                "coalesced_statements": "dbsidecar_coalesced_statements_total",
            },
        ),
    }


def _groups(stack: Stack) -> procstat.CpuGroups:
    return procstat.CpuGroups(
        single={
            "client": os.getpid(),
            "sidecar": stack.sidecar.pid if stack.sidecar else None,
            "pgbouncer": stack.pgbouncer.pid if stack.pgbouncer else None,
        },
        trees={"postgres": stack.postmaster_pids()},
    )


async def _measure_all(
    args: argparse.Namespace, stack: Stack, variants: list[Variant]
) -> dict[str, Any]:
    groups = _groups(stack)
    rss = procstat.RssWatch(stack.sidecar.pid if stack.sidecar else None)
    progress(f"bench: measuring idle CPU for {IDLE_S:g} s (health probes, timers)")
    idle = await idle_cpu(groups, IDLE_S)
    rss.sample()
    plan = Plan(args.reps, args.duration, args.warmup, args.workloads)
    raw, answers = await run_plan(plan, variants, groups, rss)
    result: dict[str, Any] = {"idle_cores": idle, "raw": raw, "answers": answers}
    if args.profile and stack.sidecar is not None and stack.sidecar.pid is not None:
        target = next(w for w in WORKLOADS if w.key == "point-c32")
        through = [v for v in variants if v.name.startswith(report.SIDECAR_PREFIXES)]
        chosen = next((v for v in through if v.name == "sidecar-tcp"), None) or through[0]
        progress(f"bench: profiling sidecar and client with py-spy during {chosen.name} point-c32")
        pids = {"sidecar": stack.sidecar.pid, "client": os.getpid()}
        seconds = max(8.0, args.duration * 8)
        result["profile"] = await profile.profile(
            pids, chosen, target, seconds, args.out / args.stamp
        )
    progress(f"bench: measuring idle CPU again for {IDLE_S:g} s")
    result["idle_cores_after"] = await idle_cpu(groups, IDLE_S)
    rss.sample()
    result["rss"] = rss.summary()
    return result


async def _soak_all(
    args: argparse.Namespace, stack: Stack, variants: list[Variant]
) -> dict[str, Any]:
    groups = _groups(stack)
    rss = procstat.RssWatch(stack.sidecar.pid if stack.sidecar else None)
    progress(f"bench: measuring idle CPU for {IDLE_S:g} s (health probes, timers)")
    idle = await idle_cpu(groups, IDLE_S)
    chosen = next(v for v in variants if v.name == SOAK_VARIANT)
    workload = next(w for w in WORKLOADS if w.key == "point-c32")
    progress(f"bench: soak, {workload.key} through {chosen.name} for {args.soak:g} s")
    found = await soak(chosen, workload, args.soak, rss, progress)
    progress(f"bench: measuring idle CPU again for {IDLE_S:g} s")
    after = await idle_cpu(groups, IDLE_S)
    rss.sample()
    found["rss"] = rss.summary()
    return {"idle_cores": idle, "idle_cores_after": after, "rss": found["rss"], "soak": found}


def _check_answers(answers: dict[str, Any]) -> list[str]:
    """Every variant must answer the same: otherwise the comparison is not fair."""
    base = answers.get(report.BASELINE)
    if base is None:
        return []
    problems = []
    for name, answer in answers.items():
        if name == report.BASELINE or "error" in answer:
            continue  # a variant left out is reported as such, not as a wrong answer
        problems += [
            f"{name} {key}: {answer.get(key)!r}, asyncpg {expected!r}"
            for key, expected in base.items()
            if answer.get(key) != expected
        ]
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    args.stamp = "bench-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # SIGTERM unwinds like Ctrl-C, through every finally below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.monotonic()
    stack = Stack(log=progress)
    try:
        stack.start()
        wanted = [SOAK_VARIANT] if args.soak else args.variant_names
        variants, missing = _variants(stack, wanted)
        if args.soak:
            variants = [v for v in variants if v.name == SOAK_VARIANT]
            missing = {k: v for k, v in missing.items() if k != "pgbouncer"}
        load_before = os.getloadavg()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            task = _soak_all if args.soak else _measure_all
            measured = runner.run(task(args, stack, variants))
        for name, answer in measured.get("answers", {}).items():
            if "error" in answer:
                missing[name] = f"failed: {answer['error']}"
        names = [v.name for v in variants]
        names += [n for n in missing if n not in names]
        if not args.soak:
            # The table's columns: baselines first, pgbouncer last, as measured.
            order = {n: i for i, n in enumerate(["asyncpg", "asyncpg-default-reset"])}
            order.update({n: 2 + i for i, (n, *_) in enumerate(SIDECAR_VARIANTS)})
            order["pgbouncer"] = 99
            names.sort(key=lambda n: order.get(n, 98))
        document: dict[str, Any] = {
            "meta": {
                "started": args.stamp,
                "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
                "command": shlex.join(
                    ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
                ),
                "commit": _commit(),
                "reps": args.reps,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "soak_s": args.soak,
                "soak_window_s": SOAK_WINDOW_S,
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "versions": _versions(stack),
                "pool_size": POOL_SIZE,
                "missing": missing,
                "notes": [
                    "ratio_to_asyncpg = variant median / asyncpg median (latency: >1 is slower; "
                    "throughput: <1 is slower); ratio_to_pgbouncer likewise with pgbouncer",
                    "direct scatter-gather = 4 concurrent queries on 4 shard pools, merged in "
                    "Python (heapq.merge / sum)",
                    "cpu_us_per_op = CPU seconds of the process group during the measurement / "
                    "successful operations (a transaction counts as one operation)",
                    "other_cores = CPU used by processes not started by the benchmark",
                    "sidecar rss: VmRSS at start (before load) and end, peak = VmHWM",
                    "idle cores: CPU of each process group over a few seconds with no load",
                ],
            },
            "idle_cores": measured["idle_cores"],
            "idle_cores_after": measured["idle_cores_after"],
            "answers": measured.get("answers", {}),
            "sidecar": {
                **_sidecar_counters(stack),
                "rss": measured["rss"],
                "idle": {
                    "before the run": measured["idle_cores"],
                    "after": measured["idle_cores_after"],
                },
            },
        }
        summary: dict[str, Any] = {}
        if args.soak:
            document["soak"] = measured["soak"]
        else:
            summary = report.summarise(args.workloads, measured["raw"], names, missing)
            document["workloads"] = summary
            document["scatter_over_single_shard"] = report.scatter_ratios(summary, names)
            others = _other_cores(summary)
            document["meta"]["other_cores"] = statistics.median(others) if others else None
        if "profile" in measured:
            document["profile"] = measured["profile"]
        document["meta"]["wall_s"] = round(time.monotonic() - began, 1)
        _print_report(document, names)
        json_path = args.out / f"{args.stamp}.json"
        report.write_json(json_path, document)
        print(f"JSON: {json_path}")
        if summary:
            png_path = args.out / f"{args.stamp}.png"
            title = (
                f"dbsidecar bench {document['meta']['date_utc']}: {args.reps} reps x "
                f"{args.duration:g} s, {os.cpu_count()} CPUs, pool {POOL_SIZE}"
            )
            problem = report.chart(png_path, summary, names, title)
            print(f"chart: {problem}" if problem else f"chart: {png_path}")
        if args.soak:
            found = document["soak"]
            healthy = not found["errors"] and not found.get("transport_problem")
            return 0 if found["rss_target_met"] and healthy else 1
        return 1 if _check_answers(document["answers"]) else 0
    except KeyboardInterrupt:
        progress("bench: interrupted; stopping everything")
        return 130
    finally:
        with _signals_ignored():
            stack.stop()


def _other_cores(summary: dict[str, Any]) -> list[float]:
    return [
        r["other_cores"]
        for w in summary.values()
        for v in w["variants"].values()
        for r in v.get("reps", [])
        if r["other_cores"] is not None
    ]


def _print_report(document: dict[str, Any], names: list[str]) -> None:
    meta = document["meta"]
    print(
        f"\n{meta['command']} ({meta['date_utc']}): {meta['cpus']} CPUs, load "
        f"{meta['loadavg_before'][0]:.2f} → {meta['loadavg_after'][0]:.2f}"
        + (
            ""
            if meta["soak_s"]
            else f"; {meta['reps']} reps x {meta['duration_s']:g} s per measurement, "
            "medians, min-max over reps"
        )
        + "\n"
    )
    if document.get("workloads"):
        print(report.table(document["workloads"], names))
    ratios = document.get("scatter_over_single_shard")
    if ratios:
        print("scatter-gather p50 / single-shard p50 (goal ≤ 2x):")
        for name, r in ratios.items():
            parts = ", ".join(f"{k.removesuffix('-c1')} {v:.2f}x" for k, v in r.items())
            print(f"  {name:<22}{parts}")
    others = _other_cores(document.get("workloads", {}))
    if others:
        print(
            f"noise: processes not started by the benchmark used {statistics.median(others):.2f} "
            f"cores (median; max {max(others):.2f}) of {meta['cpus']} during measurements"
        )
    for label, key in (("before the run", "idle_cores"), ("after it", "idle_cores_after")):
        idle = document[key]
        print(
            f"idle CPU {label} (cores, {IDLE_S:g} s, no load): "
            + ", ".join(f"{k} {v:.3f}" for k, v in idle.items() if k != "other")
            + f"; other processes {idle.get('other', 0):.3f}"
        )
    print(f"sidecar RSS: {report.rss_text(document['sidecar']['rss'])} (peak = VmHWM)")
    cache = document["sidecar"].get("compile_cache")
    if cache:
        print(f"sidecar compile cache: {cache['hits']} hits, {cache['misses']} misses")
    counters = document["sidecar"]
    if "channel_frames" in counters:
        print(
            f"sidecar counters: {counters['channel_frames']:,.0f} channel frames, "
            f"{counters['coalesced_plans']:,.0f} reads in {counters['coalesced_statements']:,.0f}"
            " coalesced statements"
        )
    for name, status in meta["missing"].items():
        print(f"{name}: {status}")
    for problem in _check_answers(document["answers"]):
        print(f"ANSWERS DIFFER: {problem}")
    if "profile" in document:
        print(profile.render(document["profile"]))
    print("\n---- markdown for the README (paste as is) ----\n")
    print(report.markdown(document, names))
    print("\n---- end of markdown ----\n")


if __name__ == "__main__":
    sys.exit(main())
