"""Attacks on the outbox relay: messages a caller may write that the broker refuses for
ever. The relay delivers a shard's messages in id order and retries a failed publish
without skipping it (the order per aggregate), so one such message held up every
message of every service on that shard, for ever.

Before: the sidecar acknowledged, and the relay (a real `dbsidecar relay` against a
real nats-server) then failed every publish of: a header ``Nats-Expected-Stream`` (and
any ``Nats-*`` header, which steer JetStream itself: ``Nats-Rollup`` purges a subject),
a header name NATS's client refuses (``BadHeaderError``), a payload past NATS's 1 MiB
``max_payload`` (``MaxPayloadError``), including one that is small as sent but not as
PostgreSQL stores it (a float like 1e300 is kept with all its digits). Now the sidecar
refuses each with a 400 and stores nothing of the write, and what comes after is
delivered.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import nats

from devstack.postgres import LocalTopology

from ..conftest import server_dsn
from ..harness import SidecarProcess, eventually
from ..nats_server import NatsServer
from ..relay_process import Relay, outbox_size
from ..test_relay import broker, relay_db, relay_sidecar, relays  # noqa: F401
from .attack import query

# An "any" aggregate and a subject the fixture's stream (relay.>) takes.
SUBJECT = "relay.attack"


def _message(**fields: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "subject": SUBJECT, "aggregate": "attack", **fields}


POISON: dict[str, dict[str, Any]] = {
    "Nats-Expected-Stream header": {"headers": {"Nats-Expected-Stream": "elsewhere"}},
    "Nats-Expected-Last-Sequence header": {"headers": {"Nats-Expected-Last-Sequence": "0"}},
    "lower-case nats- header": {"headers": {"nats-msg-id": "mine"}},
    "Nats-Rollup header": {"headers": {"Nats-Rollup": "all"}},
    "header name with a space": {"headers": {"bad name": "v"}},
    "header name with a colon": {"headers": {"a:b": "v"}},
    "header value over two lines": {"headers": {"X-Trace": "a\r\nNats-Msg-Id: fixed"}},
    "payload past 1 MiB": {"payload": "x" * (1 << 20)},
    "headers past 1 MiB": {"headers": {"X-Big": "y" * (1 << 20)}},
    # 6 bytes each as sent, over 300 in PostgreSQL's jsonb and in the relay's message.
    "floats stored with all their digits": {"payload": [1e300] * 4000},
}


async def _held(topology: LocalTopology, database: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, database))
    try:
        exists = await conn.fetchval("SELECT to_regclass('dbsidecar_outbox') IS NOT NULL")
        if not exists:
            return 0
        return await conn.fetchval(
            "SELECT count(*) FROM dbsidecar_outbox WHERE message_id = ANY($1::uuid[])", ids
        )
    finally:
        await conn.close()


async def test_messages_the_broker_refuses_for_ever_are_refused_when_written(
    topology: LocalTopology, relay_sidecar: SidecarProcess, relay_db: str,  # noqa: F811
    broker: NatsServer, relays: list[Relay], tmp_path: Path,  # noqa: F811
) -> None:  # fmt: skip
    refused: list[str] = []
    answers = {}
    for name, fields in POISON.items():
        message = _message(**fields)
        refused.append(message["id"])
        # On a write, and on an append (the event is refused with it).
        stream = f"attack-{uuid.uuid4().hex[:8]}"
        for plan in (
            {"op": "raw", "database": "relay", "writes": True, "sql": "SELECT 1",
             "outbox": [message]},
            {"op": "append", "database": "relay", "stream": stream,
             "events": [{"id": str(uuid.uuid4()), "type": "T"}], "outbox": [message]},
        ):  # fmt: skip
            status, body = await query(relay_sidecar.url, plan)
            answers[name, plan["op"]] = (status, body and body.get("error", {}).get("code"))
        status, body = await query(
            relay_sidecar.url, {"op": "read_stream", "database": "relay", "stream": stream}
        )
        assert status == 200 and not body.get("rows"), (name, body)
    assert answers == {key: (400, "bad_plan") for key in answers}
    assert await _held(topology, relay_db, refused) == 0
    # What the limits admit is delivered: a payload just under them, a header of one's own.
    fine = [
        _message(payload="z" * 990_000),
        _message(payload=[[1.5e300]], headers={"X-Trace": "t-1", "event-type": "Fine"}),
    ]
    plan = {"op": "raw", "database": "relay", "writes": True, "sql": "SELECT 1",
            "outbox": fine}  # fmt: skip
    status, body = await query(relay_sidecar.url, plan)
    assert status == 200, body
    relay = Relay(relay_sidecar, broker.url, tmp_path, "relay", 10)
    relays.append(relay)
    await eventually(lambda: _none(outbox_size(topology, relay_db)), 30, "the outbox to drain")
    assert relay.metric("dbsidecar_relay_failed_total") == 0
    nc = await nats.connect(broker.url)
    try:
        sub = await nc.jetstream().subscribe(SUBJECT, ordered_consumer=True)
        got = [await sub.next_msg(timeout=10) for _ in fine]
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert [m.headers["Nats-Msg-Id"] for m in got] == [m["id"] for m in fine]
    assert len(got[0].data) == 990_002
    # jsonb keeps 1.5e300 as a decimal of 301 digits, delivered as such: the same number.
    assert float(json.loads(got[1].data)[0][0]) == 1.5e300
    assert got[1].headers["X-Trace"] == "t-1"


async def _none(count: Any) -> bool:
    return await count == 0


async def test_a_frozen_leader_hands_over_to_a_standby(
    topology: LocalTopology, relay_sidecar: SidecarProcess, relay_db: str,  # noqa: F811
    broker: NatsServer, relays: list[Relay], tmp_path: Path,  # noqa: F811
) -> None:  # fmt: skip
    """Before: the leader's session lock stayed with its session, and PostgreSQL keeps a
    session whose client went silent (a frozen process, a paused VM, a network partition)
    until TCP keepalive gives up (2 hours by Linux's defaults; never, while the frozen
    host's kernel still answers), so no standby delivered meanwhile. Now the relay's
    session ends after RELAY_LEASE idle seconds (idle_session_timeout) and a live leader
    never idles that long, so a standby takes over."""
    from sidecar.relay import RELAY_LEASE

    leader = Relay(relay_sidecar, broker.url, tmp_path, "relay", 10)
    relays.append(leader)
    await eventually(
        lambda: _true(leader.metric("dbsidecar_relay_leader") == 1), 30, "a leader"
    )  # fmt: skip
    standby = Relay(relay_sidecar, broker.url, tmp_path, "relay", 10)
    relays.append(standby)
    leader.proc.send_signal(signal.SIGSTOP)  # frozen: its sockets stay open
    try:
        plan = {"op": "raw", "database": "relay", "writes": True, "sql": "SELECT 1",
                "outbox": [_message(payload="after the freeze")]}  # fmt: skip
        status, body = await query(relay_sidecar.url, plan)
        assert status == 200, body
        await eventually(
            lambda: _none(outbox_size(topology, relay_db)), RELAY_LEASE + 30,
            "the standby to deliver",
        )  # fmt: skip
        assert standby.metric("dbsidecar_relay_leader") == 1
    finally:
        leader.proc.send_signal(signal.SIGCONT)


async def _true(value: bool) -> bool:
    return value
