"""The outbox relay (`dbsidecar relay`) against a real nats-server with JetStream.

A database of this module's own (``relay_<hex>`` on the session primary) behind a sidecar
of its own takes appends whose events are published through the outbox; relays run as
`dbsidecar relay` child processes. What JetStream holds at the end is read back in
stream order: every message once (redeliveries dropped by Nats-Msg-Id), and each
aggregate's messages in the order they were appended.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from client import ConnectionManager
from client.eventstore import EventData, EventStore
from devstack.postgres import LocalTopology
from devstack.sidecar_process import REPO

from .conftest import server_dsn
from .harness import SidecarProcess, eventually
from .nats_server import NatsServer
from .relay_process import Relay, append_all, outbox_size, scratch_database, sidecar_for

pytestmark = pytest.mark.slow

STREAM = "OUTBOX"
BATCH = 100
SUBJECT = "relay.events"


class Events(EventStore):
    __database__ = "relay"
    __publish__ = SUBJECT


@pytest.fixture(scope="module")
def relay_db(topology: LocalTopology) -> Iterator[str]:
    with scratch_database(topology, "relay") as name:
        yield name


@pytest.fixture(scope="module")
def relay_sidecar(
    topology: LocalTopology, relay_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    with sidecar_for(topology, relay_db, "relay", tmp_path_factory.mktemp("relay")) as proc:
        yield proc


@pytest.fixture
async def handle(relay_sidecar: SidecarProcess) -> AsyncIterator[None]:
    ConnectionManager.configure(
        {"relay": {"sidecar": relay_sidecar.url, "database": "relay", "transport": "http"}}
    )
    yield
    await ConnectionManager.get("relay").close()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    try:
        nc = await nats.connect(server.url)
        # Two minutes of de-duplication by Nats-Msg-Id (JetStream's default, stated).
        await nc.jetstream().add_stream(name=STREAM, subjects=["relay.>"], duplicate_window=120)
        await nc.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def relays(relay_sidecar: SidecarProcess, tmp_path: Path) -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        if relay.proc.poll() is None:
            relay.kill()


async def relay_sessions(topology: LocalTopology) -> int:
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbsidecar-relay'"
        )
    finally:
        await conn.close()


async def stream_count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.messages
    finally:
        await nc.close()


async def delivered(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the stream in stream order: (Nats-Msg-Id, payload)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(STREAM)).state.messages
        sub = await js.subscribe("relay.>", ordered_consumer=True)
        out = []
        for _ in range(count):
            msg = await sub.next_msg(timeout=10)
            out.append((msg.headers["Nats-Msg-Id"], json.loads(msg.data)))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def check_delivery(
    messages: list[tuple[str, dict[str, Any]]], written: dict[str, list[int]]
) -> None:
    """Each written event exactly once, each aggregate's in the order it was appended."""
    ids = [msg_id for msg_id, _ in messages]
    assert len(ids) == len(set(ids)), "a redelivery was not dropped"
    per_stream: dict[str, list[int]] = {}
    for msg_id, payload in messages:
        assert payload["id"] == msg_id
        per_stream.setdefault(payload["stream"], []).append(payload["data"]["n"])
    assert per_stream == written


@pytest.mark.usefixtures("handle")
async def test_kill_9_mid_batch_loses_nothing_and_redeliveries_are_dropped(
    topology: LocalTopology, relay_sidecar: SidecarProcess, relay_db: str, broker: NatsServer,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    written = await append_all(
        Events, "kill" + uuid.uuid4().hex[:6], streams=20, events=150, chunk=10
    )
    total = 3000
    # Kill the relay while JetStream holds part of a batch (a count that is no multiple of
    # the batch size): the relay has published those messages and not deleted them yet,
    # so the next leader sends them again. Tried until a kill lands there.
    nc = await nats.connect(broker.url)
    js = nc.jetstream()

    async def mid_batch(before: int) -> bool:
        count = (await js.stream_info(STREAM)).state.messages
        return count > before and count % BATCH != 0

    try:
        for _ in range(10):
            relay = Relay(relay_sidecar, broker.url, tmp_path, "relay", BATCH)
            relays.append(relay)
            before = (await js.stream_info(STREAM)).state.messages
            await eventually(lambda b=before: mid_batch(b), 30, "a batch half published", 0.001)
            relay.kill()
            await eventually(lambda: _none(relay_sessions(topology)), 10, "its session to end")
            published = (await js.stream_info(STREAM)).state.messages
            queued = await outbox_size(topology, relay_db)
            assert published + queued >= total  # nothing lost, whenever it died
            if published + queued > total:
                break
    finally:
        await nc.close()
    assert published + queued > total, "never killed mid-batch in ten tries"
    final = Relay(relay_sidecar, broker.url, tmp_path, "relay", BATCH)
    relays.append(final)
    await eventually(lambda: _none(outbox_size(topology, relay_db)), 60, "the outbox to drain")
    assert await stream_count(broker.url) == total
    check_delivery(await delivered(broker.url), written)
    assert final.metric("dbsidecar_relay_lag_seconds") < 5
    assert final.metric("dbsidecar_relay_leader") == 1
    assert final.stop() == 0


@pytest.mark.usefixtures("handle")
async def test_a_broker_down_for_10_s_under_load_loses_nothing(
    topology: LocalTopology, relay_sidecar: SidecarProcess, relay_db: str, broker: NatsServer,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    relay = Relay(relay_sidecar, broker.url, tmp_path, "relay", BATCH)
    relays.append(relay)
    # A standby: it must not deliver while the first relay leads.
    standby = Relay(relay_sidecar, broker.url, tmp_path, "relay", BATCH)
    relays.append(standby)
    category = "down" + uuid.uuid4().hex[:6]
    written: dict[str, list[int]] = {f"{category}-{i}": [] for i in range(10)}
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            for stream, numbers in written.items():
                await Events.append(stream, [EventData("Counted", {"n": n})])
                numbers.append(n)
            n += 1

    load = asyncio.create_task(writer())
    try:
        await eventually(
            lambda: _true(relay.metric("dbsidecar_relay_delivered_total") > 100), 30,
            "the relay to deliver under load",
        )  # fmt: skip
        broker.stop()
        await eventually(
            lambda: _true(relay.metric("dbsidecar_relay_lag_seconds") >= 10), 60,
            "the lag to reach 10 s with the broker down",
        )  # fmt: skip
        assert relay.metric("dbsidecar_relay_failed_total") > 0
        broker.start()
        await eventually(
            lambda: _true(relay.metric("dbsidecar_relay_lag_seconds") < 2), 60,
            "the lag to fall once the broker is back",
        )  # fmt: skip
    finally:
        stop.set()
        await load
    await eventually(lambda: _none(outbox_size(topology, relay_db)), 60, "the outbox to drain")
    total = sum(len(numbers) for numbers in written.values())
    assert await stream_count(broker.url) == total
    check_delivery(await delivered(broker.url), written)
    assert standby.metric("dbsidecar_relay_leader") == 0
    assert standby.metric("dbsidecar_relay_delivered_total") == 0


async def _none(count: Any) -> bool:
    return await count == 0


async def _true(value: bool) -> bool:
    return value


def test_the_relay_refuses_a_database_it_does_not_know(relay_sidecar: SidecarProcess) -> None:
    argv = [sys.executable, "-m", "sidecar.cli", "relay", "--config",
            str(relay_sidecar.config_path), "--database", "nowhere"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no database 'nowhere'" in done.stderr
