"""Bad input gets a clear 4xx and changes nothing: identifiers, values, plan shapes."""

from __future__ import annotations

import json

import aiohttp
import pytest

from client import ActiveRecord

from .models import Order

pytestmark = pytest.mark.usefixtures("handles")

HOSTILE_NAMES = [
    'orders"; DROP TABLE orders; --',
    "orders; DELETE FROM orders",
    "orders -- comment",
    "orders/* c */",
    "weird; name",
    "1orders",
    "",
    "a.b.c",
]


async def post(sidecar, path: str, body: dict) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(sidecar.url + path, json=body) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_table_names_are_rejected(sidecar, primary, name: str) -> None:
    before = await primary.fetchval("SELECT count(*) FROM orders")
    status, body = await post(
        sidecar, "/v1/query", {"op": "select", "database": "orders", "table": name}
    )
    assert status == 400 and body["error"]["code"] == "bad_identifier"
    status, body = await post(
        sidecar, "/v1/query",
        {"op": "delete", "database": "orders", "table": name, "all_rows": True},
    )  # fmt: skip
    assert status == 400
    assert await primary.fetchval("SELECT count(*) FROM orders") == before


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_column_names_are_rejected(sidecar, name: str) -> None:
    plans = [
        {"op": "select", "database": "orders", "table": "orders", "columns": [name]},
        {"op": "select", "database": "orders", "table": "orders",
         "where": {"col": name, "op": "=", "value": 1}},
        {"op": "select", "database": "orders", "table": "orders", "order_by": [{"col": name}]},
        {"op": "insert", "database": "orders", "table": "orders", "rows": [{name: 1}]},
        {"op": "update", "database": "orders", "table": "orders", "set": {name: 1},
         "where": {"col": "id", "op": "=", "value": 1}},
        {"op": "aggregate", "database": "orders", "table": "orders",
         "aggregates": [{"fn": "count", "alias": name}]},
    ]  # fmt: skip
    for plan in plans:
        status, body = await post(sidecar, "/v1/query", plan)
        assert status == 400, plan
        assert body["error"]["code"] == "bad_identifier"


async def test_values_containing_sql_are_stored_verbatim(primary) -> None:
    evil = "x'); DROP TABLE orders; -- \" \\ /* */ $1 $$"
    order = await Order(user_id=1, status="evil", data={"k": evil}).save()
    await order.update(status=evil[:20])
    row = await primary.fetchrow("SELECT status, data FROM orders WHERE id = $1", order.id)
    assert row["status"] == evil[:20] and json.loads(row["data"]) == {"k": evil}
    found = await Order.find().where(Order.status == evil[:20]).one()
    assert found.data == {"k": evil}
    assert await primary.fetchval("SELECT to_regclass('orders') IS NOT NULL")


@pytest.mark.parametrize(
    ("plan", "code"),
    [
        ({"op": "select", "database": "orders"}, "bad_plan"),  # no table
        ({"op": "explode", "database": "orders", "table": "orders"}, "bad_plan"),
        ({"op": "select", "database": "orders", "table": "orders", "limit": "10"}, "bad_plan"),
        ({"op": "select", "database": "orders", "table": "orders", "limit": -1}, "bad_plan"),
        ({"op": "select", "database": "orders", "table": "orders", "surprise": 1}, "bad_plan"),
        ({"op": "select", "database": "orders", "table": "orders",
          "where": {"col": "id", "op": "~", "value": 1}}, "bad_operator"),
        ({"op": "select", "database": "orders", "table": "orders",
          "where": {"col": "id", "op": "=", "value": {"$evil": 1}}}, "bad_value"),
        ({"op": "select", "database": "orders", "table": "orders",
          "where": {"col": "id", "op": "=", "value": {"a": 1, "b": 2}}}, "bad_value"),
        ({"op": "select", "database": "orders", "table": "orders",
          "where": {"col": "id", "op": "=", "value": None}}, "bad_plan"),
        ({"op": "raw", "database": "orders", "sql": "SELECT 1"}, "bad_plan"),  # writes missing
        ({"op": "update", "database": "orders", "table": "orders", "set": {"status": "x"}},
         "where_required"),
    ],
)  # fmt: skip
async def test_malformed_plans_get_a_clear_400(sidecar, plan: dict, code: str) -> None:
    status, body = await post(sidecar, "/v1/query", plan)
    assert status == 400, body
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_where_tree_depth_is_limited(sidecar) -> None:
    node: dict = {"col": "id", "op": "=", "value": 1}
    for _ in range(40):
        node = {"not": node}
    status, body = await post(
        sidecar,
        "/v1/query",
        {"op": "count", "database": "orders", "table": "orders", "where": node},
    )
    assert status == 400 and body["error"]["code"] == "plan_too_complex"


async def test_body_size_is_limited(sidecar) -> None:
    rows = [{"user_id": 1, "status": "x" * 1000}] * 9000  # about 9 MB, over the 8 MiB default
    status, body = await post(
        sidecar,
        "/v1/query",
        {"op": "insert", "database": "orders", "table": "orders", "rows": rows},
    )
    assert status == 413 and body["error"]["code"] == "body_too_large"


async def test_unknown_database_is_404(sidecar) -> None:
    status, body = await post(
        sidecar, "/v1/query", {"op": "count", "database": "nope", "table": "orders"}
    )
    assert status == 404 and body["error"]["code"] == "unknown_database"


async def test_unknown_table_and_column_errors_carry_sqlstate() -> None:
    with pytest.raises(Exception) as err:
        await ActiveRecord.execute_raw("SELECT nope FROM orders", writes=False)
    assert err.value.sqlstate == "42703" and err.value.status == 400


async def test_bad_value_for_column_is_422(sidecar) -> None:
    status, body = await post(
        sidecar, "/v1/query",
        {"op": "count", "database": "orders", "table": "orders",
         "where": {"col": "user_id", "op": "=", "value": "not a number"}},
    )  # fmt: skip
    assert status == 422, body
    assert body["error"]["code"] in ("bad_value", "data_exception"), body


async def test_openapi_document_describes_the_data_api(sidecar) -> None:
    async with aiohttp.ClientSession() as http, http.get(sidecar.url + "/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/query", "/v1/batch", "/v1/topology"} <= set(doc["paths"])
    assert "Select" in doc["components"]["schemas"] and "Result" in doc["components"]["schemas"]
