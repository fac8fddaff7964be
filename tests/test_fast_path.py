"""Guards for the fast path, by mechanism rather than by stopwatch: the compile cache is
hit for repeated shapes, and a plan leaves no reset query behind on release."""

from __future__ import annotations

import aiohttp
import pytest

from client import ActiveRecord, ConnectionManager
from client.protocol import Select

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
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
        " WHERE query LIKE '%pg_advisory_unlock_all%'"
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
