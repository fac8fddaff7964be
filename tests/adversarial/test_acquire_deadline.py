"""A caller never waits for a connection longer than the acquire timeout, even when the
pool must first open its connection to a server that does not answer (a frozen node, or
a burst after idle connections were closed): every caller gets a retryable
``pool_timeout`` in time, not one connect timeout after another."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from sidecar.errors import SidecarError
from sidecar.executor import acquire
from sidecar.settings import NodeSettings
from sidecar.topology import Node
from wire.errors import ErrorCode


async def test_callers_queued_behind_a_hanging_connect_keep_their_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers the startup message

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The connect timeout is far past the acquire timeout: only the acquire's own
    # deadline can end these waits in time.
    pool = await asyncpg.create_pool(
        host="127.0.0.1", port=port, user="x", min_size=0, max_size=1, timeout=120
    )
    node = Node("silent", NodeSettings(host="127.0.0.1", port=port), "orders", "primary")
    node.pool = pool
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(acquire(node, 0.2) for _ in range(3)), return_exceptions=True),
            timeout=20,
        )
        assert all(isinstance(o, SidecarError) for o in outcomes), outcomes
        assert {o.code for o in outcomes} == {ErrorCode.POOL_TIMEOUT}
        assert all(o.retryable for o in outcomes)
        assert node.busy == 0
    finally:
        pool.terminate()
        server.close()


@pytest.fixture(autouse=True)
def bounded_memory() -> None:
    """This test starts no sidecar: the package's memory check does not apply."""
