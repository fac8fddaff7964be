"""Attacks on interactive transactions: an acknowledged write is committed, and a
transaction never harms the requests around it.

Before the transaction state machine (issue 10) a failed transaction's commit
answered 200 with an LSN while PostgreSQL had rolled everything back, a plan racing
the commit was acknowledged and lost (its connection left idle in transaction), a
raw COMMIT ended the transaction under the client's feet, and ten open transactions
took every primary connection.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import yaml

from client import WriteOutcomeUnknown
from client.connection import DatabaseHandle
from client.transport import Transport
from wire.protocol import Raw

from ..conftest import sidecar_config
from ..harness import SidecarProcess, eventually
from .attack import Proxy, post

ORDERS = "orders"


def insert(user_id: int, status: str = "tx-attack") -> dict[str, Any]:
    return {"op": "insert", "database": ORDERS, "table": "orders",
            "rows": [{"user_id": user_id, "status": status}]}  # fmt: skip


def raw(sql: str, writes: bool = True) -> dict[str, Any]:
    return {"op": "raw", "database": ORDERS, "sql": sql, "writes": writes}


async def begin(sidecar: SidecarProcess) -> str:
    status, body = await post(sidecar.url, "/v1/tx", {"database": ORDERS})
    assert status == 200, body
    return body["id"]


def marker() -> int:
    """A user_id no other test uses, so counts below are this test's own."""
    return 700_000 + uuid.uuid4().int % 200_000


async def count(primary, user_id: int) -> int:
    return await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user_id)


async def idle_in_transaction(primary) -> int:
    return await primary.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbsidecar'"
        " AND state LIKE 'idle in transaction%'"
    )


async def test_commit_of_a_failed_transaction_is_an_error_and_nothing_commits(
    sidecar, primary
) -> None:
    user = marker()
    tx = await begin(sidecar)
    assert (await post(sidecar.url, f"/v1/tx/{tx}", insert(user)))[0] == 200
    status, body = await post(sidecar.url, f"/v1/tx/{tx}", raw("SELECT 1 / 0", writes=False))
    assert status == 422 and body["error"]["code"] == "data_exception"
    # A plan after the failure is refused, and so is the commit: never a 200 with a token.
    status, body = await post(sidecar.url, f"/v1/tx/{tx}", insert(user))
    assert status == 409 and body["error"]["code"] == "transaction_aborted"
    status, body = await post(sidecar.url, f"/v1/tx/{tx}/commit", None)
    assert status == 409 and body["error"]["code"] == "transaction_aborted"
    assert "lsn" not in body
    assert await count(primary, user) == 0
    # The transaction is over and its connection back in the pool, clean.
    assert (await post(sidecar.url, f"/v1/tx/{tx}/rollback", None))[0] == 404
    await eventually(lambda: _zero(idle_in_transaction(primary)), 5, "no idle transaction")


async def _zero(value: Any) -> bool:
    return await value == 0


async def test_a_plan_racing_the_commit_is_never_acknowledged_and_lost(sidecar, primary) -> None:
    user = marker()
    late_rows = 0
    for runs in range(5):
        tx = await begin(sidecar)
        slow = asyncio.create_task(
            post(sidecar.url, f"/v1/tx/{tx}", raw(
                f"INSERT INTO orders (user_id, status) SELECT {user}, 'slow' FROM pg_sleep(0.3)"
            ))
        )  # fmt: skip
        # Commit and a second plan while the first still runs in PostgreSQL.
        await eventually(
            lambda: _running(primary, "pg_sleep(0.3)"), 10, "the slow plan to be running"
        )
        commit = asyncio.create_task(post(sidecar.url, f"/v1/tx/{tx}/commit", None))
        late = asyncio.create_task(post(sidecar.url, f"/v1/tx/{tx}", insert(user, "late")))
        (slow_status, _), (commit_status, _), (late_status, late) = await asyncio.gather(
            slow, commit, late
        )
        # The commit waited for the running plan; the late plan either got in before the
        # commit (then it is committed) or found the transaction finished (404): never
        # acknowledged and lost, never a 5xx.
        assert slow_status == 200 and commit_status == 200
        assert late_status in (200, 404), late
        rows = dict(
            await primary.fetch(
                "SELECT status, count(*) FROM orders WHERE user_id = $1 GROUP BY status", user
            )
        )
        assert rows.get("slow") == runs + 1
        late_rows += late_status == 200
        assert rows.get("late", 0) == late_rows
    assert await idle_in_transaction(primary) == 0
    # The pool did not shrink: the transaction share is available again in full.
    held = [await begin(sidecar) for _ in range(5)]
    for tx in held:
        assert (await post(sidecar.url, f"/v1/tx/{tx}/rollback", None))[0] == 200


async def _running(primary, fragment: str) -> bool:
    return bool(
        await primary.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
            f"%{fragment}%",
        )
    )


@pytest.mark.parametrize(
    "sql",
    ["COMMIT", "ROLLBACK", "BEGIN", "SAVEPOINT s", "RELEASE SAVEPOINT s", "END",
     "PREPARE TRANSACTION 'x'", "COMMIT AND CHAIN", "START TRANSACTION"],
)  # fmt: skip
async def test_raw_transaction_control_is_refused_inside_a_transaction(
    sidecar, primary, sql: str
) -> None:
    user = marker()
    tx = await begin(sidecar)
    assert (await post(sidecar.url, f"/v1/tx/{tx}", insert(user)))[0] == 200
    status, body = await post(sidecar.url, f"/v1/tx/{tx}", raw(sql))
    assert status == 400 and body["error"]["code"] == "raw_refused", body
    assert (await post(sidecar.url, f"/v1/tx/{tx}/rollback", None))[0] == 200
    assert await count(primary, user) == 0  # the client's rollback held


@pytest.mark.parametrize("sql", ["COMMIT", "ROLLBACK", "SAVEPOINT s", "BEGIN"])
async def test_raw_transaction_control_is_refused_in_a_batch(sidecar, primary, sql: str) -> None:
    user = marker()
    plans = [insert(user), raw(sql), insert(user)]
    status, body = await post(sidecar.url, "/v1/batch", {"plans": plans})
    assert status == 400 and body["error"]["code"] == "raw_refused"
    assert body["error"]["index"] == 1
    assert await count(primary, user) == 0


async def test_open_transactions_cannot_starve_ordinary_traffic(sidecar, primary) -> None:
    pool = sidecar.config["databases"][ORDERS].get("pool", {}).get("max_size", 10)
    held: list[str] = []
    refused = None
    for _ in range(pool + 2):
        status, body = await post(sidecar.url, "/v1/tx", {"database": ORDERS})
        if status != 200:
            refused = (status, body)
            break
        held.append(body["id"])
    try:
        assert refused is not None, "every connection of the pool went to transactions"
        assert refused[0] == 503 and refused[1]["error"]["code"] == "too_many_transactions"
        assert refused[1]["error"]["retryable"] is True
        assert 1 <= len(held) < pool
        # Ordinary reads and writes go on at once, never waiting for a connection.
        user = marker()
        answers = await asyncio.gather(
            *(post(sidecar.url, "/v1/query", insert(user)) for _ in range(10)),
            *(post(sidecar.url, "/v1/query", raw("SELECT 1", writes=False)) for _ in range(10)),
        )
        assert [s for s, _ in answers] == [200] * 20
        assert await count(primary, user) == 10
        # A transaction waiting for the share gets it as soon as another one ends.
        waiting = asyncio.create_task(post(sidecar.url, "/v1/tx", {"database": ORDERS}))
        await post(sidecar.url, f"/v1/tx/{held.pop()}/rollback", None)
        status, body = await waiting
        assert status == 200, body
        held.append(body["id"])
    finally:
        for tx in held:
            await post(sidecar.url, f"/v1/tx/{tx}/rollback", None)


async def test_a_finished_transaction_takes_nothing_more(sidecar, primary) -> None:
    user = marker()
    tx = await begin(sidecar)
    assert (await post(sidecar.url, f"/v1/tx/{tx}/commit", None))[0] == 200
    for path, body in ((f"/v1/tx/{tx}", insert(user)), (f"/v1/tx/{tx}/commit", None),
                       (f"/v1/tx/{tx}/rollback", None)):  # fmt: skip
        status, answer = await post(sidecar.url, path, body)
        assert status == 404 and answer["error"]["code"] == "unknown_transaction"
    assert await count(primary, user) == 0


async def test_a_reload_does_not_break_open_transactions(topology, tmp_path, primary) -> None:
    config = sidecar_config(topology, tmp_path, "tx-reload")
    proc = SidecarProcess(config, tmp_path, "tx-reload")
    proc.start()
    try:
        user = marker()
        status, body = await post(proc.url, "/v1/tx", {"database": ORDERS})
        assert status == 200, body
        tx = body["id"]
        assert (await post(proc.url, f"/v1/tx/{tx}", insert(user)))[0] == 200
        # An operator's change: the reload rebuilds the topology's objects.
        config["logging"] = {"slow_query_ms": 12345}
        proc.config_path.write_text(yaml.safe_dump(config))
        status, body = await post(proc.url, "/v1/admin/reload", None)
        assert status == 200 and body["result"] == "applied", body
        status, body = await post(proc.url, f"/v1/tx/{tx}", insert(user))
        assert status == 200, body
        assert (await post(proc.url, f"/v1/tx/{tx}/commit", None))[0] == 200
        assert await count(primary, user) == 2
    finally:
        proc.terminate()


SLOW_COMMIT = """
CREATE TABLE IF NOT EXISTS slow_commit (id bigint);
CREATE OR REPLACE FUNCTION slow_commit_check() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS slow_commit_check ON slow_commit;
-- Deferred: the second passes inside COMMIT, where the test cuts the connection.
CREATE CONSTRAINT TRIGGER slow_commit_check AFTER INSERT ON slow_commit
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_check();
"""


async def test_a_commit_whose_answer_is_lost_is_an_unknown_outcome(sidecar, primary) -> None:
    """The connection drops while COMMIT runs: the client cannot know whether it
    committed, so it says so (WriteOutcomeUnknown), never "unreachable", which reads as
    "nothing happened" and invites a retry that would apply the transaction twice."""
    await primary.execute(SLOW_COMMIT)
    mark = marker()
    async with Proxy(sidecar.port) as proxy:
        db = DatabaseHandle("lost-commit", transport=Transport(proxy.url, mode="http"),
                            database=ORDERS)  # fmt: skip
        try:
            async with db.transaction() as tx:
                sql = "INSERT INTO slow_commit VALUES ($1)"
                await tx.run(Raw(database=ORDERS, sql=sql, params=[mark], writes=True))
                commit = asyncio.create_task(tx.commit())

                async def committing() -> bool:
                    sql = (
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE query ILIKE 'COMMIT%' AND wait_event = 'PgSleep'"
                    )
                    return await primary.fetchval(sql) > 0

                await eventually(committing, 10, "the COMMIT to run")
                proxy.cut()
                with pytest.raises(WriteOutcomeUnknown, match="may or may not have committed"):
                    await commit
        finally:
            await db.transport.close()

    async def committed() -> bool:
        return await primary.fetchval("SELECT count(*) FROM slow_commit WHERE id = $1", mark) == 1

    # Unknown to the client; in truth the sidecar finished the COMMIT.
    await eventually(committed, 10, "the commit to land")
