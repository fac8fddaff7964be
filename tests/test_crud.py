"""The client's ActiveRecord API against the sidecar and real PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from client import (
    ActiveRecord,
    ConnectionManager,
    Count,
    DatabaseError,
    PlanError,
    RecordNotFound,
    Sum,
    UniqueViolation,
    ValidationError,
)

from .models import Order

pytestmark = pytest.mark.usefixtures("handles")


async def test_save_fills_generated_columns_and_reads_back(primary) -> None:
    order = await Order(user_id=1, status="pending", data={"items": [1, 2]}).save()
    assert order.id is not None and order.persisted
    assert order.created_at.tzinfo is not None
    row = await primary.fetchrow("SELECT user_id, status, data FROM orders WHERE id = $1", order.id)
    assert (row["user_id"], row["status"]) == (1, "pending")
    found = await Order.find_by_id(order.id).one()
    assert found.to_dict() == order.to_dict()
    assert found.data == {"items": [1, 2]}


async def test_update_and_delete(primary) -> None:
    order = await Order(user_id=2, status="new").save()
    await order.update(status="paid", amount=Decimal("10.50"))
    assert await primary.fetchval("SELECT status FROM orders WHERE id=$1", order.id) == "paid"
    assert (await Order.find_by_id(order.id).one()).amount == Decimal("10.50")
    await order.delete()
    assert await Order.find_by_id(order.id).first() is None
    with pytest.raises(RecordNotFound):
        await Order.find_by_id(order.id).one()


async def test_queries_where_order_limit_count_first() -> None:
    user = 1000
    for i, status in enumerate(["new", "paid", "new", "shipped", "paid"]):
        await Order(user_id=user, status=status, amount=Decimal(i)).save()
    rows = (
        await Order.find()
        .where(Order.user_id == user)
        .order_by(Order.amount.desc())
        .limit(2)
        .offset(1)
        .all()
    )
    assert [r.amount for r in rows] == [Decimal(3), Decimal(2)]
    count = (
        await Order.find()
        .where((Order.user_id == user) & ((Order.status == "new") | Order.status.in_(["paid"])))
        .count()
    )
    assert count == 4
    assert await Order.find().where(Order.user_id == user, ~(Order.status == "new")).count() == 3
    assert await Order.find().where(Order.user_id == user, Order.amount.between(1, 3)).count() == 3
    assert await Order.find().where(Order.user_id == user, Order.status.like("p%")).count() == 2
    assert await Order.find().where(Order.user_id == user, Order.status.ilike("P%")).count() == 2
    assert await Order.find().where(Order.user_id == user, Order.data == None).count() == 5  # noqa: E711
    assert (
        await Order.find().where(Order.user_id == user, Order.status.not_in(["new"])).count() == 3
    )
    assert await Order.find().where(Order.user_id == user, Order.amount >= 3).count() == 2
    assert await Order.find().where(Order.user_id == user, Order.amount < 1).count() == 1
    assert await Order.find().where(Order.user_id == user, Order.status != "new").count() == 3
    first = await Order.find().where(Order.user_id == user).order_by("-amount").first()
    assert first is not None and first.amount == Decimal(4)
    assert await Order.find().where(Order.user_id == -1).first() is None
    assert await Order.find().filter(user_id=user, status="paid").exists()


async def test_aggregates_grouped() -> None:
    user = 2000
    for status, amount in [("a", 1), ("a", 2), ("b", 10)]:
        await Order(user_id=user, status=status, amount=Decimal(amount)).save()
    rows = (
        await Order.find()
        .where(Order.user_id == user)
        .group_by(Order.status)
        .order_by("status")
        .aggregate(n=Count(), total=Sum(Order.amount))
    )
    assert [(r["status"], r["n"], r["total"]) for r in rows] == [
        ("a", 2, Decimal(3)),
        ("b", 1, Decimal(10)),
    ]


async def test_bulk_update_and_delete_by_query() -> None:
    user = 3000
    for _ in range(3):
        await Order(user_id=user, status="new").save()
    assert await Order.find().where(Order.user_id == user).update(status="void") == 3
    assert await Order.find().where(Order.user_id == user, Order.status == "void").count() == 3
    assert await Order.find().where(Order.user_id == user).delete() == 3


async def test_update_or_delete_without_where_is_refused() -> None:
    with pytest.raises(PlanError) as err:
        await Order.find().delete()
    assert err.value.code == "where_required"


async def test_insert_many_and_execute_raw(primary) -> None:
    records = await Order.insert_many([Order(user_id=4000, status=s) for s in "xyz"])
    assert all(r.id for r in records) and [r.status for r in records] == list("xyz")
    rows = await ActiveRecord.execute_raw("SELECT 1 AS one")
    assert rows == [{"one": 1}]
    rows = await ActiveRecord.execute_raw(
        "SELECT count(*) AS n FROM orders WHERE user_id = $1", 4000, writes=False
    )
    assert rows[0]["n"] == 3
    await ActiveRecord.execute_raw("UPDATE orders SET status = 'raw' WHERE user_id = $1", 4000)
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE status = 'raw'") == 3


async def test_raw_read_declared_as_read_cannot_write(primary) -> None:
    before = await primary.fetchval("SELECT count(*) FROM orders")
    # Refused by the parser before it runs; a write hidden in a CTE, by READ ONLY.
    with pytest.raises(PlanError) as err:
        await ActiveRecord.execute_raw("DELETE FROM orders", writes=False)
    assert err.value.code == "raw_refused"
    with pytest.raises(DatabaseError) as err:
        await ActiveRecord.execute_raw(
            "WITH gone AS (DELETE FROM orders RETURNING 1) SELECT count(*) FROM gone",
            writes=False,
        )
    assert err.value.code == "read_only_transaction"
    assert await primary.fetchval("SELECT count(*) FROM orders") == before


async def test_unique_violation_maps_to_exception() -> None:
    await ActiveRecord.execute_raw("INSERT INTO kv VALUES ('dup', '1')")
    with pytest.raises(UniqueViolation) as err:
        await ActiveRecord.execute_raw("INSERT INTO kv VALUES ('dup', '2')")
    assert err.value.sqlstate == "23505" and err.value.status == 409


async def test_field_validation_happens_before_sending() -> None:
    with pytest.raises(ValidationError):
        await Order(user_id="one", status="new").save()
    with pytest.raises(ValidationError):
        await Order(user_id=1, status="x" * 21).save()


async def test_using_names_another_database_and_composes_in_gather() -> None:
    # The seed's API composition: two logical databases in one gather.
    orders_db = ConnectionManager.get("default")
    inv, payments = await asyncio.gather(
        ActiveRecord.execute_raw("SELECT current_database() AS db", using="inventory"),
        ActiveRecord.execute_raw("SELECT current_database() AS db", using="payments"),
    )
    assert inv[0]["db"] == "inventory" and payments[0]["db"] == "payments"
    assert (await Order.find().using(orders_db).where(Order.user_id == -5).count()) == 0


async def test_two_hundred_concurrent_queries_are_all_correct() -> None:
    orders = [await Order(user_id=5000 + i, status=f"s{i}").save() for i in range(20)]

    async def check(i: int) -> bool:
        order = orders[i % len(orders)]
        found = await Order.find_by_id(order.id).one()
        return found.status == order.status and found.user_id == order.user_id

    results = await asyncio.gather(*(check(i) for i in range(200)))
    assert all(results) and len(results) == 200
