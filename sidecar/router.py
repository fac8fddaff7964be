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
        """The node that takes writes for a shard: never one known to be in recovery."""
        node = shard.primary
        if node.in_recovery:
            self.count(db, "refused")
            raise SidecarError(
                503,
                "no_primary",
                f"the primary of {shard.name or db.name} ({node.name}) is in recovery",
                retryable=True,
            )
        return node

    async def choose(
        self, db: Database, shard: Shard, *, replica: bool, after: int | None, count: bool = True
    ) -> Choice:
        """The node for a read on one shard; ``after`` is a WAL position to observe."""
        if not replica:
            choice = Choice(self.writer(db, shard), "primary", "primary")
        else:
            choice = await self._replica(db, shard, after)
        if count:
            self.count(db, choice.decision)
        return choice

    async def _replica(self, db: Database, shard: Shard, after: int | None) -> Choice:
        cfg = db.settings
        candidates = self._candidates(db, shard)
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
                    n for n in self._candidates(db, shard) if n.lsn is not None and n.lsn >= after
                ]
            if not caught_up:
                return Choice(self.writer(db, shard), "primary", "ryw_primary")
            candidates = caught_up
        if not candidates:
            if not cfg.fallback_to_primary:
                self.count(db, "refused")
                raise SidecarError(
                    503,
                    "no_replica_available",
                    f"no healthy replica of {shard.name or db.name} within the lag bound",
                    retryable=True,
                )
            return Choice(self.writer(db, shard), "primary", "fallback_primary")
        return Choice(self._pick(cfg.replica_strategy, shard, candidates), "replica", "replica")

    @staticmethod
    def _candidates(db: Database, shard: Shard) -> list[Node]:
        cfg = db.settings
        out = []
        for node in shard.replicas:
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
