"""Where a plan runs: primary or replica, and which node.

Writes go to the shard's writable primary, always. Reads go to the primary
unless the plan or the database's policy asks for a replica; a replica must be
up, in recovery and within the lag bound, and for read-your-writes it must have
replayed the caller's token, else (after a short wait) the primary serves.
Every decision is counted per database and kind.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from wire.errors import ErrorCode

from .errors import SidecarError
from .topology import Database, Node, Shard

Decision = Literal["primary", "replica", "fallback_primary", "ryw_primary", "scatter", "refused"]


@dataclass(slots=True)
class Choice:
    node: Node
    role: Literal["primary", "replica"]
    decision: Decision


class Router:
    def __init__(self) -> None:
        self.decisions: Counter[tuple[str, str]] = Counter()

    def count(self, db: Database, decision: Decision) -> None:
        self.decisions[(db.name, decision)] += 1

    def writer(self, db: Database, shard: Shard) -> Node:
        """The node that takes writes for a shard.

        The one node that reports being a primary (a promoted replica included), or,
        before any probe answered, the configured primary. Never a node in recovery,
        never one fenced by a failover, and nobody while two nodes claim the role.
        """
        where = shard.name or db.name
        primaries = shard.reporting_primary()
        if len(primaries) > 1:
            self.count(db, "refused")
            names = ", ".join(n.name for n in primaries)
            raise SidecarError(
                ErrorCode.SPLIT_BRAIN,
                f"{where}: {names} all report being primary; writes wait until one remains",
            )
        if primaries:
            node = primaries[0]
        else:
            node = shard.primary
            if node is None or not node.up or node.in_recovery is not None:
                self.count(db, "refused")
                raise SidecarError(ErrorCode.NO_PRIMARY, f"{where} has no reachable primary")
        if node.fenced:
            self.count(db, "refused")
            raise SidecarError(
                ErrorCode.NO_PRIMARY,
                f"{where}: {node.name} came back as primary after a failover and is not trusted",
            )
        return node

    def primary_for_read(self, db: Database, shard: Shard) -> Node:
        """Like :meth:`writer`, but reads carry on through a split brain, on the node a
        failover made primary."""
        primaries = shard.reporting_primary()
        if len(primaries) > 1:
            trusted = [n for n in primaries if not n.fenced]
            return (trusted or primaries)[0]
        return self.writer(db, shard)

    async def choose(
        self,
        db: Database,
        shard: Shard,
        *,
        replica: bool,
        after: int | None,
        count: bool = True,
        exclude: Node | None = None,
    ) -> Choice:
        """The node for a read on one shard; ``after`` is a WAL position to observe;
        ``exclude`` a replica that just failed this read."""
        if not replica:
            choice = Choice(self.primary_for_read(db, shard), "primary", "primary")
        else:
            choice = await self._replica(db, shard, after, exclude)
        if count:
            self.count(db, choice.decision)
        return choice

    async def _replica(
        self, db: Database, shard: Shard, after: int | None, exclude: Node | None
    ) -> Choice:
        cfg = db.settings
        candidates = [n for n in self._candidates(db, shard) if n is not exclude]
        if after is not None and candidates:
            caught_up = [n for n in candidates if n.lsn is not None and n.lsn >= after]
            deadline = time.monotonic() + cfg.ryw_wait_ms / 1000
            while not caught_up and (left := deadline - time.monotonic()) > 0:
                # Positions are polled in the background; wait for the next one.
                try:
                    await asyncio.wait_for(shard.advanced.wait(), left)
                except TimeoutError:
                    break
                caught_up = [
                    n
                    for n in self._candidates(db, shard)
                    if n is not exclude and n.lsn is not None and n.lsn >= after
                ]
            if not caught_up:
                return Choice(self.primary_for_read(db, shard), "primary", "ryw_primary")
            candidates = caught_up
        if not candidates:
            if not cfg.fallback_to_primary:
                self.count(db, "refused")
                raise SidecarError(
                    ErrorCode.NO_REPLICA_AVAILABLE,
                    f"no healthy replica of {shard.name or db.name} within the lag bound",
                )
            return Choice(self.primary_for_read(db, shard), "primary", "fallback_primary")
        return Choice(self._pick(cfg.replica_strategy, shard, candidates), "replica", "replica")

    @staticmethod
    def _candidates(db: Database, shard: Shard) -> list[Node]:
        cfg = db.settings
        out = []
        # Any node in recovery serves reads: an old primary that rejoined as a replica too.
        for node in shard.nodes:
            if not node.up or node.in_recovery is not True:
                continue
            if cfg.max_replica_lag_bytes is not None and (
                node.lag_bytes is None or node.lag_bytes > cfg.max_replica_lag_bytes
            ):
                continue
            if cfg.max_replica_lag_seconds is not None and (
                node.lag_seconds is None or node.lag_seconds > cfg.max_replica_lag_seconds
            ):
                continue
            out.append(node)
        return out

    @staticmethod
    def _pick(strategy: str, shard: Shard, candidates: list[Node]) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        if strategy == "random":
            return random.choice(candidates)
        turn = next(shard.rr)
        if strategy == "least_busy":
            least = min(n.busy for n in candidates)
            candidates = [n for n in candidates if n.busy == least]
        return candidates[turn % len(candidates)]
