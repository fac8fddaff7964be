"""Gauges read at scrape time from the live structures (pools, nodes, routing decisions,
compile cache, open transactions, the registry), so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import metrics

if TYPE_CHECKING:
    from .state import SidecarState


def initialize(state: SidecarState) -> None:
    """Create every node's labelled series at 0, so a timeout shows as an increase
    from 0 rather than as a series that appears out of nowhere."""
    for node in state.topology.nodes:
        labels = (node.db_label, node.shard_label, node.name)
        metrics.pool_acquire_timeouts.labels(*labels)


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
                "dbsidecar_registry_up", "1 while the registry (Consul or etcd) answers."
            )
            registry_up.add_metric([], 1.0 if registry.up else 0.0)
            yield registry_up
