"""One PostgreSQL topology and one sidecar for the whole session.

The topology is the one `dbsidecar dev` starts (same code, `devstack`), plus a second
primary so the `users` shards span two servers: a primary with a streaming
replica (orders, inventory, payments, user_shard_0/2) and primary2 (user_shard_1/3).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from client import ConnectionManager
from devstack.postgres import LocalTopology, PgServer
from devstack.topology import USER_SHARDS, shard_server, sidecar_config

from . import schema
from .harness import SECRETS, SIDECAR_LOGS, SidecarProcess


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """After every test: no sidecar log of the whole run holds a configured secret."""
    yield
    leaks = [
        f"{path}: contains a secret"
        for path in SIDECAR_LOGS
        if path.exists() and any(secret in path.read_text(errors="replace") for secret in SECRETS)
    ]
    assert not leaks, leaks


@pytest.fixture(scope="session")
def topology() -> Iterator[LocalTopology]:
    topo = LocalTopology(replica=True, extra_primaries=1)
    topo.start()
    try:
        asyncio.run(_create_schema(topo))
        yield topo
    finally:
        topo.stop()


def server_dsn(topo: LocalTopology, server: PgServer, database: str) -> str:
    return server.dsn(database, topo.user, topo.password)


async def _create_schema(topo: LocalTopology) -> None:
    conn = await asyncpg.connect(server_dsn(topo, topo.primary, "orders"))
    await conn.execute(schema.ORDERS)
    await conn.close()
    targets = [(topo.primary, "users")] + [
        (shard_server(topo, i), name) for i, name in enumerate(USER_SHARDS)
    ]
    for server, database in targets:
        conn = await asyncpg.connect(server_dsn(topo, server, database))
        await conn.execute(schema.USERS)
        await conn.close()


@pytest.fixture
def pair() -> Iterator[LocalTopology]:
    """A primary and its streaming replica of one's own, for tests that stop, kill or
    promote servers (the session topology must stay intact)."""
    topo = LocalTopology(replica=True, databases=("orders",), log=lambda line: None)
    topo.start()
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidecar")


@pytest.fixture(scope="session")
def sidecar(topology: LocalTopology, workdir: Path) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(sidecar_config(topology, workdir), workdir)
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="session")
async def handles(sidecar: SidecarProcess) -> AsyncIterator[None]:
    ConnectionManager.reset()
    ConnectionManager.configure(
        {
            "default": {"sidecar": sidecar.url, "database": "orders"},
            "users": {"sidecar": f"unix://{sidecar.uds}", "database": "users"},
        }
    )
    yield
    await ConnectionManager.close_all()
    ConnectionManager.reset()


@pytest.fixture
async def primary(topology: LocalTopology) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the orders primary, for checking what really happened."""
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    yield conn
    await conn.close()
