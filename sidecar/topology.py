"""The live picture of every database, shard and node that the router reads.

Built from settings once (pools opened concurrently); health probes write the
node states in place, so routing reads plain attributes and never awaits.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from .pools import create_pool
from .settings import DatabaseSettings, NodeSettings, Settings
from .sharding import ShardFunction

Role = Literal["primary", "replica"]


@dataclass(eq=False)
class Node:
    name: str
    settings: NodeSettings
    database: str
    configured_role: Role
    # Labels for metrics and logs: the logical database and the shard ("" if none).
    db_label: str = ""
    shard_label: str = ""
    pool: asyncpg.Pool | None = None
    # Written by the health probe.
    up: bool = True
    in_recovery: bool | None = None
    # Current WAL position on a primary, replay position on a replica.
    lsn: int | None = None
    lsn_at: float = 0.0
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    latency: float | None = None
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    # Connections checked out by requests right now (least_busy).
    busy: int = 0
    # Set when another node of its shard was promoted: a primary that comes back
    # after a failover is never trusted with writes until it rejoins as a replica.
    fenced: bool = False

    def mark(self, up: bool, error: str | None = None) -> bool:
        """Set up/down; True when that changed."""
        self.last_error = error
        if up == self.up:
            return False
        self.up = up
        self.since = time.time()
        return True


@dataclass(eq=False)
class Shard:
    name: str | None
    index: int
    primary: Node
    replicas: list[Node]
    rr: itertools.count = field(default_factory=itertools.count)
    # (monotonic time, primary LSN) samples, to turn replica positions into seconds of lag.
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20_000))
    # Set and replaced whenever a replica position advances (read-your-writes waits on it).
    advanced: asyncio.Event = field(default_factory=asyncio.Event)

    # True while more than one node of the shard reports being a primary.
    split_brain: bool = False
    split_brain_events: int = 0

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def reporting_primary(self) -> list[Node]:
        """Nodes that are up and say they are not in recovery."""
        return [n for n in self.nodes if n.up and n.in_recovery is False]

    def lag_reference(self) -> Node | None:
        """The node whose WAL position replicas are measured against."""
        trusted = [n for n in self.reporting_primary() if not n.fenced]
        return trusted[0] if len(trusted) == 1 else None

    def notify_advanced(self) -> None:
        event, self.advanced = self.advanced, asyncio.Event()
        event.set()

    def lag_seconds_at(self, lsn: int, now: float) -> float:
        """Seconds since the primary first reported a position past ``lsn``."""
        for at, primary_lsn in self.history:
            if primary_lsn > lsn:
                return max(0.0, now - at)
        return 0.0


@dataclass(eq=False)
class Database:
    name: str
    settings: DatabaseSettings
    shards: list[Shard]
    shard_fn: ShardFunction | None = None

    @property
    def sharded(self) -> bool:
        return self.shard_fn is not None

    @property
    def shard_names(self) -> list[str]:
        return [s.name or "" for s in self.shards]


@dataclass(eq=False)
class Topology:
    databases: dict[str, Database]
    # A shard's name used as a database name routes to that shard.
    shard_aliases: dict[str, tuple[Database, int]]

    @property
    def nodes(self) -> list[Node]:
        return [n for db in self.databases.values() for s in db.shards for n in s.nodes]

    def lookup(self, name: str) -> tuple[Database, int | None] | None:
        db = self.databases.get(name)
        if db is not None:
            return db, None
        return self.shard_aliases.get(name)

    async def close(self) -> None:
        pools = {id(n.pool): n.pool for n in self.nodes if n.pool is not None}
        await asyncio.gather(*(p.close() for p in pools.values()), return_exceptions=True)


def _node(settings: NodeSettings, database: str, role: Role, logical: str, shard: str) -> Node:
    return Node(settings.label(database), settings, database, role, logical, shard)


def build(settings: Settings) -> Topology:
    """The topology's structure, without pools (see :func:`open_pools`)."""
    databases: dict[str, Database] = {}
    aliases: dict[str, tuple[Database, int]] = {}
    for name, cfg in settings.databases.items():
        if cfg.sharding is None:
            assert cfg.primary is not None
            shard = Shard(
                None,
                0,
                _node(cfg.primary, name, "primary", name, ""),
                [_node(r, name, "replica", name, "") for r in cfg.replicas],
            )
            databases[name] = Database(name, cfg, [shard])
            continue
        shards = [
            Shard(
                s.name,
                i,
                _node(s.primary, s.name, "primary", name, s.name),
                [_node(r, s.name, "replica", name, s.name) for r in s.replicas],
            )
            for i, s in enumerate(cfg.shards)
        ]
        db = Database(name, cfg, shards, ShardFunction(cfg.sharding, [s.name for s in cfg.shards]))
        databases[name] = db
        for shard in shards:
            aliases[shard.name or ""] = (db, shard.index)
    return Topology(databases, aliases)


async def open_pools(topo: Topology) -> None:
    """Open every node's pool concurrently; on failure close what was opened."""

    async def open_pool(db: Database, node: Node) -> None:
        where = f"databases.{db.name}.{node.name}"
        node.pool = await create_pool(node.settings, node.database, db.settings.pool, where)

    try:
        await asyncio.gather(
            *(
                open_pool(db, n)
                for db in topo.databases.values()
                for s in db.shards
                for n in s.nodes
            )
        )
    except BaseException:
        await topo.close()
        raise
