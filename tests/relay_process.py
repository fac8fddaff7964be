"""What the relay's tests share: a `dbsidecar relay` child process on a free metrics
port (the example shop's test uses it too), a scratch database behind a sidecar of its
own, the outbox's size read from PostgreSQL, and appends of counted events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import asyncpg

from client.eventstore import EventData, EventStore
from devstack.postgres import LocalTopology
from devstack.sidecar_process import REPO

from .conftest import server_dsn
from .harness import SIDECAR_LOGS, SidecarProcess, free_port, samples, wait_until


@contextlib.contextmanager
def scratch_database(topology: LocalTopology, prefix: str) -> Iterator[str]:
    """A database of its own on the session primary (``<prefix>_<hex>``), dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(sql(f'DROP DATABASE "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def sidecar_for(
    topology: LocalTopology, database: str, logical: str, workdir: Path
) -> Iterator[SidecarProcess]:
    """A sidecar serving ``database`` of the session primary as ``logical``."""
    server = topology.primary
    node = {"name": f"{server.name}/{database}", "host": "127.0.0.1", "port": server.port,
            "database": database, "user": topology.user, "password": topology.password}  # fmt: skip
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "databases": {logical: {"primary": node}},
    }
    proc = SidecarProcess(config, workdir, f"{logical}-sidecar")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


async def outbox_size(topology: LocalTopology, database: str) -> int:
    """Messages not yet delivered, read from PostgreSQL (0 before any write made the table)."""
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, database))
    try:
        exists = await conn.fetchval("SELECT to_regclass('dbsidecar_outbox') IS NOT NULL")
        return await conn.fetchval("SELECT count(*) FROM dbsidecar_outbox") if exists else 0
    finally:
        await conn.close()


async def append_all(
    store: type[EventStore], category: str, streams: int, events: int, chunk: int
) -> dict[str, list[int]]:
    """``events`` events in each of ``streams`` streams, ``chunk`` per append, the streams
    concurrently; the order each stream's events were appended in."""
    written: dict[str, list[int]] = {}

    async def one(stream: str) -> None:
        for start in range(0, events, chunk):
            batch = [EventData("Counted", {"n": n}) for n in range(start, start + chunk)]
            await store.append(stream, batch)
        written[stream] = list(range(events))

    await asyncio.gather(*(one(f"{category}-{i}") for i in range(streams)))
    return written


class Relay:
    """A `dbsidecar relay` child process; its log joins the session's secret scan.
    ``url`` is the NATS server's, or with ``sink="webhook"`` the webhook's; ``options``
    are more of the command's arguments."""

    def __init__(
        self,
        sidecar: SidecarProcess,
        url: str,
        workdir: Path,
        database: str,
        batch: int = 100,
        *,
        sink: Literal["nats", "webhook"] = "nats",
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.metrics_port = free_port()
        self.log_path = workdir / f"relay-{self.metrics_port}.log"
        SIDECAR_LOGS.append(self.log_path)
        argv = [sys.executable, "-m", "sidecar.cli", "relay", "--config",
                str(sidecar.config_path), "--database", database, f"--{sink}", url,
                "--batch", str(batch), "--max-backoff", "0.5", "--metrics-host", "127.0.0.1",
                "--metrics-port", str(self.metrics_port), *options]  # fmt: skip
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=environment,
            )  # fmt: skip
        wait_until(self._serving, 30, "the relay's metrics endpoint")

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited: {self.log_path.read_text()[-2000:]}")
        try:
            return bool(samples(self.ops, "dbsidecar_relay_leader"))
        except OSError:
            return False

    def metric(self, name: str) -> float:
        return sum(v for _, v in samples(self.ops, name))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)
