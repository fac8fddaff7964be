"""Attacks on the event store and the outbox (append, read_stream, read_category plans,
and the ``outbox`` field of write plans) over plain HTTP; the truth read from PostgreSQL.

Before: event data, metadata and outbox payloads were bound in jsonb[] arrays, where
asyncpg reads a JSON array as more array dimensions: an event whose data was ["x"] was
acknowledged and stored as "x", [[1]] as 1, and data [1, 2] or [] (or two events whose
data were lists) were refused with a not-null violation. Now they travel as JSON text
cast to jsonb in SQL, and every JSON value is stored as sent.

Before: a reader of every stream only ever *tried* the barrier lock that appenders hold
shared, for 0.5 s, then answered no events. Appenders whose transactions overlap keep
it busy for as long as they keep coming: under 32 concurrent appenders (about 800
appends/s) not one such read answered an event, so a Subscription of every stream
(which takes an empty page for "caught up") stood still, silently, for as long as the
load lasted. Now it queues for the barrier after trying briefly (new appenders wait
behind it while those in flight commit), and reads under load answer events, still
without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from client import ConnectionManager
from client.eventstore import Checkpoint, EventData, EventStore, RecordedEvent
from client.subscription import Subscription
from client.transactions import Transaction
from sidecar.storetables import BARRIER_LOCK
from wire.protocol import Raw
from wire.values import encode_value

from ..conftest import server_dsn
from ..harness import eventually
from .attack import post, query

# Each a value an event's data (or metadata, or an outbox payload) may plainly be.
VALUES: list[Any] = [
    ["x"],
    [[1]],
    [1, 2],
    [],
    [[]],
    [[1, 2], [3]],
    [[[[[[[["deep"]]]]]]]],
    {"a": [1, [2]]},
    [{"a": 1}, None, "s", 1.5, True],
    "plain",
    0,
]


def _event(data: Any = None, metadata: Any = None) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "Probed", "data": data, "metadata": metadata}


async def test_json_arrays_are_stored_and_read_back_as_sent(sidecar, primary) -> None:
    stream = f"x{uuid.uuid4().hex[:10]}-1"
    # One value per append, and all of them in one append (lists of unequal shapes).
    appends = [[_event(v, v)] for v in VALUES] + [[_event(v, [v]) for v in VALUES]]
    for events in appends:
        plan = {"op": "append", "database": "orders", "stream": stream, "events": events}
        status, body = await query(sidecar.url, plan)
        assert status == 200, (events, body)
    sent = [e for events in appends for e in events]
    held = await primary.fetch(
        "SELECT event_id, data::text, metadata::text FROM dbsidecar_events "
        "WHERE stream = $1 ORDER BY version",
        stream,
    )
    assert [str(r["event_id"]) for r in held] == [e["id"] for e in sent]
    for row, event in zip(held, sent, strict=True):
        assert json.loads(row["data"]) == event["data"], event
        assert json.loads(row["metadata"]) == event["metadata"], event
    plan = {"op": "read_stream", "database": "orders", "stream": stream}
    status, body = await query(sidecar.url, plan)
    assert status == 200
    data, metadata = body["columns"].index("data"), body["columns"].index("metadata")
    read = [(r[data], r[metadata]) for r in body["rows"]]  # json columns: plain JSON
    assert read == [(e["data"], e["metadata"]) for e in sent]


async def test_outbox_payloads_are_stored_as_sent(sidecar, primary) -> None:
    messages = [
        {"id": str(uuid.uuid4()), "subject": "probe.json", "aggregate": "a", "payload": v}
        for v in VALUES
    ]
    plan = {"op": "raw", "database": "orders", "writes": True, "sql": "SELECT 1",
            "outbox": messages}  # fmt: skip
    status, body = await query(sidecar.url, plan)
    try:
        assert status == 200, body
        held = await primary.fetch(
            "SELECT message_id, payload::text FROM dbsidecar_outbox "
            "WHERE message_id = ANY($1::uuid[]) ORDER BY id",
            [m["id"] for m in messages],
        )
        assert [(str(r[0]), json.loads(r[1])) for r in held] == [
            (m["id"], m["payload"]) for m in messages
        ]
    finally:
        await primary.execute(
            "DELETE FROM dbsidecar_outbox WHERE message_id = ANY($1::uuid[])",
            [m["id"] for m in messages],
        )


async def test_a_reader_of_every_stream_is_not_starved_by_constant_appends(
    sidecar, primary
) -> None:
    cat = f"s{uuid.uuid4().hex[:10]}"
    appended: dict[str, int] = {}
    stop = asyncio.Event()

    async def appender(http: aiohttp.ClientSession, stream: str) -> None:
        while not stop.is_set():
            plan = {"op": "append", "database": "orders", "stream": stream,
                    "events": [{"id": str(uuid.uuid4()), "type": "T"}]}  # fmt: skip
            async with http.post(sidecar.url + "/v1/query", json=plan) as resp:
                assert resp.status == 200, await resp.text()
            appended[stream] = appended.get(stream, 0) + 1

    async def read(http: aiohttp.ClientSession, after: int) -> list[list[Any]]:
        plan = {"op": "read_category", "database": "orders", "after": {"": after},
                "limit": 50}  # fmt: skip
        async with http.post(sidecar.url + "/v1/query", json=plan) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json()).get("rows", [])

    # Where every stream's events end now (a first append creates the table).
    status, body = await query(
        sidecar.url,
        {"op": "append", "database": "orders", "stream": f"{cat}-start",
         "events": [{"id": str(uuid.uuid4()), "type": "T"}]},
    )  # fmt: skip
    assert status == 200, body
    checkpoint = body["rows"][0][2]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        load = [asyncio.create_task(appender(http, f"{cat}-{i}")) for i in range(32)]
        try:
            await eventually(lambda: _true(sum(appended.values()) > 500), 60, "appends")
            answered = []
            seen: dict[str, list[int]] = {}
            for _ in range(10):
                rows = await read(http, checkpoint)
                answered.append(len(rows))
                for row in rows:
                    seen.setdefault(row[1], []).append(row[2])
                if rows:
                    checkpoint = rows[-1][0]
        finally:
            stop.set()
            await asyncio.gather(*load)
        # Under the load, reads answer events (before: none of them did).
        assert sum(1 for n in answered if n) >= 8, answered
        # And none skipped one: read on to the end, every stream's versions in order, once.
        while rows := await read(http, checkpoint):
            for row in rows:
                seen.setdefault(row[1], []).append(row[2])
            checkpoint = rows[-1][0]
    mine = {stream: versions for stream, versions in seen.items() if stream.startswith(cat)}
    assert mine == {stream: list(range(n)) for stream, n in appended.items()}


async def _true(value: bool) -> bool:
    return value


async def test_a_reader_that_waited_for_the_barrier_in_vain_leaves_its_transaction_whole(
    sidecar, primary, topology
) -> None:
    """An appender that never commits (here: a session holding the barrier shared) makes
    the queued wait time out; in an interactive transaction that must not abort it or
    change its lock_timeout, and the reader answers no events rather than an error."""
    stream = f"b{uuid.uuid4().hex[:10]}-1"
    status, body = await query(
        sidecar.url,
        {"op": "append", "database": "orders", "stream": stream,
         "events": [{"id": str(uuid.uuid4()), "type": "T"}]},
    )  # fmt: skip
    assert status == 200, body
    before = body["rows"][0][2] - 1
    holder = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute(f"SELECT pg_advisory_xact_lock_shared({BARRIER_LOCK}, 0)")
        status, body = await post(sidecar.url, "/v1/tx", {"database": "orders"})
        assert status == 200, body
        tx = body["id"]
        read = {"op": "read_category", "database": "orders", "after": {"": before}}
        status, body = await post(sidecar.url, f"/v1/tx/{tx}", read)
        assert (status, body.get("rows", [])) == (200, []), body
        show = {"op": "raw", "database": "orders", "writes": False, "sql": "SHOW lock_timeout"}
        status, body = await post(sidecar.url, f"/v1/tx/{tx}", show)
        assert (status, body["rows"]) == (200, [["0"]]), body
        await hold.rollback()
        # The barrier free: the same transaction reads the event.
        status, body = await post(sidecar.url, f"/v1/tx/{tx}", read)
        assert status == 200 and [r[1] for r in body["rows"]][:1] == [stream], body
        assert (await post(sidecar.url, f"/v1/tx/{tx}/commit", None))[0] == 200
    finally:
        await holder.close()


PROBE_EFFECTS = (
    "CREATE TABLE IF NOT EXISTS adversarial_sub_effects "
    "(subscription text NOT NULL, event_id uuid NOT NULL)"
)


@pytest.mark.usefixtures("handles")
async def test_two_runs_of_one_subscription_commit_each_effect_once(primary) -> None:
    await primary.execute(PROBE_EFFECTS)
    name, cat = f"sub-{uuid.uuid4().hex[:8]}", f"d{uuid.uuid4().hex[:10]}"
    for i in range(20):
        await EventStore.append(f"{cat}-{i % 4}", [EventData("E", {"i": i}) for _ in range(10)])

    async def handler(event: RecordedEvent, tx: Transaction | None) -> None:
        assert tx is not None
        await tx.run(Raw(
            database="orders", writes=True,
            sql="INSERT INTO adversarial_sub_effects (subscription, event_id) VALUES ($1, $2)",
            params=[encode_value(name), encode_value(event.id)],
        ))  # fmt: skip

    async def caught_up() -> bool:
        if not await primary.fetchval("SELECT to_regclass('dbsidecar_subscriptions') IS NOT NULL"):
            return False
        stored = await primary.fetchval(
            "SELECT position FROM dbsidecar_subscriptions WHERE subscription = $1", name
        )
        last = await primary.fetchval(
            "SELECT max(position) FROM dbsidecar_events WHERE category = $1", cat
        )
        return stored == last

    # Two pods running the same subscription (a Deployment with two replicas).
    stop = asyncio.Event()
    runs = [Subscription(name, handler, category=cat, batch=10, max_wait=0.05) for _ in "ab"]
    tasks = [asyncio.create_task(run.run(stop)) for run in runs]
    try:
        await eventually(caught_up, 60, "the subscription to reach the end")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    effects = await primary.fetch(
        "SELECT event_id, count(*) FROM adversarial_sub_effects WHERE subscription = $1 GROUP BY 1",
        name,
    )
    assert len(effects) == 200
    assert {n for _, n in effects} == {1}, "an event's effect committed twice"


async def test_a_transaction_that_read_every_stream_blocks_no_appender(sidecar) -> None:
    """Before: the reader of every stream kept the barrier, taken exclusively, until its
    transaction ended, so one interactive transaction that read every stream and then
    stayed open stopped every append on the primary, of every category, for as long as
    it stayed open. Now the barrier is held for the read alone."""
    stream = f"h{uuid.uuid4().hex[:10]}-1"

    def append() -> dict[str, Any]:
        return {"op": "append", "database": "orders", "stream": stream,
                "events": [{"id": str(uuid.uuid4()), "type": "T"}]}  # fmt: skip

    assert (await query(sidecar.url, append()))[0] == 200
    status, body = await post(sidecar.url, "/v1/tx", {"database": "orders"})
    assert status == 200, body
    tx = body["id"]
    try:
        read = {"op": "read_category", "database": "orders", "after": {"": 0}, "limit": 1}
        status, body = await post(sidecar.url, f"/v1/tx/{tx}", read)
        assert status == 200 and body["rows"], body
        # The transaction stays open; another caller's append goes through meanwhile.
        timeout = aiohttp.ClientTimeout(total=5)
        status, body = await post(sidecar.url, "/v1/query", append(), timeout=timeout)
        assert status == 200, body
        # The transaction is whole, and reads on.
        status, body = await post(sidecar.url, f"/v1/tx/{tx}", read)
        assert status == 200 and body["rows"], body
        assert (await post(sidecar.url, f"/v1/tx/{tx}/commit", None))[0] == 200
    finally:
        await post(sidecar.url, f"/v1/tx/{tx}/rollback", None)


@pytest.mark.usefixtures("handles")
async def test_subscriptions_starting_at_once_on_a_new_database_all_start(topology) -> None:
    """Before: a first run creates dbsidecar_subscriptions with CREATE TABLE IF NOT
    EXISTS, which checks before it creates, so runs starting at once (pods of one
    Deployment) collided in the catalog (a unique violation on pg_type; a PartialWrite on
    a sharded database) and run() ended with that error. Seen in a full run; here the
    other pod is a session that creates the table and commits while load() waits on it.
    Now a collision is tried again."""
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    try:
        await conn.execute("DROP TABLE IF EXISTS dbsidecar_subscriptions")
        other = conn.transaction()
        await other.start()
        await conn.execute(_SUBSCRIPTIONS_TABLE)

        async def handler(event: RecordedEvent, tx: Transaction | None) -> None:
            raise AssertionError("no events in this category")

        sub = Subscription("start", handler, category=f"n{uuid.uuid4().hex[:10]}")
        loading = asyncio.create_task(sub.load())
        # load()'s CREATE waits on the other pod's uncommitted row in pg_type.
        await eventually(lambda: _waiting(conn), 30, "load() to wait on the catalog")
        await other.commit()
        assert await loading == Checkpoint()
    finally:
        await conn.close()


_SUBSCRIPTIONS_TABLE = (
    "CREATE TABLE dbsidecar_subscriptions (subscription text NOT NULL, "
    "shard text NOT NULL, position bigint NOT NULL, PRIMARY KEY (subscription, shard))"
)


async def _waiting(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'transactionid' "
            "AND datname = current_database()"
        )
    )


async def test_a_reused_outbox_message_id_is_refused_not_dropped(sidecar, primary) -> None:
    """Before: an outbox message whose id was queued already (ON CONFLICT DO NOTHING) was
    acknowledged with its write and dropped, so a write committed without its message
    (a careless caller reusing an id, e.g. one derived from the aggregate). An id is the
    message: the same message again (a retried write) is still taken, and adds nothing;
    another message under a queued id is a 409 and nothing of its write commits."""
    stream = f"m{uuid.uuid4().hex[:10]}-1"
    message_id = str(uuid.uuid4())

    def append(payload: Any) -> dict[str, Any]:
        message = {"id": message_id, "subject": "probe.reuse", "aggregate": stream,
                   "payload": payload}  # fmt: skip
        event = {"id": str(uuid.uuid4()), "type": "T"}
        return {"op": "append", "database": "orders", "stream": stream, "events": [event],
                "outbox": [message]}  # fmt: skip

    try:
        first = append({"n": 1})
        assert (await query(sidecar.url, first))[0] == 200
        again = {**first, "events": [{"id": str(uuid.uuid4()), "type": "T"}]}
        assert (await query(sidecar.url, again))[0] == 200  # the same message: taken once
        status, body = await query(sidecar.url, append({"n": 2}))
        assert (status, body["error"]["code"]) == (409, "unique_violation"), body
        held = await primary.fetch(
            "SELECT payload::text FROM dbsidecar_outbox WHERE message_id = $1",
            uuid.UUID(message_id),
        )
        assert [json.loads(r[0]) for r in held] == [{"n": 1}]
        assert await primary.fetchval(
            "SELECT count(*) FROM dbsidecar_events WHERE stream = $1", stream
        ) == 2  # fmt: skip
    finally:
        await primary.execute(
            "DELETE FROM dbsidecar_outbox WHERE message_id = $1", uuid.UUID(message_id)
        )


class _Gate:
    """A listener in front of the sidecar: closes every connection until opened, then
    forwards them (a pod whose app starts before its sidecar container is ready)."""

    def __init__(self, port: int) -> None:
        self.port, self.open, self.refused = port, False, 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            self.refused += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.usefixtures("handles")
async def test_a_subscription_started_before_its_sidecar_is_ready_waits_for_it(
    sidecar,
) -> None:
    """Before: run() loaded the checkpoint outside its retry loop, so a subscription
    whose first request failed (the sidecar container not ready yet, a restart) ended
    run() with that error and never ran again. Now the first load is retried too."""
    gate = _Gate(int(sidecar.url.rsplit(":", 1)[1]))
    url = await gate.start()
    ConnectionManager.configure(
        {"late": {"sidecar": url, "database": "orders", "transport": "http"}}
    )  # fmt: skip
    cat = f"l{uuid.uuid4().hex[:10]}"
    seen: list[RecordedEvent] = []

    async def handler(event: RecordedEvent, tx: Transaction | None) -> None:
        seen.append(event)

    stop = asyncio.Event()
    sub = Subscription("late", handler, category=cat, using="late", max_wait=0.1)
    task = asyncio.create_task(sub.run(stop))
    try:
        await eventually(lambda: _true(gate.refused >= 2 or task.done()), 30, "a refusal")
        gate.open = True
        await EventStore.append(f"{cat}-1", [EventData("E")])
        await eventually(lambda: _true(len(seen) == 1 or task.done()), 30, "the event")
        assert not task.done(), task.exception()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await ConnectionManager.get("late").close()
        assert gate.server is not None
        gate.server.close()
