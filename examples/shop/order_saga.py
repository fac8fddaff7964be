"""The order saga: reserve stock → create the order and its items → charge the payment →
complete the order (and append its ``OrderPaid`` event, published through the outbox).
Each step is a local transaction in its own service's database; a failure undoes the
applied steps in reverse (stock released, order failed, charge refunded). The
orchestrator's log and each database's step ledger make every step happen once, whatever
crashes or retries happen around it (see :mod:`client.saga`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from client import Saga, Step, Transaction

from .models import Order, OrderEvents, OrderItem, Payment, Product


class OutOfStock(Exception):
    pass


class PaymentDeclined(Exception):
    pass


async def reserve_stock(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    prices: dict[str, str] = {}
    for item in data["items"]:
        # One conditional statement: the stock never goes below zero, and two sagas
        # reserving the last unit cannot both succeed.
        rows = await Product.execute_raw(
            "UPDATE shop_products SET stock = stock - $2 WHERE id = $1 AND stock >= $2"
            " RETURNING price",
            item["product_id"], item["quantity"], using=tx,
        )  # fmt: skip
        if not rows:
            raise OutOfStock(f"product {item['product_id']}: not enough stock")
        prices[str(item["product_id"])] = str(rows[0]["price"])
    total = sum(Decimal(prices[str(i["product_id"])]) * i["quantity"] for i in data["items"])
    return {"prices": prices, "total": str(total)}


async def release_stock(tx: Transaction, data: dict[str, Any]) -> None:
    for item in data["items"]:
        await Product.execute_raw(
            "UPDATE shop_products SET stock = stock + $2 WHERE id = $1",
            item["product_id"], item["quantity"], using=tx,
        )  # fmt: skip


async def create_order(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    order = await Order(
        user_id=data["user_id"], status="pending", total=Decimal(data["total"]),
        saga_id=data["saga_id"],
    ).save().using(tx)  # fmt: skip
    items = [
        OrderItem(
            order_id=order.id, product_id=i["product_id"], quantity=i["quantity"],
            price=Decimal(data["prices"][str(i["product_id"])]),
        )
        for i in data["items"]
    ]  # fmt: skip
    await OrderItem.insert_many(items, using=tx)
    return {"order_id": order.id}


async def fail_order(tx: Transaction, data: dict[str, Any]) -> None:
    await Order.find().where(Order.id == data["order_id"]).using(tx).update(status="failed")
    await OrderEvents.append_event(data["order_id"], "OrderFailed", {}, using=tx)


async def charge_payment(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    # The example's payment provider: a card called "declined" is declined.
    if data["card"] == "declined":
        raise PaymentDeclined("the card was declined")
    payment = await Payment(
        order_id=data["order_id"], user_id=data["user_id"], amount=Decimal(data["total"]),
        status="charged",
    ).save().using(tx)  # fmt: skip
    return {"payment_id": payment.id}


async def refund_payment(tx: Transaction, data: dict[str, Any]) -> None:
    await Payment.find().where(Payment.id == data["payment_id"]).using(tx).update(status="refunded")


async def complete_order(tx: Transaction, data: dict[str, Any]) -> None:
    await Order.find().where(Order.id == data["order_id"]).using(tx).update(status="paid")
    # The event and its outbox message commit with the status: published exactly when
    # the order is paid, never for an order whose transaction rolled back.
    paid = {"user_id": data["user_id"], "total": data["total"]}
    await OrderEvents.append_event(data["order_id"], "OrderPaid", paid, using=tx)


ORDER_SAGA = Saga(
    "order",
    [
        Step("reserve_stock", reserve_stock, compensation=release_stock, database="inventory"),
        Step("create_order", create_order, compensation=fail_order, database="orders"),
        Step("charge_payment", charge_payment, compensation=refund_payment, database="payments"),
        Step("complete_order", complete_order, database="orders"),
    ],
    timeout=120,
)
