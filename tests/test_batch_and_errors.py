"""Atomic batches, and how failures reach the caller: codes, statuses, retryability."""

from __future__ import annotations

import asyncio

import pytest

from client import ConnectionManager, PlanError, Timeout, Unavailable, UniqueViolation
from wire.protocol import Insert, Raw, Select, Update

from .conftest import sidecar_config
from .harness import SidecarProcess
from .models import Order

pytestmark = pytest.mark.usefixtures("handles")


async def test_batch_commits_all_plans_together(primary) -> None:
    db = ConnectionManager.get("default")
    result = await db.batch(
        [
            Insert(database="orders", table="kv", rows=[{"k": "b1", "v": "1"}]),
            Update(
                database="orders",
                table="kv",
                values={"v": "2"},
                where={"col": "k", "op": "=", "value": "b1"},
                returning=["v"],
            ),
            Select(database="orders", table="kv", where={"col": "k", "op": "=", "value": "b1"}),
        ]
    )
    assert [r.rowcount for r in result.results] == [1, 1, 1]
    assert result.results[2].rows == [["b1", "2"]]
    assert result.lsn is not None
    assert await primary.fetchval("SELECT v FROM kv WHERE k = 'b1'") == "2"


async def test_batch_rolls_back_entirely_on_the_failing_plan(primary) -> None:
    db = ConnectionManager.get("default")
    await Order.find().where(Order.user_id == 777).delete()
    with pytest.raises(UniqueViolation) as err:
        await db.batch(
            [
                Insert(database="orders", table="orders", rows=[{"user_id": 777, "status": "a"}]),
                Insert(database="orders", table="kv", rows=[{"k": "b2", "v": "1"}]),
                Insert(database="orders", table="kv", rows=[{"k": "b2", "v": "dup"}]),
                Insert(database="orders", table="orders", rows=[{"user_id": 777, "status": "b"}]),
            ]
        )
    assert err.value.index == 2  # the plan that failed
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 777") == 0
    assert await primary.fetchval("SELECT count(*) FROM kv WHERE k = 'b2'") == 0


async def test_batch_with_an_invalid_plan_runs_nothing(primary) -> None:
    db = ConnectionManager.get("default")
    with pytest.raises(PlanError) as err:
        await db.batch(
            [
                Insert(database="orders", table="kv", rows=[{"k": "b3", "v": "1"}]),
                Select(database="orders", table="bad name"),
            ]
        )
    assert err.value.index == 1
    assert await primary.fetchval("SELECT count(*) FROM kv WHERE k = 'b3'") == 0


async def test_batch_must_stay_on_one_database() -> None:
    db = ConnectionManager.get("default")
    with pytest.raises(PlanError):
        await db.batch(
            [
                Select(database="orders", table="kv"),
                Select(database="inventory", table="kv"),
            ]
        )


@pytest.fixture(scope="module")
def tight_sidecar(topology, workdir):
    """A sidecar with a one-connection pool and short timeouts."""
    config = sidecar_config(topology, workdir, "tight")
    for db in config["databases"].values():
        db["pool"] = {"min_size": 1, "max_size": 1, "acquire_timeout": 0.3, "statement_timeout": 1}
    proc = SidecarProcess(config, workdir, "tight")
    proc.start()
    yield proc
    proc.terminate()


async def test_pool_timeout_is_503_retryable_and_statement_timeout_504(tight_sidecar) -> None:
    ConnectionManager.configure({"tight": {"sidecar": tight_sidecar.url, "database": "orders"}})
    db = ConnectionManager.get("tight")
    db.read_retries = 0  # see the first error, not the client's retry
    slow = asyncio.create_task(
        db.run(Raw(database="orders", sql="SELECT pg_sleep(5)", writes=True))
    )
    # While the only connection is busy, another plan cannot get one.
    await asyncio.sleep(0)  # let the slow plan be sent first
    with pytest.raises(Unavailable) as busy:
        for _ in range(50):
            await db.run(Raw(database="orders", sql="SELECT 1", writes=True))
    assert busy.value.code == "pool_timeout" and busy.value.retryable and busy.value.status == 503
    with pytest.raises(Timeout) as timed_out:
        await slow
    assert timed_out.value.code == "statement_timeout" and timed_out.value.status == 504
    assert timed_out.value.sqlstate == "57014"
