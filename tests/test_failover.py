"""Health probes, failover and the Kubernetes lifecycle, with real servers stopped,
killed and promoted. Each test gets its own small primary + replica pair."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from client import DbSidecarError, Unavailable
from client.connection import DatabaseHandle
from client.transport import Transport
from devstack.postgres import LocalTopology, PgServer
from wire.protocol import Insert, Raw, Route

from .harness import SidecarProcess, answers, eventually, free_port, http_get, statements

pytestmark = pytest.mark.slow


@pytest.fixture
async def with_table(pair: LocalTopology) -> LocalTopology:
    """The pair, with table t created on the primary and replicated."""
    await _schema(pair)
    return pair


async def _schema(topo: LocalTopology) -> None:
    conn = await asyncpg.connect(topo.primary.dsn("orders", topo.user, topo.password))
    await conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    await conn.close()
    replica = await asyncpg.connect(topo.replica.dsn("orders", topo.user, topo.password))

    async def replicated() -> bool:
        return await replica.fetchval("SELECT to_regclass('t') IS NOT NULL")

    await eventually(replicated, 10, "the table to reach the replica")
    await replica.close()


def node(topo: LocalTopology, server: PgServer | None, name: str, port: int | None = None) -> dict:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port or (server.port if server else 0),
        "database": "orders",
        "user": topo.user,
        "password": topo.password,
    }


def fault_config(topo: LocalTopology, **extra: object) -> dict:
    config: dict = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "health": {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2},
        "shutdown": {"drain_timeout": 10},
        "databases": {
            "orders": {
                "primary": node(topo, topo.primary, "a"),
                "replicas": [node(topo, topo.replica, "b")],
                "pool": {"acquire_timeout": 1, "connect_timeout": 1, "statement_timeout": 10},
            }
        },
    }
    config.update(extra)
    return config


@pytest.fixture
async def started(with_table, tmp_path) -> AsyncIterator[tuple[SidecarProcess, DatabaseHandle]]:
    proc = SidecarProcess(fault_config(with_table), tmp_path, "fault")
    proc.start()
    transport = Transport(proc.url)
    db = DatabaseHandle("fault", transport=transport, database="orders", consistency="eventual")
    try:
        yield proc, db
    finally:
        await transport.close()
        proc.terminate()


async def nodes(proc: SidecarProcess) -> dict[str, dict]:
    async with aiohttp.ClientSession() as http, http.get(proc.ops + "/healthz") as resp:
        doc = await resp.json()
    return {n["name"]: n for n in doc["databases"]["orders"]["nodes"]}


def read_replica() -> Raw:
    return Raw(database="orders", sql="SELECT count(*) FROM t", writes=False,
               route=Route(role="replica"))  # fmt: skip


def insert(v: str) -> Insert:
    return Insert(database="orders", table="t", rows=[{"v": v}], returning=["id"])


@pytest.mark.parametrize("read_retries", [3, 0], ids=["client-retries", "no-client-retries"])
async def test_replica_stopped_under_load_then_back(pair, started, read_retries) -> None:
    proc, shared = started
    # One request per plan (no client bundles), so the sidecar's request counts are the
    # client's reads; with read_retries=0 every failure the sidecar answers reaches us.
    db = DatabaseHandle("fault", transport=shared.transport, database="orders",
                  consistency="eventual", read_retries=read_retries, batching=False)  # fmt: skip
    await eventually(lambda: _served_by(db, "b"), 5, "reads on the replica")
    stop_at: list[float] = []
    outcomes: list[tuple[float, str | None, str | None]] = []  # (when, error, node)
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            try:
                result = await db.run(read_replica())
                outcomes.append((time.monotonic(), None, result.served_by[0].node))
            except DbSidecarError as exc:
                outcomes.append((time.monotonic(), exc.code, None))

    answers_before, statements_before = answers(proc.ops), statements(proc.ops, "orders")
    readers = [asyncio.create_task(reader()) for _ in range(32)]
    try:

        async def loaded() -> bool:
            return sum(node == "b" for _, _, node in outcomes) >= 100

        await eventually(loaded, 5, "100 reads served by the replica")
        stop_at.append(time.monotonic())
        await asyncio.to_thread(pair.replica.stop, "immediate")
        window = 2 * 0.2 + 0.5  # failure_threshold x interval, plus one probe timeout

        async def down() -> bool:
            return not (await nodes(proc))["b"]["up"]

        await eventually(down, 5, "the probe to mark the replica down")

        async def past_window() -> bool:
            return sum(at > stop_at[0] + window for at, _, _ in outcomes) >= 200

        await eventually(past_window, 10, "200 reads after the detection window")
    finally:
        done.set()
        await asyncio.gather(*readers)
    answered = answers(proc.ops) - answers_before
    ran = statements(proc.ops, "orders") - statements_before
    assert len(outcomes) > 100
    # Exact: no read failed, not even inside the detection window. The sidecar answered
    # every request 200 (with client retries off, exactly the reads the client made).
    assert [code for _, code, _ in outcomes if code is not None] == []
    assert set(answered) == {"200"}, answered
    if read_retries == 0:
        assert answered["200"] == len(outcomes), (answered, len(outcomes))
    # The stop was felt: statements failed on the replica as node_unavailable ...
    lost = ran[("replica", "node_unavailable")]
    assert lost >= 1, ran
    expected = {("replica", "ok"), ("replica", "node_unavailable"), ("primary", "ok")}
    assert set(ran) <= expected, ran
    # ... and the sidecar ran each of them once more, on the primary: one statement per
    # answered request, plus one per replica failure.
    assert ran.total() == answered.total() + lost, (ran, answered)
    assert any(node == "a" for at, _, node in outcomes if at > stop_at[0])
    await asyncio.to_thread(pair.replica.start)
    await eventually(lambda: _served_by(db, "b"), 10, "the restarted replica to serve reads")


async def _served_by(db: DatabaseHandle, node_name: str) -> bool:
    result = await db.run(read_replica())
    return result.served_by[0].node == node_name


async def test_promotion_moves_writes_and_split_brain_refuses_them(pair, started) -> None:
    _, db = started
    first = await db.run(insert("before"))
    assert first.served_by[0].node == "a"
    await asyncio.to_thread(pair.primary.stop, "immediate")
    with pytest.raises(Unavailable):
        await db.run(insert("no primary"))
    replica = await asyncpg.connect(pair.replica.dsn("orders", pair.user, pair.password))
    written_before_promotion = [
        r async for r in _attempts(db, 5)
    ]  # writes while only the replica is up must all fail
    assert all(r is None or r.served_by[0].node == "a" for r in written_before_promotion)
    assert await replica.fetchval("SELECT count(*) FROM t WHERE v = 'no primary'") == 0
    await replica.execute("SELECT pg_promote()")
    await replica.close()

    async def writes_work() -> bool:
        try:
            result = await db.run(insert("after"))
        except Unavailable:
            return False
        assert result.served_by[0].node == "b"
        return True

    await eventually(writes_work, 5, "writes to succeed on the promoted replica")

    # The old primary comes back as a primary: two primaries, writes refused, reads go on.
    await asyncio.to_thread(pair.primary.start)

    async def split() -> bool:
        try:
            await db.run(insert("split"))
        except Unavailable as exc:
            return exc.code == "split_brain"
        return False

    await eventually(split, 10, "the split brain to be detected")
    read = await db.run(Raw(database="orders", sql="SELECT count(*) FROM t", writes=False))
    assert read.served_by[0].node == "b"  # the promoted node, not the returning one
    await asyncio.to_thread(pair.primary.stop, "fast")
    await eventually(writes_work, 10, "writes to resume once the old primary is gone")


async def _attempts(db: DatabaseHandle, n: int):
    for i in range(n):
        try:
            yield await db.run(insert(f"attempt {i}"))
        except Unavailable:
            yield None


class Blackhole:
    """Accepts TCP connections and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.usefixtures("with_table")
async def test_a_node_that_never_answers_is_down_and_nothing_hangs(pair, tmp_path) -> None:
    hole = Blackhole()
    config = fault_config(pair)
    config["databases"]["orders"]["replicas"].append(node(pair, None, "hole", hole.port))
    config["databases"]["ghost"] = {
        "primary": node(pair, None, "ghost", hole.port),
        "pool": {"acquire_timeout": 1, "connect_timeout": 1},
    }
    proc = SidecarProcess(config, tmp_path, "hole")
    transport = Transport(proc.url)
    try:
        proc.start()
        state = await nodes(proc)
        assert state["hole"]["up"] is False and "Timeout" in (state["hole"]["last_error"] or "")
        db = DatabaseHandle("h", transport=transport, database="orders", consistency="eventual")
        for _ in range(6):  # round robin would pick the hole every other time if it were up
            result = await db.run(read_replica())
            assert result.served_by[0].node in ("a", "b")
        ghost = DatabaseHandle("g", transport=transport, database="ghost", read_retries=0)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(
                ghost.run(Raw(database="ghost", sql="SELECT 1", writes=True)), 10
            )
        # Readiness does not depend on the databases unless asked to.
        assert http_get(proc.ops + "/readyz")[0] == 200
        assert http_get(proc.ops + "/livez")[0] == 200
    finally:
        await transport.close()
        proc.terminate()
        hole.close()


async def test_require_primary_makes_readiness_follow_the_primary(pair, tmp_path) -> None:
    proc = SidecarProcess(fault_config(pair, readiness={"require_primary": True}), tmp_path, "rp")
    proc.start()
    try:
        assert http_get(proc.ops + "/readyz")[0] == 200
        await asyncio.to_thread(pair.primary.stop, "immediate")

        async def not_ready() -> bool:
            return http_get(proc.ops + "/readyz")[0] == 503

        await eventually(not_ready, 5, "readiness to follow the primary")
        _, body = http_get(proc.ops + "/readyz")
        assert json.loads(body) == {"status": "no_primary", "databases": ["orders"]}
        assert http_get(proc.ops + "/livez")[0] == 200
    finally:
        proc.terminate()


async def test_sigterm_drains_in_flight_work_then_exits_zero(pair, tmp_path) -> None:
    proc = SidecarProcess(fault_config(pair), tmp_path, "term")
    proc.start()
    transport = Transport(proc.url)
    db = DatabaseHandle("t", transport=transport, database="orders")
    primary = await asyncpg.connect(pair.primary.dsn("orders", pair.user, pair.password))
    try:
        slow = asyncio.create_task(
            db.run(Raw(database="orders", sql="SELECT pg_sleep(2), 'done' AS d", writes=False))
        )

        async def sleeping() -> bool:
            return bool(await primary.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%'"
            ))  # fmt: skip

        await eventually(sleeping, 5, "the slow query to run")
        proc.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return http_get(proc.ops + "/readyz")[0] == 503

        await eventually(draining, 2, "readiness to turn 503")
        with pytest.raises(Unavailable) as refused:
            async with db.transaction():
                pass
        assert refused.value.code == "draining"
        result = await slow
        assert result.rows == [[None, "done"]]
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0
        assert "draining" in proc.log()
    finally:
        await primary.close()
        await transport.close()
        proc.terminate()


def test_quitquitquit_and_wait_and_status(pair, tmp_path) -> None:
    proc = SidecarProcess(fault_config(pair), tmp_path, "quit")
    proc.start()
    try:
        wait = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "wait", "--ops", proc.ops, "--timeout", "5s"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert wait.returncode == 0
        status = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "status", "--ops", proc.ops],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0
        assert "orders" in status.stdout and " a " in status.stdout and "replica" in status.stdout
        request = urllib.request.Request(proc.url + "/quitquitquit", method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        assert proc.proc.wait(15) == 0
    finally:
        proc.terminate()
