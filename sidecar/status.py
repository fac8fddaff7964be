"""`dbsidecar status`: the topology and live traffic of a running sidecar, for people.

Traffic comes from the sidecar's own /metrics: per database, requests and errors per
second and p50/p99 latency, over the last refresh interval with ``--watch`` (or since
start otherwise), computed from histogram buckets the way PromQL's
histogram_quantile does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Traffic:
    """Cumulative per-database counters from one scrape."""

    requests: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    errors: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # database -> upper bound -> cumulative count
    buckets: dict[str, dict[float, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )


def parse_traffic(exposition: str) -> Traffic:
    traffic = Traffic()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            db = sample.labels.get("database")
            if db is None:
                continue
            if sample.name == "dbsidecar_queries_total":
                traffic.requests[db] += sample.value
                if sample.labels.get("outcome") != "ok":
                    traffic.errors[db] += sample.value
            elif sample.name == "dbsidecar_query_duration_seconds_bucket":
                traffic.buckets[db][float(sample.labels["le"])] += sample.value
    return traffic


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative buckets; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def _delta(now: Traffic, before: Traffic | None) -> Traffic:
    if before is None:
        return now
    out = Traffic()
    for db in now.requests:
        out.requests[db] = now.requests[db] - before.requests.get(db, 0.0)
        out.errors[db] = now.errors.get(db, 0.0) - before.errors.get(db, 0.0)
    for db, bounds in now.buckets.items():
        for bound, count in bounds.items():
            out.buckets[db][bound] = count - before.buckets.get(db, {}).get(bound, 0.0)
    return out


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}ms"


def render(doc: dict[str, Any], now: Traffic, before: Traffic | None, seconds: float) -> str:
    """The status screen: traffic per database over ``seconds``, then every node."""
    window = _delta(now, before)
    lines = [
        f"started={doc['started']} draining={doc['draining']} inflight={doc['inflight']} "
        f"uptime={doc['uptime_seconds']:.0f}s compile-cache hits={doc['compile_cache']['hits']} "
        f"misses={doc['compile_cache']['misses']}",
        "",
        f"{'DATABASE':<12} {'REQ/S':>9} {'ERR/S':>8} {'P50':>10} {'P99':>10}"
        f"   ({'last ' + format(seconds, '.0f') + ' s' if before else 'since start'})",
    ]
    for name in doc["databases"]:
        rate = window.requests.get(name, 0.0) / seconds if seconds > 0 else 0.0
        errors = window.errors.get(name, 0.0) / seconds if seconds > 0 else 0.0
        buckets = window.buckets.get(name, {})
        lines.append(
            f"{name:<12} {rate:>9.1f} {errors:>8.1f} {_ms(quantile(0.5, buckets)):>10} "
            f"{_ms(quantile(0.99, buckets)):>10}"
        )
    lines += [
        "",
        f"{'DATABASE':<12} {'SHARD':<14} {'NODE':<28} {'ROLE':<8} {'STATE':<5} "
        f"{'LAG':>10} {'LAG(s)':>7} {'PING':>8} {'POOL':>9}",
    ]
    for name, db in doc["databases"].items():
        for node in db["nodes"]:
            pool = node["pool"]
            pool_text = f"{pool['size'] - pool['idle']}/{pool['max']}" if pool else "-"
            lines.append(
                f"{name:<12} {_fmt(node['shard']):<14} {node['name'][:28]:<28} "
                f"{_fmt(node['role']):<8} {'up' if node['up'] else 'DOWN':<5} "
                f"{_fmt(node['lag_bytes'], 'B'):>10} {_fmt(node['lag_seconds']):>7} "
                f"{_fmt(node['latency_ms'], 'ms'):>8} {pool_text:>9}"
            )
            if node["last_error"]:
                lines.append(f"{'':<12} {'':<14} last error: {node['last_error']}")
    return "\n".join(lines + _schema_lines(doc))


def _schema_lines(doc: dict[str, Any]) -> list[str]:
    """Each shard's schema version, for databases that have one (``dbsidecar migrate
    status`` says what to do about a failed migration)."""
    agree = {True: "consistent", False: "SHARDS DISAGREE", None: "not read yet"}
    lines = []
    for name, db in doc["databases"].items():
        schema = db.get("schema", {})
        readings = schema.get("shards", {})
        if not any(r["version"] or r["dirty"] or r["error"] for r in readings.values()):
            continue  # never migrated: nothing to show
        for shard, reading in readings.items():
            state = "ok"
            if reading["dirty"]:
                state = f"DIRTY {','.join(map(str, reading['dirty']))}"
            if reading["error"]:
                state += f" (not read: {reading['error']})"
            lines.append(f"{name:<12} {shard:<14} {_fmt(reading['version']):>8}  {state}")
        lines.append(f"{name:<12} {'':<14} {'':>8}  {agree[schema.get('consistent')]}")
    if not lines:
        return []
    return ["", f"{'DATABASE':<12} {'SHARD':<14} {'SCHEMA':>8}  STATE", *lines]
