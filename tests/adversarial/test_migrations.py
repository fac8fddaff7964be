"""Attacks on schema migrations: files that leave a transaction or session state behind,
bodies that make the checks expensive, and many callers migrating at once.

The engine tests run ``sidecar.migrate.migrate`` in this process against four shard
databases of their own (the ``shards`` fixture of tests/test_migrations.py); the API
tests run a sidecar process over them. What happened is read straight from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from devstack.ports import HOST, free_port
from sidecar.migrate import Target, migrate
from sidecar.migration_files import checked
from sidecar.migration_table import LOCK_KEY
from wire.migrations import MigrationFile

from ..harness import SidecarProcess, eventually, http_get
from ..test_migrations import (
    CONCURRENT_INDEX,
    COUNTER,
    WIDGETS,
    ShardSet,
    cli,
    shards,
    write_config,
    write_files,
)

__all__ = ["shards"]  # the fixture, used by the tests below

TOKEN = "adversarial-migrations-token"
NO_TX = "-- dbsidecar: no-transaction\n"


def targets(set_: ShardSet) -> list[Target]:
    def connect(dsn: str) -> Any:
        return asyncpg.connect(dsn, server_settings={"application_name": "dbsidecar-migrate"})

    return [
        Target(name, f"node{i}", partial(connect, set_.dsn(i))) for i, name in enumerate(set_.names)
    ]


def files(*sqls: str) -> list[Any]:
    return files_from(1, *sqls)


def files_from(first: int, *sqls: str) -> list[Any]:
    return checked([MigrationFile(i, f"m{i}", sql) for i, sql in enumerate(sqls, first)])


async def test_a_no_transaction_file_that_leaves_begin_open_is_not_reported_applied(
    shards: ShardSet,
) -> None:
    # BEGIN without COMMIT in a no-transaction file: its statements and the "applied"
    # row ran inside that open transaction, which closing the connection rolls back.
    left_open = (
        NO_TX + "BEGIN;\nCREATE TABLE left_open (id int);\nINSERT INTO applied_log VALUES (2);\n"
    )
    report = await migrate("adv", targets(shards), files(COUNTER, left_open), lock_timeout=5)
    first = report.shards[0]
    truth = await shards.bookkeeping(0)
    applied_here = {v for v, r in truth.items() if r["state"] == "applied"}
    # Whatever the report calls applied is applied in PostgreSQL.
    assert set(first.applied) <= applied_here, (first, dict(truth))
    assert not report.ok and first.outcome == "failed", report
    assert "transaction open" in (first.message or "")
    assert truth[2]["state"] == "dirty" and not await shards.has_table(0, "left_open")
    assert [s.outcome for s in report.shards[1:]] == ["skipped"] * 3
    # The lock went with the run: nobody holds it.
    rows = await shards.fetch(
        0, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
        LOCK_KEY & 0xFFFFFFFF,
    )  # fmt: skip
    assert rows[0]["n"] == 0


async def test_session_state_of_one_file_does_not_reach_the_next(shards: ShardSet) -> None:
    who = (
        "CREATE TABLE who (version int, by_user text DEFAULT current_user);\n"
        "GRANT INSERT ON who TO PUBLIC;\n"
    )
    # Careless files: a role switched for the session, a scratch table shadowing a real one.
    role = "SET ROLE pg_monitor;\n"
    scratch = "CREATE TEMP TABLE applied_log (version int);\n"
    later = "INSERT INTO who (version) VALUES (5);\nINSERT INTO applied_log VALUES (5);\n"
    later_no_tx = NO_TX + later.replace("(5)", "(6)")
    migrations = files(COUNTER, who, role, scratch, later, later_no_tx)
    report = await migrate("adv", targets(shards)[:1], migrations, lock_timeout=5)
    assert report.ok, [s.message for s in report.shards]
    user = shards.topo.user
    rows = await shards.fetch(0, "SELECT version, by_user FROM who ORDER BY version")
    assert [(r["version"], r["by_user"]) for r in rows] == [(5, user), (6, user)]
    # The inserts into applied_log reached the real table, not a temporary one.
    rows = await shards.fetch(0, "SELECT version FROM applied_log ORDER BY version")
    assert [r["version"] for r in rows] == [1, 5, 6]


@pytest.fixture
async def mig_sidecar(shards: ShardSet, tmp_path: Path) -> AsyncIterator[SidecarProcess]:
    config = {
        "listen": {"host": HOST, "port": free_port()},
        "ops": {"host": HOST, "port": free_port()},
        "auth_token": TOKEN,
        "databases": {"advmig": shards.database(None, lock_timeout=0.4)},
    }
    proc = SidecarProcess(config, tmp_path, "advmig")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with session.post(url + "/v1/migrate", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def _body(*sqls: str) -> bytes:
    migrations = [{"version": i, "name": f"m{i}", "sql": sql} for i, sql in enumerate(sqls, 1)]
    return json.dumps({"database": "advmig", "migrations": migrations}).encode()


async def test_a_large_migration_body_does_not_freeze_the_sidecar(
    mig_sidecar: SidecarProcess, shards: ShardSet
) -> None:
    # ~7 MB of statements (the default body limit is 8 MiB), refused at the end for its
    # COMMIT: the check must not hold the event loop (and ~500 MB) for many seconds.
    big = "CREATE TABLE t (a int);\n" * 290_000 + "COMMIT;\n"
    async with aiohttp.ClientSession() as session:
        posted = asyncio.create_task(_post(session, mig_sidecar.url, _body(big)))
        slowest = 0.0
        while not posted.done():
            began = time.monotonic()
            status, _ = await asyncio.to_thread(http_get, mig_sidecar.ops + "/livez", 60)
            slowest = max(slowest, time.monotonic() - began)
            assert status == 200
        status, answer = await posted
    assert status == 400 and "transaction control" in answer["error"]["message"], answer
    assert slowest < 3.0, f"/livez took {slowest:.1f} s while a migrate body was checked"
    assert not await shards.has_table(0, "dbsidecar_schema_migrations")


async def _migrators(set_: ShardSet) -> int:
    total = 0
    for index in range(len(set_.names)):
        rows = await set_.fetch(
            index,
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE application_name = 'dbsidecar-migrate' AND datname = current_database()",
        )
        total += rows[0]["n"]
    return total


async def test_concurrent_migrate_calls_do_not_open_connections_without_bound(
    mig_sidecar: SidecarProcess, shards: ShardSet
) -> None:
    # Shard 0's lock is held elsewhere, so every run waits on it (lock_timeout 0.4 s).
    # Each run holds a dedicated connection per shard: calls that all run at once
    # would hold 4 per caller, and enough callers exhaust max_connections for everyone.
    holder = await asyncpg.connect(shards.dsn(0))
    callers = 8
    most = 0
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        async with aiohttp.ClientSession() as session:
            body = _body(COUNTER)
            calls = [
                asyncio.create_task(_post(session, mig_sidecar.url, body)) for _ in range(callers)
            ]

            async def sampled() -> bool:
                nonlocal most
                most = max(most, await _migrators(shards))
                return all(c.done() for c in calls)

            await eventually(sampled, 60, "the migrate calls to finish")
            answers = [await c for c in calls]
    finally:
        await holder.close()
    assert all(status == 200 and not a["ok"] for status, a in answers), answers
    assert all("migration lock" in a["shards"][0]["message"] for _, a in answers)
    assert 0 < most <= len(shards.names), f"{most} migrator connections at once"


@pytest.fixture
async def ready_sidecar(shards: ShardSet, tmp_path: Path) -> AsyncIterator[SidecarProcess]:
    """An unsharded database on shard 0 whose readiness requires consistent versions,
    read every 0.1 s."""
    plain = shards.database()["shards"][0]["primary"]
    migrations = {"require_consistent": True, "version_interval": 0.1}
    config = {
        "listen": {"host": HOST, "port": free_port()},
        "ops": {"host": HOST, "port": free_port()},
        "auth_token": TOKEN,
        "databases": {"advone": {"primary": plain, "migrations": migrations}},
    }
    proc = SidecarProcess(config, tmp_path, "advone")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


def _schema(sidecar: SidecarProcess) -> dict[str, Any]:
    status, body = http_get(sidecar.ops + "/healthz")
    assert status == 200
    (reading,) = json.loads(body)["databases"]["advone"]["schema"]["shards"].values()
    return reading


async def test_a_running_no_transaction_migration_is_not_a_failed_one_for_readiness(
    ready_sidecar: SidecarProcess, shards: ShardSet
) -> None:
    # A no-transaction file is recorded dirty while it runs (so a crash leaves it dirty).
    # A CREATE INDEX CONCURRENTLY that takes hours must not pull every pod out of its
    # Service for that long: readiness refuses failed migrations, not running ones.
    target = targets(shards)[:1]
    first = await migrate("advone", target, files(COUNTER, WIDGETS), lock_timeout=5)
    assert first.ok, first
    blocker = await asyncpg.connect(shards.dsn(0))
    running = None
    try:
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("INSERT INTO widgets VALUES (1, 'a')")
        migrations = files(COUNTER, WIDGETS, CONCURRENT_INDEX)
        running = asyncio.create_task(migrate("advone", target, migrations, lock_timeout=5))

        async def index_waiting() -> bool:
            rows = await shards.fetch(
                0,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'CREATE INDEX CONCURRENTLY%'",
            )
            return rows[0]["n"] == 1

        await eventually(index_waiting, 30, "CREATE INDEX CONCURRENTLY to wait")
        since = time.time()

        async def read_since() -> bool:
            return _schema(ready_sidecar)["checked_at"] > since + 0.05

        await eventually(read_since, 30, "the sidecar to read the version again")
        status, body = http_get(ready_sidecar.ops + "/readyz")
        assert status == 200, body
        await blocker_tx.commit()
        report = await running
    finally:
        if running is not None and not running.done():
            running.cancel()
        await blocker.close()
    assert report.ok, report

    async def at_three() -> bool:
        reading = _schema(ready_sidecar)
        return reading["version"] == 3 and reading["dirty"] == []

    await eventually(at_three, 30, "the sidecar to read version 3")
    assert http_get(ready_sidecar.ops + "/readyz")[0] == 200
    # A no-transaction migration that failed is still refused.
    broken = NO_TX + "CREATE INDEX CONCURRENTLY nowhere_x ON nowhere (x);\n"
    failed = await migrate("advone", target, [*migrations, *files_from(4, broken)], lock_timeout=5)
    assert not failed.ok

    async def refused() -> bool:
        return http_get(ready_sidecar.ops + "/readyz")[0] == 503

    await eventually(refused, 30, "readiness to refuse the failed migration")


async def test_no_configured_password_in_a_migrate_answer(
    mig_sidecar: SidecarProcess, shards: ShardSet
) -> None:
    # PostgreSQL quotes what a failing statement holds (syntax errors, RAISE, a key's
    # value): a secret in it is masked in the message, and in the dirty list as well.
    password = shards.topo.password
    leaky = f"DO $$ BEGIN RAISE EXCEPTION 'no role with password %', '{password}'; END $$;\n"
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with session.post(
            mig_sidecar.url + "/v1/migrate", data=_body(leaky), headers=headers
        ) as resp:
            status, text = resp.status, await resp.text()
    assert status == 200 and "no role with password" in text, text
    assert password not in text


async def test_a_file_that_releases_the_migration_lock_stops_the_run(shards: ShardSet) -> None:
    # pg_advisory_unlock_all() (or DISCARD ALL) in a file releases the session's advisory
    # locks, the migration lock among them: the files after it would run while another
    # migrator may take the lock and run them too.
    seen = "CREATE TABLE lock_seen (held bigint);\n"
    discard = "SELECT pg_advisory_unlock_all();\n"
    probe = (
        "INSERT INTO lock_seen SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        f"AND pid = pg_backend_pid() AND granted AND objid = {LOCK_KEY & 0xFFFFFFFF};\n"
    )
    report = await migrate("adv", targets(shards)[:1], files(seen, discard, probe), lock_timeout=5)
    held = [r["held"] for r in await shards.fetch(0, "SELECT held FROM lock_seen")]
    # Either the run stopped before the next file, or it held the lock while running it.
    assert held in ([], [1]), f"version 3 ran without the migration lock: {report}"
    assert not report.ok and "migration lock" in (report.shards[0].message or ""), report


async def test_discard_all_in_a_file_is_reported_as_what_it_did(
    mig_sidecar: SidecarProcess, shards: ShardSet
) -> None:
    # DISCARD ALL drops the migrator's prepared statements too: the bookkeeping write after
    # the file failed with asyncpg's "prepared statement ... does not exist", and the
    # finished file stayed dirty ("may be half applied").
    seen = "CREATE TABLE lock_seen (held bigint);\n"
    discard = NO_TX + "DISCARD ALL;\n"
    async with aiohttp.ClientSession() as session:
        status, answer = await _post(session, mig_sidecar.url, _body(seen, discard, seen))
    assert status == 200 and not answer["ok"], answer
    first = answer["shards"][0]
    assert "released the migration lock" in first["message"], first
    rows = await shards.bookkeeping(0)
    assert {v: r["state"] for v, r in rows.items()} == {1: "applied", 2: "applied"}


async def test_migrate_status_prints_no_terminal_control_sequences(
    shards: ShardSet, tmp_path: Path
) -> None:
    # A failing file's error (PostgreSQL quotes the file: a RAISE, a token near a syntax
    # error) is kept and printed to the operator's terminal by `migrate` and `status`.
    hostile = "DO $$ BEGIN RAISE EXCEPTION E'boom\\x1b]0;owned\\x07\\x1b[2J\\u009b31m'; END $$;\n"
    folder = write_files(tmp_path / "migrations", {"0001_hostile.sql": hostile})
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    args = ("--config", str(config), "--database", "mig")
    runs = [await cli("migrate", *args), await cli("migrate", "status", *args)]
    runs.append(await cli("migrate", "status", *args, "--json"))
    for run in runs:
        assert run.code == 1 and "boom" in run.out, run
        assert not any(c in run.out for c in "\x1b\x07\x9b"), repr(run.out)
    assert json.loads(runs[2].out)["shards"][0]["dirty"][0]["error"].startswith("boom")
