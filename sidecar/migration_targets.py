"""Where a database's migrations run: each shard's primary, as a :class:`Target`.

``dbsidecar migrate`` takes the configured primaries (it runs without a sidecar); the
running sidecar takes the node its router sends writes to, so a promoted replica is
migrated after a failover. Either way the migrator opens a dedicated connection: the
lock it holds is session-level and must not go back to a pool.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import asyncpg

from wire.errors import ErrorCode

from .errors import SidecarError
from .migrate import Target
from .pools import connect_kwargs
from .runtime import Runtime
from .settings import ConfigError, DatabaseSettings, NodeSettings, Settings

_SERVER_SETTINGS = {"application_name": "dbsidecar-migrate"}


async def _connect(kwargs: dict[str, Any], connect_timeout: float) -> asyncpg.Connection:
    # No statement cache: a file's DISCARD ALL or DEALLOCATE ALL would drop the cached
    # statements, and the bookkeeping write after it would fail on one that is gone.
    return await asyncpg.connect(
        **kwargs, timeout=connect_timeout, server_settings=_SERVER_SETTINGS,
        statement_cache_size=0,
    )  # fmt: skip


def _target(
    shard: str, node: NodeSettings, database: str, db: DatabaseSettings, where: str
) -> Target:
    kwargs = connect_kwargs(node, database, where)
    return Target(shard, node.label(database), partial(_connect, kwargs, db.pool.connect_timeout))


def from_settings(settings: Settings, name: str) -> list[Target]:
    """The configured primary of every shard of ``name``; ConfigError if it has none."""
    db = settings.databases.get(name)
    if db is None:
        known = ", ".join(sorted(settings.databases)) or "none"
        raise ConfigError(f"no database {name!r} in the configuration (configured: {known})")
    where = f"databases.{name}"
    if db.sharding is None:
        if db.primary is None:
            raise ConfigError(f"{where}: its nodes come from Consul; migrate through the sidecar")
        return [_target(name, db.primary, name, db, where)]
    targets = []
    for i, shard in enumerate(db.shards):
        if shard.primary is None:
            raise ConfigError(
                f"{where}.shards[{i}]: its nodes come from Consul; migrate through the sidecar"
            )
        targets.append(_target(shard.name, shard.primary, shard.name, db, f"{where}.shards[{i}]"))
    return targets


def from_runtime(runtime: Runtime, name: str) -> list[Target]:
    """The node taking writes on every shard of ``name`` now (SidecarError if a shard
    has none: no migration starts on some shards only because another is down)."""
    db = runtime.topology.databases.get(name)
    if db is None:
        raise SidecarError(ErrorCode.UNKNOWN_DATABASE, f"unknown database {name!r}")
    targets = []
    for shard in db.shards:
        node = runtime.router.writer(db, shard)
        where = f"databases.{name}.{node.name}"
        shard_name = shard.name or name
        targets.append(_target(shard_name, node.settings, node.database, db.settings, where))
    return targets
