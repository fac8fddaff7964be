"""Interactive transactions: one pooled primary connection held between requests.

``POST /v1/tx`` opens one and returns its id; plans posted to ``/v1/tx/{id}`` run
inside it, one at a time, on the primary; ``commit``/``rollback`` end it. On a
sharded database the transaction binds to one shard: the one named when it was
opened, or else the one its first plan pins. A transaction left idle longer than
``transactions.idle_timeout`` is rolled back so it cannot hold a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from asyncpg.transaction import Transaction as PgTransaction

from client.protocol import Plan, Result

from . import sharding
from .compiler import Compiled
from .dispatch import Dispatcher
from .errors import SidecarError, bad_plan, from_exception
from .executor import LSN_SQL, acquire, make_outcome, release, run_statement, to_result
from .settings import TransactionSettings
from .topology import Database, Node, Shard

log = logging.getLogger("dbsidecar.transactions")


@dataclass(eq=False)
class OpenTransaction:
    id: str
    db: Database
    shard: Shard | None
    node: Node | None = None
    conn: asyncpg.Connection | None = None
    tx: PgTransaction | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Transactions:
    def __init__(self, dispatcher: Dispatcher, settings: TransactionSettings) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.open: dict[str, OpenTransaction] = {}
        self.accepting = True
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="transaction reaper")

    async def begin(self, database: str, shard: str | int | None) -> str:
        if not self.accepting:
            raise SidecarError(503, "draining", "the sidecar is shutting down", retryable=True)
        if len(self.open) >= self.settings.max_open:
            raise SidecarError(
                503, "too_many_transactions", "too many open transactions", retryable=True
            )
        db, pinned = self.dispatcher.database(database)
        if not db.sharded:
            target: Shard | None = db.shards[0]
        elif shard is not None:
            target = db.shards[sharding.explicit_shard(shard, db.shard_names)]
        else:
            target = db.shards[pinned] if pinned is not None else None
        tx = OpenTransaction(secrets.token_hex(16), db, target)
        if target is not None:
            await self._connect(tx, target)
        self.open[tx.id] = tx
        return tx.id

    async def _connect(self, tx: OpenTransaction, shard: Shard) -> None:
        node = self.dispatcher.router.writer(tx.db, shard)
        self.dispatcher.router.count(tx.db, "primary")
        conn = await acquire(node, tx.db.settings.pool.acquire_timeout)
        conn.mark_dirty()  # whatever runs inside may leave session state
        try:
            pg_tx = conn.transaction()
            await pg_tx.start()
        except Exception as exc:
            await release(node, conn)
            raise from_exception(exc, writes=False) from exc
        tx.shard, tx.node, tx.conn, tx.tx = shard, node, conn, pg_tx

    def _get(self, tx_id: str) -> OpenTransaction:
        tx = self.open.get(tx_id)
        if tx is None:
            raise SidecarError(
                404, "unknown_transaction", "no such transaction (finished, or idle too long)"
            )
        return tx

    async def run(self, tx_id: str, plan: Plan) -> Result:
        tx = self._get(tx_id)
        async with tx.lock:
            tx.last_used = time.monotonic()
            db, pinned = self.dispatcher.database(plan.database)
            if db is not tx.db:
                raise bad_plan("a transaction stays on the database it was opened on")
            shard = self._shard_of(tx, plan, pinned)
            if tx.conn is None:
                await self._connect(tx, shard)
            elif shard is not tx.shard:
                raise bad_plan(
                    f"this transaction is bound to shard {tx.shard.name if tx.shard else None!r}",
                    "cross_shard_transaction",
                )
            compiled = self.dispatcher.compiler.compile(plan)
            assert tx.conn is not None and tx.node is not None
            try:
                parts = await self.dispatcher.observed(
                    db, shard, tx.node, "primary", plan, self._statement(tx, compiled)
                )
            except SidecarError as exc:
                if exc.code in ("write_outcome_unknown", "node_unavailable"):
                    await self._discard(tx)
                raise
            tx.last_used = time.monotonic()
            shard_name = tx.shard.name if tx.shard else None
            return to_result(make_outcome(parts, tx.node, "primary", shard_name))

    @staticmethod
    async def _statement(
        tx: OpenTransaction, compiled: Compiled
    ) -> tuple[list[str], list[str | None], list[tuple[Any, ...]], int]:
        assert tx.conn is not None
        try:
            return await run_statement(tx.conn, compiled)
        except Exception as exc:
            raise from_exception(exc, writes=True) from exc

    def _shard_of(self, tx: OpenTransaction, plan: Plan, pinned: int | None) -> Shard:
        db = tx.db
        if not db.sharded:
            return db.shards[0]
        if pinned is not None and plan.route.shard is None:
            return db.shards[pinned]
        assert db.shard_fn is not None
        indexes = sharding.target_shards(plan, db.shard_fn, db.shard_names)
        if indexes is None and plan.route.shard is None and tx.shard is not None:
            # A plan without the key, inside a transaction bound to a shard, stays there.
            return tx.shard
        if indexes is None or len(indexes) != 1:
            raise bad_plan(
                "a transaction on a sharded database stays on one shard: pin it when "
                "opening, or pin one shard in the first plan",
                "cross_shard_transaction",
            )
        return db.shards[indexes[0]]

    async def commit(self, tx_id: str) -> str | None:
        tx = self._get(tx_id)
        async with tx.lock:
            self.open.pop(tx_id, None)
            if tx.conn is None or tx.tx is None:
                return None
            try:
                await tx.tx.commit()
                lsn = await tx.conn.fetchval(LSN_SQL)
            except Exception as exc:
                await self._release(tx, broken=True)
                raise from_exception(exc, writes=True) from exc
            await self._release(tx)
            if lsn is None or tx.db.sharded is False:
                return lsn
            return f"{tx.shard.name}@{lsn}" if tx.shard and tx.shard.name else lsn

    async def rollback(self, tx_id: str) -> None:
        tx = self._get(tx_id)
        async with tx.lock:
            self.open.pop(tx_id, None)
            await self._discard(tx)

    async def _discard(self, tx: OpenTransaction) -> None:
        self.open.pop(tx.id, None)
        if tx.tx is not None and tx.conn is not None and not tx.conn.is_closed():
            with contextlib.suppress(Exception):
                await tx.tx.rollback()
        await self._release(tx)

    async def _release(self, tx: OpenTransaction, broken: bool = False) -> None:
        conn, node = tx.conn, tx.node
        tx.conn = tx.tx = None
        if conn is None or node is None or node.pool is None:
            return
        if broken:
            conn.terminate()
        await release(node, conn)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.idle_timeout / 4))
            deadline = time.monotonic() - self.settings.idle_timeout
            for tx in list(self.open.values()):
                if tx.last_used < deadline and not tx.lock.locked():
                    log.warning("rolling back transaction %s idle for too long", tx.id[:8])
                    await self._discard(tx)

    async def close(self) -> None:
        """Refuse new transactions and roll back the open ones."""
        self.accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for tx in list(self.open.values()):
            await self._discard(tx)
