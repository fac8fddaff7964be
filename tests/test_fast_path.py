"""Guards for the fast path, by mechanism rather than by stopwatch: the compile cache is
hit for repeated shapes, and a plan leaves no reset query behind on release."""

from __future__ import annotations

import aiohttp
import pytest

from client import ActiveRecord, ConnectionManager
from wire.protocol import Select

from .models import Order

pytestmark = pytest.mark.usefixtures("handles")


async def cache(sidecar) -> dict:
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/v1/topology") as resp:
        return (await resp.json())["compile_cache"]


async def test_repeated_shapes_hit_the_compile_cache(sidecar) -> None:
    before = await cache(sidecar)
    for user_id in range(25):  # one shape, 25 different values
        statuses = ["a"] * (user_id + 1)
        query = Order.find().where(Order.user_id == user_id, Order.status.in_(statuses))
        await query.limit(user_id + 1).all()
    after = await cache(sidecar)
    assert after["misses"] - before["misses"] <= 1
    assert after["hits"] - before["hits"] >= 24


async def reset_calls(primary) -> int:
    return await primary.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE 'DISCARD ALL%'"
    )


async def test_plans_cost_no_reset_query_and_raw_sql_does(primary) -> None:
    installed = "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'"
    if not await primary.fetchval(installed):
        pytest.skip("pg_stat_statements is not available on this PostgreSQL")
    db = ConnectionManager.get("default")
    before = await reset_calls(primary)
    for _ in range(30):
        await db.run(Select(database="orders", table="kv", limit=1))
    assert await reset_calls(primary) == before
    await ActiveRecord.execute_raw("SET application_name = 'changed by raw sql'")
    assert await reset_calls(primary) > before


def request_counts(sidecar) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from .harness import http_get

    counts: dict[str, float] = {}
    text = http_get(sidecar.ops + "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dbsidecar_requests_total":
                endpoint = sample.labels["endpoint"]
                counts[endpoint] = counts.get(endpoint, 0) + sample.value
    return counts


def handle(sidecar, batching: bool):
    from client.connection import DatabaseHandle
    from client.transport import Transport

    return DatabaseHandle("b", transport=Transport(sidecar.url), database="orders",
                          consistency="eventual", batching=batching)  # fmt: skip


async def test_concurrent_plans_are_coalesced_into_few_requests(sidecar) -> None:
    import asyncio

    from client import PlanError
    from wire.protocol import Raw

    db = handle(sidecar, batching=True)
    before = request_counts(sidecar)
    plans = [Raw(database="orders", sql="SELECT $1::int AS n", params=[i], writes=False)
             for i in range(50)]  # fmt: skip
    plans[17] = Raw(database="orders", sql="SELECT nope", writes=False)  # fails alone
    results = await asyncio.gather(*(db.run(p) for p in plans), return_exceptions=True)
    after = request_counts(sidecar)
    sent = sum(after.get(k, 0) - before.get(k, 0) for k in ("/v1/query", "/v1/bundle"))
    assert sent < 5, sent  # 50 plans, a handful of HTTP requests
    assert isinstance(results[17], PlanError) and results[17].sqlstate == "42703"
    assert [r.rows[0][0] for i, r in enumerate(results) if i != 17] == [
        i for i in range(50) if i != 17
    ]
    await db.transport.close()


async def test_batching_keeps_each_callers_order_and_can_be_switched_off(sidecar) -> None:
    import asyncio

    from wire.protocol import Insert, Select

    db = handle(sidecar, batching=True)
    key = "order-check"

    async def writer_then_reader(i: int) -> str | None:
        # One caller's plans run in the order it issued them.
        await db.run(Insert(database="orders", table="kv", rows=[{"k": f"{key}{i}", "v": str(i)}]))
        found = await db.run(
            Select(
                database="orders", table="kv", where={"col": "k", "op": "=", "value": f"{key}{i}"}
            )
        )
        return found.rows[0][1] if found.rows else None

    assert await asyncio.gather(*(writer_then_reader(i) for i in range(20))) == [
        str(i) for i in range(20)
    ]
    await db.transport.close()
    plain = handle(sidecar, batching=False)
    before = request_counts(sidecar)
    await asyncio.gather(
        *(plain.run(Select(database="orders", table="kv", limit=1)) for _ in range(10))
    )
    after = request_counts(sidecar)
    assert after["/v1/query"] - before.get("/v1/query", 0) == 10
    assert after.get("/v1/bundle", 0) == before.get("/v1/bundle", 0)
    await plain.transport.close()


async def test_more_concurrent_plans_than_a_bundle_holds(sidecar) -> None:
    import asyncio

    from client.connection import MAX_BUNDLE
    from wire.protocol import Raw

    db = handle(sidecar, batching=True)
    count = MAX_BUNDLE * 2 + 7
    plans = [Raw(database="orders", sql="SELECT $1::int", params=[i], writes=False)
             for i in range(count)]  # fmt: skip
    results = await asyncio.gather(*(db.run(p) for p in plans))
    assert [r.rows[0][0] for r in results] == list(range(count))
    await db.transport.close()
