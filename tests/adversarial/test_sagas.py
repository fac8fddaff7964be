"""Attacks on sagas: a log whose recorded transaction id PostgreSQL now gives another
transaction, and hostile text in the log printed to an operator's terminal.

Sagas run through the session sidecar (the ``handles`` fixture); the log and the ledgers
are the ones tests/test_saga.py installs (its ``saga_dbs`` fixture), and the truth is
read straight from PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from client import ConnectionManager, saga_log
from client.saga import Orchestrator, Saga, Step
from client.transactions import Transaction
from devstack.topology import USER_SHARDS, shard_server
from sidecar import saga_view
from wire.protocol import Raw

from ..conftest import server_dsn
from ..harness import SidecarProcess, eventually
from ..test_saga import saga_dbs

__all__ = ["saga_dbs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.usefixtures("handles")
FAST = {"backoff": 0.01, "max_backoff": 0.05}
EFFECTS = "CREATE TABLE IF NOT EXISTS adv_saga_effects (saga_id text NOT NULL, step text NOT NULL)"


async def _effect(tx: Transaction, data: dict[str, Any]) -> None:
    await tx.run(
        Raw(
            database=tx.database,
            sql="INSERT INTO adv_saga_effects VALUES ($1, 'only')",
            params=[data["id"]],
            writes=True,
        )
    )


async def test_a_committed_txid_without_its_ledger_row_does_not_skip_the_step(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    """The log names the step's transaction by its xid8; pg_xact_status says "committed"
    for it, but the ledger row that commits with every step is not there. That is what a
    failover to an asynchronous replica that never saw the step's transaction looks like
    (the new primary hands the same xid8 to another transaction), or a restored backup:
    the step was never applied and must run, not be taken as done."""
    orders = saga_dbs["orders"]
    await orders.execute(EFFECTS)
    saga = Saga("adv_reused_xid", [Step("only", _effect, database="orders")])
    orchestrator = Orchestrator([saga], **FAST)
    # Another transaction, committed, on the step's database: it now holds that xid8.
    async with orders.transaction():
        txid = await orders.fetchval("SELECT pg_current_xact_id()::text")
        await orders.execute("SELECT 1")
    saga_id = await _pending_with_txid(orchestrator, saga, txid)

    async def resumed() -> bool:
        return await orchestrator.run(saga_id) is not None

    await eventually(resumed, 10, "the saga to be resumed")
    outcome = await orchestrator.get(saga_id)
    assert outcome is not None and outcome.state == "completed", outcome
    applied = await orders.fetchval(
        "SELECT count(*) FROM adv_saga_effects WHERE saga_id = $1", saga_id
    )
    assert applied == 1, "the step was taken as applied without running"


def _sagas_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    saga_view.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sagas", *argv])
    return args.func(args)


async def _noop(tx: Transaction, data: dict[str, Any]) -> None:
    return None


async def test_the_sagas_command_prints_no_terminal_control_sequences(
    sidecar: SidecarProcess, saga_dbs: dict[str, asyncpg.Connection], capsys: Any
) -> None:
    # Ids, names, step names, owners and errors are whatever the services chose: an
    # escape sequence in any of them would retitle, clear or rewrite the operator's screen.
    marker = uuid.uuid4().hex[:8]
    saga_id = f"adv-{marker}\x1b]0;owned\x07\x1b[2J"
    name = f"adv_ansi_{marker}\x1b[31m"
    step = "first\rFAKE LINE\x1b[0m\u202e"
    began = Saga(name, [Step(step, _noop)])
    await Orchestrator([began]).begin(began, {}, saga_id=saga_id)
    # The code changed: its run leaves the saga as is, with a last_error naming the steps,
    # and holds its lease under a hostile owner name.
    changed = Saga(name, [Step(step + "2", _noop)])
    taker = Orchestrator([changed], owner="pod\x1b[8m", lease=0.5)
    assert await taker.run(saga_id) is None
    code = await asyncio.to_thread(_sagas_command, "--database", "orders", "--url", sidecar.url)
    out = capsys.readouterr().out
    assert code == 0, out
    (line,) = [line for line in out.splitlines() if marker in line]
    assert not any(c in line for c in "\x1b\x07\r\u202e"), repr(line)
    assert "\\x1b]0;owned\\x07" in line and "not resumed" in line, line
    # The original code finishes it, so it does not stay in the log's unfinished list.

    async def finished() -> bool:
        return await Orchestrator([began]).run(saga_id) is not None

    await eventually(finished, 10, "the original code to finish the saga")


async def _pending_with_txid(orchestrator: Orchestrator, saga: Saga, txid: str) -> str:
    """A saga a crashed orchestrator left mid-step 0 with ``txid`` as its transaction."""
    saga_id = f"adv-{uuid.uuid4().hex[:10]}"
    await orchestrator.begin(saga, {"id": saga_id}, saga_id=saga_id)
    ghost = "ghost-orchestrator"
    assert await saga_log.claim(orchestrator.log, saga_id, [saga.name], ghost, 30) is not None
    entry = {"request_id": f"saga:{saga_id}:action/0", "shard": None, "txid": txid, "tx": None}
    await saga_log.write(
        orchestrator.log, saga_id, ghost, 0.0,
        pending="action/0", transactions={"action/0": entry},
    )  # fmt: skip
    return saga_id


async def test_a_txid_from_the_future_is_settled_not_raised(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    """After a failover to an asynchronous replica, the log may name a transaction the new
    primary has not reached yet: pg_xact_status raises "transaction ID is in the future",
    and every resume failed on it. Such a transaction never happened there."""
    orders = saga_dbs["orders"]
    await orders.execute(EFFECTS)
    saga = Saga("adv_future_xid", [Step("only", _effect, database="orders")])
    orchestrator = Orchestrator([saga], **FAST)
    now = int(await orders.fetchval("SELECT pg_current_xact_id()::text"))
    saga_id = await _pending_with_txid(orchestrator, saga, str(now + 1_000_000))

    async def resumed() -> bool:
        return await orchestrator.run(saga_id) is not None

    await eventually(resumed, 10, "the saga to be resumed")
    outcome = await orchestrator.get(saga_id)
    assert outcome is not None and outcome.state == "completed", outcome
    applied = await orders.fetchval(
        "SELECT count(*) FROM adv_saga_effects WHERE saga_id = $1", saga_id
    )
    assert applied == 1


async def _undo(tx: Transaction, data: dict[str, Any]) -> None:
    await tx.run(
        Raw(
            database=tx.database,
            sql="INSERT INTO adv_saga_effects VALUES ($1, 'undone')",
            params=[data["id"]],
            writes=True,
        )
    )


async def _fails_loudly(tx: Transaction, data: dict[str, Any]) -> None:
    # An exception carrying a large payload (a response body, a dump of the data): more
    # than the sidecar takes in one request body.
    raise RuntimeError("declined: " + "x" * (9 * 1024 * 1024))


async def test_a_step_failing_with_a_huge_message_is_still_compensated(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    orders = saga_dbs["orders"]
    await orders.execute(EFFECTS)
    saga = Saga(
        "adv_huge_error",
        [
            Step("effect", _effect, compensation=_undo, database="orders"),
            Step("loud", _fails_loudly, database="orders"),
        ],
    )
    orchestrator = Orchestrator([saga], **FAST)
    saga_id = f"adv-{uuid.uuid4().hex[:10]}"
    outcome = await orchestrator.start(saga, {"id": saga_id}, saga_id=saga_id)
    assert outcome is not None and outcome.state == "compensated", outcome
    assert outcome.error is not None and outcome.error.startswith("step loud: RuntimeError")
    rows = await orders.fetch(
        "SELECT step FROM adv_saga_effects WHERE saga_id = $1 ORDER BY step", saga_id
    )
    assert [r["step"] for r in rows] == ["only", "undone"]


async def _raises_cancelled(tx: Transaction, data: dict[str, Any]) -> None:
    # A step awaiting a future someone else cancelled: CancelledError reaches the saga,
    # though nobody cancelled the orchestrator.
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


async def test_a_step_raising_cancelled_error_does_not_stop_resuming(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    orders = saga_dbs["orders"]
    await orders.execute(EFFECTS)
    saga = Saga(
        "adv_cancelled_step",
        [
            Step("effect", _effect, compensation=_undo, database="orders"),
            Step("cancelled", _raises_cancelled, database="orders"),
        ],
    )
    orchestrator = Orchestrator([saga], **FAST)
    saga_id = f"adv-{uuid.uuid4().hex[:10]}"
    await orchestrator.begin(saga, {"id": saga_id}, saga_id=saga_id)
    # resume() is what serve() runs in a loop: a saga's step must not end that loop (the
    # saga would then stop every pod's serve() in turn, a poison pill).
    resuming = asyncio.create_task(orchestrator.resume())
    await asyncio.wait({resuming}, timeout=60)
    assert resuming.done() and not resuming.cancelled(), "resume() died of a step's error"
    (outcome,) = [o for o in resuming.result() if o.id == saga_id]
    assert outcome.state == "compensated" and "CancelledError" in (outcome.error or "")
    rows = await orders.fetch(
        "SELECT step FROM adv_saga_effects WHERE saga_id = $1 ORDER BY step", saga_id
    )
    assert [r["step"] for r in rows] == ["only", "undone"]


async def _effect_with_blob(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    await _effect(tx, data)
    return {"blob": "x" * (5 * 1024 * 1024)}


async def _another_blob(tx: Transaction, data: dict[str, Any]) -> dict[str, Any]:
    return {"blob2": "y" * (5 * 1024 * 1024)}


async def test_step_outputs_too_large_for_the_log_fail_the_step_instead_of_the_saga(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    # Each output fits a request body, the saga's data holding both does not: the second
    # step committed, then every write of the log (and every resume) was refused with 413,
    # so the saga could neither go on nor compensate.
    orders = saga_dbs["orders"]
    await orders.execute(EFFECTS)
    saga = Saga(
        "adv_big_outputs",
        [
            Step("effect", _effect_with_blob, compensation=_undo, database="orders"),
            Step("more", _another_blob, database="orders"),
        ],
    )
    orchestrator = Orchestrator([saga], **FAST)
    saga_id = f"adv-{uuid.uuid4().hex[:10]}"
    outcome = await orchestrator.start(saga, {"id": saga_id}, saga_id=saga_id)
    assert outcome is not None and outcome.state == "compensated", outcome
    assert "data" in (outcome.error or "") and "bytes" in (outcome.error or "")
    rows = await orders.fetch(
        "SELECT step FROM adv_saga_effects WHERE saga_id = $1 ORDER BY step", saga_id
    )
    # Whatever ran was undone (nothing, or the first step and its compensation).
    assert [r["step"] for r in rows] in ([], ["only", "undone"])


async def test_pods_installing_the_log_at_once_never_fail(
    saga_dbs: dict[str, asyncpg.Connection],
) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS collide in the catalog in two ways: on the
    # row type's unique index (23505, the other creator not committed yet) or, when it
    # committed in between, "type ... already exists" (42710); CREATE INDEX IF NOT EXISTS
    # likewise with "relation ... already exists" (42P07). install() must absorb each.
    payments = saga_dbs["payments"]
    db = ConnectionManager.handle_for(ConnectionManager.get("default"), "payments")
    try:
        for _ in range(25):
            await payments.execute("DROP TABLE IF EXISTS dbsidecar_sagas")
            await asyncio.gather(*(saga_log.install_log(db) for _ in range(12)))
            assert await payments.fetchval("SELECT to_regclass('dbsidecar_sagas')")
    finally:
        await payments.execute("DROP TABLE IF EXISTS dbsidecar_sagas")


async def test_pods_installing_a_sharded_ledger_at_once_never_fail(topology) -> None:
    """Before: the ledger of a sharded step database is created on every shard at once,
    so a pod colliding with another on one shard got a PartialWrite (the other shards
    had the table), which install() did not take for a collision: it failed. Here the
    other pod is a session creating the ledger on user_shard_1 that commits while the
    install waits on its catalog row."""
    conn = await asyncpg.connect(server_dsn(topology, shard_server(topology, 1), USER_SHARDS[1]))
    users = ConnectionManager.get("users")
    try:
        await conn.execute("DROP TABLE IF EXISTS dbsidecar_saga_steps")
        other = conn.transaction()
        await other.start()
        await conn.execute(saga_log._CREATE_LEDGER)
        installing = asyncio.create_task(saga_log.install_ledger(users, sharded=True))

        async def waiting() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'transactionid'"
                    " AND datname = current_database()"
                )
            )

        await eventually(waiting, 30, "the install to wait on the catalog")
        await other.commit()
        await installing
        assert await conn.fetchval("SELECT to_regclass('dbsidecar_saga_steps') IS NOT NULL")
    finally:
        await conn.close()
