"""Attacks on the event store and the outbox (append, read_stream, read_category plans,
and the ``outbox`` field of write plans) over plain HTTP; the truth read from PostgreSQL.

Before: event data, metadata and outbox payloads were bound in jsonb[] arrays, where
asyncpg reads a JSON array as more array dimensions: an event whose data was ["x"] was
acknowledged and stored as "x", [[1]] as 1, and data [1, 2] or [] (or two events whose
data were lists) were refused with a not-null violation. Now they travel as JSON text
cast to jsonb in SQL, and every JSON value is stored as sent.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .attack import query

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
