"""The outbox relay: messages committed in ``dbsidecar_outbox`` delivered to a sink.

A sink is where messages go: NATS JetStream (:mod:`sidecar.relay_nats`) or an HTTP
webhook (:mod:`sidecar.relay_webhook`); this module is the delivery loop, the same for
either, and the small interface (:class:`Sink`) it delivers through.

One delivery loop per shard primary of a logical database. A loop delivers only while
it holds a session-level advisory lock on that shard's database, so any number of relay
processes (one per pod) can run and exactly one delivers per shard; when its connection
or process dies, PostgreSQL drops the lock and a standby takes over within one poll.

The leader reads the oldest messages in id order (a bounded batch), sends them one
after another, each acknowledged by the sink before the next (so the order per aggregate
that the writers' locks made, see :mod:`sidecar.outbox`, is the order the receiver sees),
then deletes what was acknowledged in one statement. A crash between a send and the
delete sends those messages again, with the same message id, which the receiver drops
them by (JetStream by ``Nats-Msg-Id``, a webhook by ``Idempotency-Key``). A failed send
(broker down, no stream for the subject, a webhook's non-2xx answer) stops the batch
there, deletes what went before it, and tries again after a backoff that doubles up to
``max_backoff``: nothing is skipped, nothing reordered, nothing dropped.

Metrics (per database and shard): ``dbsidecar_relay_lag_seconds`` (age of the oldest
undelivered message, 0 when none), ``dbsidecar_relay_delivered_total``,
``dbsidecar_relay_failed_total`` (failed sends), ``dbsidecar_relay_leader`` (1 while
this process delivers for the shard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from .pools import connect_kwargs
from .settings import Settings
from .storetables import OUTBOX, RELAY_LOCK

log = logging.getLogger("dbsidecar.relay")

_BATCH_SQL = (
    "SELECT id, message_id, aggregate, subject, payload, headers, "
    "extract(epoch FROM clock_timestamp() - created_at)::float8 AS age "
    f"FROM {OUTBOX} ORDER BY id LIMIT $1"
)
_DELETE_SQL = f"DELETE FROM {OUTBOX} WHERE id = ANY($1::bigint[])"
_EXISTS_SQL = f"SELECT to_regclass('{OUTBOX}') IS NOT NULL"
_LEAD_SQL = f"SELECT pg_try_advisory_lock({RELAY_LOCK}, 0)"


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message as a sink sends it."""

    id: str  # the message id (a UUID): what the receiver de-duplicates by
    subject: str
    aggregate: str
    payload: Any  # plain JSON
    headers: dict[str, str]


class DeliveryFailed(Exception):
    """The sink did not get a message acknowledged: the batch stops there and the same
    message is sent again after the backoff. ``level``: how loudly the loop logs it
    (an error when only a change on the receiver's side can get the message through)."""

    def __init__(self, reason: str, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.level = level


class Sink(Protocol):
    """Where the loop delivers: shared by every shard's loop of the process."""

    async def send(self, message: Message) -> None:
        """Return once the receiver acknowledged ``message``; raise DeliveryFailed
        otherwise (within a bounded time)."""
        ...

    async def close(self) -> None: ...


# Seconds a relay's session may stay silent before PostgreSQL ends it (idle_session_timeout)
# and with it the session's lock. Without it a leader that froze (a stopped process, a
# paused VM, a network partition) kept its session, so its lock, until TCP keepalive gave
# up (2 hours by Linux's defaults; never while the frozen host's kernel still answers),
# and no standby delivered meanwhile. A live relay never stays silent that long: it
# polls, and a long batch touches the session (see ShardRelay._batch).
RELAY_LEASE = 10.0


@dataclass(frozen=True, slots=True)
class RelayOptions:
    batch: int = 200
    # Seconds one send may take until it counts as failed.
    publish_timeout: float = 2.0
    # The idle poll and the backoff after failures both grow from min_wait to these.
    min_wait: float = 0.02
    max_poll: float = 0.5
    max_backoff: float = 2.0


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["database", "shard"]
        self.lag = Gauge("dbsidecar_relay_lag_seconds",
                         "Age of the oldest undelivered outbox message", labels,
                         registry=registry)  # fmt: skip
        self.delivered = Counter("dbsidecar_relay_delivered",
                                 "Outbox messages acknowledged by the sink", labels,
                                 registry=registry)  # fmt: skip
        self.failed = Counter("dbsidecar_relay_failed", "Failed sends (retried)", labels,
                              registry=registry)  # fmt: skip
        self.leader = Gauge("dbsidecar_relay_leader",
                            "1 while this relay delivers for the shard", labels,
                            registry=registry)  # fmt: skip


class ShardRelay:
    """The delivery loop of one shard: lead, deliver in batches, back off on failure."""

    def __init__(
        self,
        database: str,
        shard: str,
        connect: dict[str, Any],
        sink: Sink,
        options: RelayOptions,
        metrics: RelayMetrics,
    ) -> None:
        self.database, self.shard = database, shard
        self._connect = connect
        self._sink = sink
        self._options = options
        self._lag = metrics.lag.labels(database, shard)
        self._delivered = metrics.delivered.labels(database, shard)
        self._failed = metrics.failed.labels(database, shard)
        self._leader = metrics.leader.labels(database, shard)

    async def run(self) -> None:
        """For ever: connect, wait to lead, deliver; a lost connection starts over."""
        wait = self._options.min_wait
        while True:
            try:
                conn = await asyncpg.connect(**self._connect)
                await _json_codecs(conn)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("relay %s/%s: cannot connect: %s", self.database, self.shard, exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self._options.max_backoff)
                continue
            wait = self._options.min_wait
            try:
                await self._lead(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay %s/%s: database failed: %s", self.database, self.shard, exc)
            finally:
                self._leader.set(0)
                conn.terminate()  # the server drops the session's lock with it

    async def _lead(self, conn: asyncpg.Connection) -> None:
        while True:
            if await conn.fetchval(_LEAD_SQL):
                break
            await asyncio.sleep(self._options.max_poll)  # another relay delivers
        log.info("relay %s/%s: delivering", self.database, self.shard)
        self._leader.set(1)
        await self._deliver(conn)

    async def _deliver(self, conn: asyncpg.Connection) -> None:
        opts = self._options
        wait = opts.min_wait
        while True:
            sent = await self._batch(conn)
            if sent is None:  # a failure: the same messages again after the backoff
                await asyncio.sleep(wait)
                wait = min(wait * 2, opts.max_backoff)
            elif sent < opts.batch:  # drained: poll, less often while nothing comes
                await asyncio.sleep(wait)
                wait = opts.min_wait if sent else min(wait * 2, opts.max_poll)
            else:
                wait = opts.min_wait

    async def _batch(self, conn: asyncpg.Connection) -> int | None:
        """One batch: the number of messages delivered, None when a send failed."""
        if not await conn.fetchval(_EXISTS_SQL):
            self._lag.set(0)
            return 0  # no write carried a message yet
        rows = await conn.fetch(_BATCH_SQL, self._options.batch)
        self._lag.set(rows[0]["age"] if rows else 0)
        done: list[int] = []
        failed = False
        touched = time.monotonic()
        for row in rows:
            if time.monotonic() - touched > RELAY_LEASE / 4:
                await conn.execute("SELECT 1")  # alive: the lease (see RELAY_LEASE) goes on
                touched = time.monotonic()
            message = Message(str(row["message_id"]), row["subject"], row["aggregate"],
                              row["payload"], row["headers"] or {})  # fmt: skip
            try:
                await self._sink.send(message)
            except DeliveryFailed as exc:
                failed = True
                self._failed.inc()
                log.log(exc.level, "relay %s/%s: message %s not delivered: %s",
                        self.database, self.shard, message.id, exc)  # fmt: skip
                break
            done.append(row["id"])
        if done:
            await conn.execute(_DELETE_SQL, done)
            self._delivered.inc(len(done))
        return None if failed else len(done)


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=msgspec.json.encode, decoder=msgspec.json.decode, schema="pg_catalog"
        )


def shard_relays(
    settings: Settings,
    database: str,
    sink: Sink,
    options: RelayOptions,
    metrics: RelayMetrics,
) -> list[ShardRelay]:
    """A delivery loop for each shard primary of ``database`` (one without shards: one)."""
    db = settings.databases.get(database)
    if db is None:
        known = sorted(settings.databases)
        raise ValueError(f"no database {database!r} is configured; known: {known}")
    shards = [(s.name, s.primary) for s in db.shards] or [("", db.primary)]
    relays = []
    for name, node in shards:
        if node is None:
            # Nodes found in Consul's catalog have no static primary to connect to.
            raise ValueError(f"database {database!r} shard {name!r} names no primary node")
        where = f"{database}/{name}" if name else database
        kwargs = connect_kwargs(node, database, where)
        # Longer than any wait of the loop's, whatever the options say.
        lease = max(RELAY_LEASE, 4 * max(options.max_backoff, options.max_poll),
                    2 * options.publish_timeout)  # fmt: skip
        kwargs["server_settings"] = {
            "application_name": "dbsidecar-relay",
            "idle_session_timeout": str(int(lease * 1000)),
        }
        # A frozen server fails the loop's statements (and it connects again) instead of
        # holding the relay for ever.
        kwargs["command_timeout"] = options.publish_timeout * 10
        relays.append(ShardRelay(database, name, kwargs, sink, options, metrics))
    return relays
