"""Attacks on the channel (``GET /v1/channel``, a WebSocket), truth read from PostgreSQL.

- A missing or wrong bearer token is refused at the upgrade (401): the client raises
  ``Unauthorized``, no frame is taken and nothing runs.
- A client that floods thousands of frames and reads no answer is held at
  ``limits.max_channel_inflight``: the sidecar stops reading it, its memory stays
  bounded, other clients are served, and every frame is answered once it reads.
- An upgrade from a web page (an ``Origin`` header: browsers apply no same-origin rule
  to WebSockets) is refused with 403 ``cross_origin``; past ``limits.max_channels`` open
  channels an upgrade gets 503 ``too_many_channels`` and the client uses HTTP.
- A frame beyond ``limits.max_body_bytes`` closes the channel with 1009, unread.
- Frames that are not valid get a 400 answer naming their id and the channel goes on;
  frames without a readable id close it with 1007. Nothing of either runs, and no node
  is marked down.
- A channel that drops mid-flight: the read in flight is retried on a new channel and
  succeeds, the write in flight is ``WriteOutcomeUnknown`` (here it did commit).
- A killed sidecar: the write in flight is ``WriteOutcomeUnknown``, the read a retryable
  error; the same transport opens a channel to the restarted sidecar.
- SIGTERM: plans in flight complete (their rows are in PostgreSQL), frames sent while
  draining are answered 503 ``draining`` without running (the client sends such a plan
  again over HTTP, which still serves), then every channel closes with 1001 and the
  process exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from client import Unauthorized, WriteOutcomeUnknown
from client.connection import DatabaseHandle
from client.errors import SidecarUnreachable
from client.transport import Transport
from devstack.postgres import LocalTopology

from ..conftest import sidecar_config
from ..harness import SidecarProcess, counter, eventually, http_get
from .attack import Proxy, rss_bytes

MiB = 1024 * 1024
# A user_id no other test writes: refused frames must not have inserted anything.
MARK = 910_412
SELECT = {"op": "select", "database": "orders", "table": "orders", "limit": 1}
INSERT = {
    "op": "insert",
    "database": "orders",
    "table": "orders",
    "rows": [{"user_id": MARK, "status": "smuggled"}],
}


def frame(frame_id: Any, **fields: Any) -> str:
    return json.dumps({"id": frame_id, **fields})


def frames(sidecar: SidecarProcess, **labels: str) -> float:
    return counter(sidecar.ops, "dbsidecar_channel_frames_total", **labels)


def channels_open(sidecar: SidecarProcess) -> float:
    return counter(sidecar.ops, "dbsidecar_channels_open")


@contextlib.asynccontextmanager
async def raw_channel(url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket to the sidecar's channel, never through the client library."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url + "/v1/channel", max_msg_size=0, **kwargs) as ws,
    ):
        yield ws


async def answers(ws: aiohttp.ClientWebSocketResponse, count: int) -> dict[int, dict[str, Any]]:
    """The next ``count`` answers, by id."""
    found: dict[int, dict[str, Any]] = {}
    while len(found) < count:
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
        answer = json.loads(msg.data)
        found[answer["id"]] = answer
    return found


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read to the end of the channel; the sidecar's close code."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 30)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
        assert msg.type is not aiohttp.WSMsgType.ERROR, msg.data


def handle(url: str, *, token: str | None = None, read_retries: int = 3) -> DatabaseHandle:
    return DatabaseHandle(
        "attack",
        transport=Transport(url, token=token),
        database="orders",
        consistency="eventual",
        read_retries=read_retries,
        batching=False,
    )


def raw(sql: str, *params: Any, writes: bool) -> Any:
    from wire.protocol import Raw

    return Raw(database="orders", sql=sql, params=list(params), writes=writes)


@pytest.fixture
async def unmarked(primary: asyncpg.Connection) -> AsyncIterator[None]:
    await primary.execute("DELETE FROM orders WHERE user_id = $1", MARK)
    yield
    await primary.execute("DELETE FROM orders WHERE user_id = $1", MARK)


async def marked(primary: asyncpg.Connection) -> int:
    return await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", MARK)


def nodes_up(sidecar: SidecarProcess) -> dict[str, bool]:
    topology = json.loads(http_get(sidecar.url + "/v1/topology")[1])
    return {n["name"]: n["up"] for db in topology["databases"].values() for n in db["nodes"]}


@pytest.fixture(scope="module")
def own(topology: LocalTopology, workdir: Path) -> Iterator[dict[str, Any]]:
    """A configuration for sidecars of the test's own (killed, stopped, guarded)."""
    yield sidecar_config(topology, workdir, "channel")


# Authorization
@pytest.fixture(scope="module")
def guarded(topology: LocalTopology, workdir: Path) -> Iterator[SidecarProcess]:
    config = sidecar_config(topology, workdir, "channel-guarded")
    config["auth_token"] = "tok-" + topology.password[::-1] + "-channel"
    proc = SidecarProcess(config, workdir, "channel-guarded")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.mark.parametrize("token", [None, "tok-wrong"], ids=["missing", "wrong"])
async def test_a_wrong_or_missing_token_is_refused_at_the_upgrade(
    guarded: SidecarProcess, primary: asyncpg.Connection, unmarked: None, token: str | None
) -> None:
    db = handle(guarded.url, token=token)
    refused = counter(guarded.ops, "dbsidecar_requests_total", endpoint="/v1/channel", code="401")
    taken = frames(guarded)
    try:
        with pytest.raises(Unauthorized):
            await db.run(
                raw("INSERT INTO orders (user_id, status) VALUES ($1, 'x')", MARK, writes=True)
            )
        assert not db.transport.http_only  # refused, not mistaken for an older sidecar
    finally:
        await db.transport.close()
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with raw_channel(guarded.url, headers=headers):
            pass
    assert caught.value.status == 401
    assert (
        counter(guarded.ops, "dbsidecar_requests_total", endpoint="/v1/channel", code="401")
        == refused + 2
    )
    assert frames(guarded) == taken
    assert await marked(primary) == 0
    # The right token opens the channel.
    db = handle(guarded.url, token=guarded.config["auth_token"])
    try:
        assert (await db.run(raw("SELECT 1", writes=False))).rows == [[1]]
        assert frames(guarded, kind="plan") == taken + 1
    finally:
        await db.transport.close()


# Flooding
async def test_a_flood_without_reading_is_held_at_the_inflight_bound(
    sidecar: SidecarProcess,
) -> None:
    assert sidecar.proc is not None
    limit = 256  # limits.max_channel_inflight of the session sidecar (the default)
    count = 5000
    # 20 kB answers: the socket buffers between the two hold a few hundred of them.
    sql = "SELECT $1::int AS n, repeat('x', 20000) AS pad"
    rss_before = rss_bytes(sidecar.proc.pid)
    taken_before = frames(sidecar, kind="plan")
    opened_before = channels_open(sidecar)

    def taken() -> float:
        return frames(sidecar, kind="plan") - taken_before

    async with raw_channel(sidecar.url) as ws:
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for i in range(count):
                plan = {
                    "op": "raw",
                    "database": "orders",
                    "sql": sql,
                    "params": [i],
                    "writes": False,
                }
                await ws.send_str(frame(i, plan=plan))
                sent += 1

        sender = asyncio.create_task(flood())
        try:

            async def held() -> bool:
                return taken() >= limit

            await eventually(held, 30, "the first frames of the flood to run")
            # Others are served meanwhile, on a channel of their own.
            other = handle(sidecar.url)
            try:
                for n in range(50):
                    assert (await other.run(raw("SELECT $1::int", n, writes=False))).rows == [[n]]
            finally:
                await other.transport.close()
            # Held: the answers the socket buffers took, plus the in-flight bound.
            assert taken() < 1500, f"{taken():.0f} of {sent} frames ran while none was read"
            grown = rss_bytes(sidecar.proc.pid) - rss_before
            assert grown < 64 * MiB, f"the sidecar grew by {grown / MiB:.0f} MiB"
            # Reading, the client gets every answer, each matched to its frame.
            got = await answers(ws, count)
            assert all(
                a["status"] == 200 and a["result"]["rows"][0][0] == i for i, a in got.items()
            )
            assert sorted(got) == list(range(count))
            await sender
        finally:
            sender.cancel()

    async def closed() -> bool:
        return channels_open(sidecar) == opened_before

    await eventually(closed, 10, "the flooding channel to be gone")


# Oversized and invalid frames
def _reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_bytes(pid)


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def _declare_huge_frame(sidecar: SidecarProcess, size: int) -> bytes:
    """Upgrade by hand, then send only the header of a ``size``-byte text frame and a
    few bytes of it; what the sidecar sends back until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/channel HTTP/1.1\r\nhost: sidecar\r\nupgrade: websocket\r\n"
        f"connection: Upgrade\r\nsec-websocket-key: {key}\r\n"
        f"sec-websocket-version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    # FIN + text, masked, 64-bit length; the mask key; the start of the payload.
    writer.write(struct.pack("!BBQ", 0x81, 0x80 | 127, size) + os.urandom(4) + b"{" * 1024)
    received = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return received


async def test_an_oversized_frame_closes_the_channel_unread(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None
) -> None:
    assert sidecar.proc is not None
    oversized = frames(sidecar, kind="oversized", code="1009")
    # Refused by its declared length (limits.max_body_bytes is 8 MiB): a close frame 1009.
    received = await _declare_huge_frame(sidecar, 8 * MiB + 1)
    assert received[:1] == b"\x88" and struct.unpack("!H", received[2:4])[0] == 1009, received
    # Sent whole, 40 MiB: nothing of it is buffered. (The client may see a reset instead
    # of the close frame: the sidecar closes with the rest of the frame unread.)
    before = _reset_peak(sidecar.proc.pid)
    padding = " " * (40 * MiB)
    sql = f"INSERT INTO orders (user_id, status) VALUES ({MARK}, 'big'){padding}"
    async with raw_channel(sidecar.url) as ws:
        with contextlib.suppress(ConnectionError):
            await ws.send_str(
                frame(1, plan={"op": "raw", "database": "orders", "sql": sql, "writes": True})
            )
        assert await closed_with(ws) in (1009, 1006)
    grown = _peak(sidecar.proc.pid) - before
    assert grown < 32 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB for a refused frame"
    assert frames(sidecar, kind="oversized", code="1009") == oversized + 2
    assert await marked(primary) == 0


def _deep(levels: int) -> str:
    """A select whose where-tree nests ``levels`` deep (as text: json.dumps would recurse)."""
    leaf = '{"col": "id", "op": "=", "value": 1}'
    where = '{"and": [' * levels + leaf + "]}" * levels
    return '{"op": "select", "database": "orders", "table": "orders", "where": ' + where + "}"


async def test_invalid_frames_are_answered_and_the_channel_goes_on(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None
) -> None:
    up = nodes_up(sidecar)
    bad = {
        1: frame(1, plan={"op": "nope", "database": "orders"}),
        2: frame(2),
        3: frame(3, plan=SELECT, plans=[INSERT]),
        4: frame(4, plan=INSERT, extra=True),
        5: frame(5, plans=[INSERT], request_id=7),
        6: frame(6, plans=[INSERT] + [SELECT] * 1000),  # limits.max_batch_plans is 1000
        # Deeper than the decoder goes: the id, written first, still names the frame.
        7: '{"id": 7, "plan": ' + _deep(5000) + "}",
    }
    async with raw_channel(sidecar.url) as ws:
        for text in bad.values():
            await ws.send_str(text)
        await ws.send_bytes(frame(8, plan=SELECT).encode())  # JSON in a binary frame
        await ws.send_str(frame(9, plan=SELECT))
        got = await answers(ws, 9)
    for frame_id in bad:
        assert got[frame_id]["status"] == 400, got[frame_id]
    codes = {i: got[i]["error"]["code"] for i in bad}
    assert codes == {**dict.fromkeys(range(1, 7), "bad_plan"), 7: "plan_too_complex"}, codes
    assert "at most 1000 plans" in got[6]["error"]["message"]
    assert got[8]["status"] == got[9]["status"] == 200
    assert await marked(primary) == 0
    assert nodes_up(sidecar) == up  # a channel's errors are the caller's, never a node's


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        frame("one", plan=INSERT),
        frame(1.5, plan=INSERT),
        json.dumps({"plan": INSERT}),
        '{"plan": ' + _deep(5000) + ', "id": 1}',
    ],
    ids=["not-json", "array", "string-id", "float-id", "no-id", "deep-id-last"],
)
async def test_a_frame_without_a_readable_id_closes_the_channel(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None, text: str
) -> None:
    closed = frames(sidecar, kind="invalid", code="1007")
    async with raw_channel(sidecar.url) as ws:
        await ws.send_str(text)
        assert await closed_with(ws) == 1007
    assert frames(sidecar, kind="invalid", code="1007") == closed + 1
    assert await marked(primary) == 0


# Channels that drop
async def _running(primary: asyncpg.Connection, marker: str) -> None:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()"

    async def seen() -> bool:
        return await primary.fetchval(sql, f"%{marker}%") > 0

    await eventually(seen, 10, f"the statement {marker} to run")


SLOW_WRITE = "INSERT INTO orders (user_id, status) SELECT $1, 'slow' FROM pg_sleep(1)"


async def test_a_channel_that_drops_mid_flight(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None
) -> None:
    async with Proxy(sidecar.port) as proxy:
        db = handle(proxy.url)
        try:
            write = asyncio.create_task(
                db.run(raw(SLOW_WRITE + " /* drop-write */", MARK, writes=True))
            )
            read = asyncio.create_task(
                db.run(raw("SELECT 42 FROM pg_sleep(1) /* drop-read */", writes=False))
            )
            await _running(primary, "drop-write")
            await _running(primary, "drop-read")
            assert db.transport._dialer is not None
            first = db.transport._dialer._channel
            proxy.cut()
            with pytest.raises(WriteOutcomeUnknown):
                await write
            assert (await read).rows == [[42]]
            # Retried: the read is the only plan that could have opened a second channel.
            assert db.transport._dialer._channel is not first
        finally:
            await db.transport.close()

    async def committed() -> bool:
        return await marked(primary) == 1

    # Unknown to the client; in truth the sidecar went on and it committed.
    await eventually(committed, 10, "the dropped write to commit")


async def test_a_killed_sidecar_leaves_writes_unknown_and_reads_retryable(
    own: dict[str, Any], workdir: Path, primary: asyncpg.Connection, unmarked: None
) -> None:
    proc = SidecarProcess(own, workdir, "channel-killed")
    proc.start()
    db = handle(proc.url, read_retries=0)  # every failure reaches the test
    try:
        write = asyncio.create_task(
            db.run(raw(SLOW_WRITE + " /* killed-write */", MARK, writes=True))
        )
        read = asyncio.create_task(
            db.run(raw("SELECT 1 FROM pg_sleep(1) /* killed-read */", writes=False))
        )
        await _running(primary, "killed-write")
        await _running(primary, "killed-read")
        assert proc.proc is not None
        proc.proc.kill()
        with pytest.raises(WriteOutcomeUnknown):
            await write
        with pytest.raises(SidecarUnreachable) as caught:
            await read
        assert caught.value.retryable and not isinstance(caught.value, WriteOutcomeUnknown)

        async def committed() -> bool:
            return await marked(primary) == 1

        # Unknown to the client; in truth PostgreSQL ran the statement to its end.
        await eventually(committed, 10, "the orphaned write to commit")
        proc.terminate()
        # The same transport reaches the sidecar started again, on a new channel.
        proc.start()
        assert (await db.run(raw("SELECT 2", writes=False))).rows == [[2]]
        assert frames(proc, kind="plan") == 1
    finally:
        await db.transport.close()
        proc.terminate()


async def test_sigterm_answers_what_is_in_flight_then_closes_with_1001(
    own: dict[str, Any], workdir: Path, primary: asyncpg.Connection, unmarked: None
) -> None:
    proc = SidecarProcess(own, workdir, "channel-drained")
    proc.start()
    assert proc.proc is not None
    db = handle(proc.url)
    # Slow enough to be still running while the test looks at what draining does.
    slow_write = SLOW_WRITE.replace("pg_sleep(1)", "pg_sleep(3)")
    slow = {
        "op": "raw",
        "database": "orders",
        "sql": slow_write + " /* drained-raw */",
        "params": [MARK],
        "writes": True,
    }
    try:
        async with raw_channel(proc.url) as ws:
            # Acknowledged writes in flight: three through the client, one on a raw channel.
            writes = [
                asyncio.create_task(
                    db.run(raw(slow_write + f" /* drained-{i} */", MARK, writes=True))
                )
                for i in range(3)
            ]
            await ws.send_str(frame(1, plan=slow))
            for marker in ("drained-0", "drained-1", "drained-2", "drained-raw"):
                await _running(primary, marker)
            proc.proc.send_signal(signal.SIGTERM)

            def draining() -> bool:
                return http_get(proc.ops + "/readyz")[0] == 503

            await eventually(_async(draining), 10, "the sidecar to drain")
            # While draining: a frame is answered without running; the client sends its
            # plan again over HTTP, which still serves.
            await ws.send_str(frame(2, plan=INSERT))
            late = await db.run(
                raw("INSERT INTO orders (user_id, status) VALUES ($1, 'late')", MARK, writes=True)
            )
            assert late.rowcount == 1
            for task in writes:
                assert (await task).rowcount == 1
            got = await answers(ws, 2)
            assert got[1]["status"] == 200 and got[1]["result"]["rowcount"] == 1
            assert got[2]["status"] == 503 and got[2]["error"]["code"] == "draining"
            assert await closed_with(ws) == 1001
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        rows = await primary.fetch("SELECT status FROM orders WHERE user_id = $1", MARK)
        assert sorted(r["status"] for r in rows) == ["late"] + ["slow"] * 4
    finally:
        await db.transport.close()
        proc.terminate()


def _async(check: Any) -> Any:
    async def wrapped() -> bool:
        return await asyncio.to_thread(check)

    return wrapped


async def test_sigterm_drops_a_channel_whose_client_stopped_reading(
    own: dict[str, Any], workdir: Path
) -> None:
    """Its answers cannot go out; the sidecar still stops, within the close grace and
    uvicorn's graceful wait (shutdown.drain_timeout)."""
    config = {**own, "shutdown": {"drain_timeout": 3}}
    proc = SidecarProcess(config, workdir, "channel-stuck")
    proc.start()
    assert proc.proc is not None
    try:
        async with raw_channel(proc.url) as ws:
            plan = {
                "op": "raw",
                "database": "orders",
                "writes": False,
                "sql": "SELECT repeat('x', 100000)",
            }
            for i in range(400):
                await ws.send_str(frame(i, plan=plan))

            async def stuck() -> bool:
                return frames(proc, kind="plan") >= 256

            await eventually(stuck, 30, "the channel to fill up")
            proc.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        assert "did not take their last answers" in proc.log()
    finally:
        proc.terminate()


async def test_an_upgrade_from_a_web_page_is_refused(sidecar: SidecarProcess) -> None:
    """A page open in the developer's browser must not read the databases through the
    sidecar on loopback: its WebSocket carries an Origin header, and is refused."""
    async with aiohttp.ClientSession() as http:
        for origin in ("https://evil.example", "null", f"{sidecar.url}"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(sidecar.url + "/v1/channel", headers={"Origin": origin})
            assert refused.value.status == 403, origin
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = {"Origin": "https://evil.example", "Connection": "Upgrade",
                   "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": key}  # fmt: skip
        async with http.get(sidecar.url + "/v1/channel", headers=upgrade) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "cross_origin"


async def test_channels_past_the_limit_are_refused_and_the_client_uses_http(
    topology: LocalTopology, workdir: Path
) -> None:
    config = sidecar_config(topology, workdir, "channels")
    config["limits"] = {**config.get("limits", {}), "max_channels": 2}
    proc = SidecarProcess(config, workdir, "channels")
    proc.start()
    try:
        async with raw_channel(proc.url), raw_channel(proc.url):
            assert channels_open(proc) == 2
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(proc.url + "/v1/channel")
                assert refused.value.status == 503
            db = handle(proc.url)
            try:
                result = await db.run(raw("SELECT 41 + 1", writes=False))
                assert result.rows == [[42]]
            finally:
                await db.transport.close()
            assert channels_open(proc) == 2
    finally:
        proc.terminate()
