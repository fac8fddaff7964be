"""The design's OrderSaga, for the saga tests and their worker process (tests/saga_worker.py).

reserve stock (inventory) -> create the order (orders) -> charge it (payments) -> complete
it (orders). No effect is idempotent on its own (stock is decremented, a payment row is
inserted each time): only the saga's ledger keeps a rerun from applying one twice, so the
tests' totals catch any double application.

The saga's data: ``order_id``, ``sku``, ``qty``, ``amount`` (a string), and optionally
``limit`` (a charge above it is declined) and ``fail_complete`` (the last step fails).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from client import (
    ActiveRecord,
    DecimalField,
    IntegerField,
    PrimaryKeyField,
    StringField,
    TextField,
)
from client.saga import Saga, Step
from client.transactions import Transaction
from wire.protocol import Raw

TABLES = {
    "inventory": "CREATE TABLE IF NOT EXISTS saga_test_stock"
    " (sku text PRIMARY KEY, qty integer NOT NULL CHECK (qty >= 0))",
    "orders": "CREATE TABLE IF NOT EXISTS saga_test_orders (id text PRIMARY KEY, sku text NOT NULL,"
    " qty integer NOT NULL, amount numeric(12, 2) NOT NULL, status text NOT NULL)",
    # No unique key on order_id: a second charge of one order would be a second row.
    "payments": "CREATE TABLE IF NOT EXISTS saga_test_payments (id bigserial PRIMARY KEY,"
    " order_id text NOT NULL, amount numeric(12, 2) NOT NULL, kind text NOT NULL)",
}


class PaymentDeclined(Exception):
    pass


class SagaOrder(ActiveRecord):
    __tablename__ = "saga_test_orders"
    __database__ = "orders"
    id = TextField(primary_key=True)
    sku = TextField()
    qty = IntegerField()
    amount = DecimalField()
    status = StringField()


class Payment(ActiveRecord):
    __tablename__ = "saga_test_payments"
    __database__ = "payments"
    id = PrimaryKeyField()
    order_id = TextField()
    amount = DecimalField()
    kind = StringField()


async def _stock(tx: Transaction, sku: str, delta: int) -> int:
    result = await tx.run(
        Raw(
            database=tx.database,
            sql="UPDATE saga_test_stock SET qty = qty + $2 WHERE sku = $1 AND qty + $2 >= 0"
            " RETURNING qty",
            params=[sku, delta],
            writes=True,
        )
    )
    if not result.rows:
        raise RuntimeError(f"out of stock: {sku}")
    return int(result.rows[0][0])


async def reserve(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    return {"stock_left": await _stock(tx, data["sku"], -data["qty"])}


async def release(tx: Transaction, data: dict[str, Any]) -> None:
    await _stock(tx, data["sku"], data["qty"])


async def create_order(tx: Transaction, data: dict[str, Any]) -> None:
    order = SagaOrder(
        id=data["order_id"],
        sku=data["sku"],
        qty=data["qty"],
        amount=Decimal(data["amount"]),
        status="pending",
    )
    await order.save(using=tx)


async def fail_order(tx: Transaction, data: dict[str, Any]) -> None:
    order = await SagaOrder.find_by_id(data["order_id"]).using(tx).one()
    await order.update(status="failed")


async def charge(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    amount = Decimal(data["amount"])
    if amount > Decimal(data.get("limit", "1000")):
        raise PaymentDeclined(f"{amount} is over the card's limit")
    payment = await Payment(order_id=data["order_id"], amount=amount, kind="charge").save(using=tx)
    return {"payment_id": payment.id}


async def refund(tx: Transaction, data: dict[str, Any]) -> None:
    await Payment(order_id=data["order_id"], amount=Decimal(data["amount"]), kind="refund").save(
        using=tx
    )


async def complete(tx: Transaction, data: dict[str, Any]) -> None:
    if data.get("fail_complete"):
        raise RuntimeError("the fraud check refused the order")
    order = await SagaOrder.find_by_id(data["order_id"]).using(tx).one()
    await order.update(status="completed")


def order_saga(timeout: float | None = None, step_timeout: float = 10.0) -> Saga:
    return Saga(
        "order",
        [
            Step("reserve", reserve, release, database="inventory", timeout=step_timeout),
            Step("create_order", create_order, fail_order, database="orders", timeout=step_timeout),
            Step("charge", charge, refund, database="payments", timeout=step_timeout),
            Step("complete", complete, database="orders", timeout=step_timeout),
        ],
        timeout=timeout,
    )
