"""The channel (one WebSocket, many plans in flight) through the client, on the session
sidecar: plans multiplexed and answered out of order, one frame per event-loop turn,
HTTP as the fallback and as a mode, request ids, cancellation, a clean close.

The sidecar's own counters say what travelled how: ``dbsidecar_channel_frames_total``
by frame kind, and ``dbsidecar_requests_total{endpoint="/v1/channel"}`` for upgrades.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from client import ConnectionManager, PlanError
from client.channel import BACKOFF_BASE, BACKOFF_CAP
from client.connection import DatabaseHandle
from client.errors import SidecarUnreachable
from client.transport import Transport, request_id
from wire.protocol import Insert, Raw

from .harness import SidecarProcess, counter, eventually

pytestmark = pytest.mark.usefixtures("handles")
REPO = Path(__file__).resolve().parent.parent


def frames(sidecar: SidecarProcess, kind: str) -> float:
    return counter(sidecar.ops, "dbsidecar_channel_frames_total", kind=kind)


def upgrades(sidecar: SidecarProcess, code: str = "101") -> float:
    return counter(sidecar.ops, "dbsidecar_requests_total", endpoint="/v1/channel", code=code)


def handle(url: str, *, batching: bool = True, mode: str = "channel") -> DatabaseHandle:
    transport = Transport(url, mode=mode)  # type: ignore[arg-type]
    return DatabaseHandle(
        "channel",
        transport=transport,
        database="orders",
        consistency="eventual",
        batching=batching,
    )


def number(n: int) -> Raw:
    return Raw(database="orders", sql="SELECT $1::int AS n", params=[n], writes=False)


@pytest.fixture
async def db(sidecar: SidecarProcess) -> AsyncIterator[DatabaseHandle]:
    handle_ = handle(sidecar.url, batching=False)
    yield handle_
    await handle_.transport.close()


async def test_plans_are_multiplexed_and_answered_in_completion_order(
    sidecar: SidecarProcess, db: DatabaseHandle
) -> None:
    opened = upgrades(sidecar)
    plans_before = frames(sidecar, "plan")
    finished: list[int] = []

    async def run(n: int, sql: str) -> int:
        result = await db.run(Raw(database="orders", sql=sql, params=[n], writes=False))
        finished.append(n)
        return result.rows[0][0]

    # A slow plan, then twenty fast ones on the same channel while it runs.
    slow = asyncio.create_task(run(-1, "SELECT $1::int FROM pg_sleep(1)"))
    await asyncio.sleep(0)
    fast = await asyncio.gather(*(run(n, "SELECT $1::int") for n in range(20)))
    assert fast == list(range(20))  # each answer matched to its own frame
    assert not slow.done(), "a fast plan waited for the slow one"
    assert await slow == -1
    assert finished[-1] == -1 and sorted(finished[:-1]) == list(range(20))
    assert upgrades(sidecar) == opened + 1, "one channel carried every plan"
    assert frames(sidecar, "plan") == plans_before + 21


async def test_plans_of_one_turn_travel_as_one_bundle_frame(sidecar: SidecarProcess) -> None:
    db = handle(sidecar.url)
    try:
        await db.run(number(0))  # the channel is open before counting
        bundles, plans = frames(sidecar, "bundle"), frames(sidecar, "plan")
        results = await asyncio.gather(*(db.run(number(n)) for n in range(50)))
        assert [r.rows[0][0] for r in results] == list(range(50))
        assert frames(sidecar, "bundle") == bundles + 1
        assert frames(sidecar, "plan") == plans
    finally:
        await db.transport.close()


async def test_a_bundle_keeps_each_plans_own_outcome(sidecar: SidecarProcess) -> None:
    db = handle(sidecar.url)
    try:
        plans = [number(n) for n in range(5)]
        plans[2] = Raw(database="orders", sql="SELECT nope", writes=False)
        results = await asyncio.gather(*(db.run(p) for p in plans), return_exceptions=True)
        assert isinstance(results[2], PlanError) and results[2].sqlstate == "42703"
        assert [r.rows[0][0] for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4]
    finally:
        await db.transport.close()


async def test_a_channel_over_the_unix_socket(sidecar: SidecarProcess) -> None:
    db = handle(sidecar.uds_url, batching=False)
    opened = upgrades(sidecar)
    try:
        assert [(await db.run(number(n))).rows[0][0] for n in range(3)] == [0, 1, 2]
        assert upgrades(sidecar) == opened + 1
    finally:
        await db.transport.close()


async def test_an_error_carries_the_callers_request_id(db: DatabaseHandle) -> None:
    token = request_id.set("channel-rid-42")
    try:
        with pytest.raises(PlanError) as caught:
            await db.run(Raw(database="orders", sql="SELECT nope", writes=False))
    finally:
        request_id.reset(token)
    assert caught.value.request_id == "channel-rid-42"


async def test_a_cancelled_caller_leaves_nothing_behind(db: DatabaseHandle) -> None:
    await db.run(number(0))  # opens the channel
    assert db.transport._dialer is not None
    channel = db.transport._dialer._channel
    assert channel is not None
    sleep = Raw(database="orders", sql="SELECT pg_sleep(0.5)", writes=False)
    slow = asyncio.create_task(db.run(sleep))

    async def in_flight() -> bool:
        return bool(channel.pending)

    await eventually(in_flight, 5, "the slow plan to be in flight")
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert channel.pending == {}
    # Its late answer is dropped and the same channel goes on serving.
    assert (await db.run(number(7))).rows == [[7]]
    assert db.transport._dialer._channel is channel


async def test_http_mode_opens_no_channel(sidecar: SidecarProcess) -> None:
    db = handle(sidecar.url, mode="http")
    opened = upgrades(sidecar)
    try:
        assert (await db.run(number(3))).rows == [[3]]
        assert upgrades(sidecar) == opened
    finally:
        await db.transport.close()
    with pytest.raises(ValueError, match="transport"):
        Transport(sidecar.url, mode="carrier-pigeon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport"):
        ConnectionManager.configure({"x": {"database": "orders", "transport": "udp"}})


# Fallback: a server that serves the plan endpoints but answers the upgrade otherwise
@pytest.fixture(params=[404, 403, 426])
async def old_sidecar(
    request: pytest.FixtureRequest, sidecar: SidecarProcess
) -> AsyncIterator[str]:
    """An HTTP server in front of the sidecar that knows no channel: the upgrade gets
    ``request.param``, plan requests are passed on."""

    async def refuse(_: web.Request) -> web.Response:
        return web.Response(status=request.param, text="no channel here")

    async def forward(incoming: web.Request) -> web.Response:
        body, headers = await incoming.read(), {"content-type": "application/json"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(sidecar.url + incoming.path, data=body, headers=headers) as resp,
        ):
            answer = await resp.read()
        return web.Response(body=answer, status=resp.status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/channel", refuse)
    app.router.add_post("/v1/query", forward)
    app.router.add_post("/v1/bundle", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_an_older_sidecar_is_spoken_to_over_http(
    old_sidecar: str, sidecar: SidecarProcess, primary: asyncpg.Connection
) -> None:
    db = handle(old_sidecar)
    try:
        assert (await db.run(number(1))).rows == [[1]]
        assert db.transport.http_only  # remembered: no upgrade is tried again
        results = await asyncio.gather(*(db.run(number(n)) for n in range(10)))
        assert [r.rows[0][0] for r in results] == list(range(10))
        tag = f"fallback-{uuid.uuid4()}"  # id(db) repeats across parametrized runs
        await db.run(Insert(database="orders", table="kv", rows=[{"k": tag, "v": "1"}]))
        assert await primary.fetchval("SELECT v FROM kv WHERE k = $1", tag) == "1"
    finally:
        await db.transport.close()


async def test_close_leaves_no_unclosed_resources(sidecar: SidecarProcess) -> None:
    """In a fresh interpreter that turns ResourceWarnings into errors and reports what
    asyncio and aiohttp find unclosed at exit."""
    script = textwrap.dedent(
        f"""
        import asyncio, gc
        from client.connection import DatabaseHandle
        from client.transport import Transport
        from wire.protocol import Raw

        async def main():
            for url in ({sidecar.url!r}, {sidecar.uds_url!r}):
                db = DatabaseHandle("x", transport=Transport(url), database="orders")
                plans = [Raw(database="orders", sql="SELECT 1", writes=False)] * 3
                await asyncio.gather(*(db.run(p) for p in plans))
                await db.run(plans[0])
                await db.transport.close()
            gc.collect()

        asyncio.run(main())
        gc.collect()
        print("done")
        """
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert "nclosed" not in done.stderr and "never awaited" not in done.stderr, done.stderr


async def test_callers_share_one_dial_and_failed_dials_back_off() -> None:
    """Against a server that hangs up on every connection: twenty concurrent plans make
    one dial, not twenty, and each later dial waits out a growing, jittered backoff."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    db = handle(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", batching=False)
    db.read_retries = 0
    try:
        plans = [db.run(number(n)) for n in range(20)]
        failed = await asyncio.gather(*plans, return_exceptions=True)
        assert all(isinstance(f, SidecarUnreachable) and f.retryable for f in failed), failed
        dialer = db.transport._dialer
        assert dialer is not None and dialer._failures == 1
        # (aiohttp tries an idempotent request a second time when a connection resets.)
        assert accepted <= 2
        for failures in range(2, 5):
            with pytest.raises(SidecarUnreachable):
                await db.run(number(0))
            assert dialer._failures == failures
            # The jitter may be any part of the backoff, so the wait may be over already.
            wait = dialer._retry_at - asyncio.get_running_loop().time()
            assert wait <= min(BACKOFF_CAP, BACKOFF_BASE * 2**failures)
        assert accepted <= 8
    finally:
        await db.transport.close()
        server.close()
        await server.wait_closed()
