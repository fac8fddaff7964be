"""Where the dev topology keeps each logical database, and the sidecar configuration for it.

`dbsidecar dev`, the test session and the benchmark all use this one layout. With extra
primaries (the tests start one), the ``users`` shards alternate between servers, so
scatter-gather crosses real server boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .ports import HOST, free_port
from .postgres import LocalTopology, PgServer

USER_SHARDS = [f"user_shard_{i}" for i in range(4)]
# Logical databases with a primary and (in dev) the replica's copy.
PLAIN_DATABASES = ("orders", "inventory", "payments")


def shard_server(topo: LocalTopology, index: int) -> PgServer:
    """The primary holding shard ``index`` of ``users``: the shards go round the primaries."""
    return topo.primaries[index % len(topo.primaries)]


def _node(server: PgServer, database: str, topo: LocalTopology) -> dict[str, Any]:
    return {
        "name": f"{server.name}/{database}",
        "host": HOST,
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
    databases: dict[str, Any] = {}
    for name in PLAIN_DATABASES:
        databases[name] = {
            "primary": _node(primary, name, topo),
            "replicas": [_node(r, name, topo) for r in replicas],
            # Reads stay on the primary unless a query asks for a replica
            # (using_read_replica()); replicas further behind than 16 MiB are skipped.
            "read_default": "primary",
            "max_replica_lag_bytes": 16 * 1024 * 1024,
            # Apps may migrate their databases at start (POST /v1/migrate).
            "migrations": {},
        }
    shards = []
    for i, name in enumerate(USER_SHARDS):
        server = shard_server(topo, i)
        shards.append(
            {
                "name": name,
                "primary": _node(server, name, topo),
                # Only the first primary streams to the replica.
                "replicas": [_node(r, name, topo) for r in replicas] if server is primary else [],
            }
        )
    databases["users"] = {
        "sharding": {"key": "id", "function": "modulo"},
        "shards": shards,
        "migrations": {},
    }
    return {
        "listen": {"host": HOST, "port": port, "uds": uds},
        "ops": {"host": HOST, "port": ops_port},
        "databases": databases,
    }


def sidecar_config(topo: LocalTopology, workdir: Path, name: str = "sidecar") -> dict[str, Any]:
    """:func:`dev_config` on free ports, with a Unix socket ``<name>.sock`` in ``workdir``."""
    return dev_config(
        topo, port=free_port(), ops_port=free_port(), uds=str(workdir / f"{name}.sock")
    )
