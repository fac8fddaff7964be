"""Running a routed plan on one shard: the node, the statement, and what wraps it once.

For each target of a :class:`~sidecar.route.Route` the runner picks the node (the
shard's primary for a write, the router's choice for a read), runs the compiled
statement there through the executor, counts it, logs it when slow (its shape, never
its values) and, for a read whose node failed or had no free connection, tries once
more on another eligible node. A write is never retried: it may have committed.
Interactive transactions hold a connection through :class:`Held`, whose statements
the runner observes the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import asyncpg

from wire.errors import ErrorCode
from wire.protocol import Plan, Raw

from . import metrics, tracing
from .compiler import Compiled
from .errors import SidecarError, connection_lost, from_exception, is_closed
from .executor import (
    LSN_SQL,
    Outcome,
    acquire,
    deadline,
    execute,
    failed,
    make_outcome,
    release,
    run_statement,
)
from .route import REFUSALS, Intent, Route, Target, route
from .runtime import Runtime
from .topology import Database, Node, Shard

log = logging.getLogger("dbsidecar.queries")
T = TypeVar("T")

# Failures a read may leave behind on one node and try on another: nothing ran.
_RETRYABLE_READ = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.POOL_TIMEOUT})


def plan_op(plan: Plan | None) -> str:
    """The plan's operation as a metric label ("batch" for a whole batch)."""
    return "batch" if plan is None else str(plan.__struct_config__.tag)


@contextlib.contextmanager
def refusals_counted(rt: Runtime, database: str) -> Iterator[None]:
    """Routing refusals raised inside count as the "refused" routing decision."""
    try:
        yield
    except SidecarError as exc:
        _count_refusal(rt, database, exc)
        raise


def routed(rt: Runtime, plan: Plan, checked: Compiled, **binding: Any) -> Route:
    """route(), with its refusals counted as routing decisions."""
    try:
        return route(plan, checked, rt.topology, **binding)
    except SidecarError as exc:
        _count_refusal(rt, plan.database, exc)
        raise


def _count_refusal(rt: Runtime, database: str, exc: SidecarError) -> None:
    if exc.code in REFUSALS and (found := rt.topology.lookup(database)) is not None:
        rt.router.count(found[0], "refused")


async def run_target(
    rt: Runtime, route: Route, target: Target, compiled: Compiled, *, count: bool = True
) -> list[Outcome]:
    """Run one target's statement on the node that should serve it."""
    db, shard = route.db, target.shard
    if route.writes:
        node, role = rt.router.writer(db, shard), "primary"
        if count:
            rt.router.count(db, "primary")
    else:
        node, role = await _read_node(rt, route, target, count)
    try:
        return await _execute(rt, route, target, node, role, compiled)
    except SidecarError as exc:
        if route.writes or exc.code not in _RETRYABLE_READ:
            raise
        again, again_role = await _read_node(rt, route, target, False, exclude=node)
        if again is node:
            raise
        return await _execute(rt, route, target, again, again_role, compiled)


def _execute(
    rt: Runtime, route: Route, target: Target, node: Node, role: str, compiled: Compiled
) -> Awaitable[list[Outcome]]:
    plan = target.plan
    if not route.writes and compiled.coalescible:
        pool = route.db.settings.pool
        coalesced = rt.coalescer.read(
            rt.compiler, rt.settings.coalescing, node, role, target.shard.name, compiled, pool
        )
        return observed(rt, route.db, target.shard, node, role, plan, coalesced)
    statement = execute(
        node,
        role,
        target.shard.name,
        [compiled],
        writes=route.writes,
        transaction=False,
        readonly=isinstance(plan, Raw) and not route.writes,
        pool=route.db.settings.pool,
    )
    return observed(rt, route.db, target.shard, node, role, plan, statement)


async def _read_node(
    rt: Runtime, route: Route, target: Target, count: bool, exclude: Node | None = None
) -> tuple[Node, str]:
    choice = await rt.router.choose(
        route.db,
        target.shard,
        replica=route.intent is Intent.READ_REPLICA,
        after=target.after,
        count=count,
        exclude=exclude,
    )
    return choice.node, choice.role


async def observed(
    rt: Runtime,
    db: Database,
    shard: Shard,
    node: Node,
    role: str,
    plan: Plan | None,
    work: Awaitable[T],
) -> T:
    """Await work on a node, counting it and logging it if slow (shape, never values)."""
    op = plan_op(plan)
    began = time.perf_counter()
    outcome = "ok"
    try:
        if not tracing.ENABLED:
            return await work
        with tracing.span("dbsidecar.execute", {
            "db.system.name": "postgresql", "db.namespace": db.name, "dbsidecar.op": op,
            "dbsidecar.shard": shard.name, "dbsidecar.node": node.name, "dbsidecar.role": role,
        }):  # fmt: skip
            return await work
    except SidecarError as exc:
        outcome = exc.code
        raise
    finally:
        elapsed = time.perf_counter() - began
        shard_label = shard.name or ""
        metrics.query_seconds(db.name, shard_label, role, op).observe(elapsed)
        metrics.query_count(db.name, shard_label, role, op, outcome).inc()
        if elapsed * 1000 >= rt.settings.logging.slow_query_ms:
            log.warning(
                "slow query",
                extra={
                    "database": db.name,
                    "shard": shard.name,
                    "node": node.name,
                    "role": role,
                    "op": op,
                    "table": getattr(plan, "table", None),
                    "duration_ms": round(elapsed * 1000, 3),
                    "outcome": outcome,
                },
            )


class Held:
    """A shard primary's connection held across requests, inside BEGIN .. COMMIT: what an
    interactive transaction runs on. Every way out (commit, rollback, a lost connection)
    gives the connection back; :attr:`open` says whether it is still held."""

    def __init__(self, db: Database, shard: Shard, node: Node, conn: asyncpg.Connection) -> None:
        self.db, self.shard, self.node, self._conn = db, shard, node, conn
        self._limit = deadline(db.settings.pool)

    @property
    def open(self) -> bool:
        return self._conn is not None

    @classmethod
    async def begin(cls, rt: Runtime, db: Database, shard: Shard, node: Node) -> Held:
        """BEGIN on a connection to ``node``, the shard's writer (the caller chose it)."""
        rt.router.count(db, "primary")
        conn = await acquire(node, db.settings.pool.acquire_timeout)
        conn.mark_dirty()  # whatever runs inside may leave session state
        held = cls(db, shard, node, conn)
        try:
            await conn.execute("BEGIN", timeout=held._limit)
        except Exception as exc:
            lost = connection_lost(exc, conn)
            await held._give_back(broken=lost)
            raise from_exception(exc, writes=False, conn=conn) from exc
        return held

    async def run(self, rt: Runtime, plan: Plan, compiled: Compiled) -> Outcome:
        """One statement of the transaction. A PostgreSQL error comes back with its
        ``sqlstate`` (the transaction is aborted then); a lost connection answers
        ``transaction_lost``: the server rolled everything back."""
        return await observed(
            rt, self.db, self.shard, self.node, "primary", plan, self._run(compiled)
        )

    async def _run(self, compiled: Compiled) -> Outcome:
        conn = self._conn
        assert conn is not None
        try:
            parts = await run_statement(conn, compiled, self._limit)
        except Exception as exc:
            if connection_lost(exc, conn):
                failed(self.node, conn, exc)
                await self._give_back(broken=True)
                raise SidecarError(
                    ErrorCode.TRANSACTION_LOST,
                    f"the connection to {self.node.name} failed; the transaction was rolled "
                    "back and nothing of it committed",
                ) from exc
            raise from_exception(exc, writes=True) from exc
        return make_outcome(parts, self.node, "primary", self.shard.name)

    async def commit(self) -> str | None:
        """COMMIT, then the WAL position to hand back as a consistency token (None when
        it could not be read: committed all the same)."""
        conn = self._conn
        assert conn is not None
        try:
            status = await conn.execute("COMMIT", timeout=self._limit)
        except Exception as exc:
            # Broken during COMMIT: it may or may not have committed. A PostgreSQL error
            # (a deferred constraint, a serialization failure) means it rolled back.
            await self._give_back(broken=connection_lost(exc, conn))
            raise from_exception(exc, writes=True, conn=conn) from exc
        if status != "COMMIT":
            # PostgreSQL ends an aborted transaction's COMMIT with a rollback.
            await self._give_back()
            raise SidecarError(
                ErrorCode.TRANSACTION_ABORTED,
                f"PostgreSQL answered the commit with {status!r}: nothing of it committed",
            )
        lsn: str | None = None
        try:
            lsn = await conn.fetchval(LSN_SQL, timeout=self._limit)
        except Exception as exc:
            log.warning("committed, but reading the WAL position failed: %s", exc)
        await self._give_back(broken=lsn is None)
        return lsn

    async def rollback(self) -> None:
        """ROLLBACK; a connection that cannot is closed instead (the server rolls back)."""
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.execute("ROLLBACK", timeout=self._limit)
        except Exception:
            await self._give_back(broken=True)
        else:
            await self._give_back()

    def abandon(self) -> None:
        """Close the connection under a statement still running (shutdown after the drain)."""
        if self._conn is not None and not is_closed(self._conn):
            self._conn.terminate()

    async def _give_back(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken and not is_closed(conn):
            conn.terminate()
        if self.node.pool is not None:
            await release(self.node, conn, self.db.settings.pool.acquire_timeout)
