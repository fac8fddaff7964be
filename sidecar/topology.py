"""The live picture of every database, shard and node that the router reads.

Built from settings once (pools opened concurrently); health probes write the
node states in place, so routing reads plain attributes and never awaits.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
import msgspec

from .pools import create_pool
from .settings import (
    DatabaseSettings,
    NodeSettings,
    PatroniSettings,
    PoolSettings,
    ServiceSettings,
    Settings,
)
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
    # What makes two configurations' nodes the same node (and keeps its pool on reload).
    identity: tuple[object, ...] = ()
    # The shard it belongs to in the current table (probes update its history and lag).
    shard: Shard | None = None
    pool: asyncpg.Pool | None = None
    # Written by the health probe.
    up: bool = True
    in_recovery: bool | None = None
    # Current WAL position on a primary, replay position on a replica.
    lsn: int | None = None
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
    # Set when a statement's deadline passed on this node: its probe checks it at once
    # and marks it down on a failure (a slow request alone proves nothing).
    suspect: asyncio.Event = field(default_factory=asyncio.Event)

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
    # The configured (or catalog-tagged) primary; None while a catalog lists none.
    primary: Node | None
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
        return [self.primary, *self.replicas] if self.primary else list(self.replicas)

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
    # Requests running on this table; a replaced table's removed nodes close at 0.
    users: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def nodes(self) -> list[Node]:
        return [n for db in self.databases.values() for s in db.shards for n in s.nodes]

    def lookup(self, name: str) -> tuple[Database, int | None] | None:
        db = self.databases.get(name)
        if db is not None:
            return db, None
        return self.shard_aliases.get(name)

    async def close(self) -> None:
        await close_pools(self.nodes)

    def enter(self) -> None:
        """A request starts using this table (see :meth:`released`)."""
        self.users += 1
        self._idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    async def released(self) -> None:
        """Wait until no request that started on this table is still running."""
        if self.users:
            await self._idle.wait()


@dataclass(frozen=True)
class CatalogNode:
    """One passing instance of a Consul service, or one member of a Patroni cluster
    (tagged ``primary`` for the leader, ``replica`` otherwise)."""

    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()


# Catalog name (a Consul service, a Patroni cluster's key prefix) -> its nodes, as the
# registry last reported them.
Catalog = Mapping[str, Sequence[CatalogNode]]


class _Builder:
    """Builds a topology, reusing the Node (pool, probe, state) of every node whose
    identity is unchanged, so a reload does not reconnect what it did not change."""

    def __init__(self, catalog: Catalog, previous: Topology | None) -> None:
        self.catalog = catalog
        self.reuse = {n.identity: n for n in previous.nodes} if previous else {}
        self.history = (
            {(db.name, s.name): s.history for db in previous.databases.values() for s in db.shards}
            if previous
            else {}
        )

    def node(
        self, settings: NodeSettings, database: str, role: Role, logical: str, shard: str,
        pool: PoolSettings, discovered: bool = False,
    ) -> Node:  # fmt: skip
        # A discovered node's role is the registry's opinion of the moment, and it flips at
        # every failover; the server is the same, so its pool, its probe's view and its
        # fencing stay (a new Node would forget that it was fenced).
        identity = (
            logical, shard, None if discovered else role, database,
            msgspec.json.encode(settings), msgspec.json.encode(pool),
        )  # fmt: skip
        found = self.reuse.get(identity)
        if found is not None:
            found.configured_role = role
            return found
        return Node(settings.label(database), settings, database, role, logical, shard, identity)

    def shard(
        self, name: str | None, index: int, database: str, logical: str, pool: PoolSettings,
        primary: NodeSettings | None, replicas: list[NodeSettings],
        discovery: ServiceSettings | PatroniSettings | None,
    ) -> Shard:  # fmt: skip
        discovered = discovery is not None
        if discovery is not None:
            primary, replicas = self._discovered(discovery)
        label = name or ""
        shard = Shard(
            name,
            index,
            None
            if primary is None
            else self.node(primary, database, "primary", logical, label, pool, discovered),
            [self.node(r, database, "replica", logical, label, pool, discovered) for r in replicas],
        )
        old = self.history.get((logical, name))
        if old is not None:
            shard.history = old
        for node in shard.nodes:
            node.shard = shard
        return shard

    def _discovered(
        self, discovery: ServiceSettings | PatroniSettings
    ) -> tuple[NodeSettings | None, list[NodeSettings]]:
        if isinstance(discovery, ServiceSettings):
            catalog, label, primary_tags = discovery.name, discovery.name, discovery.primary_tags
        else:
            catalog, label, primary_tags = discovery.prefix, discovery.scope, ["primary"]
        primary: NodeSettings | None = None
        replicas: list[NodeSettings] = []
        for instance in sorted(self.catalog.get(catalog, ()), key=lambda i: i.id):
            node = msgspec.structs.replace(
                discovery.node,
                name=f"{label}/{instance.id}",
                host=instance.address,
                port=instance.port,
            )
            if primary is None and set(instance.tags) & set(primary_tags):
                primary = node
            else:
                # Untagged instances serve reads until their probe says otherwise.
                replicas.append(node)
        return primary, replicas


def build(
    settings: Settings, catalog: Catalog | None = None, previous: Topology | None = None
) -> Topology:
    """The topology's structure, without pools (see :func:`open_pools`)."""
    builder = _Builder(catalog or {}, previous)
    databases: dict[str, Database] = {}
    aliases: dict[str, tuple[Database, int]] = {}
    for name, cfg in settings.databases.items():
        if cfg.sharding is None:
            shard = builder.shard(
                None, 0, name, name, cfg.pool, cfg.primary, cfg.replicas, cfg.service or cfg.patroni
            )
            databases[name] = Database(name, cfg, [shard])
            continue
        shards = [
            builder.shard(
                s.name, i, s.name, name, cfg.pool, s.primary, s.replicas, s.service or s.patroni
            )
            for i, s in enumerate(cfg.shards)
        ]
        db = Database(name, cfg, shards, ShardFunction(cfg.sharding, [s.name for s in cfg.shards]))
        databases[name] = db
        for shard in shards:
            aliases[shard.name or ""] = (db, shard.index)
    return Topology(databases, aliases)


async def open_pools(topo: Topology) -> None:
    """Open the pools of nodes that have none yet, concurrently.

    On failure the pools opened here are closed again.
    """
    fresh = [n for n in topo.nodes if n.pool is None]

    async def open_pool(node: Node) -> None:
        where = f"databases.{node.db_label}.{node.name}"
        settings = topo.databases[node.db_label].settings.pool
        node.pool = await create_pool(node.settings, node.database, settings, where)

    try:
        await asyncio.gather(*(open_pool(n) for n in fresh))
    except BaseException:
        await close_pools(fresh)
        raise


async def close_pools(nodes: Sequence[Node]) -> None:
    """Close pools gracefully: each waits for its checked-out connections to come back."""
    pools = [n.pool for n in nodes if n.pool is not None]
    for node in nodes:
        node.pool = None
    await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
