"""The topology as a document: for /v1/topology, /healthz and `dbsidecar status`."""

from __future__ import annotations

import time
from typing import Any

from wire.consistency import int_to_lsn

from .state import SidecarState
from .topology import Node


def _node(node: Node, shard: str | None) -> dict[str, Any]:
    pool = node.pool
    return {
        "name": node.name,
        "shard": shard,
        "configured_role": node.configured_role,
        "role": None
        if node.in_recovery is None
        else ("replica" if node.in_recovery else "primary"),
        "up": node.up,
        "since": node.since,
        "lsn": None if node.lsn is None else int_to_lsn(node.lsn),
        "lag_bytes": node.lag_bytes,
        "lag_seconds": None if node.lag_seconds is None else round(node.lag_seconds, 3),
        "latency_ms": None if node.latency is None else round(node.latency * 1000, 3),
        "last_error": node.last_error,
        "pool": None
        if pool is None
        else {"size": pool.get_size(), "idle": pool.get_idle_size(), "max": pool.get_max_size()},
    }


def topology_document(state: SidecarState) -> dict[str, Any]:
    databases = {}
    for name, db in state.topology.databases.items():
        databases[name] = {
            "sharded": db.sharded,
            "shard_key": db.shard_fn.key if db.shard_fn else None,
            "shard_function": db.shard_fn.function if db.shard_fn else None,
            "read_default": db.settings.read_default,
            "nodes": [_node(n, s.name) for s in db.shards for n in s.nodes],
            "schema": state.schema.document(name),
        }
    compiler = state.runtime.compiler
    return {
        "started": state.started,
        "draining": state.draining,
        "uptime_seconds": round(time.time() - state.started_at, 3),
        "inflight": state.inflight,
        "compile_cache": {"hits": compiler.hits, "misses": compiler.misses},
        "config": state.config.document(),
        "routing": {
            f"{db}/{kind}": n for (db, kind), n in sorted(state.runtime.router.decisions.items())
        },
        "databases": databases,
    }
