"""The bookkeeping on each shard: the ``dbsidecar_schema_migrations`` table and the lock.

One row per version that was applied or attempted: ``state`` is ``applied`` or
``dirty`` (the last attempt failed, or a no-transaction migration is running or was
interrupted), with the error, when and how long. The migration lock is a
session-level advisory lock on a dedicated connection: it is not tied to a
transaction, so ``CREATE INDEX CONCURRENTLY`` can run while it is held, and it dies
with its session when a migrator is killed. Waiters poll ``pg_try_advisory_lock``
instead of blocking in ``pg_advisory_lock``: a blocked waiter keeps a snapshot open,
and ``CREATE INDEX CONCURRENTLY`` in the lock holder would wait for that snapshot
while the waiter waits for the holder (a deadlock PostgreSQL breaks by failing one).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import asyncpg

TABLE = "dbsidecar_schema_migrations"
# pg_advisory_lock's bigint key for "dbsidecar migrations"; advisory locks are per
# database, so each shard has its own.
LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"dbsidecar schema migrations").digest()[:8], "big", signed=True
)
_FIRST_POLL = 0.05
_MAX_POLL = 1.0

State = Literal["applied", "dirty"]


@dataclass(frozen=True, slots=True)
class Row:
    version: int
    name: str
    checksum: str
    state: State
    transactional: bool
    error: str | None
    applied_at: dt.datetime
    duration: dt.timedelta | None


class LockTimeout(Exception):
    """Another migrator held the lock for longer than the caller would wait."""


class Table:
    """The table in the schema the connection starts in, named with that schema, so a
    migration that changes ``search_path`` does not move the bookkeeping."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        quoted = '"' + schema.replace('"', '""') + '"'
        self.name = f"{quoted}.{TABLE}"
        self.schema = schema

    @classmethod
    async def on(cls, conn: asyncpg.Connection) -> Table:
        schema = await conn.fetchval("SELECT current_schema()")
        return cls(conn, schema or "public")

    async def exists(self) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
                self.schema,
                TABLE,
            )
        )

    async def create(self) -> None:
        await self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {self.name} (
                version bigint PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                state text NOT NULL CHECK (state IN ('applied', 'dirty')),
                transactional boolean NOT NULL,
                error text,
                applied_at timestamptz NOT NULL,
                duration interval,
                -- The checksum it was applied with, when its file was later fixed for a
                -- shard where it failed (the fix's checksum is then the one above).
                superseded_checksum text
            )"""
        )

    async def rows(self) -> dict[int, Row]:
        if not await self.exists():
            return {}
        records = await self.conn.fetch(
            "SELECT version, name, checksum, state, transactional, error, applied_at, duration "
            f"FROM {self.name} ORDER BY version"
        )
        return {r["version"]: Row(**dict(r)) for r in records}

    async def record(
        self,
        version: int,
        name: str,
        checksum: str,
        state: State,
        transactional: bool,
        error: str | None = None,
        duration: float | None = None,
    ) -> None:
        """Insert or replace the row of ``version`` (a retry replaces its dirty row)."""
        await self.conn.execute(
            f"""INSERT INTO {self.name}
                (version, name, checksum, state, transactional, error, applied_at, duration)
            VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp(), $7)
            ON CONFLICT (version) DO UPDATE SET
                name = EXCLUDED.name, checksum = EXCLUDED.checksum, state = EXCLUDED.state,
                transactional = EXCLUDED.transactional, error = EXCLUDED.error,
                applied_at = EXCLUDED.applied_at, duration = EXCLUDED.duration""",
            version,
            name,
            checksum,
            state,
            transactional,
            error,
            None if duration is None else dt.timedelta(seconds=duration),
        )

    async def realign(self, version: int, checksum: str) -> None:
        """Record a fixed file's checksum for a version this shard applied before."""
        await self.conn.execute(
            f"UPDATE {self.name} SET superseded_checksum = checksum, checksum = $2 "
            "WHERE version = $1",
            version,
            checksum,
        )

    async def delete(self, version: int) -> None:
        await self.conn.execute(f"DELETE FROM {self.name} WHERE version = $1", version)


async def lock_holder(conn: asyncpg.Connection) -> int | None:
    """The pid of the session holding the migration lock in this database, if any."""
    return await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid = $1 AND objid = $2 AND objsubid = 1 LIMIT 1",
        # A bigint key is stored as its high and low 32 bits (classid, objid).
        (LOCK_KEY >> 32) & 0xFFFFFFFF,
        LOCK_KEY & 0xFFFFFFFF,
    )


async def holds_lock(conn: asyncpg.Connection) -> bool:
    """Whether this session still holds the migration lock (a file may have released it:
    ``pg_advisory_unlock_all()``, ``DISCARD ALL``)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND classid = $1 AND objid = $2 AND objsubid = 1)",
            (LOCK_KEY >> 32) & 0xFFFFFFFF,
            LOCK_KEY & 0xFFFFFFFF,
        )
    )


async def lock(
    conn: asyncpg.Connection, wait_at_most: float, waiting: Callable[[int | None], None]
) -> None:
    """Take the migration lock, polling; ``waiting`` hears once who holds it."""
    deadline = time.monotonic() + wait_at_most
    interval = _FIRST_POLL
    told = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if not told:
            waiting(await lock_holder(conn))
            told = True
        if time.monotonic() > deadline:
            raise LockTimeout(f"another migrator held the migration lock over {wait_at_most:g} s")
        await asyncio.sleep(interval)
        interval = min(_MAX_POLL, interval * 1.5)


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
