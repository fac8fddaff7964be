"""Subscriptions through the session sidecar: catching up from a stored checkpoint,
following new events, and a handler's writes committed exactly once with the checkpoint
(on one database and on the shards of `users`), even when the handler fails mid-page."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import pytest

from client import ConnectionManager
from client.eventstore import EventData, EventStore, RecordedEvent
from client.subscription import Subscription
from client.transactions import Transaction
from devstack.topology import USER_SHARDS
from wire.protocol import ALL_SHARDS, Raw, Route
from wire.values import encode_value

from .conftest import server_dsn, shard_server
from .harness import eventually

pytestmark = pytest.mark.usefixtures("handles")

EFFECTS = (
    "CREATE TABLE IF NOT EXISTS subscription_effects "
    "(subscription text NOT NULL, event_id uuid NOT NULL, PRIMARY KEY (subscription, event_id))"
)


@pytest.fixture(scope="module")
async def effects() -> None:
    for name in ("default", "users"):
        db = ConnectionManager.get(name)
        everywhere = Route(shard=ALL_SHARDS)
        await db.run(Raw(database=db.database, sql=EFFECTS, writes=True, route=everywhere))


def effect(name: str, event: RecordedEvent, database: str) -> Raw:
    return Raw(
        database=database,
        sql="INSERT INTO subscription_effects (subscription, event_id) VALUES ($1, $2)",
        params=[encode_value(name), encode_value(event.id)],
        writes=True,
        # A raw plan on a sharded database names its shard, even in a transaction.
        route=Route(shard=event.shard or None),
    )


@contextlib.asynccontextmanager
async def running(*subs: Subscription) -> AsyncIterator[None]:
    """The subscriptions run in the background inside the block, and stop at its end."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sub.run(stop)) for sub in subs]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def count_effects(conn: asyncpg.Connection, name: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM subscription_effects WHERE subscription = $1", name
    )


@pytest.mark.usefixtures("effects")
async def test_a_failing_page_commits_nothing_and_runs_again(primary) -> None:
    name, category = f"sub-{uuid.uuid4().hex[:8]}", "s" + uuid.uuid4().hex[:10]
    appended = []
    for i in range(25):
        result = await EventStore.append(f"{category}-{i % 3}", [EventData("E", {"i": i})])
        appended.append(result.positions[0])
    calls: Counter[int] = Counter()
    failed = False

    async def handler(event: RecordedEvent, tx: Transaction | None) -> None:
        nonlocal failed
        assert tx is not None
        calls[event.data["i"]] += 1
        await tx.run(effect(name, event, "orders"))
        if event.data["i"] == 13 and not failed:
            failed = True
            raise RuntimeError("the handler fails once, after writing")

    sub = Subscription(name, handler, category=category, batch=10, max_wait=0.1)
    async with running(sub):
        await eventually(lambda: _is(count_effects(primary, name), 25), 30, "25 effects")
    assert failed and calls[13] == 2 and calls[10] == 2  # the page ran again
    assert calls[0] == 1 and calls[24] == 1
    stored = await primary.fetchval(
        "SELECT position FROM dbsidecar_subscriptions WHERE subscription = $1", name
    )
    assert stored == max(appended)
    # A new run catches up from the stored checkpoint: only new events reach it.
    again: list[int] = []

    async def second(event: RecordedEvent, tx: Transaction | None) -> None:
        assert tx is not None
        again.append(event.data["i"])
        await tx.run(effect(name, event, "orders"))

    sub = Subscription(name, second, category=category, max_wait=0.1)
    async with running(sub):
        for i in range(25, 30):
            await EventStore.append(f"{category}-{i % 3}", [EventData("E", {"i": i})])
        await eventually(lambda: _is(count_effects(primary, name), 30), 30, "5 live effects")
    assert again == list(range(25, 30))


@pytest.mark.usefixtures("effects")
async def test_a_subscription_over_shards_writes_each_effect_once_on_its_shard(topology) -> None:
    name, category = f"sub-{uuid.uuid4().hex[:8]}", "s" + uuid.uuid4().hex[:10]
    ids = set()
    for i in range(24):
        event = EventData("E", {"i": i})
        await EventStore.append(f"{category}-{i}", [event], using="users")
        ids.add(event.id)
    seen: list[RecordedEvent] = []
    loose: list[uuid.UUID] = []

    async def handler(event: RecordedEvent, tx: Transaction | None) -> None:
        assert tx is not None
        seen.append(event)
        await tx.run(effect(name, event, "users"))

    async def at_least_once(event: RecordedEvent, tx: Transaction | None) -> None:
        assert tx is None
        loose.append(event.id)

    subs = [
        Subscription(name, handler, category=category, using="users", batch=5, max_wait=0.1),
        Subscription(name + "-loose", at_least_once, category=category, using="users",
                     transactional=False, max_wait=0.1),
    ]  # fmt: skip
    async with running(*subs):
        await eventually(lambda: _true(len(seen) >= 24 and len(loose) >= 24), 30, "all events")
    assert {e.id for e in seen} == ids == set(loose) and len(seen) == 24
    for i, shard in enumerate(USER_SHARDS):
        conn = await asyncpg.connect(server_dsn(topology, shard_server(topology, i), shard))
        try:
            rows = await conn.fetch(
                "SELECT event_id FROM subscription_effects WHERE subscription = $1", name
            )
            stored = {r["event_id"] for r in rows}
            checkpoint = await conn.fetchval(
                "SELECT position FROM dbsidecar_subscriptions WHERE subscription = $1", name
            )
        finally:
            await conn.close()
        here = [e for e in seen if e.shard == shard]
        assert stored == {e.id for e in here}  # each effect on its event's shard
        assert checkpoint == (max(e.position for e in here) if here else None)


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


async def _true(value: bool) -> bool:
    return value
