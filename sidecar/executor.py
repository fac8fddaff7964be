"""Running compiled statements on a node's pool and shaping their results.

Every write reads the primary's WAL position after it commits: that is the
consistency token later reads pass back for read-your-writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from wire.errors import ErrorCode
from wire.protocol import Result, ServedBy
from wire.values import wire_rows

from . import metrics, tracing
from .compiler import Compiled, Statement, too_many_rows
from .errors import (
    SidecarError,
    caused_by,
    connection_lost,
    from_exception,
    is_closed,
    is_connection_error,
    refused_by_driver,
)
from .settings import PoolSettings
from .topology import Node

log = logging.getLogger("dbsidecar.executor")

# The insert position, not the write position: with synchronous_commit off the
# commit record may still sit in WAL buffers, past pg_current_wal_lsn().
LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"

# Seconds past statement_timeout before the sidecar gives up on a server itself.
DEADLINE_GRACE = 1.0

# PostgreSQL type name -> wire kind (see wire.values.KIND_TYPES).
_KINDS: dict[str, str] = {
    # A float column has a kind because NaN and ±Infinity do not travel as JSON numbers.
    "float8": "float",
    "float4": "float",
    "timestamptz": "datetime",
    "timestamp": "datetime",
    "date": "date",
    "time": "time",
    "timetz": "time",
    "interval": "interval",
    "numeric": "decimal",
    "uuid": "uuid",
    "bytea": "bytes",
    "json": "json",
    "jsonb": "json",
}


def _kind(typ: Any) -> str | None:
    if typ.kind == "array":
        # asyncpg names array types after their element: uuid[], numeric[].
        inner = _KINDS.get(typ.name.removesuffix("[]"))
        return f"array:{inner}" if inner else None
    return _KINDS.get(typ.name)


def describe(ps: asyncpg.prepared_stmt.PreparedStatement) -> tuple[list[str], list[str | None]]:
    attrs = ps.get_attributes()
    return [a.name for a in attrs], [_kind(a.type) for a in attrs]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def param_types(ps: asyncpg.prepared_stmt.PreparedStatement) -> list[str | None]:
    """Each parameter's qualified SQL type when it is a scalar (one an array can carry
    element by element, for a coalesced statement), else None."""
    return [
        f"{_quoted(t.schema)}.{_quoted(t.name)}" if t.kind == "scalar" else None
        for t in ps.get_parameters()
    ]


@dataclass(slots=True)
class Outcome:
    """What one statement produced on one node."""

    columns: list[str]
    kinds: list[str | None]
    rows: list[tuple[Any, ...]]
    rowcount: int
    node: Node
    role: str
    shard: str | None
    lsn: str | None = None

    def served_by(self) -> ServedBy:
        return ServedBy(node=self.node.name, role=self.role, shard=self.shard)  # type: ignore[arg-type]


def _rowcount(status: str | None) -> int:
    if not status:
        return 0
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def acquire(node: Node, acquire_timeout: float) -> asyncpg.Connection:
    """A pooled connection (give it back with :func:`release`); failures to get one are
    retryable and never ran anything."""
    if node.pool is None:
        raise SidecarError(ErrorCode.NODE_UNAVAILABLE, f"node {node.name} has no pool")
    began = time.perf_counter()
    try:
        # Always bounded, even with free slots: one may have to open its connection first
        # (and the callers queued behind it wait for that). asyncio.timeout, not the pool's
        # timeout argument, which wraps every acquire in a task of its own.
        async with asyncio.timeout(acquire_timeout):
            if tracing.ENABLED:
                attributes = {"dbsidecar.node": node.name, "dbsidecar.shard": node.shard_label}
                with tracing.span("dbsidecar.pool.acquire", attributes):
                    conn = await node.pool.acquire()
            else:
                conn = await node.pool.acquire()
    except TimeoutError:
        metrics.acquire_timeouts(node.db_label, node.shard_label, node.name).inc()
        raise SidecarError(
            ErrorCode.POOL_TIMEOUT,
            f"no free connection to {node.name} within {acquire_timeout:g} s",
        ) from None
    except Exception as exc:
        if is_connection_error(exc):
            node.mark(False, str(exc))
            raise SidecarError(
                ErrorCode.NODE_UNAVAILABLE, f"cannot connect to {node.name}: {exc}"
            ) from None
        raise
    elapsed = time.perf_counter() - began
    metrics.acquire_seconds(node.db_label, node.shard_label, node.name).observe(elapsed)
    node.busy += 1
    return conn


async def release(node: Node, conn: asyncpg.Connection, budget: float) -> None:
    """Hand a connection back; one that broke is closed by asyncpg, never an error here.
    A reset that takes longer than ``budget`` seconds (a frozen server) closes the connection."""
    assert node.pool is not None
    node.busy -= 1
    try:
        await node.pool.release(conn, timeout=budget)
    except Exception as exc:
        if not is_connection_error(exc):
            log.warning("releasing a connection to %s failed: %s", node.name, exc)


def deadline(pool: PoolSettings) -> float | None:
    """The client-side deadline of one statement: PostgreSQL's statement_timeout answers
    first on a healthy server; this one fires only when the server cannot (frozen)."""
    return pool.statement_timeout + DEADLINE_GRACE if pool.statement_timeout else None


async def run_statement(
    conn: asyncpg.Connection, compiled: Compiled, limit: float | None
) -> tuple[list[str], list[str | None], list[tuple[Any, ...]], int]:
    """One statement; ``limit`` is its client-side deadline in seconds (see deadline())."""
    if compiled.outbox is not None:
        await compiled.outbox(conn, limit)  # in the statement's transaction (see outbox.py)
    if compiled.work is not None:
        return await compiled.work(conn, limit)  # an event-store plan: its own statements
    stmt: Statement = compiled.statement
    if not stmt.returns_rows:
        status = await conn.execute(stmt.sql, *compiled.params, timeout=limit)
        return [], [], [], _rowcount(status)
    if not stmt.session_safe:
        return await _run_raw(conn, compiled, limit)
    if stmt.kinds is None or stmt.columns is None:
        # First run of this shape: learn column names and kinds.
        ps = await conn.prepare(stmt.sql, timeout=limit)
        stmt.columns, stmt.kinds = describe(ps)
        stmt.param_types = param_types(ps)
        records = await ps.fetch(*compiled.params, timeout=limit)
        count = _rowcount(ps.get_statusmsg()) or len(records)
    else:
        records = await conn.fetch(stmt.sql, *compiled.params, timeout=limit)
        count = len(records)
        if records and list(records[0].keys()) != stmt.columns:
            # The table changed under a cached shape (a migration added, dropped or
            # renamed a column): learn the description again.
            stmt.columns, stmt.kinds = describe(await conn.prepare(stmt.sql, timeout=limit))
    if stmt.row_cap is not None and len(records) > stmt.row_cap:
        raise too_many_rows(stmt.row_cap)  # the SQL's own LIMIT fetched one row past it
    return stmt.columns, stmt.kinds, [tuple(r) for r in records], count


async def _run_raw(
    conn: asyncpg.Connection, compiled: Compiled, limit: float | None
) -> tuple[list[str], list[str | None], list[tuple[Any, ...]], int]:
    """Raw SQL: rows come through a cursor, one past the cap at most, so memory stays
    bounded whatever the query; a statement that returns no rows runs as it is (it may
    be one that cannot run in a transaction block, such as CREATE INDEX CONCURRENTLY)."""
    stmt = compiled.statement
    ps = await conn.prepare(stmt.sql, timeout=limit)
    columns, kinds = describe(ps)
    if not columns or stmt.row_cap is None:
        records = await ps.fetch(*compiled.params, timeout=limit)
        return columns, kinds, [tuple(r) for r in records], _rowcount(ps.get_statusmsg())
    own = not conn.is_in_transaction()  # a cursor lives in a transaction
    if own:
        await conn.execute("BEGIN", timeout=limit)
    cursor = await ps.cursor(*compiled.params, timeout=limit)
    records = await cursor.fetch(stmt.row_cap + 1, timeout=limit)
    if len(records) > stmt.row_cap:
        raise too_many_rows(stmt.row_cap)  # the caller's handler rolls an own BEGIN back
    if own:
        await conn.execute("COMMIT", timeout=limit)
    return columns, kinds, [tuple(r) for r in records], len(records)


async def rollback(conn: asyncpg.Connection, limit: float | None) -> None:
    """Roll back after a failure; a connection that cannot is closed instead."""
    try:
        await conn.execute("ROLLBACK", timeout=limit)
    except Exception:
        conn.terminate()


def failed(node: Node, conn: asyncpg.Connection, exc: BaseException) -> None:
    """After a statement failed: a broken connection is closed at once. When the server let
    the statement's deadline pass, its probe is asked to check it now, on its own
    connection: a frozen server is marked down by that probe, a caller's own slow
    statement marks nothing. One lost session (a terminated backend) says nothing about
    the others, and a server that is really gone fails the next connect (see acquire)."""
    if connection_lost(exc, conn):
        if not is_closed(conn):
            conn.terminate()
        if caused_by(exc, TimeoutError):
            node.suspect.set()
    elif refused_by_driver(exc) and not is_closed(conn):
        # A value asyncpg refused to encode, after it had sent Parse and Describe but no
        # Sync: the session sits in an implicit transaction holding the table's lock
        # (DDL on that table would wait behind the idle pooled connection). Close it.
        conn.terminate()


async def execute(
    node: Node,
    role: str,
    shard: str | None,
    statements: Sequence[Compiled],
    *,
    writes: bool,
    transaction: bool,
    readonly: bool = False,
    pool: PoolSettings,
) -> list[Outcome]:
    """Run statements on one node, in one transaction when asked (or when several)."""
    conn = await acquire(node, pool.acquire_timeout)
    timeout = deadline(pool)
    try:
        if not all(c.statement.session_safe for c in statements):
            conn.mark_dirty()
        outcomes: list[Outcome] = []
        try:
            if transaction or len(statements) > 1 or readonly or statements[0].transactional:
                # BEGIN and COMMIT by hand: asyncpg's transaction() gives them no deadline.
                await conn.execute("BEGIN READ ONLY" if readonly else "BEGIN", timeout=timeout)
                for compiled in statements:
                    parts = await run_statement(conn, compiled, timeout)
                    outcomes.append(make_outcome(parts, node, role, shard))
                status = await conn.execute("COMMIT", timeout=timeout)
                if status != "COMMIT":
                    raise SidecarError(
                        ErrorCode.TRANSACTION_ABORTED,
                        f"PostgreSQL answered the commit with {status}",
                    )
            else:
                parts = await run_statement(conn, statements[0], timeout)
                outcomes.append(make_outcome(parts, node, role, shard))
            if writes:
                lsn = await conn.fetchval(LSN_SQL, timeout=timeout)
                for o in outcomes:
                    o.lsn = lsn
        except Exception as exc:
            error = from_exception(exc, writes=writes, conn=conn)
            failed(node, conn, exc)  # after: it may close a connection the caller broke
            if not is_closed(conn) and conn.is_in_transaction():
                await rollback(conn, timeout)
            if len(statements) > 1 and len(outcomes) < len(statements):
                # In a batch, name the plan that failed.
                error.index = len(outcomes)
            raise error from exc
        return outcomes
    finally:
        await release(node, conn, pool.acquire_timeout)


def make_outcome(
    parts: tuple[list[str], list[str | None], list[tuple[Any, ...]], int],
    node: Node,
    role: str,
    shard: str | None,
) -> Outcome:
    columns, kinds, rows, count = parts
    return Outcome(columns, kinds, rows, count, node, role, shard)


def to_result(outcome: Outcome, lsn: str | None = None) -> Result:
    return Result(
        columns=outcome.columns,
        types=outcome.kinds,
        rows=wire_rows(outcome.kinds, outcome.rows),  # type: ignore[arg-type]
        rowcount=outcome.rowcount,
        lsn=lsn,
        served_by=[outcome.served_by()],
    )
