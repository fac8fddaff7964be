"""The transactional outbox through the session sidecar: messages commit with their write,
single, batched or in an interactive transaction, and only then.

Writes go to a table of this module's own (``outbox_things`` on ``orders``); messages are
told apart by their ids, so other tests' messages in the same outbox never matter.
"""

from __future__ import annotations

import json
import uuid

import pytest

from client import ConnectionManager, PlanError, UniqueViolation
from client.eventstore import EventData, EventStore
from client.outbox import message, with_outbox
from wire.protocol import ALL_SHARDS, Insert, Raw, Route, Update

pytestmark = pytest.mark.usefixtures("handles")

TABLE = "CREATE TABLE IF NOT EXISTS outbox_things (id bigint PRIMARY KEY, n int NOT NULL)"


@pytest.fixture(scope="module")
async def things() -> None:
    db = ConnectionManager.get("default")
    await db.run(Raw(database="orders", sql=TABLE, writes=True))


async def queued(primary, ids: list[uuid.UUID]) -> list[tuple[str, str, object]]:
    rows = await primary.fetch(
        "SELECT aggregate, subject, payload FROM dbsidecar_outbox WHERE message_id = ANY($1) "
        "ORDER BY id",
        ids,
    )
    return [(r["aggregate"], r["subject"], _json(r["payload"])) for r in rows]


def _json(text: str | None) -> object:
    return None if text is None else json.loads(text)


def insert(key: int) -> Insert:
    return Insert(database="orders", table="outbox_things", rows=[{"id": key, "n": 0}])


@pytest.mark.usefixtures("things")
async def test_a_write_and_its_messages_commit_together(primary) -> None:
    db = ConnectionManager.get("default")
    key = uuid.uuid4().int % 2**62
    first = message("things.created", f"thing-{key}", {"id": key}, {"source": "test"})
    await db.run(with_outbox(insert(key), [first]))
    assert await queued(primary, [uuid.UUID(first.id)]) == [
        (f"thing-{key}", "things.created", {"id": key})
    ]
    headers = await primary.fetchval(
        "SELECT headers FROM dbsidecar_outbox WHERE message_id = $1", uuid.UUID(first.id)
    )
    assert json.loads(headers) == {"source": "test"}
    # The same key again: the insert fails, and its message is not queued either.
    refused = message("things.created", f"thing-{key}", {"id": key})
    with pytest.raises(UniqueViolation):
        await db.run(with_outbox(insert(key), [refused]))
    assert await queued(primary, [uuid.UUID(refused.id)]) == []


@pytest.mark.usefixtures("things")
async def test_batches_and_transactions_commit_messages_only_when_they_commit(primary) -> None:
    db = ConnectionManager.get("default")
    key = uuid.uuid4().int % 2**62
    ok = [message("things.batch", f"thing-{key}", {"n": n}) for n in range(3)]
    update = Update(database="orders", table="outbox_things", values={"n": 1},
                    where={"col": "id", "op": "=", "value": key})  # fmt: skip
    await db.batch([with_outbox(insert(key), ok[:2]), with_outbox(update, ok[2:])])
    assert [p for _, _, p in await queued(primary, [uuid.UUID(m.id) for m in ok])] == [
        {"n": 0},
        {"n": 1},
        {"n": 2},
    ]
    failed = message("things.batch", f"thing-{key}", None)
    with pytest.raises(UniqueViolation):
        await db.batch([with_outbox(update, [failed]), insert(key)])
    rolled_back = message("things.tx", f"thing-{key}", None)
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.run(with_outbox(update, [rolled_back]))
            raise RuntimeError("roll it back")
    committed = message("things.tx", f"thing-{key}", None)
    async with db.transaction() as tx:
        await tx.run(with_outbox(update, [committed]))
        assert await queued(primary, [uuid.UUID(committed.id)]) == []  # not before COMMIT
    ids = [uuid.UUID(m.id) for m in (failed, rolled_back, committed)]
    assert [s for _, s, _ in await queued(primary, ids)] == ["things.tx"]


async def test_messages_are_refused_where_they_could_not_commit_once() -> None:
    users = ConnectionManager.get("users")
    everywhere = Update(database="users", table="users", values={"name": "x"},
                        where={"col": "name", "op": "=", "value": "nobody"},
                        route=Route(shard=ALL_SHARDS))  # fmt: skip
    with pytest.raises(PlanError, match="one shard"):
        await users.run(with_outbox(everywhere, [message("users.renamed", "user-1")]))
    db = ConnectionManager.get("default")
    for subject in ("has space", "wild.*", "", "a..b"):
        with pytest.raises(PlanError, match="subject"):
            await db.run(with_outbox(insert(1), [message(subject, "thing-1")]))
    read = Raw(database="orders", sql="SELECT 1", writes=False)
    with pytest.raises(PlanError, match="writes=true"):
        await db.run(with_outbox(read, [message("things.read", "thing-1")]))


async def test_published_events_are_queued_once_even_when_the_append_is_retried(primary) -> None:
    class Things(EventStore):
        __category__ = "thing" + uuid.uuid4().hex[:8]
        __publish__ = "things.events"

    events = [EventData("Made", {"n": 1}), EventData("Painted", {"n": 2})]
    first = await Things.append(Things.stream_of(1), events, expected_version="no_stream")
    again = await Things.append(Things.stream_of(1), events, expected_version="no_stream")
    assert again == first
    stream = Things.stream_of(1)
    assert await queued(primary, [e.id for e in events]) == [
        (stream, "things.events", {"id": str(e.id), "stream": stream, "type": e.type,
                                   "data": e.data})
        for e in events
    ]  # fmt: skip
