"""Roles, replica choice, lag bounds and read-your-writes, on real streaming replication."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from client import ActiveRecord, ConnectionManager, Unavailable
from wire.protocol import Delete, Insert, Raw, Route, Select, Update

from .conftest import server_dsn, sidecar_config
from .harness import SidecarProcess, eventually
from .models import Order

pytestmark = pytest.mark.usefixtures("handles")


def eventual(sidecar: SidecarProcess, name: str = "eventual", database: str = "orders"):
    ConnectionManager.configure(
        {name: {"sidecar": sidecar.url, "database": database, "consistency": "eventual"}}
    )
    return ConnectionManager.get(name)


async def topology_doc(sidecar: SidecarProcess) -> dict:
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/v1/topology") as resp:
        return await resp.json()


async def node_state(sidecar: SidecarProcess, database: str, node: str) -> dict:
    doc = await topology_doc(sidecar)
    return next(n for n in doc["databases"][database]["nodes"] if n["name"] == node)


@pytest.fixture
async def replica_conn(topology) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(server_dsn(topology, topology.replica, "orders"))
    yield conn
    await conn.close()


@pytest.fixture
async def paused_replay(replica_conn) -> AsyncIterator[asyncpg.Connection]:
    """Replay stopped on the replica for the test; resumed whatever happens."""
    await replica_conn.execute("SELECT pg_wal_replay_pause()")
    try:
        yield replica_conn
    finally:
        await replica_conn.execute("SELECT pg_wal_replay_resume()")


async def test_replica_read_runs_on_the_replica(sidecar) -> None:
    db = eventual(sidecar)
    rows = await ActiveRecord.execute_raw(
        "SELECT pg_is_in_recovery() AS recovery", writes=False, replica=True, using=db
    )
    assert rows[0]["recovery"] is True
    assert [(s.node, s.role) for s in rows.served_by] == [("replica/orders", "replica")]
    orders = await Order.find().using(db).using_read_replica().limit(1).rows()
    assert orders.served_by[0].role == "replica"
    # Without asking, reads stay on the primary.
    rows = await ActiveRecord.execute_raw("SELECT pg_is_in_recovery() AS r", writes=False, using=db)
    assert rows[0]["r"] is False and rows.served_by[0].role == "primary"


async def test_writes_carry_a_token_and_are_read_back_from_the_replica(sidecar) -> None:
    order = await Order(user_id=42, status="ryw").save()
    db = ConnectionManager.get("default")
    assert db.token is not None
    found = await Order.find_by_id(order.id).using_read_replica().one()
    assert found.status == "ryw"


async def test_lagging_replica_serves_token_free_reads_only_within_bound_and_never_stale_ryw(
    sidecar, paused_replay
) -> None:
    session = ConnectionManager.get("default")
    loose = eventual(sidecar)
    order = await Order(user_id=43, status="fresh").save()
    # The session that wrote: its token cannot be met by the paused replica -> primary.
    found = await Order.find_by_id(order.id).using_read_replica().one()
    assert found.status == "fresh" and found.served_by[0].role == "primary"
    # A reader without a token is served by the replica, stale but within the 16 MiB bound.
    stale = await Order.find_by_id(order.id).using(loose).using_read_replica().first()
    assert stale is None
    state = await node_state(sidecar, "orders", "replica/orders")
    assert state["lag_bytes"] is not None

    async def lag_seen() -> bool:
        return (await node_state(sidecar, "orders", "replica/orders"))["lag_bytes"] > 0

    await eventually(lag_seen, 5, "the sidecar to measure the replica's lag")
    assert session.token is not None
    decisions = (await topology_doc(sidecar))["routing"]
    assert decisions.get("orders/ryw_primary", 0) >= 1


async def test_ryw_read_moves_back_to_the_replica_once_it_catches_up(sidecar, replica_conn) -> None:
    await replica_conn.execute("SELECT pg_wal_replay_pause()")
    try:
        order = await Order(user_id=44, status="later").save()
        first = await Order.find_by_id(order.id).using_read_replica().one()
        assert first.served_by[0].role == "primary"
    finally:
        await replica_conn.execute("SELECT pg_wal_replay_resume()")

    async def on_replica() -> bool:
        found = await Order.find_by_id(order.id).using_read_replica().one()
        assert found.status == "later"  # never stale, wherever it ran
        return found.served_by[0].role == "replica"

    await eventually(on_replica, 10, "the read to be served by the caught-up replica")


@pytest.fixture(scope="module")
def strict_sidecar(topology, workdir) -> AsyncIterator[SidecarProcess]:
    """Tight lag bounds; inventory refuses to fall back; payments reads from replicas by
    default; orders lists the replica twice (two names) to show round robin."""
    config = sidecar_config(topology, workdir, "strict")
    dbs = config["databases"]
    dbs["orders"]["max_replica_lag_bytes"] = 1024
    twin = dict(dbs["orders"]["replicas"][0], name="replica-twin/orders")
    dbs["orders"]["replicas"].append(twin)
    dbs["inventory"].update(max_replica_lag_bytes=1024, fallback_to_primary=False)
    dbs["payments"].update(read_default="replica", max_replica_lag_seconds=0.5)
    proc = SidecarProcess(config, workdir, "strict")
    proc.start()
    yield proc
    proc.terminate()


async def test_replica_beyond_the_lag_bound_is_skipped_or_refused(
    strict_sidecar, paused_replay, primary
) -> None:
    orders = eventual(strict_sidecar, "strict-orders", "orders")
    inventory = eventual(strict_sidecar, "strict-inventory", "inventory")
    # More than 1 KiB of WAL that the paused replica cannot replay.
    await primary.execute(
        "INSERT INTO kv SELECT 'lag' || g, repeat('x', 100) FROM generate_series(1, 50) g"
    )

    async def lagging() -> bool:
        state = await node_state(strict_sidecar, "orders", "replica/orders")
        return (state["lag_bytes"] or 0) > 1024

    await eventually(lagging, 5, "the replica's lag to pass the bound")
    rows = await ActiveRecord.execute_raw(
        "SELECT 1 AS one", writes=False, replica=True, using=orders
    )
    assert rows.served_by[0].role == "primary"  # fell back
    inventory.read_retries = 0
    with pytest.raises(Unavailable) as err:
        await ActiveRecord.execute_raw("SELECT 1", writes=False, replica=True, using=inventory)
    assert err.value.code == "no_replica_available" and err.value.retryable
    doc = await topology_doc(strict_sidecar)
    assert doc["routing"]["orders/fallback_primary"] >= 1
    assert doc["routing"]["inventory/refused"] >= 1
    # The seconds bound: measured from WAL positions, it grows while replay stays paused.
    payments = eventual(strict_sidecar, "strict-payments-lag", "payments")

    async def too_old() -> bool:
        state = await node_state(strict_sidecar, "payments", "replica/payments")
        return (state["lag_seconds"] or 0) > 0.5

    await eventually(too_old, 5, "the replica's lag to pass 0.5 s")
    rows = await ActiveRecord.execute_raw("SELECT 1", writes=False, using=payments)
    assert rows.served_by[0].role == "primary"


async def test_round_robin_alternates_and_read_default_replica(strict_sidecar) -> None:
    orders = eventual(strict_sidecar, "strict-orders2", "orders")

    async def both_fresh() -> bool:
        doc = await topology_doc(strict_sidecar)
        nodes = doc["databases"]["orders"]["nodes"]
        return all(n["lag_bytes"] is not None and n["lag_bytes"] <= 1024 for n in nodes[1:])

    await eventually(both_fresh, 10, "the replicas to be within the bound")
    served = []
    for _ in range(6):
        rows = await ActiveRecord.execute_raw("SELECT 1", writes=False, replica=True, using=orders)
        served.append(rows.served_by[0].node)
    assert set(served) == {"replica/orders", "replica-twin/orders"}
    assert all(a != b for a, b in itertools.pairwise(served))
    payments = eventual(strict_sidecar, "strict-payments", "payments")

    async def default_is_replica() -> bool:
        rows = await ActiveRecord.execute_raw("SELECT 1", writes=False, using=payments)
        return rows.served_by[0].role == "replica"

    # read_default: replica, once the replica is within 0.5 s again.
    await eventually(default_is_replica, 10, "payments reads to go to the replica")
    plan = Raw(database="payments", sql="SELECT 1", writes=False, route=Route(role="primary"))
    assert (await payments.run(plan)).served_by[0].role == "primary"


async def test_no_write_ever_reaches_the_replica(sidecar, replica_conn) -> None:
    """1,000 randomized plans, writes asking for the replica included."""
    db = eventual(sidecar, "mix")
    rng = random.Random(1234)
    await db.run(
        Delete(database="orders", table="kv", where={"col": "k", "op": "like", "value": "mix%"})
    )

    def plan(i: int):
        key = f"mix{rng.randrange(50)}"
        role = rng.choice([None, "replica", "primary"])
        route = Route(role=role)
        return rng.choice(
            [
                Insert(database="orders", table="kv", rows=[{"k": f"mix-{i}", "v": "1"}],
                       route=route),
                Update(database="orders", table="kv", values={"v": str(i)},
                       where={"col": "k", "op": "=", "value": key}, route=route),
                Delete(database="orders", table="kv",
                       where={"col": "k", "op": "=", "value": key}, route=route),
                Raw(database="orders", sql="UPDATE kv SET v = v WHERE k = $1", params=[key],
                    writes=True, route=route),
                Select(database="orders", table="kv", limit=1, route=route),
                Raw(database="orders", sql="SELECT count(*) FROM kv", writes=False, route=route),
            ]
        )  # fmt: skip

    plans = [plan(i) for i in range(1000)]
    writes = reads_on_replica = 0
    for start in range(0, len(plans), 50):
        chunk = plans[start : start + 50]
        results = await asyncio.gather(*(db.run(p) for p in chunk))
        for p, result in zip(chunk, results, strict=True):
            roles = {s.role for s in result.served_by}
            if isinstance(p, Insert | Update | Delete) or (isinstance(p, Raw) and p.writes):
                writes += 1
                assert roles == {"primary"} and result.lsn is not None, p
            elif roles == {"replica"}:
                reads_on_replica += 1
    batch_plans = [Insert(database="orders", table="kv", rows=[{"k": f"mix-b{i}", "v": "b"}],
                          route=Route(role="replica")) for i in range(5)]  # fmt: skip
    batch = await db.batch(batch_plans)
    assert all(r.served_by[0].role == "primary" for r in batch.results)
    assert writes > 400 and reads_on_replica > 100
    # The replica's own statistics agree: it never executed a write statement.
    has_pss = await replica_conn.fetchval(
        "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'"
    )
    if has_pss:
        written = await replica_conn.fetchval(
            "SELECT count(*) FROM pg_stat_statements WHERE query ~* '^\\s*(insert|update|delete)'"
            " AND query ILIKE '%kv%'"
        )
        assert written == 0
