"""A write whose backend dies mid-flight.

The sidecar cannot know whether such a write committed, so it must say so: 503
``write_outcome_unknown`` (retryable), never 200. Here the backend is terminated while
the statement still runs, so the truth is known (nothing committed) and the test reads
it from PostgreSQL. One dead backend is not a dead node: later writes must succeed once
the health probe has seen the node answer.

The session topology serves: ``pg_terminate_backend`` ends one session and leaves the
server (and every other test's connections) alone.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from ..harness import SidecarProcess, counter, eventually
from .attack import query

# Health probes run every second by default (success_threshold 1): recovering a node the
# sidecar marked down takes a probe round or two; this only bounds a hang.
RECOVERY = 15.0


async def _backend(primary: asyncpg.Connection, sql: str, *args: Any) -> int:
    """The pid ``sql`` names once the sidecar's statement shows in pg_stat_activity."""
    found: list[int] = []

    async def running() -> bool:
        pid = await primary.fetchval(sql, *args)
        if pid is not None:
            found.append(pid)
        return pid is not None

    await eventually(running, 10, "the sidecar's write to run on the primary")
    return found[0]


async def _killed(
    sidecar: SidecarProcess, primary: asyncpg.Connection, plan: dict, find: str, *args: Any
) -> tuple[int, Any]:
    """Send ``plan``, terminate the backend running it, and return the sidecar's answer."""
    request = asyncio.create_task(query(sidecar.url, plan))
    pid = await _backend(primary, find, *args)
    assert await primary.fetchval("SELECT pg_terminate_backend($1)", pid)
    return await request


def _unknown(op: str, sidecar: SidecarProcess) -> float:
    return counter(
        sidecar.ops,
        "dbsidecar_queries_total",
        database="orders",
        role="primary",
        op=op,
        outcome="write_outcome_unknown",
    )


async def _writes_again(sidecar: SidecarProcess, primary: asyncpg.Connection) -> list[Any]:
    """Wait until a write through the sidecar succeeds; the answers of those that did not."""
    refused: list[Any] = []
    key = f"after-{uuid.uuid4()}"
    plan = {"database": "orders", "op": "insert", "table": "kv", "rows": [{"k": key, "v": "x"}]}

    async def written() -> bool:
        status, body = await query(sidecar.url, plan)
        if status != 200:
            refused.append((status, body["error"]["code"], body["error"]["retryable"]))
        return status == 200

    await eventually(written, RECOVERY, "writes through the sidecar to succeed again")
    assert await primary.fetchval("SELECT count(*) FROM kv WHERE k = $1", key) == 1
    return refused


async def test_a_raw_write_killed_before_commit_answers_outcome_unknown_and_is_absent(
    sidecar: SidecarProcess, primary: asyncpg.Connection
) -> None:
    marker = f"killed-{uuid.uuid4()}"
    # The marker in a comment lets pg_stat_activity find this statement and no other.
    plan = {
        "database": "orders",
        "op": "raw",
        "writes": True,
        "sql": f"/* {marker} */ INSERT INTO kv (k, v) SELECT $1, 'x' FROM pg_sleep(60)",
        "params": [marker],
    }
    unknown_before = _unknown("raw", sidecar)
    status, body = await _killed(
        sidecar,
        primary,
        plan,
        "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
        f"%{marker}%",
    )
    assert status == 503, body
    assert body["error"]["code"] == "write_outcome_unknown", body
    assert body["error"]["retryable"] is True
    # True to the database: the statement died before its commit.
    assert await primary.fetchval("SELECT count(*) FROM kv WHERE k = $1", marker) == 0
    assert _unknown("raw", sidecar) - unknown_before == 1
    refused = await _writes_again(sidecar, primary)
    # Whatever failed while the sidecar recovered failed retryably, with a 503.
    assert all(status == 503 and retryable for status, _, retryable in refused), refused


async def test_an_update_killed_while_it_waits_answers_outcome_unknown_and_changes_nothing(
    sidecar: SidecarProcess, primary: asyncpg.Connection, topology: Any
) -> None:
    """A compiled write (no raw SQL) blocked on a row lock, terminated while it waits."""
    key = f"locked-{uuid.uuid4()}"
    await primary.execute("INSERT INTO kv (k, v) VALUES ($1, 'before')", key)
    locker = await asyncpg.connect(topology.primary.dsn("orders", topology.user, topology.password))
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT 1 FROM kv WHERE k = $1 FOR UPDATE", key)
        plan = {
            "database": "orders",
            "op": "update",
            "table": "kv",
            "set": {"v": "after"},
            "where": {"col": "k", "op": "=", "value": key},
        }
        unknown_before = _unknown("update", sidecar)
        status, body = await _killed(
            sidecar,
            primary,
            plan,
            "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            locker.get_server_pid(),
        )
        await lock.rollback()
    finally:
        await locker.close()
    assert status == 503, body
    assert body["error"]["code"] == "write_outcome_unknown", body
    assert body["error"]["retryable"] is True
    assert await primary.fetchval("SELECT v FROM kv WHERE k = $1", key) == "before"
    assert _unknown("update", sidecar) - unknown_before == 1
    refused = await _writes_again(sidecar, primary)
    assert all(status == 503 and retryable for status, _, retryable in refused), refused
