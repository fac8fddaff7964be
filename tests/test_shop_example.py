"""The e-commerce example (examples/shop) end to end: its three services run as real
processes against the session's sidecar, migrate their databases when they start, and
take orders through the order saga. Truth is read from PostgreSQL directly: stock,
orders, payments and the saga log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
import pytest

from devstack.topology import USER_SHARDS

from .conftest import server_dsn, shard_server
from .harness import eventually
from .nats_server import NatsServer
from .relay_process import Relay
from .shop_services import ServiceProcess, call

pytestmark = pytest.mark.slow
# The restarted orders service takes a crashed one's sagas over when its lease runs out.
LEASE = 3.0
MIGRATIONS = Path(__file__).resolve().parents[1] / "examples" / "shop" / "migrations"


@pytest.fixture(scope="module")
def shop(sidecar, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    workdir = tmp_path_factory.mktemp("shop")
    env = {"SHOP_SAGA_LEASE": str(LEASE)}
    services = {
        name: ServiceProcess(name, sidecar.url, workdir, env)
        for name in ("users", "catalog", "orders")
    }
    try:
        for service in services.values():
            service.start()
        yield services
    finally:
        for service in services.values():
            service.stop()


@pytest.fixture
async def db(topology) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """Direct connections to the shop's databases, for the truth."""
    conns = {
        name: await asyncpg.connect(server_dsn(topology, topology.primary, name))
        for name in ("inventory", "orders", "payments")
    }
    yield conns
    for conn in conns.values():
        await conn.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def new_user(http: aiohttp.ClientSession, shop: dict[str, ServiceProcess]) -> int:
    status, user = await call(http, "POST", shop["users"].url + "/users",
                              {"name": "Ada", "email": "ada@example.com"})  # fmt: skip
    assert status == 201, user
    return user["id"]


async def new_product(
    http: aiohttp.ClientSession, shop: dict[str, ServiceProcess], price: str, stock: int
) -> int:
    sku = f"SKU-{id(object())}-{price}-{stock}"
    product_doc = {"sku": sku, "name": "thing", "price": price, "stock": stock}
    status, product = await call(http, "POST", shop["catalog"].url + "/products", product_doc)
    assert status == 201, product
    return product["id"]


def order_of(user_id: int, card: str, *items: tuple[int, int]) -> dict[str, Any]:
    """The body of POST /orders: ``items`` are (product id, quantity)."""
    lines = [{"product_id": p, "quantity": q} for p, q in items]
    return {"user_id": user_id, "card": card, "items": lines}


async def events_of(db: dict[str, asyncpg.Connection], order_id: int) -> list[str]:
    """The order's event stream, as the event store holds it."""
    rows = await db["orders"].fetch(
        "SELECT type FROM dbsidecar_events WHERE stream = $1 ORDER BY version", f"order-{order_id}"
    )
    return [r["type"] for r in rows]


async def stock(db: dict[str, asyncpg.Connection], product_id: int) -> int:
    return await db["inventory"].fetchval(
        "SELECT stock FROM shop_products WHERE id = $1", product_id
    )


async def test_every_service_migrated_its_databases(shop, topology) -> None:
    targets = [(topology.primary, name) for name in ("inventory", "orders", "payments")]
    targets += [(shard_server(topology, i), name) for i, name in enumerate(USER_SHARDS)]
    for server, name in targets:
        folder = "users" if name in USER_SHARDS else name
        expected = sorted(int(p.name.split("_")[0]) for p in (MIGRATIONS / folder).glob("*.sql"))
        conn = await asyncpg.connect(server_dsn(topology, server, name))
        try:
            applied = await conn.fetch(
                "SELECT version FROM dbsidecar_schema_migrations WHERE state = 'applied'"
            )
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'shop_%'"
            )
        finally:
            await conn.close()
        assert expected and set(expected) <= {r[0] for r in applied}, (name, applied)
        assert tables >= 1, name


async def test_an_order_completes_and_composes_with_its_user(shop, db, http) -> None:
    user_id = await new_user(http, shop)
    p1 = await new_product(http, shop, "2.50", 10)
    p2 = await new_product(http, shop, "10.00", 5)
    body = order_of(user_id, "visa", (p1, 2), (p2, 1))
    status, placed = await call(http, "POST", shop["orders"].url + "/orders", body)
    assert status == 201 and placed["state"] == "completed", placed
    order_id = placed["order_id"]
    assert (await stock(db, p1), await stock(db, p2)) == (8, 4)
    order = await db["orders"].fetchrow("SELECT * FROM shop_orders WHERE id = $1", order_id)
    assert order["status"] == "paid" and order["total"] == Decimal("15.00")
    payments = await db["payments"].fetch(
        "SELECT amount, status FROM shop_payments WHERE order_id = $1", order_id
    )
    assert [(p["amount"], p["status"]) for p in payments] == [(Decimal("15.00"), "charged")]
    assert await events_of(db, order_id) == ["OrderPaid"]
    # API composition: the user (its shard) with its orders (another database).
    status, composed = await call(http, "GET", f"{shop['users'].url}/users/{user_id}")
    assert status == 200 and composed["name"] == "Ada"
    assert [o["id"] for o in composed["orders"]] == [order_id]
    status, detail = await call(http, "GET", f"{shop['orders'].url}/orders/{order_id}")
    assert status == 200 and len(detail["items"]) == 2 and len(detail["payments"]) == 1


async def test_a_declined_payment_restores_stock_and_fails_the_order(shop, db, http) -> None:
    user_id = await new_user(http, shop)
    product = await new_product(http, shop, "7.00", 3)
    body = order_of(user_id, "declined", (product, 2))
    status, placed = await call(http, "POST", shop["orders"].url + "/orders", body)
    assert status == 409 and placed["state"] == "compensated", placed
    assert "declined" in placed["error"]
    assert await stock(db, product) == 3
    order = await db["orders"].fetchrow(
        "SELECT status FROM shop_orders WHERE id = $1", placed["order_id"]
    )
    assert order["status"] == "failed"
    assert await events_of(db, placed["order_id"]) == ["OrderFailed"]
    assert (
        await db["payments"].fetchval(
            "SELECT count(*) FROM shop_payments WHERE order_id = $1", placed["order_id"]
        )
        == 0
    )


async def test_not_enough_stock_creates_nothing(shop, db, http) -> None:
    user_id = await new_user(http, shop)
    product = await new_product(http, shop, "1.00", 1)
    body = order_of(user_id, "visa", (product, 2))
    status, placed = await call(http, "POST", shop["orders"].url + "/orders", body)
    assert status == 409 and placed["state"] == "compensated" and placed["order_id"] is None
    assert await stock(db, product) == 1
    assert (
        await db["orders"].fetchval("SELECT count(*) FROM shop_orders WHERE user_id = $1", user_id)
        == 0
    )


async def test_bad_orders_are_refused_with_a_4xx(shop, http) -> None:
    url = shop["orders"].url + "/orders"
    for body in ({}, order_of(1, "visa"), {**order_of(1, "visa", (1, 1)), "user_id": "x"}):
        status, answer = await call(http, "POST", url, body)
        assert status == 400, (body, answer)


async def test_a_crash_mid_saga_is_resumed_and_charges_once(shop, db, http) -> None:
    user_id = await new_user(http, shop)
    product = await new_product(http, shop, "4.00", 6)
    # Hold the payments table: the charge step blocks inside its transaction.
    blocker = db["payments"]
    held = blocker.transaction()
    await held.start()
    await blocker.execute("LOCK TABLE shop_payments IN ACCESS EXCLUSIVE MODE")
    body = order_of(user_id, "visa", (product, 3))
    placing = asyncio.ensure_future(call(http, "POST", shop["orders"].url + "/orders", body))
    saga_id = None

    async def charging() -> bool:
        nonlocal saga_id
        saga_id = await db["orders"].fetchval(
            "SELECT id FROM dbsidecar_sagas WHERE (data->>'user_id')::bigint = $1"
            " AND pending = 'action/2'",
            user_id,
        )
        return saga_id is not None

    try:
        await eventually(charging, 30, "the saga to reach its charge step")
        shop["orders"].kill()  # kill -9, mid-step
        with pytest.raises(aiohttp.ClientError):
            await placing
    finally:
        await held.rollback()
    shop["orders"].start()

    async def finished() -> bool:
        state = await db["orders"].fetchval(
            "SELECT state FROM dbsidecar_sagas WHERE id = $1", saga_id
        )
        return state in ("completed", "compensated")

    await eventually(finished, 60, "the restarted service to finish the saga")
    row = await db["orders"].fetchrow(
        "SELECT state, data FROM dbsidecar_sagas WHERE id = $1", saga_id
    )
    assert row["state"] == "completed", row
    order = await db["orders"].fetchrow(
        "SELECT id, status FROM shop_orders WHERE saga_id = $1", saga_id
    )
    assert order["status"] == "paid"
    payments = await db["payments"].fetch(
        "SELECT amount FROM shop_payments WHERE order_id = $1", order["id"]
    )
    assert [p["amount"] for p in payments] == [Decimal("12.00")]  # charged once
    assert await events_of(db, order["id"]) == ["OrderPaid"]  # one event, one message
    assert await stock(db, product) == 3  # reserved once


async def test_a_paid_order_is_published_to_jetstream_by_the_relay(
    shop, sidecar, db, http, tmp_path: Path
) -> None:
    user_id = await new_user(http, shop)
    product = await new_product(http, shop, "3.00", 2)
    status, placed = await call(
        http, "POST", shop["orders"].url + "/orders", order_of(user_id, "visa", (product, 1))
    )
    assert status == 201, placed
    stream = f"order-{placed['order_id']}"
    # The session's orders outbox may hold other tests' messages too; the relay delivers
    # in order and never skips one the broker refuses, so the stream takes their
    # subjects as well.
    queued = await db["orders"].fetch(
        "SELECT DISTINCT subject FROM dbsidecar_outbox WHERE subject NOT LIKE 'shop.%'"
    )
    broker = NatsServer(tmp_path)
    broker.start()
    relay = None
    try:
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="SHOP", subjects=["shop.>", *(r[0] for r in queued)])
            relay = Relay(sidecar, broker.url, tmp_path, "orders")
            sub = await js.subscribe("shop.orders", ordered_consumer=True)
            # Other tests' paid orders may be in the stream too: find this one's.
            while True:
                msg = await sub.next_msg(timeout=30)
                event = json.loads(msg.data)
                if event["stream"] == stream:
                    break
            assert event["type"] == "OrderPaid" and event["data"]["total"] == "3.00"
            assert msg.headers["Nats-Msg-Id"] == event["id"]
        finally:
            await nc.close()
    finally:
        if relay is not None:
            relay.stop()
        broker.stop()
