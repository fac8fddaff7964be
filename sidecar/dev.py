"""`dbsidecar dev`: a local primary + streaming replica, and a sidecar configured for them.

The same configuration serves the test session and the benchmark. With extra
primaries (the tests start one), the ``users`` shards alternate between
servers, so scatter-gather crosses real server boundaries.
"""

from __future__ import annotations

from typing import Any

from .localdb import LocalTopology, PgServer

USER_SHARDS = [f"user_shard_{i}" for i in range(4)]
# Logical databases with a primary and (in dev) the replica's copy.
PLAIN_DATABASES = ("orders", "inventory", "payments")


def _node(server: PgServer, database: str, topo: LocalTopology) -> dict[str, Any]:
    return {
        "name": f"{server.name}/{database}",
        "host": "127.0.0.1",
        "port": server.port,
        "database": database,
        "user": topo.user,
        "password": topo.password,
    }


def dev_config(
    topo: LocalTopology, *, port: int | None = 7432, ops_port: int = 9432, uds: str | None = None
) -> dict[str, Any]:
    """The sidecar configuration document for a started local topology."""
    primary, replica = topo.primary, topo.replica
    replicas = [replica] if replica is not None else []
    primaries = [primary, *topo.extra]
    databases: dict[str, Any] = {}
    for name in PLAIN_DATABASES:
        databases[name] = {
            "primary": _node(primary, name, topo),
            "replicas": [_node(r, name, topo) for r in replicas],
            # Reads stay on the primary unless a query asks for a replica
            # (using_read_replica()); replicas further behind than 16 MiB are skipped.
            "read_default": "primary",
            "max_replica_lag_bytes": 16 * 1024 * 1024,
        }
    shards = []
    for i, name in enumerate(USER_SHARDS):
        server = primaries[i % len(primaries)]
        shards.append(
            {
                "name": name,
                "primary": _node(server, name, topo),
                # Only the first primary streams to the replica.
                "replicas": [_node(r, name, topo) for r in replicas] if server is primary else [],
            }
        )
    databases["users"] = {"sharding": {"key": "id", "function": "modulo"}, "shards": shards}
    return {
        "listen": {"host": "127.0.0.1", "port": port, "uds": uds},
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "databases": databases,
    }
