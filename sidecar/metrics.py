"""Prometheus metrics: counters and histograms kept on the request path, and state
gauges (pools, nodes, routing decisions, open transactions) read at scrape time from
the live structures by a collector, so they can never drift from the truth.

Names follow Prometheus conventions: ``dbsidecar_`` prefix, base units, ``_total``
counters, labels bounded by configuration (database, shard, node, role, op), never
per-query values. One process per sidecar, so no multiprocess mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from .state import SidecarState

# Loopback work takes tens of microseconds to milliseconds; slow queries take seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

registry = CollectorRegistry()
ProcessCollector(registry=registry)
PlatformCollector(registry=registry)

requests_total = Counter(
    "dbsidecar_requests_total",
    "Data-plane HTTP requests by endpoint and status code.",
    ["endpoint", "code"],
    registry=registry,
)
request_duration = Histogram(
    "dbsidecar_request_duration_seconds",
    "Data-plane HTTP request latency, from the handler's view.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
queries_total = Counter(
    "dbsidecar_queries_total",
    "Statements run on a node; outcome is ok or the error code.",
    ["database", "shard", "role", "op", "outcome"],
    registry=registry,
)
query_duration = Histogram(
    "dbsidecar_query_duration_seconds",
    "Time from checking out a connection to having the rows, per statement group.",
    ["database", "shard", "role", "op"],
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
pool_acquire_duration = Histogram(
    "dbsidecar_pool_acquire_duration_seconds",
    "Time to get a connection from a node's pool.",
    ["database", "shard", "node"],
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
pool_acquire_timeouts = Counter(
    "dbsidecar_pool_acquire_timeouts_total",
    "Requests that found no free connection within the acquire timeout.",
    ["database", "shard", "node"],
    registry=registry,
)
batch_size = Histogram(
    "dbsidecar_batch_size",
    "Plans per batch request.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=registry,
)
bundle_size = Histogram(
    "dbsidecar_bundle_size",
    "Plans per bundle (independent plans the client batched into one request).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=registry,
)
config_reloads = Counter(
    "dbsidecar_config_reloads_total",
    "Configuration loads by source and result (success or error).",
    ["source", "result"],
    registry=registry,
)
config_last_success = Gauge(
    "dbsidecar_config_last_reload_success_timestamp_seconds",
    "When a configuration was last applied.",
    registry=registry,
)
build_info = Gauge("dbsidecar_build_info", "The running version.", ["version"], registry=registry)
build_info.labels(__version__).set(1)


# The hot path asks for the same labelled series over and over; prometheus-client's
# labels() takes a lock and builds a key each time, a cached lookup does not.
# Label values are bounded by the configuration, so the caches are too.
@functools.cache
def query_seconds(database: str, shard: str, role: str, op: str) -> Any:
    return query_duration.labels(database, shard, role, op)


@functools.cache
def query_count(database: str, shard: str, role: str, op: str, outcome: str) -> Any:
    return queries_total.labels(database, shard, role, op, outcome)


@functools.cache
def acquire_seconds(database: str, shard: str, node: str) -> Any:
    return pool_acquire_duration.labels(database, shard, node)


@functools.cache
def acquire_timeouts(database: str, shard: str, node: str) -> Any:
    return pool_acquire_timeouts.labels(database, shard, node)


@functools.cache
def request_seconds(endpoint: str) -> Any:
    return request_duration.labels(endpoint)


@functools.cache
def request_count(endpoint: str, code: int) -> Any:
    return requests_total.labels(endpoint, str(code))


def initialize(state: SidecarState) -> None:
    """Create every node's labelled series at 0, so a timeout shows as an increase
    from 0 rather than as a series that appears out of nowhere."""
    for node in state.topology.nodes:
        labels = (node.db_label, node.shard_label, node.name)
        pool_acquire_timeouts.labels(*labels)


class StateCollector(Collector):
    """Gauges and counters read from the live topology at scrape time."""

    def __init__(self, state: Callable[[], SidecarState | None]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        if state is None:
            return
        labels = ["database", "shard", "node", "role"]
        up = GaugeMetricFamily(
            "dbsidecar_node_up", "1 if the node answers its probes.", labels=labels
        )
        primary = GaugeMetricFamily(
            "dbsidecar_node_role_is_primary",
            "1 if the node reports it is not in recovery.",
            labels=labels,
        )
        lag_bytes = GaugeMetricFamily(
            "dbsidecar_replica_lag_bytes", "WAL bytes a replica is behind.", labels=labels
        )
        lag_seconds = GaugeMetricFamily(
            "dbsidecar_replica_lag_seconds",
            "Seconds since the primary passed the replica's replay position.",
            labels=labels,
        )
        probe = GaugeMetricFamily(
            "dbsidecar_probe_duration_seconds", "Duration of the node's last probe.", labels=labels
        )
        pool = GaugeMetricFamily(
            "dbsidecar_pool_connections",
            "Open pool connections by state (idle or busy).",
            labels=[*labels, "state"],
        )
        pool_max = GaugeMetricFamily(
            "dbsidecar_pool_max_connections", "The pool's size limit.", labels=labels
        )
        split = CounterMetricFamily(
            "dbsidecar_split_brain_events",
            "Times two nodes of one database or shard both reported being primary.",
            labels=["database", "shard"],
        )
        for db in state.topology.databases.values():
            for shard in db.shards:
                shard_name = shard.name or ""
                split.add_metric([db.name, shard_name], shard.split_brain_events)
                for node in shard.nodes:
                    role = node.configured_role if node.in_recovery is None else (
                        "replica" if node.in_recovery else "primary"
                    )  # fmt: skip
                    values = [db.name, shard_name, node.name, role]
                    up.add_metric(values, 1.0 if node.up else 0.0)
                    primary.add_metric(values, 1.0 if node.in_recovery is False else 0.0)
                    if node.in_recovery and node.lag_bytes is not None:
                        lag_bytes.add_metric(values, node.lag_bytes)
                    if node.in_recovery and node.lag_seconds is not None:
                        lag_seconds.add_metric(values, node.lag_seconds)
                    if node.latency is not None:
                        probe.add_metric(values, node.latency)
                    if node.pool is not None:
                        size, idle = node.pool.get_size(), node.pool.get_idle_size()
                        pool.add_metric([*values, "idle"], idle)
                        pool.add_metric([*values, "busy"], size - idle)
                        pool_max.add_metric(values, node.pool.get_max_size())
        decisions = CounterMetricFamily(
            "dbsidecar_routing_decisions",
            "Where reads and writes were sent: primary, replica, fallback_primary, "
            "ryw_primary, scatter, refused.",
            labels=["database", "decision"],
        )
        for (database, decision), count in state.runtime.router.decisions.items():
            decisions.add_metric([database, decision], count)
        compiler = state.runtime.compiler
        cache = CounterMetricFamily(
            "dbsidecar_compile_cache_lookups",
            "Plan compilations by whether the shape's SQL was cached.",
            labels=["result"],
        )
        cache.add_metric(["hit"], compiler.hits)
        cache.add_metric(["miss"], compiler.misses)
        open_tx = GaugeMetricFamily(
            "dbsidecar_transactions_open", "Interactive transactions open now."
        )
        open_tx.add_metric([], len(state.transactions.open))
        yield from (up, primary, lag_bytes, lag_seconds, probe, pool, pool_max, split)
        yield from (decisions, cache, open_tx)
        registry = state.config.registry
        if registry is not None:
            registry_up = GaugeMetricFamily(
                "dbsidecar_registry_up", "1 while the configuration registry (Consul) answers."
            )
            registry_up.add_metric([], 1.0 if registry.up else 0.0)
            yield registry_up


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
