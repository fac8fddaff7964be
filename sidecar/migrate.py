"""Applying migrations to one database: every shard's primary, in shard order.

A run first connects to every shard and compares each shard's bookkeeping with the
files (nothing is written if any shard is unreachable, is a replica, or refuses: an
edited applied file, a half-applied no-transaction migration, ...). Then, shard by
shard, it takes the shard's migration lock (see :mod:`sidecar.migration_table`),
reads the bookkeeping again (another migrator may have been first) and applies what
is pending in version order:

- a transactional migration runs with its ``applied`` row in one transaction; if it
  fails, nothing of it stays, a ``dirty`` row records the error, and the next run
  retries it (fix the file or the database first if the error is in it);
- a no-transaction migration is recorded ``dirty`` before it runs, then runs its
  statements one by one and becomes ``applied``; if it fails or the migrator dies, it
  may be half applied, so the same file is refused until it changes or someone
  resolves it (``dbsidecar migrate resolve``).

The first failure stops the run: later shards are left untouched. Each shard records
its own version, so a re-run continues where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from wire.migrations import DirtyMigration, MigrationReport, ShardReport

from .migration_files import Migration
from .migration_table import LockTimeout, Row, Table, holds_lock, lock, lock_holder, unlock

Progress = Callable[[str], None]
# Errors a message may quote; a secret never reaches them (asyncpg names no password).
_RUN_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, LockTimeout)


@dataclass(frozen=True, slots=True)
class Target:
    """One shard: its name, its primary's label and how to open a connection to it."""

    shard: str
    node: str
    connect: Callable[[], Awaitable[asyncpg.Connection]]


class Refused(Exception):
    """The shard's bookkeeping and the files disagree; the message says what to do."""


def _quiet(line: str) -> None:
    pass


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    detail = getattr(exc, "detail", None)
    return f"{text} ({detail})" if detail else text


# Version -> the checksums it failed with on some shard of the database (its dirty rows).
Failures = dict[int, set[str]]


def failures(shard_rows: Sequence[dict[int, Row]]) -> Failures:
    found: Failures = {}
    for rows in shard_rows:
        for version, row in rows.items():
            if row.state == "dirty":
                found.setdefault(version, set()).add(row.checksum)
    return found


@dataclass(frozen=True, slots=True)
class ShardPlan:
    # To apply, in version order (dirty ones are retried).
    todo: list[Migration]
    # Applied here with the content that then failed on another shard; its file was
    # changed to fix that shard: the fixed file's checksum is recorded here, not run.
    realign: list[Migration]


def plan(
    rows: dict[int, Row],
    files: Sequence[Migration],
    where: str,
    database: str,
    failed: Failures,
) -> ShardPlan:
    """What to do on a shard; Refused when the shard and the files disagree."""
    by_version = {m.version: m for m in files}
    latest = files[-1].version if files else 0
    resolve = f"dbsidecar migrate resolve --database {database} --shard {where}"
    realign = []
    for version, row in rows.items():
        m = by_version.get(version)
        if m is None:
            if row.state == "dirty":
                raise Refused(
                    f"version {version} ({row.name}) is dirty on {where} and has no file: "
                    f"restore its file, or decide with `{resolve} --version {version}`"
                )
            if version < latest:
                raise Refused(
                    f"version {version} ({row.name}) is applied on {where} but has no file: "
                    "files of applied migrations must stay"
                )
            # Above the files' latest: a newer release applied it (a rolling deployment).
            continue
        if row.state == "applied" and row.checksum != m.checksum:
            fixing = failed.get(version, set())
            if row.checksum in fixing and m.checksum not in fixing:
                realign.append(m)
                continue
            raise Refused(
                f"{m.label} was applied on {where} with checksum {row.checksum[:12]}, "
                f"the file now has {m.checksum[:12]}: an applied migration must not change "
                "(unless it failed on another shard and this is the fix); restore the file "
                "and put the change in a new migration"
            )
        if row.state == "dirty" and not row.transactional and row.checksum == m.checksum:
            raise Refused(
                f"{m.label} failed on {where} outside a transaction and may be half applied "
                f"({row.error}): repair the database by hand, then `{resolve} --version "
                f"{version} --retry` (run it again) or `--applied` (it is done); or change "
                "the file (e.g. make it idempotent) and it is retried"
            )
    applied = [v for v, r in rows.items() if r.state == "applied"]
    todo = [m for m in files if rows.get(m.version) is None or rows[m.version].state == "dirty"]
    newest = max(applied, default=0)
    late = [m for m in todo if m.version < newest]
    if late:
        raise Refused(
            f"{late[0].label} is new on {where} but version {newest} is already applied "
            f"there: renumber it above {newest}"
        )
    return ShardPlan(todo, realign)


def _version(rows: dict[int, Row]) -> int | None:
    return max((v for v, r in rows.items() if r.state == "applied"), default=None)


def _dirty(rows: dict[int, Row]) -> list[DirtyMigration]:
    return [
        DirtyMigration(v, r.name, r.error or "", r.transactional)
        for v, r in rows.items()
        if r.state == "dirty"
    ]


async def _open(target: Target) -> asyncpg.Connection:
    conn = await target.connect()
    try:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise Refused(
                f"{target.node} ({target.shard}) is in recovery (a replica): migrations run "
                "on primaries only; has a failover happened?"
            )
    except BaseException:
        await conn.close()
        raise
    return conn


class _Run:
    def __init__(
        self,
        database: str,
        targets: Sequence[Target],
        files: Sequence[Migration],
        lock_timeout: float,
        progress: Progress,
    ) -> None:
        self.database = database
        self.targets = targets
        self.files = files
        self.lock_timeout = lock_timeout
        self.say = progress
        self.reports = {t.shard: ShardReport(t.shard, t.node, "skipped", None) for t in targets}
        self.failed: Failures = {}

    def report(self) -> MigrationReport:
        latest = self.files[-1].version if self.files else None
        shards = [self.reports[t.shard] for t in self.targets]
        # Applied or current means every file is applied there (a shard may be ahead: a
        # newer release's versions, during a rolling deployment).
        ok = all(s.outcome in ("applied", "current") for s in shards)
        return MigrationReport(self.database, ok, latest, shards)

    def _fail(self, shard: str, outcome: Literal["failed", "refused"], message: str) -> None:
        self.reports[shard].outcome = outcome
        self.reports[shard].message = message
        self.say(f"{self.database}/{shard}: {outcome.upper()}: {message}")
        for report in self.reports.values():
            if report.outcome == "skipped" and report.message is None:
                report.message = f"not touched: {shard} {outcome} first"

    async def preflight(self) -> dict[str, asyncpg.Connection] | None:
        """Connections to every shard, each checked against the files; None (and the
        reports say why) if any shard cannot be migrated."""
        opened = await asyncio.gather(*(_open(t) for t in self.targets), return_exceptions=True)
        conns = {
            t.shard: c
            for t, c in zip(self.targets, opened, strict=True)
            if not isinstance(c, BaseException)
        }
        try:
            good = await self._compare(opened, conns)
        except BaseException:
            await _close(conns)
            raise
        if not good:
            await _close(conns)
            return None
        return conns

    async def _compare(
        self, opened: list[asyncpg.Connection | BaseException], conns: dict[str, asyncpg.Connection]
    ) -> bool:
        good = True
        rows_of: dict[str, dict[int, Row]] = {}
        busy: set[str] = set()
        for target, conn in zip(self.targets, opened, strict=True):
            if isinstance(conn, BaseException):
                if not isinstance(conn, (Refused, *_RUN_ERRORS)):
                    raise conn
                why = str(conn) if isinstance(conn, Refused) else _error_text(conn)
                self._fail(target.shard, "refused", f"cannot migrate {target.node}: {why}")
                good = False
                continue
            rows_of[target.shard] = await (await Table.on(conn)).rows()
            if await lock_holder(conn) is not None:
                busy.add(target.shard)
        self.failed = failures(list(rows_of.values()))
        for shard, rows in rows_of.items():
            report = self.reports[shard]
            report.version, report.dirty = _version(rows), _dirty(rows)
            try:
                todo = plan(rows, self.files, shard, self.database, self.failed).todo
                report.pending = [m.version for m in todo]
            except Refused as exc:
                # Another migrator is at work there (its running no-transaction migration
                # looks dirty): the shard is judged under its lock, once it is ours.
                if shard not in busy:
                    self._fail(shard, "refused", str(exc))
                    good = False
        return good

    async def shard(self, target: Target, conn: asyncpg.Connection) -> bool:
        """Apply what is pending on one shard under its lock; False on a failure."""
        name = f"{self.database}/{target.shard}"
        report = self.reports[target.shard]

        def waiting(pid: int | None) -> None:
            holder = f" (held by pid {pid})" if pid else ""
            self.say(f"{name}: waiting for the migration lock{holder}")

        await lock(conn, self.lock_timeout, waiting)
        try:
            table = await Table.on(conn)
            await table.create()
            rows = await table.rows()
            try:
                # Failures seen on every shard before the run, and this shard's now.
                failed = failures([rows])
                for version, checksums in self.failed.items():
                    failed.setdefault(version, set()).update(checksums)
                todo = plan(rows, self.files, target.shard, self.database, failed)
            except Refused as exc:
                self._fail(target.shard, "refused", str(exc))
                return False
            report.outcome = "current"
            for m in todo.realign:
                old = rows[m.version].checksum
                await table.realign(m.version, m.checksum)
                report.realigned.append(m.version)
                self.say(
                    f"{name}: {m.label} was applied here as {old[:12]} before it failed "
                    f"elsewhere; its fixed file ({m.checksum[:12]}) is recorded, not run"
                )
            for m in todo.todo:
                self.say(f"{name}: applying {m.label}")
                began = time.monotonic()
                error = await (_transactional if m.transactional else _outside)(table, m)
                if error is not None:
                    report.dirty = _dirty(await table.rows())
                    self._fail(target.shard, "failed", _failure(m, target.shard, error))
                    return False
                report.applied.append(m.version)
                report.outcome = "applied"
                self.say(f"{name}: applied {m.label} in {time.monotonic() - began:.3f} s")
                if not await holds_lock(conn):
                    # The file released the session's advisory locks: another migrator
                    # may hold the lock now, so nothing more runs here without it.
                    self._fail(
                        target.shard, "failed",
                        f"{m.label} released the migration lock (pg_advisory_unlock_all() "
                        "or DISCARD ALL in it); it is applied, and the run stopped so that "
                        "no file runs without the lock: take that out of later files and "
                        "run migrate again",
                    )  # fmt: skip
                    return False
            rows = await table.rows()
            report.version, report.dirty, report.pending = _version(rows), _dirty(rows), []
            self.say(f"{name}: at version {report.version}")
            return True
        finally:
            with contextlib.suppress(*_RUN_ERRORS):
                await unlock(conn)


def _failure(m: Migration, shard: str, error: str) -> str:
    if m.transactional:
        return (
            f"{m.label} failed on {shard}: {error}. It ran in a transaction, so nothing of "
            "it stayed; fix the file (or the database) and run migrate again: it is retried"
        )
    return (
        f"{m.label} failed on {shard} outside a transaction: {error}. Statements before "
        "the failing one stayed applied; fix the file (make it idempotent) and run migrate "
        "again, or repair the database and use `dbsidecar migrate resolve`"
    )


async def _transactional(table: Table, m: Migration) -> str | None:
    """Run ``m`` and its applied row in one transaction; the error text on failure."""
    began = time.monotonic()
    try:
        async with table.conn.transaction():
            await table.conn.execute(m.sql)
            # A file may SET ROLE (to own what it creates): the bookkeeping row is the
            # migrator's own, written with its own rights.
            await table.conn.execute("RESET ROLE")
            await table.record(
                m.version, m.name, m.checksum, "applied", True,
                duration=time.monotonic() - began,
            )  # fmt: skip
    except asyncpg.PostgresError as exc:
        error = _error_text(exc)
        await table.record(m.version, m.name, m.checksum, "dirty", True, error)
        return error
    finally:
        await _reset(table.conn)
    return None


async def _outside(table: Table, m: Migration) -> str | None:
    """Run ``m``'s statements one by one outside a transaction, dirty until done."""
    began = time.monotonic()
    await table.record(
        m.version, m.name, m.checksum, "dirty", False,
        "interrupted: the migrator stopped while running it",
    )  # fmt: skip
    error = None
    try:
        for i, statement in enumerate(m.statements, 1):
            try:
                await table.conn.execute(statement)
            except asyncpg.PostgresError as exc:
                error = f"statement {i} of {len(m.statements)}: {_error_text(exc)}"
                break
    finally:
        # A file's BEGIN without its COMMIT leaves a transaction open on this connection:
        # the bookkeeping row would be written inside it and the report would say applied,
        # then closing the connection rolls all of it back. Roll it back now, and say so.
        left_open = table.conn.is_in_transaction()
        if left_open:
            await table.conn.execute("ROLLBACK")
        await _reset(table.conn)
    if left_open:
        rolled_back = (
            "the file left a transaction open (BEGIN without COMMIT); its statements "
            "since BEGIN were rolled back"
        )
        error = rolled_back if error is None else f"{error}; {rolled_back}"
    if error is not None:
        await table.record(m.version, m.name, m.checksum, "dirty", False, error)
        return error
    duration = time.monotonic() - began
    await table.record(m.version, m.name, m.checksum, "applied", False, duration=duration)
    return None


# What a file may leave on the migrator's session for the files after it. RESET ALL
# leaves the role alone (SET ROLE), and a temporary table outlives its transaction and
# is searched before every schema: a later file's INSERT would land in it and vanish with
# the session. DISCARD ALL is not usable here: it also releases the migration lock.
_RESET = "RESET ROLE; RESET ALL; DISCARD TEMP; UNLISTEN *"


async def _reset(conn: asyncpg.Connection) -> None:
    await conn.execute(_RESET)


async def _close(conns: dict[str, asyncpg.Connection]) -> None:
    await asyncio.gather(*(c.close() for c in conns.values()), return_exceptions=True)


async def migrate(
    database: str,
    targets: Sequence[Target],
    files: Sequence[Migration],
    *,
    lock_timeout: float,
    progress: Progress = _quiet,
) -> MigrationReport:
    """Apply ``files`` to every shard in order; the report says what happened where."""
    run = _Run(database, targets, files, lock_timeout, progress)
    conns = await run.preflight()
    if conns is None:
        return run.report()
    try:
        for target in targets:
            try:
                if not await run.shard(target, conns[target.shard]):
                    break
            except _RUN_ERRORS as exc:
                run._fail(target.shard, "failed", f"{target.node}: {_error_text(exc)}")
                break
    finally:
        await _close(conns)
    return run.report()


async def status(
    database: str, targets: Sequence[Target], files: Sequence[Migration] | None
) -> MigrationReport:
    """Every shard's version, dirty versions and, given the files, what is pending."""

    async def read(target: Target) -> tuple[ShardReport, dict[int, Row] | None]:
        report = ShardReport(target.shard, target.node, "status", None)
        try:
            conn = await target.connect()
        except _RUN_ERRORS as exc:
            report.message = f"cannot reach {target.node}: {_error_text(exc)}"
            return report, None
        try:
            rows = await (await Table.on(conn)).rows()
            holder = await lock_holder(conn)
        finally:
            await conn.close()
        report.version, report.dirty = _version(rows), _dirty(rows)
        if holder:
            report.message = f"a migrator is running now (pid {holder})"
        return report, rows

    read_all = await asyncio.gather(*(read(t) for t in targets))
    failed = failures([rows for _, rows in read_all if rows is not None])
    shards = []
    for report, rows in read_all:
        shards.append(report)
        if rows is None or files is None or report.message:
            # Unreachable, no files, or a migrator at work (judged when it is done).
            continue
        try:
            todo = plan(rows, files, report.shard, database, failed).todo
            report.pending = [m.version for m in todo]
        except Refused as exc:
            report.message = str(exc)
    latest = files[-1].version if files else None
    ok = all(s.message is None and not s.dirty and not s.pending for s in shards)
    return MigrationReport(database, ok, latest, shards)


async def resolve(
    database: str,
    target: Target,
    migration: Migration,
    action: Literal["retry", "applied"],
    *,
    lock_timeout: float,
    progress: Progress = _quiet,
) -> str:
    """An operator's decision on a dirty version: run it again, or take it as applied
    (after repairing the shard by hand). Returns what was done; Refused if the version
    is not dirty there."""
    conn = await _open(target)
    try:
        await lock(conn, lock_timeout, lambda pid: progress(f"waiting for the lock (pid {pid})"))
        try:
            table = await Table.on(conn)
            row = (await table.rows()).get(migration.version)
            if row is None or row.state != "dirty":
                state = "not recorded" if row is None else row.state
                raise Refused(f"{migration.label} is {state} on {target.shard}, not dirty")
            if action == "retry":
                await table.delete(migration.version)
                return f"{database}/{target.shard}: {migration.label} will run again"
            await table.record(
                migration.version, migration.name, migration.checksum, "applied",
                migration.transactional,
            )  # fmt: skip
            return f"{database}/{target.shard}: {migration.label} recorded as applied"
        finally:
            with contextlib.suppress(*_RUN_ERRORS):
                await unlock(conn)
    finally:
        await conn.close()
