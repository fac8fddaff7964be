"""Sagas (client.saga) on real PostgreSQL through the session sidecar: the OrderSaga of
tests/saga_order.py completes, compensates in reverse, retries a failing compensation until
it succeeds, honours step and saga timeouts, settles lost commit answers with
pg_xact_status, and applies each step once when two orchestrators race for a saga.

Every test uses its own SKU and order ids, so the books of each (stock, orders, payments)
are checked on their own. The kill -9 tests run orchestrators as processes
(tests/saga_worker.py) that SIGKILL themselves at every event an orchestrator reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from client import ConnectionManager, saga_log, saga_metrics
from client.saga import Orchestrator, Saga, SagaOutcome, Step
from client.transactions import Transaction
from devstack.topology import USER_SHARDS, shard_server
from sidecar import saga_view

from .conftest import server_dsn, sidecar_config
from .harness import SidecarProcess, eventually
from .models import User
from .saga_order import TABLES, complete, create_order, fail_order, order_saga, release, reserve
from .saga_worker import LEASE

pytestmark = pytest.mark.usefixtures("handles")
STOCK = 100
FAST = {"backoff": 0.01, "max_backoff": 0.05}


@pytest.fixture(scope="session")
async def saga_dbs(topology, handles) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """Direct connections to orders, inventory and payments (to read the truth), with the
    test tables and the saga log and ledgers installed."""
    conns = {db: await asyncpg.connect(server_dsn(topology, topology.primary, db)) for db in TABLES}
    for db, sql in TABLES.items():
        await conns[db].execute(sql)
    await Orchestrator([order_saga()]).install()
    yield conns
    for conn in conns.values():
        await conn.close()


async def new_sku(dbs: dict[str, asyncpg.Connection]) -> str:
    sku = f"sku-{uuid.uuid4().hex[:8]}"
    await dbs["inventory"].execute("INSERT INTO saga_test_stock VALUES ($1, $2)", sku, STOCK)
    return sku


def order(sku: str, **extra: Any) -> dict[str, Any]:
    return {"order_id": f"o-{uuid.uuid4().hex[:10]}", "sku": sku, "qty": 2, "amount": "25.00"} | (
        extra
    )


async def books(dbs: dict[str, asyncpg.Connection], sku: str) -> dict[str, Any]:
    """What PostgreSQL holds for one SKU: stock, orders by status, payments per order."""
    stock = await dbs["inventory"].fetchval("SELECT qty FROM saga_test_stock WHERE sku = $1", sku)
    orders = await dbs["orders"].fetch(
        "SELECT id, qty, status FROM saga_test_orders WHERE sku = $1", sku
    )
    ids = [o["id"] for o in orders]
    payments = await dbs["payments"].fetch(
        "SELECT order_id, kind, amount FROM saga_test_payments WHERE order_id = ANY($1)", ids
    )
    return {"stock": stock, "orders": {o["id"]: dict(o) for o in orders}, "payments": payments}


async def assert_balanced(
    dbs: dict[str, asyncpg.Connection], sku: str, outcomes: list[SagaOutcome]
) -> None:
    """Every saga ended completed or compensated; nothing applied twice or left half-done."""
    truth = await books(dbs, sku)
    sold = 0
    for outcome in outcomes:
        assert outcome.state in ("completed", "compensated"), outcome
        order_id = outcome.data["order_id"]
        mine = [p["kind"] for p in truth["payments"] if p["order_id"] == order_id]
        row = truth["orders"].get(order_id)
        if outcome.state == "completed":
            assert mine == ["charge"], (outcome, mine)
            assert row is not None and row["status"] == "completed", (outcome, row)
            sold += row["qty"]
        else:
            assert mine.count("charge") <= 1 and mine.count("charge") == mine.count("refund")
            assert row is None or row["status"] == "failed", (outcome, row)
    assert truth["stock"] + sold == STOCK, (truth["stock"], sold)


class Recorder:
    """An on_event hook keeping (event, step) in order, per saga."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def __call__(self, name: str, saga_id: str, step: int) -> None:
        self.events.append((name, step))

    def of(self, prefix: str) -> list[tuple[str, int]]:
        return [e for e in self.events if e[0].startswith(prefix)]


async def test_an_order_saga_completes_with_each_step_applied_once(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    events = Recorder()
    saga = order_saga()
    orchestrator = Orchestrator([saga], on_event=events)
    data = order(sku)
    outcome = await orchestrator.start(saga, data)
    assert outcome is not None and outcome.state == "completed", outcome
    assert outcome.data["stock_left"] == STOCK - 2 and outcome.data["payment_id"] > 0
    await assert_balanced(saga_dbs, sku, [outcome])
    assert events.of("action.logged") == [("action.logged", i) for i in range(4)]
    assert events.events[-1] == ("completed", 4)
    # The ledger of each database has the step applied there, with its output.
    ledger = await saga_dbs["inventory"].fetch(
        "SELECT step, phase, output FROM dbsidecar_saga_steps WHERE saga_id = $1", outcome.id
    )
    assert [(r["step"], r["phase"]) for r in ledger] == [(0, "action")]
    assert '"stock_left": 98' in ledger[0]["output"]
    # Finished: no orchestrator can claim it again.
    assert await orchestrator.run(outcome.id) is None
    assert (await orchestrator.get(outcome.id)) == outcome


async def test_a_declined_payment_compensates_the_applied_steps_in_reverse(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    events = Recorder()
    saga = order_saga()
    orchestrator = Orchestrator([saga], on_event=events)
    outcome = await orchestrator.start(saga, order(sku, limit="10.00"))
    assert outcome is not None and outcome.state == "compensated", outcome
    assert "PaymentDeclined" in (outcome.error or "")
    # The charge was never applied: compensate create_order, then reserve; nothing else.
    assert events.of("compensation.logged") == [
        ("compensation.logged", 1),
        ("compensation.logged", 0),
    ]
    await assert_balanced(saga_dbs, sku, [outcome])
    truth = await books(saga_dbs, sku)
    assert truth["stock"] == STOCK and truth["payments"] == []
    assert [o["status"] for o in truth["orders"].values()] == ["failed"]


async def test_a_failing_compensation_is_retried_until_it_succeeds(saga_dbs) -> None:
    """Never skipped: it fails four times (stuck after two, visible in the log and the
    gauge), succeeds on the fifth, and only then is the step before it compensated."""
    sku = await new_sku(saga_dbs)
    failures = 4
    seen_stuck: list[SagaOutcome | None] = []

    async def flaky_fail_order(tx: Transaction, data: dict[str, Any]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("the orders service is having a bad day")
        await fail_order(tx, data)

    async def declined(tx: Transaction, data: dict[str, Any]) -> None:
        raise RuntimeError("declined")

    saga = Saga(
        "flaky",
        [
            Step("reserve", reserve, release, database="inventory"),
            Step("create_order", create_order, flaky_fail_order, database="orders"),
            Step("charge", declined, database="payments"),
        ],
    )
    events = Recorder()

    async def hook(name: str, saga_id: str, step: int) -> None:
        events(name, saga_id, step)
        if name == "stuck":
            seen_stuck.append(await orchestrator.get(saga_id))

    registry = CollectorRegistry()
    saga_metrics.enable(registry)
    try:
        orchestrator = Orchestrator([saga], stuck_after=2, on_event=hook, **FAST)
        outcome = await orchestrator.start(saga, order(sku))
    finally:
        saga_metrics.disable()
    assert outcome is not None and outcome.state == "compensated" and not outcome.stuck
    assert events.of("compensation.failed") == [("compensation.failed", 1)] * 4
    assert events.of("compensation.logged") == [
        ("compensation.logged", 1),
        ("compensation.logged", 0),
    ]
    assert events.of("stuck") == [("stuck", 1)]
    stuck = seen_stuck[0]
    assert stuck is not None and stuck.stuck and stuck.state == "compensating"
    assert stuck.attempts == 2 and "bad day" in (stuck.last_error or "")
    await assert_balanced(saga_dbs, sku, [outcome])
    value = registry.get_sample_value
    assert value("dbsidecar_client_sagas_started_total", {"saga": "flaky"}) == 1
    assert value("dbsidecar_client_sagas_compensated_total", {"saga": "flaky"}) == 1
    assert value("dbsidecar_client_sagas_stuck", {"saga": "flaky"}) == 0


async def test_a_step_that_outlasts_its_timeout_rolls_back_and_compensates(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    never = asyncio.Event()

    async def hanging_charge(tx: Transaction, data: dict[str, Any]) -> None:
        await saga_dbs["payments"].execute("SELECT 1")  # the step has begun
        await never.wait()

    saga = Saga(
        "hanging",
        [
            Step("reserve", reserve, release, database="inventory"),
            Step("create_order", create_order, fail_order, database="orders"),
            Step("charge", hanging_charge, database="payments", timeout=0.2),
            Step("complete", complete, database="orders"),
        ],
    )
    outcome = await Orchestrator([saga]).start(saga, order(sku))
    assert outcome is not None and outcome.state == "compensated", outcome
    assert "timed out after 0.2 s" in (outcome.error or "")
    await assert_balanced(saga_dbs, sku, [outcome])
    # The step's transaction rolled back: its ledger row is gone with it.
    assert not await saga_dbs["payments"].fetchval(
        "SELECT count(*) FROM dbsidecar_saga_steps WHERE saga_id = $1", outcome.id
    )


async def test_a_saga_past_its_deadline_compensates(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    never = asyncio.Event()

    async def slow_charge(tx: Transaction, data: dict[str, Any]) -> None:
        await never.wait()

    steps = [
        Step("reserve", reserve, release, database="inventory"),
        Step("create_order", create_order, fail_order, database="orders"),
        Step("charge", slow_charge, database="payments", timeout=30),
    ]
    saga = Saga("deadline", steps, timeout=0.5)
    orchestrator = Orchestrator([saga])
    outcome = await orchestrator.start(saga, order(sku))
    assert outcome is not None and outcome.state == "compensated", outcome
    assert "deadline passed" in (outcome.error or "")
    # A saga nobody ran before its deadline: resumed, it compensates without a step.
    late = Saga("late", steps, timeout=0.0)
    orchestrator = Orchestrator([late])
    saga_id = await orchestrator.begin(late, order(sku))
    (resumed,) = [o for o in await orchestrator.resume() if o.id == saga_id]
    assert resumed.state == "compensated" and resumed.error == "the saga's deadline passed"
    await assert_balanced(saga_dbs, sku, [outcome, resumed])


async def test_a_rewound_log_replays_applied_steps_from_the_ledgers(saga_dbs) -> None:
    """The log's database restored from an older backup (here: the row set back to step 0)
    while the services' databases were not: each step finds its ledger row and takes the
    stored output instead of applying itself again."""
    sku = await new_sku(saga_dbs)
    saga = order_saga()
    first = await Orchestrator([saga]).start(saga, order(sku))
    assert first is not None and first.state == "completed"
    await saga_dbs["orders"].execute(
        "UPDATE dbsidecar_sagas SET state = 'running', step = 0, pending = NULL, owner = NULL,"
        " data = data - 'stock_left' - 'payment_id' WHERE id = $1",
        first.id,
    )
    events = Recorder()
    again = await Orchestrator([saga], on_event=events).run(first.id)
    assert again is not None and again.state == "completed"
    assert events.of("action.") == [
        (event, step) for step in range(4) for event in ("action.replayed", "action.logged")
    ]
    assert again.data == first.data  # the outputs came back from the ledgers
    await assert_balanced(saga_dbs, sku, [again])


async def test_a_step_on_a_sharded_database_runs_and_compensates_on_its_shard(
    topology, saga_dbs
) -> None:
    async def create_user(tx: Transaction, data: dict[str, Any]) -> None:
        await User(id=data["user_id"], name="saga").save(using=tx)

    async def delete_user(tx: Transaction, data: dict[str, Any]) -> None:
        user = await User.find_by_id(data["user_id"]).using(tx).one()
        await user.delete()

    async def refuse(tx: Transaction, data: dict[str, Any]) -> None:
        raise RuntimeError("refused")

    def shard_of(data: dict[str, Any]) -> str:
        return f"user_shard_{data['user_id'] % len(USER_SHARDS)}"

    saga = Saga(
        "signup",
        [
            Step("create_user", create_user, delete_user, database="users", shard=shard_of),
            Step("refuse", refuse, database="payments"),
        ],
    )
    orchestrator = Orchestrator([saga])
    await orchestrator.install()  # the ledger on every shard of users
    user_id = 7_700_001 + uuid.uuid4().int % 1000
    outcome = await orchestrator.start(saga, {"user_id": user_id})
    assert outcome is not None and outcome.state == "compensated", outcome
    index = user_id % len(USER_SHARDS)
    conn = await asyncpg.connect(
        server_dsn(topology, shard_server(topology, index), USER_SHARDS[index])
    )
    try:
        ledger = await conn.fetch(
            "SELECT phase FROM dbsidecar_saga_steps WHERE saga_id = $1 ORDER BY phase",
            outcome.id,
        )
        assert [r["phase"] for r in ledger] == ["action", "compensation"]
        assert await conn.fetchval("SELECT count(*) FROM users WHERE id = $1", user_id) == 0
    finally:
        await conn.close()


async def test_orchestrators_installing_at_once_all_succeed(saga_dbs) -> None:
    """Pods starting together each install the log: PostgreSQL's CREATE TABLE IF NOT EXISTS
    lets concurrent creators collide in its catalog (a unique violation), which install()
    absorbs. Tried in a database without the log (inventory), a few rounds."""
    db = ConnectionManager.handle_for(ConnectionManager.get("default"), "inventory")
    try:
        for _ in range(4):
            await saga_dbs["inventory"].execute("DROP TABLE IF EXISTS dbsidecar_sagas")
            await asyncio.gather(*(saga_log.install_log(db) for _ in range(8)))
            assert await saga_dbs["inventory"].fetchval("SELECT to_regclass('dbsidecar_sagas')")
    finally:
        await saga_dbs["inventory"].execute("DROP TABLE IF EXISTS dbsidecar_sagas")


async def test_serve_runs_sagas_begun_anywhere(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    saga = order_saga()
    orchestrator = Orchestrator([saga])
    ids = [await orchestrator.begin(saga, order(sku)) for _ in range(3)]
    # Beginning with an id that exists begins nothing new.
    assert await orchestrator.begin(saga, order(sku), saga_id=ids[0]) == ids[0]
    background = asyncio.create_task(Orchestrator([saga]).serve(interval=0.05))
    try:

        async def finished() -> bool:
            outcomes = [await orchestrator.get(i) for i in ids]
            return all(o is not None and o.finished for o in outcomes)

        await eventually(finished, 30, "the background orchestrator to run the sagas")
    finally:
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
    outcomes = [await orchestrator.get(i) for i in ids]
    await assert_balanced(saga_dbs, sku, [o for o in outcomes if o is not None])


async def test_a_saga_is_not_resumed_under_a_changed_definition(saga_dbs) -> None:
    """Step indexes in the log mean the steps it began with: code whose steps differ leaves
    the saga alone (and says why in the log) for code that still has them."""
    sku = await new_sku(saga_dbs)
    saga = order_saga()
    saga_id = await Orchestrator([saga]).begin(saga, order(sku))
    changed = Saga("order", saga.steps[:2] + saga.steps[3:])
    assert await Orchestrator([changed], lease=0.01).run(saga_id) is None
    left = await Orchestrator([saga]).get(saga_id)
    assert left is not None and left.state == "running" and left.step == 0
    assert "not resumed: the log has steps" in (left.last_error or "")

    async def lease_over() -> bool:
        return bool(await Orchestrator([saga]).run(saga_id))

    await eventually(lease_over, 10, "the original code to run the saga")
    outcome = await Orchestrator([saga]).get(saga_id)
    assert outcome is not None and outcome.state == "completed"
    await assert_balanced(saga_dbs, sku, [outcome])


async def test_pg_xact_status_settles_committed_aborted_and_running_transactions(
    saga_dbs,
) -> None:
    db = ConnectionManager.handle_for(ConnectionManager.get("default"), "payments")
    conn = saga_dbs["payments"]
    txids = {}
    for end in ("COMMIT", "ROLLBACK"):
        await conn.execute("BEGIN")
        txids[end] = await conn.fetchval("SELECT pg_current_xact_id()::text")
        await conn.execute(end)
    assert await saga_log.xact_status(db, txids["COMMIT"], None) == "committed"
    assert await saga_log.xact_status(db, txids["ROLLBACK"], None) == "aborted"
    async with conn.transaction():
        running = await conn.fetchval("SELECT pg_current_xact_id()::text")
        assert await saga_log.xact_status(db, running, None) == "in progress"


class CommitAnswerDropper:
    """A TCP proxy in front of the sidecar that, once armed, lets the next commit request
    through and drops its answer: the commit happens, the client never hears of it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        drop = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.armed and b"/commit HTTP/1.1" in data:
                    self.armed = False
                    drop.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if drop.is_set():
                    self.dropped += 1
                    break  # the commit's answer: lost
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_lost_commit_answer_is_settled_as_committed(sidecar, saga_dbs) -> None:
    """The charge commits but its answer never arrives: pg_xact_status says committed, so
    the saga goes on with that charge instead of charging again or compensating."""
    sku = await new_sku(saga_dbs)
    proxy = CommitAnswerDropper(sidecar.port)
    ConnectionManager.configure(
        {"saga_proxy": {"sidecar": await proxy.start(), "database": "orders", "transport": "http"}}
    )
    events = Recorder()

    def hook(name: str, saga_id: str, step: int) -> None:
        events(name, saga_id, step)
        if (name, step) == ("action.committing", 2):
            proxy.armed = True

    saga = order_saga()
    try:
        orchestrator = Orchestrator([saga], log="saga_proxy", on_event=hook)
        outcome = await orchestrator.start(saga, order(sku))
    finally:
        await proxy.stop()
    assert proxy.dropped == 1
    assert outcome is not None and outcome.state == "completed", outcome
    step2 = [e for e, step in events.events if step == 2 and e.startswith("action.")]
    assert step2 == [
        "action.begun",
        "action.committing",
        "action.unknown",
        "action.committed",
        "action.logged",
    ]
    await assert_balanced(saga_dbs, sku, [outcome])


async def test_a_commit_whose_connection_died_is_settled_as_aborted_and_retried(
    saga_dbs,
) -> None:
    """The charge's server connection is terminated before COMMIT: the sidecar answers
    write_outcome_unknown, pg_xact_status says aborted, and the charge runs again, once."""
    sku = await new_sku(saga_dbs)
    events = Recorder()
    killed: list[bool] = []

    async def hook(name: str, saga_id: str, step: int) -> None:
        events(name, saga_id, step)
        if (name, step) == ("action.committing", 2) and not killed:
            killed.append(
                await saga_dbs["payments"].fetchval(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = 'payments' AND state = 'idle in transaction'"
                    " AND backend_xid IS NOT NULL"
                )
            )

    saga = order_saga()
    outcome = await Orchestrator([saga], on_event=hook, **FAST).start(saga, order(sku))
    assert killed == [True]
    assert outcome is not None and outcome.state == "completed", outcome
    step2 = [e for e, step in events.events if step == 2 and e.startswith("action.")]
    assert step2[:4] == ["action.begun", "action.committing", "action.unknown", "action.failed"]
    assert step2[4:] == ["action.begun", "action.committing", "action.committed", "action.logged"]
    await assert_balanced(saga_dbs, sku, [outcome])


async def test_two_orchestrators_racing_for_a_saga_run_it_once(saga_dbs) -> None:
    sku = await new_sku(saga_dbs)
    saga = order_saga()
    first, second = Orchestrator([saga]), Orchestrator([saga])
    ids = [await first.begin(saga, order(sku)) for _ in range(4)]
    runs = await asyncio.gather(*(o.run(i) for i in ids for o in (first, second)))
    outcomes = [r for r in runs if r is not None]
    assert sorted(o.id for o in outcomes) == sorted(ids)  # each saga ran in one of them
    await assert_balanced(saga_dbs, sku, outcomes)


async def _take_over_mid_step(
    saga_dbs: dict[str, asyncpg.Connection], second_log: str
) -> tuple[str, SagaOutcome, SagaOutcome | None, list[str]]:
    """A holds the saga with a short lease and stops inside the charge step (ledger row
    inserted, action not run) until B, through ``second_log``, has taken the saga over.
    B's outcome, A's, and B's events at the charge step."""
    sku = await new_sku(saga_dbs)
    saga = order_saga()
    events = Recorder()
    second = Orchestrator([saga], log=second_log, on_event=events, **FAST)
    paused = asyncio.Event()

    async def pause_inside_charge(name: str, saga_id: str, step: int) -> None:
        if (name, step) != ("action.begun", 2):
            return
        paused.set()

        async def taken_over() -> bool:
            owner = await saga_dbs["orders"].fetchval(
                "SELECT owner FROM dbsidecar_sagas WHERE id = $1", saga_id
            )
            return owner == second.owner

        await eventually(taken_over, 30, "the second orchestrator to take the saga over")

    first = Orchestrator([saga], lease=0.5, on_event=pause_inside_charge, **FAST)
    saga_id = await first.begin(saga, order(sku))
    a = asyncio.create_task(first.run(saga_id))
    await asyncio.wait_for(paused.wait(), 30)
    b_outcome: list[SagaOutcome] = []

    async def b_ran() -> bool:
        if (outcome := await second.run(saga_id)) is not None:
            b_outcome.append(outcome)
        return bool(b_outcome)

    await eventually(b_ran, 30, "the second orchestrator to claim the saga")
    a_outcome = await a
    charge = [e for e, step in events.events if step == 2 and e.startswith("action.")]
    return sku, b_outcome[0], a_outcome, charge


async def test_a_saga_taken_over_mid_step_on_the_same_sidecar_applies_the_step_once(
    saga_dbs,
) -> None:
    """B finds A's charge transaction in progress, rolls it back through the sidecar they
    share, and charges; A's charge fails on its rolled-back transaction and A stops."""
    sku, b, a, b_charge = await _take_over_mid_step(saga_dbs, "default")
    assert a is None  # A lost the saga: its next log write found B's lease
    assert b_charge[:3] == ["action.begun", "action.committing", "action.committed"]
    assert b.state == "completed", b
    await assert_balanced(saga_dbs, sku, [b])


@pytest.fixture(scope="module")
def second_sidecar(topology, workdir, handles) -> Any:
    """Another pod's sidecar: it cannot end a transaction the first one holds."""
    proc = SidecarProcess(sidecar_config(topology, workdir, "saga-b"), workdir, "saga-b")
    proc.start()
    ConnectionManager.configure({"saga_b": {"sidecar": proc.url, "database": "orders"}})
    try:
        yield proc
    finally:
        proc.terminate()


async def test_a_saga_taken_over_mid_step_by_another_pod_waits_for_the_step(
    saga_dbs, second_sidecar
) -> None:
    """B, on its own sidecar, finds A's charge transaction in progress and waits; A charges
    and commits, B's pg_xact_status says committed, B goes on from A's charge (its payment
    id from the ledger), and A stops at its next log write."""
    sku, b, a, b_charge = await _take_over_mid_step(saga_dbs, "saga_b")
    assert a is None
    assert b_charge[:2] == ["action.committed", "action.logged"]  # settled, not run again
    assert b.state == "completed", b
    truth = await books(saga_dbs, sku)
    (payment,) = [p for p in truth["payments"] if p["order_id"] == b.data["order_id"]]
    assert payment["kind"] == "charge" and payment["amount"] == Decimal("25.00")
    await assert_balanced(saga_dbs, sku, [b])


# The checkout's root: the worker runs as `python -m tests.saga_worker` from there.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def crash_sidecar(topology, workdir, handles) -> Any:
    """The killed workers' sidecar. A worker killed inside a step leaves its transaction open
    on the sidecar (holding row locks and a connection) until its idle timeout: 3 s here
    instead of 60, as a pod whose orchestrator dies quickly loses its sidecar too."""
    config = sidecar_config(topology, workdir, "saga-crash")
    config["transactions"] = {"idle_timeout": 3.0}
    for db in config["databases"].values():
        db["pool"] = {"max_size": 30}
    proc = SidecarProcess(config, workdir, "saga-crash")
    proc.start()
    ConnectionManager.configure({"saga_crash": {"sidecar": proc.url, "database": "orders"}})
    try:
        yield proc
    finally:
        proc.terminate()


async def _crash_everywhere(crash_sidecar, saga_dbs, **flags: Any) -> int:
    """Run one saga per event an orchestrator reports on this path, each in a worker process
    that SIGKILLs itself at that event; then resume them all here. Every saga must end as
    an unkilled run does, with the books of its own SKU balanced. The number of points."""
    saga = order_saga()
    # The path's events, in order, from a run that is not killed.
    events = Recorder()
    sku = await new_sku(saga_dbs)
    reference = await Orchestrator([saga], on_event=events).start(saga, order(sku, **flags))
    assert reference is not None
    await assert_balanced(saga_dbs, sku, [reference])
    points = list(dict.fromkeys(events.events))
    sagas = {point: (str(uuid.uuid4()), await new_sku(saga_dbs)) for point in points}
    procs: list[asyncio.subprocess.Process] = []
    # Two cores: more workers at once only queue for them.
    gate = asyncio.Semaphore(6)

    async def crash(point: tuple[str, int]) -> tuple[tuple[str, int], int | None, bytes]:
        saga_id, sku = sagas[point]
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.saga_worker", crash_sidecar.url, saga_id,
                json.dumps(order(sku, **flags)), point[0], str(point[1]),
                cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            return point, proc.returncode, err

    try:
        results = await asyncio.gather(*(crash(p) for p in points))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    survivors = [(p, code, err.decode()[-2000:]) for p, code, err in results if code != -9]
    assert not survivors, survivors  # each worker died at its point, by SIGKILL
    # The restart: an orchestrator here takes over once the workers' leases have run out.
    orchestrator = Orchestrator([saga], log="saga_crash", lease=LEASE, **FAST)
    outcomes: dict[tuple[str, int], SagaOutcome] = {}

    async def all_finished() -> bool:
        await orchestrator.resume()
        for point, (saga_id, _) in sagas.items():
            outcome = await orchestrator.get(saga_id)
            assert outcome is not None, point
            if outcome.finished:
                outcomes[point] = outcome
        return len(outcomes) == len(sagas)

    await eventually(all_finished, 90, "every killed saga to finish", interval=0.2)
    for point, outcome in outcomes.items():
        assert outcome.state == reference.state, (point, outcome)
        await assert_balanced(saga_dbs, sagas[point][1], [outcome])
    return len(points)


async def test_kill_9_at_every_point_of_a_completing_saga(crash_sidecar, saga_dbs) -> None:
    # started, claimed, 4 steps x (begun, committing, committed, logged), completed
    assert await _crash_everywhere(crash_sidecar, saga_dbs) == 19


async def test_kill_9_at_every_point_of_a_compensating_saga(crash_sidecar, saga_dbs) -> None:
    # started, claimed, 3 steps x 4, complete begun and failed, compensating,
    # 3 compensations x 4, compensated
    points = await _crash_everywhere(crash_sidecar, saga_dbs, fail_complete=True)
    assert points == 2 + 12 + 2 + 1 + 12 + 1


def _sagas_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    saga_view.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sagas", *argv])
    return args.func(args)


async def test_the_sagas_command_lists_unfinished_sagas_through_the_sidecar(
    sidecar, saga_dbs, capsys
) -> None:
    async def noop(tx: Transaction, data: dict[str, Any]) -> None:
        return None

    saga = Saga("viewed", [Step("first", noop), Step("second", noop)])
    orchestrator = Orchestrator([saga])
    saga_id = await orchestrator.begin(saga, {"n": 1})
    for url in (sidecar.url, sidecar.uds_url):
        code = await asyncio.to_thread(_sagas_command, "--database", "orders", "--url", url)
        out = capsys.readouterr().out
        assert code == 0, out
        (line,) = [line for line in out.splitlines() if line.startswith(saga_id)]
        assert line.split()[1:6] == ["viewed", "running", "1/2", "first", "0"], line
        assert out.splitlines()[0].split() == [
            "ID", "NAME", "STATE", "STEP", "ATTEMPTS", "AGE", "OWNER", "ERROR",
        ]  # fmt: skip
    outcome = await orchestrator.run(saga_id)
    assert outcome is not None and outcome.state == "completed"
    code = await asyncio.to_thread(_sagas_command, "--database", "orders", "--url", sidecar.url)
    assert code == 0 and saga_id not in capsys.readouterr().out
    argv = ("--database", "orders", "--url", sidecar.url, "--all", "--json")
    assert await asyncio.to_thread(_sagas_command, *argv) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[saga_id]["state"] == "completed" and rows[saga_id]["owner"] is None
    # A database without the log says so instead of failing obscurely.
    argv = ("--database", "inventory", "--url", sidecar.url)
    assert await asyncio.to_thread(_sagas_command, *argv) == 1
    assert "no saga log in 'inventory'" in capsys.readouterr().err
