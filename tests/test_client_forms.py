"""The design's client forms as written: ``await user.save().using(shard)``, the read/write
``ConnectionManager.configure`` form, and connections that close cleanly (explicitly, with
``async with``, or when the event loop that opened them ends). Truth is read from
PostgreSQL directly."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator

import asyncpg
import pytest

from client import ConnectionManager, PlanError
from devstack.topology import USER_SHARDS

from .conftest import server_dsn, shard_server
from .harness import eventually
from .models import Order, User

pytestmark = pytest.mark.usefixtures("handles")


@pytest.fixture
async def shard2(topology) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(server_dsn(topology, shard_server(topology, 2), USER_SHARDS[2]))
    yield conn
    await conn.close()


async def test_save_using_a_shard_writes_there_and_the_record_stays_there(shard2) -> None:
    user = User(id=4_000_002, name="sharded")  # 4_000_002 % 4 == 2
    saved = await user.save().using("user_shard_2")
    assert saved is user and user.served_by[0].shard == "user_shard_2"
    assert await shard2.fetchval("SELECT name FROM users WHERE id = $1", user.id) == "sharded"
    await user.update(name="renamed")  # written back through the shard it was saved to
    assert await shard2.fetchval("SELECT name FROM users WHERE id = $1", user.id) == "renamed"
    await user.delete().using("user_shard_2")
    assert await shard2.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id) == 0


async def test_save_using_a_shard_its_key_does_not_belong_to_is_refused(shard2) -> None:
    user = User(id=4_000_005, name="misplaced")  # belongs on user_shard_1
    with pytest.raises(PlanError):
        await user.save().using("user_shard_2")
    assert await shard2.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id) == 0
    assert not user.persisted


async def test_save_using_a_handle_or_a_transaction(primary) -> None:
    order = await Order(user_id=7001, status="new").save().using(ConnectionManager.get())
    assert await primary.fetchval("SELECT status FROM orders WHERE id = $1", order.id) == "new"
    with pytest.raises(RuntimeError, match="boom"):
        async with ConnectionManager.get().transaction() as tx:
            await Order(user_id=7001, status="in-tx").save().using(tx)
            raise RuntimeError("boom")
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE status = 'in-tx'") == 0
    # The keyword form is the same write.
    other = await Order(user_id=7001, status="kw").save(using="default")
    assert await primary.fetchval("SELECT status FROM orders WHERE id = $1", other.id) == "kw"


async def test_a_pending_save_is_a_coroutine_for_tasks_and_gather(primary) -> None:
    task = asyncio.create_task(Order(user_id=7002, status="task").save())
    gathered = await asyncio.gather(*(Order(user_id=7002, status="g").save() for _ in range(3)))
    done = await task
    assert done.id is not None and len({o.id for o in gathered}) == 3
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 7002") == 4


async def test_using_after_the_write_started_is_refused() -> None:
    pending = Order(user_id=7003, status="x").save()
    task = asyncio.ensure_future(pending)
    await asyncio.sleep(0)  # the task has sent the write
    with pytest.raises(RuntimeError, match="using\\(\\) comes before await"):
        pending.using("default")
    await task


async def test_a_save_never_awaited_warns_and_writes_nothing(primary) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Order(user_id=7004, status="forgotten").save()
        gc.collect()
    assert any("was never awaited" in str(w.message) for w in caught), caught
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 7004") == 0


async def test_the_read_write_form_points_at_the_sidecar(sidecar, primary) -> None:
    # As the design writes it: the handle's name is the logical database.
    ConnectionManager.configure({"orders": {"write": sidecar.url, "read": [sidecar.url + "/"]}})
    db = ConnectionManager.get("orders")
    try:
        assert db.database == "orders"
        order = await Order(user_id=7005, status="rw").save().using("orders")
        assert order.served_by[0].role == "primary"
        query = Order.find_by_id(order.id).using("orders").using_read_replica()

        async def from_a_replica() -> bool:
            # Read-your-writes keeps the read on the primary until the replica replayed it.
            found = await query.one()
            return found.status == "rw" and found.served_by[0].role == "replica"

        await eventually(from_a_replica, 10, "the read to be served by a replica")
        assert await primary.fetchval("SELECT status FROM orders WHERE id = $1", order.id) == "rw"
    finally:
        await db.close()


async def test_the_read_write_form_never_takes_or_echoes_a_database_url() -> None:
    dsn = "postgresql://app:s3cr3t-pw@db.internal:5432/orders"
    for entry in ({"write": dsn}, {"write": "http://127.0.0.1:7432", "read": [dsn]}):
        with pytest.raises(ValueError) as caught:
            ConnectionManager.configure({"orders": entry})
        assert "s3cr3t-pw" not in str(caught.value) and "sidecar's configuration" in str(
            caught.value
        )
    with pytest.raises(ValueError, match="same sidecar"):
        ConnectionManager.configure(
            {"orders": {"write": "http://127.0.0.1:7432", "read": ["http://127.0.0.1:7433"]}}
        )
    with pytest.raises(ValueError, match="not both"):
        ConnectionManager.configure(
            {"orders": {"write": "http://127.0.0.1:7432", "sidecar": "http://127.0.0.1:7432"}}
        )


CLOSING = """
import asyncio, sys
from client import ConnectionManager
from wire.protocol import Raw

ConnectionManager.configure({{"default": {{"sidecar": {url!r}, "database": "orders",
                                          "transport": {transport!r}}}}})

async def main():
    db = ConnectionManager.get()
    {body}

asyncio.run(main())
print("done")
"""

BODIES = {
    # Forgotten: the connections close when asyncio.run's loop ends.
    "forgotten": 'await db.run(Raw(database="orders", sql="SELECT 1", writes=False))',
    "explicit": 'await db.run(Raw(database="orders", sql="SELECT 1", writes=False)); '
    "await ConnectionManager.close_all()",
    "async-with": "async with db:\n"
    '        await db.run(Raw(database="orders", sql="SELECT 1", writes=False))',
}


@pytest.mark.parametrize("transport", ["channel", "http"])
@pytest.mark.parametrize("how", sorted(BODIES))
def test_connections_close_without_a_warning_at_exit(sidecar, how: str, transport: str) -> None:
    script = textwrap.dedent(CLOSING).format(url=sidecar.url, transport=transport, body=BODIES[how])
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert result.stderr == ""  # no "Unclosed client session", no ResourceWarning
