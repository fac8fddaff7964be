"""Prometheus metrics: counters and histograms kept on the request path, and the
registry they are exposed from (the gauges read at scrape time live in
:mod:`sidecar.gauges`).

Names follow Prometheus conventions: ``dbsidecar_`` prefix, base units, ``_total``
counters, labels bounded by configuration (database, shard, node, role, op), never
per-query values. One process per sidecar, so no multiprocess mode.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from . import __version__

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
coalesced_plans = Counter(
    "dbsidecar_coalesced_plans_total",
    "Reads that ran inside a coalesced statement (one statement for several plans).",
    ["database", "shard", "node"],
    registry=registry,
)
coalesced_statements = Counter(
    "dbsidecar_coalesced_statements_total",
    "Coalesced statements run (each carried two or more plans).",
    ["database", "shard", "node"],
    registry=registry,
)
channel_frames = Counter(
    "dbsidecar_channel_frames_total",
    "Frames received on data-plane channels (WebSocket), by kind and status code.",
    ["kind", "code"],
    registry=registry,
)
channels_open = Gauge(
    "dbsidecar_channels_open",
    "Data-plane channels (WebSocket connections) open now.",
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


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
