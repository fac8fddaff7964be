"""Interactive transactions through /v1/tx: commit, rollback, isolation, shards, idle timeout."""

from __future__ import annotations

import pytest

from client import ConnectionManager, DbSidecarError, PlanError
from wire.protocol import Raw

from .conftest import sidecar_config
from .harness import SidecarProcess, eventually
from .models import Order, User

pytestmark = pytest.mark.usefixtures("handles")


async def test_commit_makes_all_writes_visible_at_once(primary) -> None:
    db = ConnectionManager.get("default")
    async with db.transaction() as tx:
        a = await Order(user_id=900, status="t1").save(using=tx)
        b = await Order(user_id=900, status="t2").save(using=tx)
        # Not visible outside the transaction yet.
        assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 900") == 0
        inside = await Order.find().using(tx).where(Order.user_id == 900).count()
        assert inside == 2
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 900") == 2
    assert a.id != b.id and a.served_by[0].role == "primary"
    assert db.token is not None
    await a.delete()  # records outlive the transaction and go back to the handle


async def test_an_exception_rolls_everything_back(primary) -> None:
    db = ConnectionManager.get("default")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await Order(user_id=901, status="gone").save(using=tx)
            raise RuntimeError("abort")
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = 901") == 0


async def test_records_read_in_a_transaction_write_in_it_while_it_is_open(primary) -> None:
    """``order.update()`` on a record read through ``tx`` is part of ``tx``: a rollback
    takes it back. Once the transaction is over, the record writes through its database."""
    db = ConnectionManager.get("default")
    order = await Order(user_id=902, status="new").save()
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            inside = await Order.find_by_id(order.id).using(tx).one()
            await inside.update(status="paid")
            seen = "SELECT status FROM orders WHERE id = $1"
            assert await primary.fetchval(seen, order.id) == "new"  # not committed yet
            raise RuntimeError("abort")
    assert await primary.fetchval("SELECT status FROM orders WHERE id = $1", order.id) == "new"
    await inside.update(status="shipped")  # the transaction is over: through the handle
    assert await primary.fetchval("SELECT status FROM orders WHERE id = $1", order.id) == "shipped"
    await order.delete()


async def test_a_transaction_on_a_sharded_database_stays_on_one_shard() -> None:
    db = ConnectionManager.get("users")
    async with db.transaction() as tx:
        await User(id=1001, name="t").save(using=tx)
        await User.find().using(tx).where(User.name == "t").update(score=1)  # stays on shard 1
        with pytest.raises(PlanError) as err:
            await User(id=1002, name="other shard").save(using=tx)
        assert err.value.code == "cross_shard_transaction"
        await tx.rollback()
    assert await User.find().where(User.id == 1001).first() is None


async def test_finished_or_unknown_transactions_are_refused() -> None:
    db = ConnectionManager.get("default")
    async with db.transaction() as tx:
        tx_id = tx.id
    tx.id = tx_id
    with pytest.raises(DbSidecarError) as err:
        await tx.run(Raw(database="orders", sql="SELECT 1", writes=False))
    assert err.value.code == "unknown_transaction"


async def test_idle_transactions_are_rolled_back(topology, workdir, primary) -> None:
    config = sidecar_config(topology, workdir, "idle")
    config["transactions"] = {"idle_timeout": 0.3}
    proc = SidecarProcess(config, workdir, "idle")
    proc.start()
    try:
        ConnectionManager.configure({"idle": {"sidecar": proc.url, "database": "orders"}})
        tx = ConnectionManager.get("idle").transaction()
        await tx.__aenter__()
        await tx.run(Raw(database="orders", sql="INSERT INTO kv VALUES ('idle', '1')", writes=True))

        async def released() -> bool:
            return (
                await primary.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                    " AND application_name = 'dbsidecar'"
                )
                == 0
            )

        await eventually(released, 10, "the idle transaction to be rolled back")
        with pytest.raises(DbSidecarError) as err:
            await tx.commit()
        assert err.value.code == "unknown_transaction"
        assert await primary.fetchval("SELECT count(*) FROM kv WHERE k = 'idle'") == 0
    finally:
        proc.terminate()
