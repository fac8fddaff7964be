"""Attacks on liveness: a replica that freezes (SIGSTOP on the whole server: postmaster
and every backend) while reads are in flight on it, and a caller whose own statement
outlives the deadline.

A frozen server cannot run its own statement_timeout, and its TCP connections stay
open, so before issue 10 the reads in flight hung until the server woke. Now each
statement carries a client-side deadline (statement_timeout plus a grace): past it the
connection is closed, the read moves to another node, and the node's probe checks it at
once on its own connection: a frozen server is marked down, a well one stays up (a
caller's slow statement alone never takes a node out for everyone).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import asyncpg
import pytest

from devstack.postgres import LocalTopology, PgServer

from ..conftest import sidecar_config
from ..harness import SidecarProcess, eventually
from ..test_failover import fault_config
from .attack import post

pytestmark = pytest.mark.slow


def _server_pids(server: PgServer) -> list[int]:
    root = server.pid
    assert root is not None
    pids = [root]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            pids.append(int(stat.parent.name))
    return pids


@contextmanager
def frozen(server: PgServer) -> Iterator[None]:
    pids = _server_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):  # a backend may end once it runs again
                os.kill(pid, signal.SIGCONT)


async def test_reads_in_flight_on_a_frozen_replica_move_to_the_primary(
    pair: LocalTopology, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(pair.primary.dsn("orders", pair.user, pair.password))
    await conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    await conn.close()
    config = fault_config(pair)
    # Probes alone would take their failure threshold; the statement deadline is what
    # moves the reads in flight.
    config["health"] = {"interval": 5, "timeout": 5, "failure_threshold": 5}
    config["databases"]["orders"]["pool"]["statement_timeout"] = 1
    proc = SidecarProcess(config, tmp_path, "frozen")
    proc.start()
    read = {"op": "raw", "database": "orders", "writes": False, "route": {"role": "replica"},
            "sql": "SELECT count(*) AS n, pg_is_in_recovery() AS replica FROM t"}  # fmt: skip
    try:

        async def replica_serves() -> bool:
            status, body = await post(proc.url, "/v1/query", read)
            return status == 200 and body["served_by"][0]["role"] == "replica"

        await eventually(replica_serves, 20, "the replica to serve reads")
        with frozen(pair.replica):
            answers = await asyncio.gather(*(post(proc.url, "/v1/query", read) for _ in range(8)))
            # Every read answered, from the primary, while the replica is still frozen.
            assert [status for status, _ in answers] == [200] * 8, answers
            assert {body["served_by"][0]["node"] for _, body in answers} == {"a"}
            assert {body["rows"][0][1] for _, body in answers} == {False}
    finally:
        proc.terminate()


async def test_a_callers_own_slow_statement_marks_no_node_down(topology, tmp_path, primary) -> None:
    config = sidecar_config(topology, tmp_path, "slow-caller")
    config["databases"]["orders"]["pool"] = {"statement_timeout": 1}
    proc = SidecarProcess(config, tmp_path, "slow-caller")
    proc.start()
    user = 880_000 + os.getpid() % 10_000
    insert = {"op": "insert", "database": "orders", "table": "orders",
              "rows": [{"user_id": user, "status": "honest"}]}  # fmt: skip
    slow = {"plans": [
        {"op": "raw", "database": "orders", "writes": True, "sql": sql}
        for sql in ("SET LOCAL statement_timeout = 0", "SELECT pg_sleep(3)")
    ]}  # fmt: skip
    try:
        batch = asyncio.create_task(post(proc.url, "/v1/batch", slow))
        statuses: list[int] = []
        while not batch.done():  # honest writes while the slow batch runs, and after it
            statuses.append((await post(proc.url, "/v1/query", insert))[0])
        for _ in range(40):
            statuses.append((await post(proc.url, "/v1/query", insert))[0])
        status, body = await batch
        # Past the client-side deadline the sidecar gave up on the statement itself ...
        assert status == 503 and body["error"]["code"] == "write_outcome_unknown", body
        # ... and nobody else noticed: the probe found the primary well.
        assert set(statuses) == {200}
        written = await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user)
        assert written == len(statuses)
    finally:
        proc.terminate()
