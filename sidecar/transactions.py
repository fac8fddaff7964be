"""Interactive transactions: one pooled primary connection held between requests.

``POST /v1/tx`` opens one and returns its id; plans posted to ``/v1/tx/{id}`` run
inside it, one at a time, on the primary; ``commit``/``rollback`` end it. On a
sharded database the transaction binds to one shard: the one named when it was
opened, or else the one its first plan pins. A transaction left idle longer than
``transactions.idle_timeout`` is rolled back so it cannot hold a connection forever.

Each transaction is a state machine (asyncpg's ``TransactionState`` is the model)
behind one lock, so its plans, its commit and its rollback never overlap::

    NEW --first plan / pinned begin--> STARTED --commit--> COMMITTED
     |                                  |   \\--a statement fails--> FAILED
     |                                  |                             |
     +----------rollback / idle---------+------rollback / commit------+--> ROLLED_BACK

A plan after a failure is refused (``transaction_aborted``) and so is the commit of a
failed transaction: PostgreSQL answers COMMIT of an aborted transaction with a
rollback, and that must never reach the caller as success. Open transactions hold at
most ``transactions.max_pool_share`` of a primary's pool, so they cannot starve
ordinary reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wire.errors import ErrorCode
from wire.protocol import Plan, Result

from . import runner, sharding
from .errors import SidecarError, bad_plan
from .executor import to_result
from .route import database as route_database
from .route import shard_key as route_shard_key
from .runtime import Runtime
from .settings import PoolSettings, TransactionSettings
from .topology import Database, Node, Shard

log = logging.getLogger("dbsidecar.transactions")


class TxState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    FAILED = "failed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


_MOVES: dict[TxState, frozenset[TxState]] = {
    TxState.NEW: frozenset({TxState.STARTED, TxState.COMMITTED, TxState.ROLLED_BACK}),
    TxState.STARTED: frozenset({TxState.FAILED, TxState.COMMITTED, TxState.ROLLED_BACK}),
    TxState.FAILED: frozenset({TxState.ROLLED_BACK}),
    TxState.COMMITTED: frozenset(),
    TxState.ROLLED_BACK: frozenset(),
}
_FINISHED = (TxState.COMMITTED, TxState.ROLLED_BACK)


def _unknown() -> SidecarError:
    return SidecarError(
        ErrorCode.UNKNOWN_TRANSACTION, "no such transaction (finished, or idle too long)"
    )


@dataclass(eq=False)
class OpenTransaction:
    id: str
    db: Database
    shard: Shard | None
    state: TxState = TxState.NEW
    # The connection, from the first plan (or a pinned begin) to the end.
    held: runner.Held | None = None
    # Why a FAILED transaction failed, for the errors that refuse what comes after.
    failure: str | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def move(self, to: TxState) -> None:
        if to not in _MOVES[self.state]:
            raise AssertionError(f"transaction {self.id[:8]}: {self.state.value} -> {to.value}")
        self.state = to


def pool_share(pool: PoolSettings, share: float) -> int:
    """Connections of one pool that open transactions may hold: the configured share,
    at least one, and never the last connection of a pool that has more than one."""
    held = max(1, math.floor(pool.max_size * share))
    return min(held, pool.max_size - 1) if pool.max_size > 1 else 1


class Transactions:
    def __init__(self, settings: Callable[[], TransactionSettings]) -> None:
        # Read when needed: a reload publishes new settings in the runtime.
        self.settings = settings
        self.open: dict[str, OpenTransaction] = {}
        self.accepting = True
        # Connections held by open transactions, per node.
        self._held: dict[int, int] = {}
        # Set (and replaced) whenever a transaction lets its connection go.
        self._freed = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="transaction reaper")

    async def begin(self, rt: Runtime, database: str, shard: str | int | None) -> str:
        if not self.accepting:
            raise SidecarError(ErrorCode.DRAINING, "the sidecar is shutting down")
        if len(self.open) >= rt.settings.transactions.max_open:
            raise SidecarError(ErrorCode.TOO_MANY_TRANSACTIONS, "too many open transactions")
        db, pinned = route_database(rt.topology, database)
        if not db.sharded:
            target: Shard | None = db.shards[0]
        elif shard is not None:
            target = db.shards[sharding.explicit_shard(shard, db.shard_names)]
        else:
            target = db.shards[pinned] if pinned is not None else None
        tx = OpenTransaction(secrets.token_hex(16), db, target)
        if target is not None:
            await self._connect(rt, tx, target)
        self.open[tx.id] = tx
        return tx.id

    async def _connect(self, rt: Runtime, tx: OpenTransaction, shard: Shard) -> None:
        node = rt.router.writer(tx.db, shard)
        pool = tx.db.settings.pool
        limit = pool_share(pool, rt.settings.transactions.max_pool_share)
        # Wait for a transaction's share of the pool as long as for a connection itself.
        deadline = time.monotonic() + pool.acquire_timeout
        while self._held.get(id(node), 0) >= limit:
            freed = self._freed
            try:
                await asyncio.wait_for(freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise SidecarError(
                    ErrorCode.TOO_MANY_TRANSACTIONS,
                    f"{limit} interactive transactions held connections to {node.name} "
                    f"for {pool.acquire_timeout:g} s (transactions.max_pool_share); retry",
                ) from None
        self._held[id(node)] = self._held.get(id(node), 0) + 1
        try:
            tx.held = await runner.Held.begin(rt, tx.db, shard, node)
        except Exception:
            self._let_go(node)
            raise
        tx.shard = shard
        tx.move(TxState.STARTED)

    def _get(self, tx_id: str) -> OpenTransaction:
        tx = self.open.get(tx_id)
        if tx is None:
            raise _unknown()
        return tx

    @staticmethod
    def _usable(tx: OpenTransaction) -> None:
        """Refuse work on a transaction that failed or finished while the caller waited."""
        if tx.state is TxState.FAILED:
            raise SidecarError(
                ErrorCode.TRANSACTION_ABORTED,
                f"the transaction failed earlier ({tx.failure}); only rollback is possible",
            )
        if tx.state in _FINISHED:
            raise _unknown()

    async def run(self, rt: Runtime, tx_id: str, plan: Plan) -> Result:
        tx = self._get(tx_id)
        async with tx.lock:
            self._usable(tx)
            tx.last_used = time.monotonic()
            compiled = rt.compiler.compile(plan)
            r = runner.routed(rt, plan, compiled, transaction=True, bound=tx.shard)
            if r.db.name != tx.db.name:  # a reload rebuilds the objects, not the database
                raise bad_plan("a transaction stays on the database it was opened on")
            shard = r.targets[0].shard
            if tx.state is TxState.NEW:
                await self._connect(rt, tx, shard)
            assert tx.held is not None
            try:
                bound = compiled.on_shard(route_shard_key(tx.db, shard))
                outcome = await tx.held.run(rt, plan, bound)
            except SidecarError as error:
                if not tx.held.open:
                    self._finish(tx, TxState.ROLLED_BACK)  # the connection is gone
                elif error.sqlstate is not None:
                    # PostgreSQL aborted the transaction: it can only roll back now.
                    tx.failure = f"{error.code}: {error.message}"
                    tx.move(TxState.FAILED)
                raise
            tx.last_used = time.monotonic()
            return to_result(outcome)

    async def commit(self, tx_id: str) -> str | None:
        tx = self._get(tx_id)
        async with tx.lock:
            if tx.state in _FINISHED:
                raise _unknown()
            if tx.state is TxState.NEW:
                self._finish(tx, TxState.COMMITTED)  # nothing ran, nothing to commit
                return None
            if tx.state is TxState.FAILED:
                failure = tx.failure
                await self._rollback(tx)
                raise SidecarError(
                    ErrorCode.TRANSACTION_ABORTED,
                    f"the transaction failed earlier ({failure}) and was rolled back; "
                    "nothing of it committed",
                )
            return await self._commit(tx)

    async def _commit(self, tx: OpenTransaction) -> str | None:
        assert tx.held is not None and tx.shard is not None
        try:
            lsn = await tx.held.commit()
        except SidecarError:
            self._finish(tx, TxState.ROLLED_BACK)
            raise
        self._finish(tx, TxState.COMMITTED)
        if lsn is None or not tx.db.sharded:
            return lsn
        return f"{tx.shard.name}@{lsn}" if tx.shard.name else lsn

    async def rollback(self, tx_id: str) -> None:
        tx = self._get(tx_id)
        async with tx.lock:
            if tx.state in _FINISHED:
                raise _unknown()
            await self._rollback(tx)

    async def _rollback(self, tx: OpenTransaction) -> None:
        """Roll back under the transaction's lock."""
        self._finish(tx, TxState.ROLLED_BACK)
        if tx.held is not None:
            await tx.held.rollback()

    def _finish(self, tx: OpenTransaction, to: TxState) -> None:
        tx.move(to)
        self.open.pop(tx.id, None)
        if tx.held is not None:
            self._let_go(tx.held.node)

    def _let_go(self, node: Node) -> None:
        """One connection fewer held by transactions on this node."""
        self._held[id(node)] -= 1
        if not self._held[id(node)]:
            del self._held[id(node)]
        self._freed.set()  # wakes every waiter: each checks its node's count again
        self._freed = asyncio.Event()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings().idle_timeout / 4))
            for tx in list(self.open.values()):
                if tx.lock.locked():
                    continue
                async with tx.lock:
                    idle = time.monotonic() - tx.last_used >= self.settings().idle_timeout
                    if idle and tx.state not in _FINISHED:
                        log.warning("rolling back transaction %s idle for too long", tx.id[:8])
                        await self._rollback(tx)

    async def close(self) -> None:
        """Refuse new transactions and roll back the open ones (after the drain, a plan
        still running has its connection closed: the server rolls it back)."""
        self.accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for tx in list(self.open.values()):
            if tx.lock.locked():
                if tx.held is not None:
                    tx.held.abandon()
                continue
            async with tx.lock:
                if tx.state not in _FINISHED:
                    await self._rollback(tx)
