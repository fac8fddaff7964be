"""The router's decisions on hand-set node states (no database needed): writer choice
through failover and split brain, replica filters, strategies and read-your-writes."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import SidecarError
from sidecar.router import Router
from sidecar.settings import build_settings
from sidecar.topology import Database, build


def database(**options: object) -> Database:
    node = {"host": "h", "database": "orders"}
    settings = build_settings({"databases": {"orders": {
        "primary": {**node, "name": "p"},
        "replicas": [{**node, "name": "r1"}, {**node, "name": "r2"}],
        **options,
    }}})  # fmt: skip
    db = build(settings).databases["orders"]
    primary, r1, r2 = db.shards[0].nodes
    primary.in_recovery, r1.in_recovery, r2.in_recovery = False, True, True
    for replica in (r1, r2):
        replica.lsn, replica.lag_bytes, replica.lag_seconds = 100, 0, 0.0
    return db


def test_writer_follows_promotion_fencing_and_split_brain() -> None:
    db = database()
    router, shard = Router(), db.shards[0]
    primary, r1, _ = shard.nodes
    assert router.writer(db, shard) is primary
    primary.up = False
    with pytest.raises(SidecarError) as err:
        router.writer(db, shard)
    assert err.value.code == "no_primary" and err.value.retryable
    r1.in_recovery = False  # promoted
    assert router.writer(db, shard) is r1
    primary.up, primary.fenced = True, True  # the old primary is back as a primary
    with pytest.raises(SidecarError) as err:
        router.writer(db, shard)
    assert err.value.code == "split_brain"
    assert router.primary_for_read(db, shard) is r1  # reads carry on, on the promoted node
    r1.up = False
    with pytest.raises(SidecarError) as err:
        router.writer(db, shard)  # alone, but fenced: not trusted
    assert err.value.code == "no_primary"
    assert router.decisions[("orders", "refused")] == 3


async def test_replica_filters_and_fallback() -> None:
    db = database(max_replica_lag_bytes=1000, max_replica_lag_seconds=1.0)
    router, shard = Router(), db.shards[0]
    primary, r1, r2 = shard.nodes
    r1.lag_bytes = 5000  # too far behind in bytes
    r2.lag_seconds = 3.0  # too far behind in time
    choice = await router.choose(db, shard, replica=True, after=None)
    assert (choice.node, choice.decision) == (primary, "fallback_primary")
    r2.lag_seconds, r2.up = 0.5, False
    assert (await router.choose(db, shard, replica=True, after=None)).node is primary
    r2.up = True
    assert (await router.choose(db, shard, replica=True, after=None)).node is r2
    refusing = database(fallback_to_primary=False, max_replica_lag_bytes=10)
    for replica in refusing.shards[0].nodes[1:]:
        replica.lag_bytes = 11
    with pytest.raises(SidecarError) as err:
        await Router().choose(refusing, refusing.shards[0], replica=True, after=None)
    assert err.value.code == "no_replica_available"


async def test_strategies() -> None:
    db = database(replica_strategy="least_busy")
    router, shard = Router(), db.shards[0]
    _, r1, r2 = shard.nodes
    r1.busy, r2.busy = 3, 1
    assert {(await router.choose(db, shard, replica=True, after=None)).node for _ in range(4)} == {
        r2
    }
    db = database(replica_strategy="random")
    seen = {(await Router().choose(db, db.shards[0], replica=True, after=None)).node.name
            for _ in range(50)}  # fmt: skip
    assert seen == {"r1", "r2"}


async def test_read_your_writes_waits_for_the_next_position_then_gives_up() -> None:
    db = database(ryw_wait_ms=500)
    router, shard = Router(), db.shards[0]
    r2 = shard.nodes[2]

    def replayed() -> None:
        r2.lsn = 200
        shard.notify_advanced()

    asyncio.get_running_loop().call_later(0.05, replayed)
    choice = await router.choose(db, shard, replica=True, after=150)
    assert (choice.node, choice.decision) == (r2, "replica")
    quick = database(ryw_wait_ms=20)
    choice = await Router().choose(quick, quick.shards[0], replica=True, after=10_000)
    assert (choice.node.name, choice.decision) == ("p", "ryw_primary")
