"""A real two-member Patroni cluster (etcd3 DCS) under the sidecar, which learns the
cluster's members and leader from Patroni's keys in etcd while its own probes decide who
takes writes. Readers and writers run throughout with client retries off: a switchover
moves writes with no acknowledged write lost and only retryable errors, a kill -9 of the
leader's postmaster fails over, and the old leader rejoins as a replica and serves reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from client import DbSidecarError
from client.connection import DatabaseHandle
from client.transport import Transport
from wire.protocol import Insert, Raw, Route

from .etcd_server import EtcdServer
from .harness import SidecarProcess, answers, eventually, free_port
from .patroni_cluster import PatroniCluster

pytestmark = pytest.mark.slow

APP_PASSWORD = "app-password-for-patroni-test"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(etcd: EtcdServer) -> Iterator[PatroniCluster]:
    patroni = PatroniCluster(etcd.endpoint, scope="pg")
    patroni.start()
    try:
        yield patroni
    finally:
        patroni.stop()


async def _prepare(cluster: PatroniCluster) -> None:
    """The app's role, database and table, created on the leader and replicated."""
    leader = cluster.leader()
    assert leader is not None
    conn = await asyncpg.connect(cluster.dsn(leader))
    await conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    await conn.execute("CREATE DATABASE orders OWNER app")
    await conn.close()
    conn = await asyncpg.connect(cluster.dsn(leader, "orders"))
    await conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text UNIQUE NOT NULL)")
    await conn.execute("ALTER TABLE t OWNER TO app")
    await conn.close()
    [replica] = [n for n in cluster.names if n != leader]

    async def replicated() -> bool:
        try:
            conn = await asyncpg.connect(cluster.dsn(replica, "orders"), timeout=10)
        except asyncpg.InvalidCatalogNameError:
            return False  # the database itself has not arrived yet
        try:
            return bool(await conn.fetchval("SELECT to_regclass('t') IS NOT NULL"))
        finally:
            await conn.close()

    await eventually(replicated, 10, "the table to reach the replica")


@dataclass
class Load:
    """Writers and readers through the sidecar, recording every outcome."""

    db: DatabaseHandle
    # (monotonic time, node) of every acknowledged write and successful read.
    writes: list[tuple[float, str]] = field(default_factory=list)
    reads: list[tuple[float, str]] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    # (monotonic time, "write" or "read", code, retryable) of every error.
    errors: list[tuple[float, str, str, bool]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            value = f"w{i}-{n}"
            plan = Insert(database="orders", table="t", rows=[{"v": value}], returning=["id"])
            try:
                result = await self.db.run(plan)
            except DbSidecarError as exc:
                self.errors.append((time.monotonic(), "write", exc.code, exc.retryable))
                # Nothing to wait on but time: a client would back off like this too.
                await asyncio.sleep(0.02)
                continue
            self.acknowledged.add(value)
            self.writes.append((time.monotonic(), result.served_by[0].node))

    async def reader(self) -> None:
        plan = Raw(database="orders", sql="SELECT count(*) FROM t", writes=False,
                   route=Route(role="replica"))  # fmt: skip
        while not self.stop.is_set():
            try:
                result = await self.db.run(plan)
            except DbSidecarError as exc:
                self.errors.append((time.monotonic(), "read", exc.code, exc.retryable))
                await asyncio.sleep(0.02)
                continue
            self.reads.append((time.monotonic(), result.served_by[0].node))

    def wrote_on(self, node: str, after: float) -> bool:
        return any(at > after and on == node for at, on in self.writes)

    def read_on(self, node: str, after: float) -> bool:
        return any(at > after and on == node for at, on in self.reads)

    def window(self, began: float, node: str) -> float:
        """Seconds from ``began`` to the first write acknowledged by ``node``."""
        return self.first_write(began, node) - began

    def first_write(self, began: float, node: str) -> float:
        return min(at for at, on in self.writes if at > began and on == node)

    def errors_between(self, began: float, ended: float) -> Counter[tuple[str, str]]:
        return Counter((kind, code) for at, kind, code, _ in self.errors if began <= at <= ended)


async def test_patroni_switchover_failover_and_rejoin_under_load(
    cluster: PatroniCluster, etcd: EtcdServer, tmp_path: Path
) -> None:
    await _prepare(cluster)
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "health": {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2},
        "registry": {"etcd": {"endpoints": [etcd.endpoint]}, "service": "shop"},
        "databases": {
            "orders": {
                "patroni": {"scope": "pg", "node": {"database": "orders", "user": "app",
                                                    "password": APP_PASSWORD}},
                "pool": {"acquire_timeout": 1, "connect_timeout": 1, "statement_timeout": 10},
            }
        },
    }  # fmt: skip
    proc = SidecarProcess(config, tmp_path, "patroni")
    proc.start()
    transport = Transport(proc.url)
    # Client retries off, one request per plan: every error the sidecar answers is seen.
    db = DatabaseHandle("patroni", transport=transport, database="orders",
                        consistency="eventual", read_retries=0, batching=False)  # fmt: skip
    load = Load(db)
    answers_before = answers(proc.ops)
    tasks = [asyncio.create_task(load.writer(i)) for i in range(4)]
    tasks += [asyncio.create_task(load.reader()) for _ in range(4)]
    figures: dict[str, object] = {}
    try:
        first = cluster.leader()
        assert first is not None
        [second] = [n for n in cluster.names if n != first]
        started = time.monotonic()
        await eventually(lambda: _now(load.wrote_on(f"pg/{first}", started)), 10,
                         "writes on the leader")  # fmt: skip
        await eventually(lambda: _now(load.read_on(f"pg/{second}", started)), 10,
                         "reads on the replica")  # fmt: skip

        # 1. A switchover: writes move to the new leader, nothing acknowledged is lost.
        began = time.monotonic()
        promoted = asyncio.create_task(_promoted(cluster, second))
        await asyncio.to_thread(
            cluster.patronictl, "switchover", "--leader", first, "--candidate", second, "--force"
        )
        await eventually(lambda: _now(load.wrote_on(f"pg/{second}", began)), 30,
                         "writes on the new leader")  # fmt: skip
        ended = time.monotonic()
        figures["switchover_window_s"] = round(load.window(began, f"pg/{second}"), 2)
        # How much of it is the sidecar's: from the promotion (seen directly) to the first
        # write the sidecar acknowledged from the promoted node.
        figures["switchover_follow_s"] = round(
            load.first_write(began, f"pg/{second}") - await promoted, 2
        )
        figures["switchover_errors"] = dict(load.errors_between(began, ended))
        # The old leader rejoins as a replica and serves reads again.
        await eventually(lambda: _now(load.read_on(f"pg/{first}", ended)), 60,
                         "reads on the demoted leader")  # fmt: skip
        figures["switchover_rejoin_s"] = round(time.monotonic() - began, 2)

        # 2. kill -9 of the leader's postmaster: Patroni fails over, the sidecar follows.
        await eventually(lambda: _now(cluster.healthy()), 30, "the cluster to settle")
        began = time.monotonic()
        promoted = asyncio.create_task(_promoted(cluster, first))
        # Replication is asynchronous: commits acknowledged in the last moments before a
        # crash may not have reached the replica. Those before the kill are checked apart.
        acknowledged_before_kill = set(load.acknowledged)
        cluster.kill_postmaster(second)
        await eventually(lambda: _now(load.wrote_on(f"pg/{first}", began)), 60,
                         "writes after the failover")  # fmt: skip
        ended = time.monotonic()
        assert cluster.leader() == first
        figures["failover_window_s"] = round(load.window(began, f"pg/{first}"), 2)
        figures["failover_follow_s"] = round(
            load.first_write(began, f"pg/{first}") - await promoted, 2
        )
        figures["failover_errors"] = dict(load.errors_between(began, ended))
        # 3. The killed leader rejoins as a replica and gets reads again.
        await eventually(lambda: _now(load.read_on(f"pg/{second}", ended)), 90,
                         "reads on the rejoined old leader")  # fmt: skip
        figures["failover_rejoin_s"] = round(time.monotonic() - began, 2)
        load.stop.set()
        await asyncio.gather(*tasks)
        answered = answers(proc.ops) - answers_before
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
        await transport.close()
        proc.terminate()

    # Every error was retryable, and the sidecar's own counts agree with the client's:
    # with client retries off and no bundling, one answer per plan.
    assert [e for e in load.errors if not e[3]] == []
    figures["sidecar_answers"] = dict(answered)
    assert answered.total() == len(load.writes) + len(load.reads) + len(load.errors)
    assert answered.total() - answered["200"] == len(load.errors)
    leader = cluster.leader()
    assert leader is not None
    conn = await asyncpg.connect(cluster.dsn(leader, "orders"))
    stored = {row["v"] for row in await conn.fetch("SELECT v FROM t")}
    await conn.close()
    figures["acknowledged_writes"] = len(load.acknowledged)
    figures["lost_acknowledged_writes_kill"] = len(load.acknowledged - stored)
    figures["errors_total"] = dict(Counter((kind, code) for _, kind, code, _ in load.errors))
    print("patroni figures:", figures)
    # Every write acknowledged through the switchover is in PostgreSQL, read directly.
    assert acknowledged_before_kill - stored == set()


async def _promoted(cluster: PatroniCluster, name: str) -> float:
    """When ``name`` first reports it is out of recovery, polled directly every 20 ms."""
    conn = await asyncpg.connect(cluster.dsn(name), timeout=5)

    async def out_of_recovery() -> bool:
        return not await conn.fetchval("SELECT pg_is_in_recovery()")

    try:
        await eventually(out_of_recovery, 60, f"{name} to be promoted", interval=0.02)
        return time.monotonic()
    finally:
        await conn.close()


async def _now(value: bool) -> bool:
    """A check already made, in the form eventually() polls."""
    return value


async def test_patroni_followed_through_its_rest_api(cluster: PatroniCluster, tmp_path) -> None:
    """No registry: the cluster is polled with GET /cluster on one member, whose answer
    names the others; a switchover moves writes and the sidecar follows."""
    await _prepare(cluster)
    first = cluster.leader()
    assert first is not None
    [second] = [n for n in cluster.names if n != first]
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "health": {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2},
        "databases": {
            "orders": {
                "patroni": {"scope": "pg", "interval": 0.2,
                            # Only the replica's API: the leader is learnt from its answer.
                            "rest": [f"http://127.0.0.1:{cluster.api_port[second]}"],
                            "node": {"database": "orders", "user": "app",
                                     "password": APP_PASSWORD}},
                "pool": {"acquire_timeout": 1, "connect_timeout": 1, "statement_timeout": 10},
            }
        },
    }  # fmt: skip
    proc = SidecarProcess(config, tmp_path, "patroni-rest")
    proc.start()
    transport = Transport(proc.url)
    db = DatabaseHandle("rest", transport=transport, database="orders",
                        consistency="eventual", read_retries=0, batching=False)  # fmt: skip
    write = Insert(database="orders", table="t", rows=[{"v": "rest"}], returning=["id"])
    try:
        assert (await db.run(write)).served_by[0].node == f"pg/{first}"
        await asyncio.to_thread(
            cluster.patronictl, "switchover", "--leader", first, "--candidate", second, "--force"
        )

        async def writes_on_second() -> bool:
            plan = Insert(database="orders", table="t", rows=[{"v": f"rest-{time.monotonic()}"}])
            try:
                return (await db.run(plan)).served_by[0].node == f"pg/{second}"
            except DbSidecarError as exc:
                assert exc.retryable, exc
                return False

        await eventually(writes_on_second, 30, "writes on the new leader")
        await eventually(lambda: _now(cluster.healthy()), 30, "the old leader to rejoin")
        read = Raw(database="orders", sql="SELECT 1", writes=False, route=Route(role="replica"))

        async def reads_on_first() -> bool:
            return (await db.run(read)).served_by[0].node == f"pg/{first}"

        await eventually(reads_on_first, 15, "reads on the demoted leader")
    finally:
        await transport.close()
        proc.terminate()
