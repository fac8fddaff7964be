"""Each shard's schema version, as the running sidecar last read it.

Read off the request path: at startup, after every migration through the API, and
every ``migrations.version_interval`` seconds (60 by default), with one short query
per shard primary on its pool. /v1/topology, /healthz and ``dbsidecar status`` show
it; with ``migrations.require_consistent`` /readyz refuses a database whose shards
disagree (or hold a failed migration).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import logs
from .migration_table import TABLE, lock_holder
from .runtime import Runtime
from .topology import Database, Node, Shard

log = logging.getLogger("dbsidecar.migrations")
# Seconds one shard's reading may take (a pool connect to a node that is down).
READ_TIMEOUT = 2.0
DEFAULT_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class ShardVersion:
    # The highest applied version; None when no migration was ever applied.
    version: int | None
    dirty: list[int]
    checked_at: float
    # Why the last reading failed (the version above is then the one before, if any).
    error: str | None = None


def _primary(shard: Shard) -> Node:
    """The node the shard's writes go to, chosen without the router (whose decision
    counters are for requests, not this background reading)."""
    trusted = [n for n in shard.reporting_primary() if not n.fenced]
    node = trusted[0] if trusted else shard.primary
    if node is None or node.pool is None:
        raise ConnectionError("no primary to read from")
    return node


@dataclass(eq=False)
class SchemaVersions:
    # database -> shard -> its last reading
    shards: dict[str, dict[str, ShardVersion]] = field(default_factory=dict)

    async def refresh(self, runtime: Runtime, names: list[str] | None = None) -> None:
        """Read the versions of ``names`` (every database by default), concurrently."""
        dbs = [d for n, d in runtime.topology.databases.items() if names is None or n in names]
        await asyncio.gather(*(self._database(runtime, db) for db in dbs))

    async def _database(self, runtime: Runtime, db: Database) -> None:
        readings = await asyncio.gather(
            *(self._shard(runtime, db, i) for i in range(len(db.shards)))
        )
        self.shards[db.name] = {
            shard.name or db.name: reading
            for shard, reading in zip(db.shards, readings, strict=True)
        }

    async def _shard(self, runtime: Runtime, db: Database, index: int) -> ShardVersion:
        shard = db.shards[index]
        previous = self.shards.get(db.name, {}).get(shard.name or db.name)
        try:
            node = _primary(shard)
            async with asyncio.timeout(READ_TIMEOUT), node.pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regclass($1)", TABLE) is None:
                    return ShardVersion(None, [], time.time())
                # A no-transaction migration is dirty while it runs (so a crash leaves it
                # dirty): while a migrator holds the shard's lock, such a row is running,
                # not failed, and readiness must not refuse every pod for the hours a
                # CREATE INDEX CONCURRENTLY may take.
                running = await lock_holder(conn) is not None
                row = await conn.fetchrow(
                    f"SELECT max(version) FILTER (WHERE state = 'applied') AS version, "
                    f"coalesce(array_agg(version ORDER BY version) FILTER "
                    f"(WHERE state = 'dirty' AND (transactional OR NOT $1)), '{{}}') AS dirty "
                    f"FROM {TABLE}",
                    running,
                )
        except Exception as exc:
            # A shard that cannot be read keeps its last reading, marked with the error.
            error = logs.redact(str(exc) or type(exc).__name__)
            log.debug("cannot read the schema version of %s: %s", shard.name or db.name, error)
            if previous is None:
                return ShardVersion(None, [], time.time(), error)
            return ShardVersion(previous.version, previous.dirty, time.time(), error)
        return ShardVersion(row["version"], list(row["dirty"]), time.time())

    def consistent(self, name: str) -> bool | None:
        """Whether every shard of ``name`` is at one version with no failed migration;
        None before the first reading."""
        readings = self.shards.get(name)
        if not readings:
            return None
        versions = {r.version for r in readings.values()}
        return len(versions) == 1 and not any(r.dirty for r in readings.values())

    def document(self, name: str) -> dict[str, Any]:
        readings = self.shards.get(name, {})
        return {
            "consistent": self.consistent(name),
            "shards": {
                shard: {
                    "version": r.version,
                    "dirty": r.dirty,
                    "checked_at": round(r.checked_at, 3),
                    "error": r.error,
                }
                for shard, r in readings.items()
            },
        }

    async def watch(self, current: Callable[[], Runtime]) -> None:
        """Read again every interval until cancelled; ``current`` gives the runtime in
        force, so a reload's databases and intervals are followed."""
        while True:
            await asyncio.sleep(interval(current()))
            await self.refresh(current())

    def refused(self, runtime: Runtime) -> list[str]:
        """Databases readiness refuses: require_consistent, and their shards disagree."""
        return [
            name
            for name, db in runtime.topology.databases.items()
            if db.settings.migrations is not None
            and db.settings.migrations.require_consistent
            and self.consistent(name) is False
        ]


def interval(runtime: Runtime) -> float:
    """The shortest version_interval of the configured databases."""
    values = [
        db.settings.migrations.version_interval
        for db in runtime.topology.databases.values()
        if db.settings.migrations is not None
    ]
    return min(values, default=DEFAULT_INTERVAL)
