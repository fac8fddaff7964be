"""Migrations through a running sidecar: the client's migrate(), /v1/topology's versions,
readiness with migrations.require_consistent, and bad requests answered 4xx.

The sidecar of this module serves one sharded database over four shard databases of
its own (see tests/test_migrations.py) with migrations enabled, and one without.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from client.connection import DatabaseHandle
from client.migrations import MigrationFailed, migrate
from client.transport import Transport
from devstack.ports import HOST, free_port
from sidecar.migration_table import LOCK_KEY

from .harness import SidecarProcess, eventually, http_get
from .test_migrations import COUNTER, WIDGETS, ShardSet, cli, shards, write_files

__all__ = ["shards"]  # the fixture, used by the tests below

TOKEN = "migrations-test-token"
GADGETS = "CREATE TABLE gadgets (id int);\nINSERT INTO applied_log VALUES (3);\n"
GADGETS_FIXED = GADGETS.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
BODY_LIMIT = 64 * 1024


@pytest.fixture
async def sidecar(shards: ShardSet, tmp_path: Path) -> AsyncIterator[SidecarProcess]:
    files = {"0001_counter.sql": COUNTER, "0002_widgets.sql": WIDGETS}
    configured = write_files(tmp_path / "configured", files | {"0003_gadgets.sql": GADGETS_FIXED})
    plain = shards.database()["shards"][0]["primary"] | {"name": "plain"}
    config = {
        "listen": {"host": HOST, "port": free_port()},
        "ops": {"host": HOST, "port": free_port()},
        "auth_token": TOKEN,
        "limits": {"max_body_bytes": BODY_LIMIT},
        "databases": {
            "migapi": shards.database(configured, require_consistent=True),
            "plain": {"primary": plain},
        },
    }
    proc = SidecarProcess(config, tmp_path, "migrations")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture
async def handle(sidecar: SidecarProcess) -> AsyncIterator[DatabaseHandle]:
    transport = Transport(sidecar.url, token=TOKEN, mode="http")
    yield DatabaseHandle("migapi", transport=transport, database="migapi")
    await transport.close()


def schema(sidecar: SidecarProcess) -> dict[str, Any]:
    status, body = http_get(sidecar.ops + "/healthz")
    assert status == 200
    return json.loads(body)["databases"]["migapi"]["schema"]


def versions(sidecar: SidecarProcess) -> list[int | None]:
    return [s["version"] for s in schema(sidecar)["shards"].values()]


def ready(sidecar: SidecarProcess) -> tuple[int, dict[str, Any]]:
    status, body = http_get(sidecar.ops + "/readyz")
    return status, json.loads(body)


async def test_the_app_migrates_through_the_sidecar_and_readiness_follows_the_versions(
    sidecar: SidecarProcess, handle: DatabaseHandle, shards: ShardSet, tmp_path: Path
) -> None:
    assert versions(sidecar) == [None] * 4
    assert schema(sidecar)["consistent"] is True and ready(sidecar)[0] == 200

    app_files = write_files(
        tmp_path / "app", {"0001_counter.sql": COUNTER, "0002_widgets.sql": WIDGETS}
    )
    report = await migrate(handle, app_files)
    assert report.ok and report.latest == 2
    shard_results = [(s.outcome, s.applied, s.version) for s in report.shards]
    assert shard_results == [("applied", [1, 2], 2)] * 4
    # The sidecar read the new versions right after the migration, not at its interval.
    assert versions(sidecar) == [2] * 4 and ready(sidecar)[0] == 200

    # Shard 2 already has the table version 3 creates: it fails there.
    await shards.execute(2, "CREATE TABLE gadgets (id int)")
    write_files(app_files, {"0003_gadgets.sql": GADGETS})
    with pytest.raises(MigrationFailed) as failed:
        await migrate(handle, app_files)
    outcomes = [(s.outcome, s.version) for s in failed.value.report.shards]
    assert outcomes == [("applied", 3), ("applied", 3), ("failed", 2), ("skipped", 2)]
    assert 'relation "gadgets" already exists' in str(failed.value)
    assert versions(sidecar) == [3, 3, 2, 2]
    assert [s["dirty"] for s in schema(sidecar)["shards"].values()] == [[], [], [3], []]
    assert schema(sidecar)["consistent"] is False
    status, body = ready(sidecar)
    assert (status, body) == (503, {"status": "schema_mismatch", "databases": ["migapi"]})
    # The data API's topology shows the same readings (behind the token, like every route).
    assert http_get(sidecar.url + "/v1/topology")[0] == 401
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session,
        session.get(sidecar.url + "/v1/topology") as resp,
    ):
        assert (await resp.json())["databases"]["migapi"]["schema"] == schema(sidecar)

    # No files sent: the sidecar's configured folder, with the fixed version 3. Shards
    # 0 and 1 keep what they ran and record the fixed file's checksum.
    fixed = await migrate(handle)
    assert fixed.ok
    assert [(s.outcome, s.applied, s.realigned) for s in fixed.shards] == [
        ("current", [], [3]), ("current", [], [3]), ("applied", [3], []), ("applied", [3], []),
    ]  # fmt: skip
    assert versions(sidecar) == [3] * 4 and ready(sidecar) == (200, {"status": "ok"})
    screen = await cli("status", "--ops", sidecar.ops)
    assert screen.code == 0, screen.err
    schema_lines = [line.split() for line in screen.out.splitlines() if line.startswith("migapi")]
    assert [line[1:] for line in schema_lines if len(line) == 4] == [
        [name, "3", "ok"] for name in shards.names
    ] and ["migapi", "consistent"] in schema_lines
    for index in range(4):
        rows = await shards.fetch(index, "SELECT count(*) AS n FROM applied_log WHERE version = 3")
        assert rows[0]["n"] == 1


async def _post(sidecar: SidecarProcess, body: bytes, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(sidecar.url + "/v1/migrate", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def _request(database: str, *files: tuple[int, str, str]) -> bytes:
    migrations = [{"version": v, "name": n, "sql": sql} for v, n, sql in files]
    return json.dumps({"database": database, "migrations": migrations}).encode()


async def test_bad_migrate_requests_are_refused_before_any_shard_is_touched(
    sidecar: SidecarProcess, shards: ShardSet, tmp_path: Path
) -> None:
    ok = (1, "counter", COUNTER)
    typo = "-- dbsidecar: no-transactions\nSELECT 1"
    big = "SELECT 1;" + " " * BODY_LIMIT
    cases = [
        (_request("migapi", ok), None, 401, "unauthorized"),
        (b"{not json", TOKEN, 400, "bad_migration"),
        (b'{"database": "migapi", "extra": 1}', TOKEN, 400, "bad_migration"),
        (_request("migapi", ok, (1, "again", "SELECT 1")), TOKEN, 400, "version 1 twice"),
        (_request("migapi", (0, "zero", "SELECT 1")), TOKEN, 400, "versions start at 1"),
        (_request("migapi", (2, "bad name", "SELECT 1")), TOKEN, 400, "<version>_<name>.sql"),
        (_request("migapi", (2, "tx", "BEGIN; COMMIT")), TOKEN, 400, "transaction control"),
        (_request("migapi", (2, "typo", typo)), TOKEN, 400, "unknown directive"),
        (_request("migapi", (2, "empty", "-- nothing\n")), TOKEN, 400, "holds no statement"),
        (_request("plain", ok), TOKEN, 400, "not enabled"),
        (_request("nope", ok), TOKEN, 404, "unknown_database"),
        (_request("migapi", (1, "big", big)), TOKEN, 413, "body_too_large"),
    ]
    for body, token, status, words in cases:
        got, answer = await _post(sidecar, body, token)
        assert got == status, (body[:80], answer)
        error = answer["error"]
        assert words in error["code"] + error["message"], (body[:80], error)
    # Nothing ran anywhere, and no node was marked down by the callers' mistakes.
    for index in range(4):
        assert not await shards.has_table(index, "dbsidecar_schema_migrations")
    status, body = http_get(sidecar.ops + "/healthz")
    assert all(node["up"] for db in json.loads(body)["databases"].values() for node in db["nodes"])
    # The client refuses a folder with a .sql file that is not a migration, before sending.
    write_files(tmp_path / "bad", {"create_users.sql": "SELECT 1"})
    transport = Transport(sidecar.url, token=TOKEN, mode="http")
    try:
        with pytest.raises(ValueError, match=r"<version>_<name>\.sql"):
            await migrate(
                DatabaseHandle("migapi", transport=transport, database="migapi"), tmp_path / "bad"
            )
    finally:
        await transport.close()


async def test_a_migration_may_take_longer_than_the_handles_timeout(
    sidecar: SidecarProcess, shards: ShardSet, tmp_path: Path
) -> None:
    """A run waits for other pods' runs (their lock): the handle's own timeout (here
    0.5 s) does not cut the app's migrate() short while the sidecar is still working."""
    transport = Transport(sidecar.url, token=TOKEN, mode="http", timeout=0.5)
    handle = DatabaseHandle("migapi", transport=transport, database="migapi")
    files = write_files(tmp_path / "app", {"0001_counter.sql": COUNTER})
    other_pod = await asyncpg.connect(shards.dsn(0))
    try:
        await other_pod.fetchval("SELECT pg_advisory_lock($1)", LOCK_KEY)
        began = time.monotonic()
        running = asyncio.ensure_future(migrate(handle, files))

        async def waited_past_the_timeout() -> bool:
            # The condition under test is time itself: the run outlives the handle's limit.
            waiting = await other_pod.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_try_advisory_lock%'"
                " AND pid <> pg_backend_pid()"
            )
            return waiting > 0 and time.monotonic() - began > 1.0 and not running.done()

        await eventually(waited_past_the_timeout, 10, "the run to wait past 0.5 s")
        await other_pod.fetchval("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        report = await running
        assert report.ok and [s.outcome for s in report.shards] == ["applied"] * 4
    finally:
        await other_pod.close()
        await transport.close()
