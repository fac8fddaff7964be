"""Per-service schema migrations on real PostgreSQL, through `dbsidecar migrate`.

Every test gets four shard databases of its own, spread over the session's two primaries
like the `users` shards (created here, dropped afterwards), so the bookkeeping tables,
locks and migrated tables never meet another test's. What happened is read straight
from PostgreSQL: a counter table each migration inserts into, the bookkeeping rows,
the catalog.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from devstack.ports import HOST
from devstack.postgres import LocalTopology, PgServer
from sidecar.migration_table import LOCK_KEY

from .harness import eventually

ROOT = Path(__file__).resolve().parent.parent
_sets = itertools.count(1)


@dataclass
class ShardSet:
    """Shard databases of one test: ``names[i]`` lives on primary ``i % 2``."""

    topo: LocalTopology
    names: list[str]

    def server(self, index: int) -> PgServer:
        return self.topo.primaries[index % len(self.topo.primaries)]

    def dsn(self, index: int) -> str:
        return self.server(index).dsn(self.names[index], self.topo.user, self.topo.password)

    def database(self, folder: Path | None = None, **migrations: Any) -> dict[str, Any]:
        """A sharded database entry over these shards for a sidecar configuration."""
        shards = [
            {
                "name": name,
                "primary": {
                    "name": f"{self.server(i).name}/{name}",
                    "host": HOST,
                    "port": self.server(i).port,
                    "database": name,
                    "user": self.topo.user,
                    "password": self.topo.password,
                },
            }
            for i, name in enumerate(self.names)
        ]
        entry: dict[str, Any] = {"sharding": {"key": "id", "function": "modulo"}, "shards": shards}
        if folder is not None or migrations:
            entry["migrations"] = {"dir": None if folder is None else str(folder), **migrations}
        return entry

    async def fetch(self, index: int, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn(index))
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def execute(self, index: int, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn(index))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def has_table(self, index: int, table: str) -> bool:
        rows = await self.fetch(index, "SELECT to_regclass($1) IS NOT NULL AS found", table)
        return rows[0]["found"]

    async def bookkeeping(self, index: int) -> dict[int, asyncpg.Record]:
        if not await self.has_table(index, "dbsidecar_schema_migrations"):
            return {}
        rows = await self.fetch(index, "SELECT * FROM dbsidecar_schema_migrations")
        return {r["version"]: r for r in rows}


async def _on_server(server: PgServer, topo: LocalTopology, sql: str) -> None:
    conn = await asyncpg.connect(server.dsn("postgres", topo.user, topo.password))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def shards(topology: LocalTopology) -> AsyncIterator[ShardSet]:
    prefix = f"mig{os.getpid()}_{next(_sets)}"
    made = ShardSet(topology, [])
    try:
        for i in range(4):
            name = f"{prefix}_s{i}"
            await _on_server(made.server(i), topology, f'CREATE DATABASE "{name}"')
            made.names.append(name)
        yield made
    finally:
        for i, name in enumerate(made.names):
            await _on_server(made.server(i), topology, f'DROP DATABASE "{name}" WITH (FORCE)')


def write_config(path: Path, databases: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"databases": databases}, sort_keys=False))
    path.chmod(0o600)  # it holds the password
    return path


def write_files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


@dataclass
class Run:
    code: int
    out: str
    err: str

    def report(self) -> dict[str, Any]:
        return json.loads(self.out.strip().splitlines()[-1])


async def start_cli(
    *args: str, stdout: Any = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", *args,
        stdout=stdout, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, within: float = 60.0) -> Run:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, (out or b"").decode(), err.decode())


async def cli(*args: str) -> Run:
    return await finish(await start_cli(*args))


# The counter table: every migration inserts its version, so "applied exactly once"
# is a count read from PostgreSQL, not the migrator's word.
COUNTER = "CREATE TABLE applied_log (version int NOT NULL);\nINSERT INTO applied_log VALUES (1);\n"
WIDGETS = (
    "CREATE TABLE widgets (id bigint PRIMARY KEY, name text);\n"
    "INSERT INTO applied_log VALUES (2);\n"
)
# Two statements outside a transaction: pglast splits them, each runs on its own.
CONCURRENT_INDEX = (
    "-- dbsidecar: no-transaction\n"
    "CREATE INDEX CONCURRENTLY widgets_name ON widgets (name);\n"
    "INSERT INTO applied_log VALUES (3);\n"
)
FILES = {
    "0001_counter.sql": COUNTER,
    "0002_widgets.sql": WIDGETS,
    "0003_widgets_name.sql": CONCURRENT_INDEX,
}


async def migrator_sessions(shards: ShardSet, index: int) -> int:
    rows = await shards.fetch(
        index,
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE application_name = 'dbsidecar-migrate' AND datname = current_database()",
    )
    return rows[0]["n"]


async def test_ten_concurrent_migrators_apply_each_migration_once_per_shard(
    shards: ShardSet, tmp_path: Path
) -> None:
    folder = write_files(tmp_path / "migrations", FILES)
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    # Real contention, not luck: hold shard 0's migration lock until all ten processes
    # are connected and polling for it, then let them race.
    holder = await asyncpg.connect(shards.dsn(0))
    procs: list[asyncio.subprocess.Process] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        procs = [
            await start_cli("migrate", "--config", str(config), "--database", "mig", "--json")
            for _ in range(10)
        ]

        async def all_waiting() -> bool:
            return await migrator_sessions(shards, 0) == 10

        await eventually(all_waiting, 60, "ten migrators waiting for shard 0's lock")
        await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        runs = await asyncio.gather(*(finish(p) for p in procs))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await holder.close()
    assert [r.code for r in runs] == [0] * 10, [r.err for r in runs]
    for index in range(4):
        counts = await shards.fetch(
            index, "SELECT version, count(*) AS n FROM applied_log GROUP BY version"
        )
        assert {r["version"]: r["n"] for r in counts} == {1: 1, 2: 1, 3: 1}
        rows = await shards.bookkeeping(index)
        assert sorted(rows) == [1, 2, 3]
        assert {r["state"] for r in rows.values()} == {"applied"}
        assert rows[3]["transactional"] is False and rows[1]["transactional"] is True
    # The migrators' own reports agree: each version applied by exactly one per shard.
    for index, name in enumerate(shards.names):
        reports = [s for r in runs for s in r.report()["shards"] if s["shard"] == name]
        applied = [v for s in reports for v in s.get("applied", [])]
        assert sorted(applied) == [1, 2, 3], (index, applied)
        assert {s["version"] for s in reports} == {3}
    assert not any(shards.topo.password in r.out + r.err for r in runs)


async def test_a_failure_on_shard_2_leaves_it_dirty_and_the_fixed_file_finishes(
    shards: ShardSet, tmp_path: Path
) -> None:
    # Shard 2 already has the table the second migration creates.
    await shards.execute(2, "CREATE TABLE gadgets (id int)")
    folder = write_files(
        tmp_path / "migrations",
        {"0001_counter.sql": COUNTER, "0002_gadgets.sql": "CREATE TABLE gadgets (id int);\n"},
    )
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    args = ("--config", str(config), "--database", "mig")

    run = await cli("migrate", *args)
    assert run.code == 1, run.out + run.err
    assert 'relation "gadgets" already exists' in run.out
    assert "NOT migrated everywhere" in run.out

    for index in (0, 1):
        rows = await shards.bookkeeping(index)
        assert {v: r["state"] for v, r in rows.items()} == {1: "applied", 2: "applied"}
        assert await shards.has_table(index, "gadgets")
    rows = await shards.bookkeeping(2)
    assert {v: r["state"] for v, r in rows.items()} == {1: "applied", 2: "dirty"}
    assert 'relation "gadgets" already exists' in rows[2]["error"]
    # Shard 3 untouched: not even the bookkeeping table exists.
    assert not await shards.has_table(3, "dbsidecar_schema_migrations")
    assert not await shards.has_table(3, "applied_log")

    status = await cli("migrate", "status", *args)
    assert status.code == 1, status.out + status.err
    lines = status.out.splitlines()
    shard_line = {line.split()[0]: line for line in lines if line.startswith(tuple(shards.names))}
    assert shard_line[shards.names[0]].split()[2:] == ["2", "-", "ok"]
    assert shard_line[shards.names[1]].split()[2:] == ["2", "-", "ok"]
    assert shard_line[shards.names[2]].split()[2:] == ["1", "2", "DIRTY"]
    assert shard_line[shards.names[3]].split()[2:] == ["-", "1,2", "pending"]
    assert "dirty: version 2 (gadgets), rolled back: relation" in status.out
    assert "what to do:" in status.out and "it is retried" in status.out
    as_json = json.loads((await cli("migrate", "status", *args, "--json")).out)
    assert [s["version"] for s in as_json["shards"]] == [2, 2, 1, None]
    assert [d["version"] for d in as_json["shards"][2]["dirty"]] == [2]

    # The same file again: retried (it rolled back), fails again, shard 3 still untouched.
    again = await cli("migrate", *args, "--json")
    assert again.code == 1
    assert [s["outcome"] for s in again.report()["shards"]] == [
        "current", "current", "failed", "skipped",
    ]  # fmt: skip
    assert not await shards.has_table(3, "dbsidecar_schema_migrations")

    # The fixed file: shard 2 retries it, shard 3 gets both.
    (folder / "0002_gadgets.sql").write_text("CREATE TABLE IF NOT EXISTS gadgets (id int);\n")
    fixed = await cli("migrate", *args)
    assert fixed.code == 0, fixed.out + fixed.err
    assert "all 4 shards up to date (version 2)" in fixed.out
    for index in range(4):
        rows = await shards.bookkeeping(index)
        assert {v: r["state"] for v, r in rows.items()} == {1: "applied", 2: "applied"}
    assert (await cli("migrate", "status", *args)).code == 0


async def test_an_edited_applied_file_is_refused_and_nothing_changes(
    shards: ShardSet, tmp_path: Path
) -> None:
    folder = write_files(tmp_path / "migrations", {"0001_counter.sql": COUNTER})
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    args = ("--config", str(config), "--database", "mig")
    assert (await cli("migrate", *args)).code == 0
    before = [await shards.bookkeeping(i) for i in range(4)]

    (folder / "0001_counter.sql").write_text(COUNTER.replace("version int", "version bigint"))
    write_files(folder, {"0002_widgets.sql": WIDGETS})
    run = await cli("migrate", *args)
    assert run.code == 1
    assert "version 1 (counter) was applied on" in run.out
    assert "must not change" in run.out and shards.names[0] in run.out
    # Refused before anything ran: no shard has version 2 or its table.
    for index in range(4):
        assert await shards.bookkeeping(index) == before[index]
        assert not await shards.has_table(index, "widgets")
    status = await cli("migrate", "status", *args)
    assert status.code == 1 and "must not change" in status.out


async def test_create_index_concurrently_runs_while_another_migrator_waits_for_the_lock(
    shards: ShardSet, tmp_path: Path
) -> None:
    folder = write_files(
        tmp_path / "migrations", {"0001_counter.sql": COUNTER, "0002_widgets.sql": WIDGETS}
    )
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    args = ("migrate", "--config", str(config), "--database", "mig")
    assert (await cli(*args)).code == 0
    write_files(folder, {"0003_widgets_name.sql": CONCURRENT_INDEX})
    # An open write on widgets makes CREATE INDEX CONCURRENTLY wait on shard 0 while the
    # first migrator holds the lock; the second migrator starts and waits for the lock.
    blocker = await asyncpg.connect(shards.dsn(0))
    first = second = None
    try:
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("INSERT INTO widgets VALUES (1, 'a')")
        first = await start_cli(*args)

        async def index_waiting() -> bool:
            rows = await shards.fetch(
                0,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'CREATE INDEX CONCURRENTLY%'",
            )
            return rows[0]["n"] == 1

        await eventually(index_waiting, 30, "CREATE INDEX CONCURRENTLY to wait on shard 0")
        second_out = tmp_path / "second.out"
        with second_out.open("wb") as out:
            second = await start_cli(*args, stdout=out)

        async def second_waits() -> bool:
            return "waiting for the migration lock" in second_out.read_text()

        await eventually(second_waits, 30, "the second migrator to wait for the lock")
        await blocker_tx.commit()
        first_run = await finish(first)
        second_run = await finish(second)
        second_run.out = second_out.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await blocker.close()
    assert first_run.code == 0, first_run.out + first_run.err
    assert second_run.code == 0, second_run.out + second_run.err
    assert "waiting for the migration lock (held by pid" in second_run.out
    for index in range(4):
        valid = await shards.fetch(
            index,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'widgets_name'::regclass",
        )
        assert [r["indisvalid"] for r in valid] == [True]
        counts = await shards.fetch(
            index, "SELECT count(*) AS n FROM applied_log WHERE version = 3"
        )
        assert counts[0]["n"] == 1


async def test_a_failed_no_transaction_migration_waits_for_a_decision(
    shards: ShardSet, tmp_path: Path
) -> None:
    # The index's table is missing on shard 1 only: the migration fails there, outside a
    # transaction, so the same file is not run again until someone decides.
    for index in (0, 2, 3):
        await shards.execute(index, "CREATE TABLE things (x int)")
    index_file = "-- dbsidecar: no-transaction\nCREATE INDEX CONCURRENTLY things_x ON things (x);\n"
    folder = write_files(
        tmp_path / "migrations", {"0001_counter.sql": COUNTER, "0002_things_x.sql": index_file}
    )
    config = write_config(tmp_path / "mig.yaml", {"mig": shards.database(folder)})
    args = ("--config", str(config), "--database", "mig")
    first = await cli("migrate", *args, "--json")
    assert first.code == 1
    assert [s["outcome"] for s in first.report()["shards"]] == [
        "applied", "failed", "skipped", "skipped",
    ]  # fmt: skip
    status = await cli("migrate", "status", *args)
    assert status.code == 1
    assert "dirty: version 2 (things_x), outside a transaction: statement 1 of 1" in status.out
    again = await cli("migrate", *args)
    assert again.code == 1 and "may be half applied" in again.out and "resolve" in again.out

    resolve = ("migrate", "resolve", *args, "--version", "2", "--applied", "--shard")
    refused = await cli(*resolve, shards.names[0])
    assert refused.code == 1 and "is applied on" in refused.out and "not dirty" in refused.out
    # Someone repairs shard 1 by hand and records the version as done.
    await shards.execute(1, "CREATE TABLE things (x int); CREATE INDEX things_x ON things (x)")
    resolved = await cli(*resolve, shards.names[1])
    assert resolved.code == 0, resolved.out + resolved.err
    assert "recorded as applied" in resolved.out
    done = await cli("migrate", *args)
    assert done.code == 0, done.out + done.err
    for index in range(4):
        rows = await shards.bookkeeping(index)
        assert {v: r["state"] for v, r in rows.items()} == {1: "applied", 2: "applied"}


async def test_an_unsharded_database_and_a_lock_that_is_not_released_in_time(
    shards: ShardSet, tmp_path: Path
) -> None:
    folder = write_files(tmp_path / "migrations", {"0001_counter.sql": COUNTER})
    primary = shards.database()["shards"][0]["primary"]
    config = write_config(tmp_path / "plain.yaml", {"plain": {"primary": primary}})
    args = ("--config", str(config), "--dir", str(folder))
    holder = await asyncpg.connect(shards.dsn(0))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        waited = await cli("migrate", *args, "--database", "plain", "--lock-timeout", "0.3")
    finally:
        await holder.close()  # the lock ends with its session
    assert waited.code == 1
    assert "another migrator held the migration lock over 0.3 s" in waited.out
    assert not await shards.has_table(0, "applied_log")
    status = await cli("migrate", "status", *args, "--database", "plain")
    assert status.code == 3 and "dbsidecar migrate --database plain" in status.out
    assert (await cli("migrate", *args, "--database", "plain")).code == 0
    assert (await cli("migrate", "status", *args, "--database", "plain")).code == 0
    assert (await cli("migrate", *args)).code == 2  # which database?


async def test_an_unreachable_shard_stops_the_run_before_anything_and_no_secret_is_printed(
    tmp_path: Path,
) -> None:
    secret = "Sw0rdfish-in-the-dsn"
    folder = write_files(tmp_path / "migrations", {"0001_counter.sql": COUNTER})
    nowhere = f"postgresql://app:{secret}@127.0.0.1:9/app"  # port 9: nothing listens
    config = write_config(tmp_path / "dsn.yaml", {"app": {"primary": {"dsn": nowhere}}})
    args = ("--config", str(config), "--database", "app", "--dir", str(folder))
    run = await cli("migrate", *args)
    assert run.code == 1 and "app: refused: cannot migrate" in run.out
    status = await cli("migrate", "status", *args)
    assert status.code == 1 and "cannot reach" in status.out
    assert not any(secret in r.out + r.err for r in (run, status))


async def test_a_replica_configured_as_primary_is_refused(
    topology: LocalTopology, tmp_path: Path
) -> None:
    replica = topology.replica
    assert replica is not None
    node = {"host": HOST, "port": replica.port, "database": "orders"}
    node |= {"user": topology.user, "password": topology.password}
    config = write_config(tmp_path / "replica.yaml", {"app": {"primary": node}})
    folder = write_files(tmp_path / "migrations", {"0001_counter.sql": COUNTER})
    run = await cli("migrate", "--config", str(config), "--database", "app", "--dir", str(folder))
    assert run.code == 1
    assert "is in recovery (a replica): migrations run on primaries only" in run.out
