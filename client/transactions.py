"""Interactive transactions: ``async with db.transaction() as tx:`` then ``using(tx)``.

Plans sent through ``tx`` run in one database transaction on the primary, one at a
time, in order. Leaving the block commits; an exception rolls back. On a sharded
database a transaction stays on one shard (``db.transaction(shard='user_shard_2')``,
or the shard its first plan pins).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import msgspec

from wire.protocol import BatchResult, Plan, Result, Route, TxBegin, TxDone, TxOpened

from .errors import DbSidecarError, SidecarUnreachable, WriteOutcomeUnknown

if TYPE_CHECKING:
    from .connection import DatabaseHandle

_opened = msgspec.json.Decoder(TxOpened)
_done = msgspec.json.Decoder(TxDone)
_result = msgspec.json.Decoder(Result)


class Transaction:
    def __init__(self, base: DatabaseHandle, shard: str | int | None = None) -> None:
        self.base = base
        self.database = base.database
        self.shard = shard
        self.id: str | None = None

    @property
    def home(self) -> Transaction | DatabaseHandle:
        """Where records read in this transaction write: the transaction while it is
        open (so a rollback takes their updates back too), its database once it is over."""
        return self if self.id is not None else self.base

    async def __aenter__(self) -> Transaction:
        body = msgspec.json.encode(TxBegin(self.database, Route(shard=self.shard)))
        opened = await self.base.transport.request("POST", "/v1/tx", body, _opened)
        self.id = opened.id
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.id is None:
            return
        if exc_type is None:
            await self.commit()
        else:
            await self.rollback()

    def _path(self, suffix: str = "") -> str:
        if self.id is None:
            raise DbSidecarError("the transaction is not open", code="transaction_closed")
        return f"/v1/tx/{self.id}{suffix}"

    async def run(self, plan: Plan) -> Result:
        """Run one plan inside the transaction (never retried: it is not idempotent)."""
        body = msgspec.json.encode(plan)
        return await self.base.transport.request("POST", self._path(), body, _result)

    async def batch(self, plans: list[Plan]) -> BatchResult:
        return BatchResult(results=[await self.run(p) for p in plans])

    async def commit(self) -> None:
        path = self._path("/commit")
        tx_id, self.id = self.id, None  # committed or not, the transaction is over here
        try:
            done = await self.base.transport.request("POST", path, b"", _done)
        except SidecarUnreachable as exc:
            # The request may have reached the sidecar: "unreachable" would read as
            # "nothing happened" and invite a retry that applies the transaction twice.
            raise WriteOutcomeUnknown(
                f"no answer to the commit of transaction {tx_id} ({exc}); it may or may not "
                "have committed: check before applying it again",
                code="write_outcome_unknown",
                retryable=True,
            ) from exc
        self.base.observe(done.lsn)

    async def rollback(self) -> None:
        path = self._path("/rollback")
        self.id = None
        await self.base.transport.request("POST", path, b"", _done)
