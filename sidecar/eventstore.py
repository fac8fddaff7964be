"""The event store on one shard: appends with expected versions, stream and category reads.

Each plan becomes a *work* object that runs on a connection inside a transaction the
executor opened (a plan of its own, a batch or an interactive transaction): an append
is its locks, one look at the stream and one insert, committed together.

Versions: ``(stream, version)`` is unique, and an append checks the stream's version
under a lock, so of two appends expecting the same version one wins and the other gets
``wrong_expected_version`` with the actual version. Event ids are unique too: an append
whose ids are all there already, in the same stream and order, answers what the first
one did and adds nothing (a retried append is idempotent).

Gap safety (the bug of stores that order readers by a sequence: a position is taken at
insert and becomes visible at commit, so a reader that saw 11 can miss 10 committed a
moment later). The remedy is message-db's: every appender takes a transaction-level
advisory lock on its category before it takes a position and keeps it until it commits,
so within a category positions are taken and committed in one order and every snapshot
sees a prefix of them; a category reader needs no lock. A reader of every stream
(category None) also needs positions of different categories to commit in order, so
appenders also hold a *shared* barrier lock, and that reader takes the barrier
exclusively for its read (in a savepoint it rolls back to after): then no appender is
between taking a position and committing, and appenders coming after it take larger
positions. It tries first (``pg_try_advisory_xact_lock``, no waiting in front of
appenders); appenders whose transactions overlap can keep the barrier busy for as long
as they keep coming, so after ``BARRIER_TRY`` seconds it queues for it, at most
``BARRIER_QUEUE`` seconds (PostgreSQL lets no shared lock pass a queued exclusive one,
so new appenders wait behind it while those in flight commit). When even that fails the
read answers no events (never events past a gap), and the caller asks again. Such a read
runs on the primary, since a replica's locks are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import msgspec

from wire.errors import ErrorCode
from wire.protocol import Append, ReadCategory, ReadStream

from . import storetables
from .errors import SidecarError, bad_plan
from .storetables import BARRIER_LOCK, EVENTS, EVENTS_LOCK

Parts = tuple[list[str], list[str | None], list[tuple[Any, ...]], int]

# How long a reader of every stream tries for the barrier, then queues for it, before
# answering no events. Trying alone starved it: under 32 concurrent appenders no read
# of every stream answered any event for as long as they kept on.
BARRIER_TRY = 0.1
BARRIER_QUEUE = 0.2
_BARRIER_RETRY = 0.002
MAX_NAME = 512

READ_COLUMNS = ["position", "stream", "version", "event_id", "type", "data", "metadata",
                "recorded_at", "shard"]  # fmt: skip
READ_KINDS: list[str | None] = [None, None, None, "uuid", None, "json", "json", "datetime", None]
APPEND_COLUMNS = ["event_id", "version", "position", "recorded_at"]
APPEND_KINDS: list[str | None] = ["uuid", None, None, "datetime"]

_SELECT = (
    f"SELECT position, stream, version, event_id, type, data, metadata, recorded_at FROM {EVENTS}"
)
_STREAM_SQL = f"{_SELECT} WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
_EXISTS_SQL = f"SELECT to_regclass('{EVENTS}') IS NOT NULL"
_BARRIER_SQL = (
    f"SELECT to_regclass('{EVENTS}') IS NOT NULL, pg_try_advisory_xact_lock({BARRIER_LOCK}, 0)"
)
_LET_GO = "ROLLBACK TO SAVEPOINT dbsidecar_read; RELEASE SAVEPOINT dbsidecar_read"
_SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"
# The barrier (shared) and the category's lock, left to right. A reader of every stream
# waits for the barrier only under a lock_timeout (a reader in a transaction that also
# appended could close a cycle with an appender: its wait ends, nothing hangs).
_APPEND_LOCKS = (
    f"SELECT pg_advisory_xact_lock_shared({BARRIER_LOCK}, 0), "
    f"pg_advisory_xact_lock({EVENTS_LOCK}, hashtext($1)), to_regclass('{EVENTS}') IS NOT NULL"
)
# The stream's last version and every event that already has one of the new ids.
_LOOK_SQL = (
    f"SELECT s.v, e.event_id, e.stream, e.version, e.position, e.recorded_at FROM "
    f"(SELECT coalesce(max(version), -1) AS v FROM {EVENTS} WHERE stream = $1) AS s "
    f"LEFT JOIN {EVENTS} AS e ON e.event_id = ANY($2::uuid[]) ORDER BY e.version"
)
_INSERT_SQL = (
    f"INSERT INTO {EVENTS} (stream, category, version, event_id, type, data, metadata) "
    "SELECT $1, $2, $3 + e.n, e.id, e.type, e.data::jsonb, e.metadata::jsonb "
    # data and metadata travel as JSON text (see _json): asyncpg would read a JSON
    # array inside a jsonb[] parameter as more array dimensions.
    "FROM unnest($4::uuid[], $5::text[], $6::text[], $7::text[]) "
    "WITH ORDINALITY AS e(id, type, data, metadata, n) ORDER BY e.n "
    "RETURNING event_id, version, position, recorded_at"
)


def category_of(stream: str) -> str:
    """message-db's convention: the category is the stream name before its first '-'."""
    return stream.split("-", 1)[0]


def _name(what: str, text: str) -> str:
    if not text or len(text) > MAX_NAME or "\x00" in text:
        raise bad_plan(f"{what} must be 1 to {MAX_NAME} characters without NUL")
    return text


def _json(value: Any) -> str | None:
    """A plain JSON value as its text, for a text[] parameter cast to jsonb in SQL. Bound
    in a jsonb[] array, a list value became array dimensions: ["x"] was stored as "x",
    [[1]] as 1, and [1, 2] or [] were refused (tests/adversarial/test_eventstore.py)."""
    return None if value is None else msgspec.json.encode(value).decode()


def _window(limit: int, cap: int | None) -> int:
    if limit < 1:
        raise bad_plan("limit must be at least 1")
    if cap is not None and limit > cap:
        raise bad_plan(f"limit is at most {cap} (limits.max_result_rows)")
    return limit


@dataclass(frozen=True, slots=True)
class AppendWork:
    stream: str
    expected: int | str
    ids: list[uuid.UUID]
    types: list[str]
    data: list[str | None]  # JSON text
    metadata: list[str | None]
    shard: str = ""

    def on_shard(self, key: str) -> AppendWork:
        return replace(self, shard=key)

    async def __call__(self, conn: asyncpg.Connection, limit: float | None) -> Parts:
        category = category_of(self.stream)
        locked = await conn.fetchrow(_APPEND_LOCKS, category, timeout=limit)
        if not locked[2]:
            await storetables.create(conn, EVENTS, limit)
        look = await conn.fetch(_LOOK_SQL, self.stream, self.ids, timeout=limit)
        current: int = look[0][0]
        found = [r for r in look if r["event_id"] is not None]
        if found:
            return _replayed(self, found)
        self._check(current)
        rows = await conn.fetch(
            _INSERT_SQL,
            self.stream,
            category,
            current,
            self.ids,
            self.types,
            self.data,
            self.metadata,
            timeout=limit,
        )
        rows = sorted(rows, key=lambda r: r["version"])
        return APPEND_COLUMNS, APPEND_KINDS, [tuple(r) for r in rows], len(rows)

    def _check(self, current: int) -> None:
        expected = self.expected
        if expected == "any":
            return
        if expected == "no_stream":
            ok = current == -1
        elif expected == "stream_exists":
            ok = current >= 0
        else:
            ok = current == expected
        if not ok:
            raise SidecarError(
                ErrorCode.WRONG_EXPECTED_VERSION,
                f"stream {self.stream!r} is at version {current} (-1: no events), "
                f"the append expected {expected!r}",
                actual_version=current,
            )


def _replayed(work: AppendWork, found: Sequence[asyncpg.Record]) -> Parts:
    """The answer to an append whose ids are stored already: the first append's answer
    when all of them are, in this stream, in this order; else a conflict."""
    same = (
        len(found) == len(work.ids)
        and all(r["stream"] == work.stream for r in found)
        and [r["event_id"] for r in found] == work.ids
        and [r["version"] for r in found]
        == list(range(found[0]["version"], found[0]["version"] + len(found)))
    )
    if not same:
        raise SidecarError(
            ErrorCode.UNIQUE_VIOLATION,
            f"{len(found)} of these event ids were appended before, not as this append "
            f"(stream {found[0]['stream']!r}, version {found[0]['version']}); an append "
            "is idempotent only when all its ids went to the same stream, in the same order",
        )
    rows = [(r["event_id"], r["version"], r["position"], r["recorded_at"]) for r in found]
    return APPEND_COLUMNS, APPEND_KINDS, rows, len(rows)


@dataclass(frozen=True, slots=True)
class ReadStreamWork:
    stream: str
    from_version: int
    limit: int
    shard: str = ""

    def on_shard(self, key: str) -> ReadStreamWork:
        return replace(self, shard=key)

    async def __call__(self, conn: asyncpg.Connection, limit: float | None) -> Parts:
        if not await conn.fetchval(_EXISTS_SQL, timeout=limit):
            return READ_COLUMNS, READ_KINDS, [], 0  # nothing was ever appended here
        records = await conn.fetch(
            _STREAM_SQL, self.stream, self.from_version, self.limit, timeout=limit
        )
        rows = [(*r, self.shard) for r in records]
        return READ_COLUMNS, READ_KINDS, rows, len(rows)


@dataclass(frozen=True, slots=True)
class ReadCategoryWork:
    category: str | None
    after: dict[str, int]
    limit: int
    member: int
    group_size: int
    shard: str = ""

    def on_shard(self, key: str) -> ReadCategoryWork:
        return replace(self, shard=key)

    def _sql(self) -> tuple[str, list[Any]]:
        params: list[Any] = [self.after.get(self.shard, 0)]
        sql = f"{_SELECT} WHERE position > $1"
        if self.category is not None:
            params.append(self.category)
            sql += f" AND category = ${len(params)}"
        if self.group_size > 1:
            params += [self.group_size, self.member]
            n = len(params)
            # The stream's 64-bit hash made non-negative, modulo the group's size.
            sql += f" AND (hashtextextended(stream, 0) & 9223372036854775807) % ${n - 1} = ${n}"
        params.append(self.limit)
        return f"{sql} ORDER BY position LIMIT ${len(params)}", params

    async def __call__(self, conn: asyncpg.Connection, limit: float | None) -> Parts:
        if self.category is not None:
            if not await conn.fetchval(_EXISTS_SQL, timeout=limit):
                return READ_COLUMNS, READ_KINDS, [], 0
            return await self._read(conn, limit)
        # The barrier is held for this read alone: taken in a savepoint and let go by
        # rolling back to it (a read loses nothing). Kept to the transaction's end, one
        # interactive transaction that read every stream and stayed open stopped every
        # append on the primary for as long as it stayed open.
        await conn.execute("SAVEPOINT dbsidecar_read", timeout=limit)
        try:
            if await _barrier(conn, limit):
                parts = await self._read(conn, limit)
            else:
                parts = (READ_COLUMNS, READ_KINDS, [], 0)
        except asyncpg.PostgresError:
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute(_LET_GO, timeout=limit)
            raise
        await conn.execute(_LET_GO, timeout=limit)
        return parts

    async def _read(self, conn: asyncpg.Connection, limit: float | None) -> Parts:
        sql, params = self._sql()
        records = await conn.fetch(sql, *params, timeout=limit)
        rows = [(*r, self.shard) for r in records]
        return READ_COLUMNS, READ_KINDS, rows, len(rows)


async def _barrier(conn: asyncpg.Connection, limit: float | None) -> bool:
    """Hold the barrier (no appender between its position and its commit) until the
    caller lets go of its savepoint; False when there is no table yet or appenders kept
    it busy."""
    give_up = time.monotonic() + BARRIER_TRY
    while True:
        exists, held = await conn.fetchrow(_BARRIER_SQL, timeout=limit)
        if not exists:
            return False
        if held:
            return True
        if time.monotonic() > give_up:
            return await _queue_for_barrier(conn, limit)
        await asyncio.sleep(_BARRIER_RETRY)


async def _queue_for_barrier(conn: asyncpg.Connection, limit: float | None) -> bool:
    """Wait for the barrier in PostgreSQL's lock queue, at most BARRIER_QUEUE seconds, in
    a savepoint: a lock timeout rolls back to it, the caller's transaction goes on (and
    so does its own lock_timeout, set back after the wait)."""
    await conn.execute("SAVEPOINT dbsidecar_barrier", timeout=limit)
    try:
        old = await conn.fetchval("SELECT current_setting('lock_timeout')", timeout=limit)
        wait = f"{int(BARRIER_QUEUE * 1000)}ms"
        await conn.execute(_SET_LOCK_TIMEOUT, wait, timeout=limit)
        await conn.execute(f"SELECT pg_advisory_xact_lock({BARRIER_LOCK}, 0)", timeout=limit)
    except asyncpg.LockNotAvailableError:
        await conn.execute("ROLLBACK TO SAVEPOINT dbsidecar_barrier", timeout=limit)
        await conn.execute("RELEASE SAVEPOINT dbsidecar_barrier", timeout=limit)
        return False
    await conn.execute("RELEASE SAVEPOINT dbsidecar_barrier", timeout=limit)
    await conn.execute(_SET_LOCK_TIMEOUT, old, timeout=limit)
    return True


Work = AppendWork | ReadStreamWork | ReadCategoryWork


def prepare(plan: Append | ReadStream | ReadCategory, max_rows: int | None) -> Work:
    """An event-store plan checked and decoded, ready to run on a shard's connection."""
    if isinstance(plan, Append):
        _name("a stream name", plan.stream)
        if not plan.events:
            raise bad_plan("an append needs at least one event")
        if max_rows is not None and len(plan.events) > max_rows:
            raise bad_plan(f"an append holds at most {max_rows} events")
        expected = plan.expected_version
        if isinstance(expected, int) and expected < -1:
            raise bad_plan("expected_version is -1 (no stream) or a version, from 0")
        ids: list[uuid.UUID] = []
        for event in plan.events:
            _name("an event type", event.type)
            try:
                ids.append(uuid.UUID(event.id))
            except ValueError:
                raise bad_plan(f"event id {event.id[:60]!r} is not a UUID") from None
        if len(set(ids)) != len(ids):
            raise bad_plan("an append names each event id once")
        return AppendWork(
            plan.stream,
            expected,
            ids,
            [e.type for e in plan.events],
            [_json(e.data) for e in plan.events],
            [_json(e.metadata) for e in plan.events],
        )
    if isinstance(plan, ReadStream):
        _name("a stream name", plan.stream)
        if plan.from_version < 0:
            raise bad_plan("from_version must not be negative")
        return ReadStreamWork(plan.stream, plan.from_version, _window(plan.limit, max_rows))
    if plan.category is not None:
        _name("a category", plan.category)
    if plan.group_size < 1 or not 0 <= plan.member < plan.group_size:
        raise bad_plan("a consumer group member is 0 <= member < group_size")
    if any(p < 0 for p in plan.after.values()):
        raise bad_plan("checkpoint positions must not be negative")
    return ReadCategoryWork(
        plan.category, dict(plan.after), _window(plan.limit, max_rows), plan.member, plan.group_size
    )
