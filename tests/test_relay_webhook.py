"""The outbox relay's webhook sink (`dbsidecar relay --webhook`) against a real receiver:
an aiohttp server in the test's event loop, on a free loopback port, that records every
request and answers what the test tells it to.

A database of this module's own (``hook_<hex>`` on the session primary) behind a sidecar
of its own takes appends whose events go out through the outbox; relays run as
`dbsidecar relay` child processes. A receiver de-duplicates by Idempotency-Key, so what
counts is each message's first arrival: every message, each aggregate's in the order
they were appended.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from client import ConnectionManager
from client.eventstore import EventData, EventStore
from client.outbox import message
from devstack.postgres import LocalTopology
from devstack.sidecar_process import REPO

from .conftest import server_dsn
from .harness import SECRETS, SidecarProcess, eventually
from .relay_process import Relay, append_all, outbox_size, scratch_database, sidecar_for

pytestmark = pytest.mark.slow

BATCH = 50
SUBJECT = "hook.events"
LAG = "dbsidecar_relay_lag_seconds"
DELIVERED = "dbsidecar_relay_delivered_total"
FAILED = "dbsidecar_relay_failed_total"


class Events(EventStore):
    __database__ = "webhook"
    __publish__ = SUBJECT


@dataclass
class Request:
    """One request the receiver got: ``status`` None while its answer is held back."""

    number: int
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]
    status: int | None = None


async def _ok(request: Request) -> int:
    return 200


class Receiver:
    """The webhook: ``answer`` decides each request's status; a non-2xx answer's body
    echoes the request's headers (as httpbin does), credentials included."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answer: Callable[[Request], Awaitable[int]] = _ok
        # Ends the answers held back (a relay killed while it waited for one).
        self.release = asyncio.Event()
        # The URL's path holds a token, as many webhooks' do: a secret of the session.
        self.path_token = uuid.uuid4().hex
        SECRETS.add(self.path_token)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(f"/hook/{self.path_token}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, taken without a race
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook/{self.path_token}"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, http: web.Request) -> web.Response:
        request = Request(len(self.requests), await http.json(), http.headers)
        self.requests.append(request)
        request.status = await self.answer(request)
        if 200 <= request.status < 300:
            return web.Response(status=request.status)
        return web.json_response(dict(http.headers), status=request.status)

    @property
    def accepted(self) -> list[Request]:
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300]


@pytest.fixture(scope="module")
def hook_db(topology: LocalTopology) -> Iterator[str]:
    with scratch_database(topology, "hook") as name:
        yield name


@pytest.fixture(scope="module")
def hook_sidecar(
    topology: LocalTopology, hook_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    with sidecar_for(topology, hook_db, "webhook", tmp_path_factory.mktemp("webhook")) as proc:
        yield proc


@pytest.fixture
async def handle(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str
) -> AsyncIterator[None]:
    # Each test starts from an empty outbox, whatever an earlier failing one left.
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, hook_db))
    try:
        await conn.execute(
            "DO $$ BEGIN IF to_regclass('dbsidecar_outbox') IS NOT NULL THEN "
            "DELETE FROM dbsidecar_outbox; END IF; END $$"
        )
    finally:
        await conn.close()
    ConnectionManager.configure(
        {"webhook": {"sidecar": hook_sidecar.url, "database": "webhook", "transport": "http"}}
    )
    yield
    await ConnectionManager.get("webhook").close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.stop()


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        if relay.proc.poll() is None:
            relay.kill()


async def start_relay(
    relays: list[Relay], sidecar: SidecarProcess, receiver: Receiver, tmp_path: Path,
    *options: str, env: dict[str, str] | None = None,
) -> Relay:  # fmt: skip
    # In a thread: Relay waits for the child's metrics port, and the receiver in this
    # event loop must answer the child meanwhile.
    relay = await asyncio.to_thread(
        Relay, sidecar, receiver.url, tmp_path, "webhook", BATCH, sink="webhook",
        options=["--timeout", "5", *options], env=env,
    )  # fmt: skip
    relays.append(relay)
    return relay


async def drained(topology: LocalTopology, database: str) -> None:
    async def empty() -> bool:
        return await outbox_size(topology, database) == 0

    await eventually(empty, 30, "the outbox to drain")


def check_order(requests: list[Request], written: dict[str, list[int]]) -> None:
    """Each request keyed by its message id; counting each id's first arrival only (what
    a receiver de-duplicating by the key keeps), every written event is there, each
    aggregate's in the order it was appended."""
    seen: set[str] = set()
    per_aggregate: dict[str, list[int]] = {}
    for request in requests:
        body = request.body
        assert request.headers["Idempotency-Key"] == body["id"]
        assert request.headers["Content-Type"] == "application/json"
        if body["id"] in seen:
            continue
        seen.add(body["id"])
        assert body["subject"] == SUBJECT and body["payload"]["id"] == body["id"]
        assert body["aggregate"] == body["payload"]["stream"]
        assert (
            body["headers"]
            == {"event-type": "Counted"}
            == {"event-type": request.headers["event-type"]}
        )
        per_aggregate.setdefault(body["aggregate"], []).append(body["payload"]["data"]["n"])
    assert per_aggregate == written


async def _true(value: bool) -> bool:
    return value


@pytest.mark.usefixtures("handle")
async def test_messages_arrive_once_each_in_order_per_aggregate(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str, receiver: Receiver,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    relay = await start_relay(relays, hook_sidecar, receiver, tmp_path)
    category = "once" + uuid.uuid4().hex[:6]
    written = await append_all(Events, category, streams=8, events=25, chunk=5)
    # A message whose headers are partly no HTTP header values (the sidecar refuses bad
    # names and line breaks, not every byte), or ones the relay sets itself: those
    # travel in the body only.
    own = {"X-Trace": "t-1", "X-Ctl": "a\x01b", "X-Utf": "é", "Idempotency-Key": "forged",
           "Content-Type": "text/plain", "Content-Length": "1",
           "Authorization": "Bearer from-a-writer"}  # fmt: skip
    odd = message("hook.headers", f"{category}-headers", {"odd": True}, own)
    await Events.append(f"{category}-0", [EventData("Counted", {"n": 25})], outbox=[odd])
    written[f"{category}-0"].append(25)
    total = 8 * 25 + 2
    await drained(topology, hook_db)

    assert [r.status for r in receiver.requests] == [200] * total  # each once, none failed
    odd_requests = [r for r in receiver.requests if r.body["subject"] == "hook.headers"]
    check_order([r for r in receiver.requests if r not in odd_requests], written)
    [odd_request] = odd_requests
    assert odd_request.body == {"id": odd.id, "subject": "hook.headers",
                                "aggregate": f"{category}-headers", "payload": {"odd": True},
                                "headers": own}  # fmt: skip
    sent = odd_request.headers
    assert sent["X-Trace"] == "t-1" and sent["Idempotency-Key"] == odd.id
    assert sent["Content-Type"] == "application/json"
    assert int(sent["Content-Length"]) > 1
    assert not {"X-Ctl", "X-Utf", "Authorization"} & set(sent)
    assert relay.metric(DELIVERED) == total and relay.metric(FAILED) == 0
    assert relay.metric("dbsidecar_relay_leader") == 1
    assert await asyncio.to_thread(relay.stop) == 0


@pytest.mark.usefixtures("handle")
async def test_a_failing_receiver_loses_nothing_and_the_lag_rises_and_falls(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str, receiver: Receiver,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    recovered = asyncio.Event()

    async def unavailable_until_recovered(request: Request) -> int:
        return 200 if recovered.is_set() else 503

    receiver.answer = unavailable_until_recovered
    # Appended before the relay starts, so every failure is the oldest message's.
    written = await append_all(Events, "down" + uuid.uuid4().hex[:6], streams=5, events=20, chunk=4)
    relay = await start_relay(relays, hook_sidecar, receiver, tmp_path)
    await eventually(
        lambda: _true(len(receiver.requests) >= 5 and relay.metric(LAG) >= 1), 20,
        "five 503s and the lag at 1 s",
    )  # fmt: skip
    recovered.set()
    await drained(topology, hook_db)
    await eventually(lambda: _true(relay.metric(LAG) == 0), 10, "the lag to fall to 0")

    refused = [r for r in receiver.requests if r.status == 503]
    assert len(refused) >= 5
    # The batch stopped at the refused message each time: nothing after it was sent.
    assert receiver.requests[: len(refused)] == refused
    assert {r.body["id"] for r in refused} == {receiver.accepted[0].body["id"]}
    assert len(receiver.accepted) == 100 == len({r.body["id"] for r in receiver.accepted})
    check_order(receiver.accepted, written)
    assert relay.metric(FAILED) == len(refused)
    assert relay.metric(DELIVERED) == 100
    assert "503 Service Unavailable" in relay.log_path.read_text()


@pytest.mark.usefixtures("handle")
async def test_kill_9_mid_batch_redelivers_with_the_same_idempotency_keys(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str, receiver: Receiver,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    written = await append_all(Events, "kill" + uuid.uuid4().hex[:6], streams=8, events=25, chunk=5)
    total = 200
    # The 26th request of the second batch is held unanswered: the relay has its 25
    # predecessors acknowledged and not yet deleted (a batch is deleted at its end).
    held_at = BATCH + 25
    held = asyncio.Event()

    async def hold_one(request: Request) -> int:
        if request.number == held_at:
            held.set()
            await receiver.release.wait()
        return 200

    receiver.answer = hold_one
    first = await start_relay(relays, hook_sidecar, receiver, tmp_path)
    await eventually(lambda: _true(held.is_set()), 30, "the relay to wait mid-batch")
    first.kill()
    assert await outbox_size(topology, hook_db) == total - BATCH  # only batch 1 deleted
    final = await start_relay(relays, hook_sidecar, receiver, tmp_path)
    await drained(topology, hook_db)

    requests = receiver.requests
    # The first relay's held_at + 1 requests, then the rest from where batch 2 began.
    assert len(requests) == held_at + 1 + total - BATCH
    again = [r.body["id"] for r in requests[held_at + 1 :]]
    assert again[: held_at + 1 - BATCH] == [r.body["id"] for r in requests[BATCH : held_at + 1]]
    keys: dict[str, set[str]] = {}
    for request in requests:
        keys.setdefault(request.body["id"], set()).add(request.headers["Idempotency-Key"])
    assert len(keys) == total and all(len(k) == 1 for k in keys.values())
    assert {r.body["id"] for r in receiver.accepted} == set(keys)  # each acknowledged
    check_order(requests, written)
    assert final.metric(DELIVERED) == total - BATCH
    assert await asyncio.to_thread(final.stop) == 0


@pytest.mark.usefixtures("handle")
async def test_the_authorization_header_is_sent_and_never_logged(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str, receiver: Receiver,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    token = uuid.uuid4().hex
    SECRETS.add(token)
    authorization = f"Authorization: Bearer {token}"

    async def refuse_twice(request: Request) -> int:
        # A 400's body echoes the request's headers, the Authorization among them.
        return 400 if request.number < 2 else 200

    receiver.answer = refuse_twice
    await append_all(Events, "auth" + uuid.uuid4().hex[:6], streams=2, events=5, chunk=5)
    options = ["--webhook-header", authorization, "--log-level", "debug"]
    relay = await start_relay(relays, hook_sidecar, receiver, tmp_path, *options)
    await drained(topology, hook_db)
    assert relay.metric(FAILED) == 2
    assert await asyncio.to_thread(relay.stop) == 0

    assert len(receiver.accepted) == 10
    assert {r.headers["Authorization"] for r in receiver.requests} == {f"Bearer {token}"}
    log = relay.log_path.read_text()
    assert token not in log and receiver.path_token not in log
    refused = receiver.requests[0].body["id"]
    errors = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [e["event"] for e in errors if e["level"] == "error"] == [
        f"relay webhook/: message {refused} not delivered: {receiver.url.split('/hook')[0]} "
        "answered 400 Bad Request"
    ] * 2
    # A header the command line cannot parse is refused without its value being shown.
    argv = [sys.executable, "-m", "sidecar.cli", "relay", "--config",
            str(hook_sidecar.config_path), "--database", "webhook", "--webhook", receiver.url,
            "--webhook-header", f"Authorization Bearer {token}"]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, argv, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--webhook-header" in done.stderr
    assert token not in done.stderr + done.stdout


@pytest.mark.usefixtures("handle")
async def test_headers_from_the_environment_stay_off_the_command_line(
    topology: LocalTopology, hook_sidecar: SidecarProcess, hook_db: str, receiver: Receiver,
    relays: list[Relay], tmp_path: Path,
) -> None:  # fmt: skip
    token = uuid.uuid4().hex
    SECRETS.add(token)
    env = {"DBSIDECAR_RELAY_WEBHOOK_HEADERS": f"Authorization: Bearer {token}\nX-Tenant: shop\n"}
    await append_all(Events, "env" + uuid.uuid4().hex[:6], streams=1, events=3, chunk=3)
    relay = await start_relay(relays, hook_sidecar, receiver, tmp_path, env=env)
    await drained(topology, hook_db)
    cmdline = await asyncio.to_thread(Path(f"/proc/{relay.proc.pid}/cmdline").read_bytes)
    assert await asyncio.to_thread(relay.stop) == 0
    assert {r.headers["Authorization"] for r in receiver.requests} == {f"Bearer {token}"}
    assert {r.headers["X-Tenant"] for r in receiver.requests} == {"shop"}
    assert token.encode() not in cmdline and token not in relay.log_path.read_text()
    # A malformed line is refused by its number, its value never shown.
    argv = [sys.executable, "-m", "sidecar.cli", "relay", "--config",
            str(hook_sidecar.config_path), "--database", "webhook",
            "--webhook", receiver.url]  # fmt: skip
    bad = {**os.environ, "DBSIDECAR_RELAY_WEBHOOK_HEADERS": f"Authorization Bearer {token}"}
    done = await asyncio.to_thread(
        subprocess.run, argv, cwd=REPO, env=bad, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "line 1" in done.stderr
    assert token not in done.stderr + done.stdout
