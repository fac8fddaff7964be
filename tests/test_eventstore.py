"""The event store through the session sidecar: expected versions under contention,
idempotent retries, gap-safe category and all-stream reads, and streams on shards.

Every test uses streams of its own (a fresh category), so tests never see each other's
events except through readers of every stream, which start from the head they find.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import pytest

from client import ConnectionManager, UniqueViolation
from client.errors import WrongExpectedVersion
from client.eventstore import Checkpoint, EventData, EventStore
from devstack.topology import USER_SHARDS

from .conftest import server_dsn, shard_server
from .harness import eventually

pytestmark = pytest.mark.usefixtures("handles")


def category() -> str:
    return "t" + uuid.uuid4().hex[:12]


async def head(using: str) -> Checkpoint:
    """The checkpoint after every event stored so far (a reader of every stream)."""
    checkpoint = Checkpoint()
    while True:
        page = await EventStore.read_category(None, checkpoint, 1000, using=using)
        if not page.events:
            return checkpoint
        checkpoint = page.checkpoint


async def test_appends_read_back_in_version_order(primary) -> None:
    class Orders(EventStore):
        __category__ = category()

    first = await Orders.append_event(
        42, "OrderPlaced", {"sku": "A-1"}, expected_version="no_stream"
    )
    second = await Orders.append_event(42, "OrderPaid", {"amount": 10}, expected_version=0)
    third = await Orders.append_event(42, "OrderShipped", None, metadata={"by": "test"})
    assert (first.version, second.version, third.version) == (0, 1, 2)
    assert first.position < second.position < third.position
    events = await Orders.get_events_for_aggregate(42)
    assert [(e.version, e.type, e.data) for e in events] == [
        (0, "OrderPlaced", {"sku": "A-1"}),
        (1, "OrderPaid", {"amount": 10}),
        (2, "OrderShipped", None),
    ]
    assert events[2].metadata == {"by": "test"} and events[0].id == first.id
    assert events[0] == first  # append_event answers the event as stored
    assert await Orders.get_events_for_aggregate(42, from_version=2) == events[2:]
    stored = await primary.fetch(
        "SELECT version FROM dbsidecar_events WHERE stream = $1 ORDER BY version",
        Orders.stream_of(42),
    )
    assert [r["version"] for r in stored] == [0, 1, 2]


async def test_wrong_expected_version_carries_the_actual_version() -> None:
    stream = f"{category()}-1"
    for expected in (0, "stream_exists"):
        with pytest.raises(WrongExpectedVersion) as refused:
            await EventStore.append(stream, [EventData("E")], expected_version=expected)
        assert refused.value.actual_version == -1 and refused.value.status == 409
        assert refused.value.code == "wrong_expected_version"
    await EventStore.append(stream, [EventData("E"), EventData("E")], expected_version=-1)
    for expected in ("no_stream", 0, 5):
        with pytest.raises(WrongExpectedVersion) as refused:
            await EventStore.append(stream, [EventData("E")], expected_version=expected)
        assert refused.value.actual_version == 1
    done = await EventStore.append(stream, [EventData("E")], expected_version="stream_exists")
    assert done.version == 2


async def test_32_concurrent_writers_never_share_a_version(primary) -> None:
    """32 writers append 3 events each to one stream, each expecting the version it last
    saw: every refusal is WrongExpectedVersion, no version is taken twice, and every
    acknowledged event is stored at the version it was acknowledged with."""
    stream = f"{category()}-contended"
    won: dict[uuid.UUID, int] = {}
    lost: list[uuid.UUID] = []

    async def writer() -> None:
        seen = -1
        for _ in range(3):
            while True:
                event = EventData("Tick", {"n": len(won)})
                try:
                    result = await EventStore.append(stream, [event], expected_version=seen)
                except WrongExpectedVersion as exc:
                    assert exc.actual_version is not None and exc.actual_version > seen
                    lost.append(event.id)
                    seen = exc.actual_version
                    continue
                won[event.id] = result.version
                seen = result.version
                break

    await asyncio.gather(*(writer() for _ in range(32)))
    rows = await primary.fetch(
        "SELECT event_id, version FROM dbsidecar_events WHERE stream = $1", stream
    )
    stored = {r["event_id"]: r["version"] for r in rows}
    assert stored == won  # every winner there at its version, no loser's event at all
    assert sorted(stored.values()) == list(range(96))
    assert lost and not set(lost) & set(stored)


async def test_a_retried_append_answers_the_same_and_stores_nothing_twice(primary) -> None:
    stream = f"{category()}-7"
    events = [EventData("A", {"i": 1}), EventData("B", {"i": 2})]
    first = await EventStore.append(stream, events, expected_version="no_stream")
    # The same ids again, as a client does when the first answer was lost: the same
    # answer, even though "no_stream" is no longer true.
    again = await EventStore.append(stream, events, expected_version="no_stream")
    assert again == first and first.versions == [0, 1]
    count = "SELECT count(*) FROM dbsidecar_events WHERE stream = $1"
    assert await primary.fetchval(count, stream) == 2
    # Some of the ids, or the ids in another stream: a conflict, nothing appended.
    with pytest.raises(UniqueViolation):
        await EventStore.append(stream, [events[0], EventData("C")])
    with pytest.raises(UniqueViolation):
        await EventStore.append(f"{category()}-8", events)
    assert await primary.fetchval(count, stream) == 2


async def _waiting_on_advisory_lock(primary: asyncpg.Connection) -> bool:
    return bool(
        await primary.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    )


async def test_no_reader_skips_an_event_that_commits_after_later_positions(primary) -> None:
    """A transaction holds an appended event (a low position) open while appends to
    another category commit higher positions. The table then has a gap a naive reader
    would step over; the category reader of the other category is not held up, and a
    reader of every stream answers nothing past the gap until it closes, then all of it.
    An appender to the held event's own category waits for it and comes after it."""
    held_cat, other_cat = category(), category()
    start = await head("default")
    db = ConnectionManager.get("default")
    async with db.transaction() as tx:
        held = await EventStore.append(f"{held_cat}-1", [EventData("Held")], using=tx)
        later = [
            (await EventStore.append(f"{other_cat}-{i}", [EventData("Later")])) for i in range(3)
        ]
        low = held.positions[0]
        assert all(r.positions[0] > low for r in later)
        # The gap is real: committed positions above one that is not visible yet.
        visible = await primary.fetch(
            "SELECT position FROM dbsidecar_events WHERE position >= $1", low
        )
        assert low not in {r["position"] for r in visible} and len(visible) >= 3
        # The other category's reader sees its own events at once.
        page = await EventStore.read_category(other_cat)
        assert [e.type for e in page.events] == ["Later"] * 3
        # A reader of every stream steps over nothing: no event past the open one.
        page = await EventStore.read_category(None, start, 1000)
        assert all(e.position < low for e in page.events)
        # An appender to the held category waits behind the open transaction.
        same = asyncio.ensure_future(EventStore.append(f"{held_cat}-2", [EventData("After")]))
        await eventually(
            lambda: _waiting_on_advisory_lock(primary), 10, "the appender to wait on its lock"
        )
        assert not same.done()
    after = await same
    assert after.positions[0] > max(r.positions[0] for r in later)
    seen: list[int] = []
    checkpoint = start
    while True:
        page = await EventStore.read_category(None, checkpoint, 2)
        if not page.events:
            break
        seen += [e.position for e in page.events]
        checkpoint = page.checkpoint
    mine = {low, after.positions[0], *(r.positions[0] for r in later)}
    assert mine <= set(seen) and seen == sorted(seen) and len(seen) == len(set(seen))
    page = await EventStore.read_category(held_cat)
    assert [e.type for e in page.events] == ["Held", "After"]


async def test_streams_spread_over_shards_and_every_reader_sees_each_event_once(
    topology,
) -> None:
    """40 streams on the sharded `users` database land on all four shards (each stream on
    one); a reader of every stream, in pages of 7 with its vector checkpoint, sees every
    event once; three consumer-group members of the category split it without overlap."""
    cat = category()
    start = await head("users")
    appended: set[uuid.UUID] = set()
    told: dict[str, str] = {}
    for i in range(40):
        events = [EventData("E", {"stream": i, "n": n}) for n in range(2)]
        result = await EventStore.append(f"{cat}-{i}", events, using="users")
        appended |= {e.id for e in events}
        told[result.stream] = result.shard
    per_shard = {}
    for i, name in enumerate(USER_SHARDS):
        conn = await asyncpg.connect(server_dsn(topology, shard_server(topology, i), name))
        try:
            per_shard[name] = await conn.fetch(
                "SELECT stream, event_id FROM dbsidecar_events WHERE category = $1", cat
            )
        finally:
            await conn.close()
    assert all(per_shard.values()), {k: len(v) for k, v in per_shard.items()}
    homes = Counter(r["stream"] for rows in per_shard.values() for r in rows)
    assert len(homes) == 40 and set(homes.values()) == {2}  # a stream is on one shard
    assert told == {r["stream"]: shard for shard, rows in per_shard.items() for r in rows}
    seen: Counter[uuid.UUID] = Counter()
    checkpoint = start
    while True:
        page = await EventStore.read_category(None, checkpoint, 7, using="users")
        if not page.events:
            break
        seen.update(e.id for e in page.events)
        checkpoint = page.checkpoint
    assert set(checkpoint.positions) == set(USER_SHARDS)
    assert {i: n for i, n in seen.items() if i in appended} == dict.fromkeys(appended, 1)
    assert max(seen.values()) == 1
    members: list[set[uuid.UUID]] = []
    for member in range(3):
        page = await EventStore.read_category(
            cat, None, 1000, member=member, group_size=3, using="users"
        )
        members.append({e.id for e in page.events})
        streams = Counter(e.stream for e in page.events)
        assert all(n == 2 for n in streams.values())  # a stream goes to one member whole
    assert set().union(*members) == appended
    assert sum(len(m) for m in members) == len(appended)
