"""Subscriptions: a handler fed a category's events (or every stream's) with a durable
checkpoint, catching up from it and then following new events.

::

    async def on_event(event: RecordedEvent, tx: Transaction | None) -> None:
        await Shipment(order=event.stream, ...).save(using=tx)

    sub = Subscription('shipping', on_event, category='order', using='orders')
    await sub.run(stop)         # until stop (an asyncio.Event) is set

The checkpoint (one position per shard, see :class:`~client.eventstore.Checkpoint`) lives
in ``dbsidecar_subscriptions`` on each shard of the database read, created by the first
run. With ``transactional=True`` (the default) each page of one shard's events is handled
in one transaction on that shard: the handler writes through ``tx`` and the checkpoint
advance commits with its writes, so a failure or a crash rolls both back and the page
is handled again, its effects committed exactly once (the handler's writes must stay on
the event's shard). With ``transactional=False`` the handler gets ``tx=None`` and the
checkpoint moves after each page: at least once, for handlers that write elsewhere
(idempotently). A handler that raises stops nothing: the page is retried after a
backoff that doubles up to ``max_wait``; so does a failed read. New events are found by
polling, more slowly while none come (``min_wait`` doubling to ``max_wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from itertools import groupby

import msgspec

from wire.protocol import ALL_SHARDS, Raw, Route
from wire.values import encode_value

from . import tables
from .connection import ConnectionManager, DatabaseHandle
from .eventstore import Checkpoint, EventStore, RecordedEvent
from .results import decode
from .transactions import Transaction

log = logging.getLogger("dbsidecar.subscription")

Handler = Callable[[RecordedEvent, Transaction | None], Awaitable[None]]

_TABLE = (
    "CREATE TABLE IF NOT EXISTS dbsidecar_subscriptions (subscription text NOT NULL, "
    "shard text NOT NULL, position bigint NOT NULL, PRIMARY KEY (subscription, shard))"
)
_LOAD = "SELECT shard, position FROM dbsidecar_subscriptions WHERE subscription = $1"
# Never backwards: two runs of one subscription racing cannot undo each other's progress.
_SAVE = (
    "INSERT INTO dbsidecar_subscriptions (subscription, shard, position) VALUES ($1, $2, $3) "
    "ON CONFLICT (subscription, shard) DO UPDATE SET position = excluded.position "
    "WHERE dbsidecar_subscriptions.position < excluded.position"
)
# In the handler's transaction: only from the position this run read from ($4), else no
# row comes back and the page rolls back. With _SAVE there, two runs of one subscription
# (two pods) handled the same page and both committed their effects, the second one
# merely not moving the checkpoint: every effect twice.
_ADVANCE = (
    "INSERT INTO dbsidecar_subscriptions (subscription, shard, position) VALUES ($1, $2, $3) "
    "ON CONFLICT (subscription, shard) DO UPDATE SET position = excluded.position "
    "WHERE dbsidecar_subscriptions.position = $4 RETURNING position"
)


class _Overtaken(Exception):
    """Another run of this subscription handled the page first (its effects commit)."""


class Subscription:
    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        category: str | None = None,
        using: str | DatabaseHandle | None = None,
        transactional: bool = True,
        batch: int = 100,
        member: int = 0,
        group_size: int = 1,
        min_wait: float = 0.02,
        max_wait: float = 1.0,
    ) -> None:
        self.name, self.handler, self.category = name, handler, category
        self.using, self.transactional, self.batch = using, transactional, batch
        self.member, self.group_size = member, group_size
        self.min_wait, self.max_wait = min_wait, max_wait
        self.checkpoint = Checkpoint()

    def _db(self) -> DatabaseHandle:
        db = ConnectionManager.resolve(self.using)
        if not isinstance(db, DatabaseHandle):
            raise TypeError("a subscription reads through a database handle, not a transaction")
        return db

    async def load(self) -> Checkpoint:
        """The stored checkpoint (creating the table on every shard the first time)."""
        db = self._db()
        await tables.create(db, _TABLE, shard=ALL_SHARDS)
        load = Raw(database=db.database, sql=_LOAD, params=[self.name], writes=False,
                   route=Route(shard=ALL_SHARDS))  # fmt: skip
        rows = decode(await db.run(load))
        self.checkpoint = Checkpoint({r["shard"]: r["position"] for r in rows})
        return self.checkpoint

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up from the stored checkpoint, then follow new events until ``stop``."""
        loaded = False
        wait = self.min_wait
        while not stop.is_set():
            try:
                # Loaded in the loop: a first request that failed (the sidecar container
                # not ready yet) ended run() for good when it came before it.
                if not loaded:
                    await self.load()
                    loaded = True
                handled = await self.step()
            except Exception:
                # The handler's failure or the sidecar's: the page comes again after the
                # backoff (what it committed, if anything, is behind the checkpoint).
                log.exception("subscription %s: a page failed; retrying", self.name)
                handled = -1
            if handled > 0:
                wait = self.min_wait
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(wait * 2, self.max_wait)

    async def step(self) -> int:
        """Handle one page of events after the checkpoint; the number handled."""
        db = self._db()
        page = await EventStore.read_category(
            self.category,
            self.checkpoint,
            self.batch,
            member=self.member,
            group_size=self.group_size,
            using=db,
        )
        # Shard by shard, each shard's events in their order (a page keeps it per shard).
        for shard, events in groupby(sorted(page.events, key=lambda e: e.shard), lambda e: e.shard):
            done = list(events)
            try:
                await self._handle(db, shard, done)
            except _Overtaken:
                # Nothing of this page committed: go on from where the other run got to.
                await self.load()
                return 0
            self.checkpoint = self.checkpoint.after(done)
        return len(page.events)

    async def _handle(self, db: DatabaseHandle, shard: str, events: list[RecordedEvent]) -> None:
        save = Raw(
            database=db.database,
            sql=_SAVE,
            params=[encode_value(v) for v in (self.name, shard, events[-1].position)],
            writes=True,
            route=Route(shard=shard or None),
        )
        if not self.transactional:
            for event in events:
                await self.handler(event, None)
            await db.run(save)
            return
        read_from = self.checkpoint.positions.get(shard, 0)
        advance = msgspec.structs.replace(
            save, sql=_ADVANCE, params=[*save.params, encode_value(read_from)]
        )
        async with db.transaction(shard or None) as tx:
            for event in events:
                await self.handler(event, tx)
            if not decode(await tx.run(advance)):
                raise _Overtaken  # rolls the handler's writes back
