"""Node probes: one background task per node on its own connection.

Every ``position_interval`` (100 ms) a probe reads the node's role and WAL
position, which keeps replica lag and read-your-writes current. Every
``interval`` a probe also counts towards the up/down thresholds. Lag is
measured here from WAL positions: bytes behind the primary, and seconds since
the primary first reported a position the replica has not replayed yet (so an
idle primary does not make a caught-up replica look stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import asyncpg

from wire.consistency import lsn_to_int

from .pools import connect_kwargs
from .settings import HealthSettings
from .topology import Node, Shard

log = logging.getLogger("dbsidecar.health")

PROBE_SQL = (
    "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() "
    "THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text"
)


class Prober:
    """One probe task per node; nodes come and go with configuration reloads."""

    def __init__(self, settings: Callable[[], HealthSettings]) -> None:
        # Read on every round: a reload publishes new health settings in the runtime.
        self.settings = settings
        self._tasks: dict[Node, asyncio.Task[None]] = {}

    async def watch(self, nodes: Sequence[Node]) -> None:
        """Probe these nodes (those not probed yet) and wait, bounded by the probe
        timeout, for their first answers."""
        loop = asyncio.get_running_loop()
        firsts = []
        for node in nodes:
            if node in self._tasks:
                continue
            first: asyncio.Future[None] = loop.create_future()
            firsts.append(first)
            self._tasks[node] = asyncio.create_task(
                self._run(node, first), name=f"probe {node.name}"
            )
        if firsts:
            await asyncio.wait(firsts, timeout=self.settings().timeout * 2)

    async def forget(self, nodes: Sequence[Node]) -> None:
        tasks = [t for n in nodes if (t := self._tasks.pop(n, None)) is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        await self.forget(list(self._tasks))

    async def _run(self, node: Node, first: asyncio.Future[None]) -> None:
        kwargs = connect_kwargs(node.settings, node.database, f"databases.{node.db_label}")
        conn: asyncpg.Connection | None = None
        fails = oks = 0
        last_health = 0.0
        try:
            while True:
                # Read every round: a configuration reload swaps the health settings.
                cfg = self.settings()
                # A statement missed its deadline on this node: check it now, and a
                # failure marks it down at once (no waiting for the threshold).
                urgent = node.suspect.is_set()
                node.suspect.clear()
                started = time.monotonic()
                error: str | None = None
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(
                            **kwargs,
                            timeout=cfg.timeout,
                            server_settings={"application_name": "dbsidecar-probe"},
                        )
                    row = await conn.fetchrow(PROBE_SQL, timeout=cfg.timeout)
                except Exception as exc:  # any failure is a failed probe, whatever its kind
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    if conn is not None:
                        conn.terminate()
                        conn = None
                else:
                    assert row is not None and node.shard is not None
                    self._observe(node.shard, node, row[0], lsn_to_int(row[1]) if row[1] else None)
                    node.latency = time.monotonic() - started
                now = time.monotonic()
                if urgent or now - last_health >= cfg.interval or not first.done():
                    last_health = now
                    if error is None:
                        fails, oks = 0, oks + 1
                        if not node.up and oks >= cfg.success_threshold:
                            node.mark(True)
                            log.warning("node %s of %s is up again", node.name, node.db_label)
                            _check_split_brain(node.shard)
                        node.last_error = None
                    else:
                        fails, oks = fails + 1, 0
                        node.last_error = error
                        down = fails >= cfg.failure_threshold or urgent or not first.done()
                        if node.up and down:
                            node.mark(False, error)
                            log.warning(
                                "node %s of %s is down: %s", node.name, node.db_label, error
                            )
                            _check_split_brain(node.shard)
                if not first.done():
                    first.set_result(None)
                pause = max(0.0, cfg.position_interval - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(node.suspect.wait(), pause)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1)

    def _observe(self, shard: Shard, node: Node, in_recovery: bool, lsn: int | None) -> None:
        now = time.monotonic()
        if node.in_recovery is None and (node.configured_role == "replica") != in_recovery:
            # Configuration or catalog tags said otherwise; what the node reports wins.
            log.warning(
                "node %s is configured as %s but reports %s; going by the node",
                node.name,
                node.configured_role,
                "recovery" if in_recovery else "primary role",
            )
        if node.in_recovery is not None and node.in_recovery != in_recovery:
            log.warning(
                "node %s now reports %s", node.name, "recovery" if in_recovery else "primary role"
            )
            if not in_recovery:
                # A promotion: whoever was primary before must not take writes again.
                for other in shard.nodes:
                    if other is not node and not other.fenced:
                        other.fenced = True
                        log.warning("node %s fenced after %s was promoted", other.name, node.name)
        if in_recovery and node.fenced:
            node.fenced = False  # it rejoined as a replica
            log.warning("node %s rejoined as a replica", node.name)
        node.in_recovery = in_recovery
        previous = node.lsn
        node.lsn = lsn
        if (
            node is shard.lag_reference()
            and lsn is not None
            and (not shard.history or shard.history[-1][1] != lsn)
        ):
            shard.history.append((now, lsn))
        _update_lag(shard, now)
        _check_split_brain(shard)
        if in_recovery and lsn is not None and (previous is None or lsn > previous):
            shard.notify_advanced()


def _check_split_brain(shard: Shard | None) -> None:
    if shard is None:
        return
    primaries = shard.reporting_primary()
    if len(primaries) > 1 and not shard.split_brain:
        shard.split_brain = True
        shard.split_brain_events += 1
        log.error(
            "split brain in %s: %s all report being primary; refusing writes",
            shard.name or primaries[0].database,
            ", ".join(n.name for n in primaries),
        )
    elif len(primaries) <= 1 and shard.split_brain:
        shard.split_brain = False
        log.warning("split brain in %s is over", shard.name or shard.nodes[0].db_label)


def _update_lag(shard: Shard, now: float) -> None:
    primary = shard.lag_reference()
    if primary is None or primary.lsn is None:
        return
    positions = []
    for replica in shard.nodes:
        if replica.lsn is None or not replica.in_recovery:
            continue
        positions.append(replica.lsn)
        replica.lag_bytes = max(0, primary.lsn - replica.lsn)
        replica.lag_seconds = shard.lag_seconds_at(replica.lsn, now)
    if positions:
        # Samples every replica has replayed past are no longer needed.
        oldest = min(positions)
        history = shard.history
        while len(history) >= 2 and history[1][1] <= oldest:
            history.popleft()
