"""Attacks through raw plans: SQL that changes session state, poisons pooled
connections, acts on other sessions, or is simply wrong.

Before issue 10: a temporary table shadowed ``orders`` on a pooled connection (later
inserts answered 200 and never reached the real table), ``DEALLOCATE ALL`` broke
every later compiled read on that connection, ``PREPARE`` stayed behind, a read-only
raw plan could create large objects and terminate sessions, and a wrong number of
bind parameters marked the primary down for everyone.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from ..harness import SidecarProcess, eventually, http_get
from .attack import post

ORDERS = "orders"


def raw(sql: str, writes: bool = True, params: list[Any] | None = None) -> dict[str, Any]:
    plan: dict[str, Any] = {"op": "raw", "database": ORDERS, "sql": sql, "writes": writes}
    if params is not None:
        plan["params"] = params
    return plan


def read(user_id: int) -> dict[str, Any]:
    return {"op": "select", "database": ORDERS, "table": "orders",
            "where": {"col": "user_id", "op": "=", "value": user_id}}  # fmt: skip


def insert(user_id: int) -> dict[str, Any]:
    return {"op": "insert", "database": ORDERS, "table": "orders",
            "rows": [{"user_id": user_id, "status": "raw-attack"}]}  # fmt: skip


def marker() -> int:
    return 500_000 + uuid.uuid4().int % 100_000


async def flood(sidecar: SidecarProcess, plan: dict[str, Any], times: int) -> list[int]:
    """The plan many times at once, so it reaches every pooled connection."""
    answers = await asyncio.gather(*(post(sidecar.url, "/v1/query", plan) for _ in range(times)))
    return [status for status, _ in answers]


async def test_a_temporary_table_never_shadows_the_real_one(sidecar, primary) -> None:
    user = marker()
    shadow = raw("CREATE TEMP TABLE orders (LIKE public.orders INCLUDING DEFAULTS)")
    assert set(await flood(sidecar, shadow, 20)) == {200}
    assert await flood(sidecar, insert(user), 50) == [200] * 50
    real = "SELECT count(*) FROM public.orders WHERE user_id = $1"
    assert await primary.fetchval(real, user) == 50


async def test_session_settings_do_not_outlive_their_request(sidecar) -> None:
    assert set(await flood(sidecar, raw("SET search_path TO pg_catalog"), 20)) == {200}
    assert set(await flood(sidecar, raw("SET ROLE NONE"), 5)) == {200}
    shown = await asyncio.gather(
        *(post(sidecar.url, "/v1/query", raw("SHOW search_path", writes=False)) for _ in range(20))
    )
    assert {body["rows"][0][0] for _, body in shown} == {'"$user", public'}
    assert set(await flood(sidecar, read(1), 20)) == {200}


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("DEALLOCATE ALL", "raw_refused"),
        ("PREPARE p AS SELECT 1", "raw_refused"),
        ("EXECUTE p", "raw_refused"),
        ("DISCARD ALL", "raw_refused"),
        ("LISTEN channel", "raw_refused"),
        ("LOAD 'auto_explain'", "raw_refused"),
        ("SELECT 1; SELECT 2", "raw_refused"),
        ("COPY orders TO STDOUT", "raw_refused"),
        ("SELEC 1", "syntax_error"),
    ],
)
async def test_statements_that_poison_a_pooled_connection_are_refused(
    sidecar, sql: str, code: str
) -> None:
    status, body = await post(sidecar.url, "/v1/query", raw(sql))
    assert status == 400 and body["error"]["code"] == code, body
    # Compiled reads on every pooled connection still work.
    assert set(await flood(sidecar, read(1), 20)) == {200}


async def test_compiled_reads_survive_the_session_discard_after_raw_sql(sidecar) -> None:
    # DISCARD ALL after a raw plan deallocates asyncpg's server-side statements too: its
    # statement cache must forget them, or the next compiled plan names a missing one.
    for _ in range(3):
        assert set(await flood(sidecar, read(2), 20)) == {200}  # cached statements everywhere
        assert set(await flood(sidecar, raw("SELECT 1", writes=False), 20)) == {200}
    assert set(await flood(sidecar, read(2), 40)) == {200}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT lo_from_bytea(0, '\\x00'::bytea)",
        "SELECT lo_unlink(1)",
        "SELECT lo_create(0)",
        "SELECT pg_notify('c', 'read-only?')",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_xact_lock(42)",
        "SELECT pg_stat_reset()",
        "SELECT * FROM orders WHERE id IN (SELECT pg_catalog.lo_creat(-1))",
    ],
)
async def test_side_effects_in_a_read_only_raw_plan_are_refused(sidecar, primary, sql) -> None:
    objects = "SELECT count(*) FROM pg_largeobject_metadata"
    before = await primary.fetchval(objects)
    status, body = await post(sidecar.url, "/v1/query", raw(sql, writes=False))
    assert status == 400 and body["error"]["code"] == "raw_refused", body
    assert await primary.fetchval(objects) == before


@pytest.mark.parametrize("writes", [False, True])
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'dbsidecar'",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity",
        "SELECT pg_reload_conf()",
    ],
)
async def test_acting_on_other_sessions_is_refused(sidecar, primary, sql, writes) -> None:
    pids = "SELECT array_agg(pid ORDER BY pid) FROM pg_stat_activity WHERE application_name = $1"
    before = await primary.fetchval(pids, "dbsidecar")
    status, body = await post(sidecar.url, "/v1/query", raw(sql, writes=writes))
    assert status == 400 and body["error"]["code"] == "raw_refused", body
    assert await primary.fetchval(pids, "dbsidecar") == before


async def test_a_read_only_raw_plan_that_writes_is_refused(sidecar, primary) -> None:
    user = marker()
    writes = (
        f"INSERT INTO orders (user_id, status) VALUES ({user}, 'x')",
        f"DELETE FROM orders WHERE user_id = {user}",
        "CREATE TABLE sneaky (i int)",
    )
    for sql in writes:
        status, body = await post(sidecar.url, "/v1/query", raw(sql, writes=False))
        assert status == 400 and body["error"]["code"] == "raw_refused", body
    hidden = f"WITH w AS (INSERT INTO orders (user_id, status) VALUES ({user}, 'x')) SELECT 1"
    status, body = await post(sidecar.url, "/v1/query", raw(hidden, writes=False))
    assert status == 409 and body["error"]["code"] == "read_only_transaction"
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user) == 0


@pytest.mark.parametrize(
    ("plan", "status", "code"),
    [
        (raw("SELECT $1::int", writes=False), 400, "bad_statement"),
        (raw("SELECT 1", writes=False, params=[1, 2]), 400, "bad_statement"),
        (raw("SELECT $1::int + $2::int", writes=False, params=[1]), 400, "bad_statement"),
        (raw("SELECT $1::int", writes=True, params=["not a number"]), 422, "data_exception"),
    ],
)
async def test_client_mistakes_never_mark_a_node_down(sidecar, primary, plan, status, code) -> None:
    user = marker()

    async def attack() -> None:
        answers = await asyncio.gather(*(post(sidecar.url, "/v1/query", plan) for _ in range(20)))
        assert {(s, b["error"]["code"]) for s, b in answers} == {(status, code)}

    # Mistakes and honest traffic at once: every honest request succeeds.
    _, honest = await asyncio.gather(attack(), flood(sidecar, insert(user), 40))
    assert honest == [200] * 40
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user) == 40
    health, body = http_get(sidecar.ops + "/healthz")
    assert health == 200 and b'"up":false' not in body.replace(b" ", b"")


async def test_a_statement_canceled_by_someone_else_is_not_a_timeout(sidecar, primary) -> None:
    slow = asyncio.create_task(
        post(sidecar.url, "/v1/query", raw("SELECT pg_sleep(30) /* cancel-me */", writes=False))
    )
    running = "SELECT pid FROM pg_stat_activity WHERE query LIKE '%/* cancel-me */'"

    async def canceled() -> bool:
        pids = [
            r["pid"] for r in await primary.fetch(running) if r["pid"] != primary.get_server_pid()
        ]
        return bool(pids) and all(
            [await primary.fetchval("SELECT pg_cancel_backend($1)", p) for p in pids]
        )

    await eventually(canceled, 10, "the slow statement to run and be canceled")
    status, body = await slow
    assert status == 409 and body["error"]["code"] == "query_canceled", body
    assert body["error"]["retryable"] is True
    assert set(await flood(sidecar, read(1), 10)) == {200}


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("ALTER ROLE CURRENT_USER IN DATABASE orders SET search_path = evil, public", True),
        ("ALTER ROLE CURRENT_USER SET synchronous_commit = off", True),
        ("ALTER DATABASE orders SET default_transaction_read_only = on", True),
        ("ALTER SYSTEM SET synchronous_commit = off", True),
        ("ALTER ROLE CURRENT_USER PASSWORD 'changed'", True),
        ("DO $$ BEGIN PERFORM pg_terminate_backend(pid) FROM pg_stat_activity"
         " WHERE application_name = 'dbsidecar'; END $$", True),
        ("SELECT query_to_xml('select pg_terminate_backend(pid) from pg_stat_activity"
         " where application_name = ''dbsidecar''', true, false, '')", False),
        ("SELECT query_to_xml('select lo_from_bytea(0, ''\\x41''::bytea)', true, false, '')",
         False),
        ("SELECT * FROM ts_stat('select to_tsvector(pg_notify(''c'', ''x'')::text)')", False),
    ],
)  # fmt: skip
async def test_what_reaches_every_later_session_is_refused(sidecar, primary, sql, writes) -> None:
    truth = (
        "SELECT (SELECT count(*) FROM pg_db_role_setting),"
        " (SELECT count(*) FROM pg_largeobject_metadata),"
        " (SELECT array_agg(pid ORDER BY pid) FROM pg_stat_activity"
        "  WHERE application_name = 'dbsidecar')"
    )
    before = await primary.fetchrow(truth)
    status, body = await post(sidecar.url, "/v1/query", raw(sql, writes=writes))
    assert status == 400 and body["error"]["code"] == "raw_refused", body
    assert await primary.fetchrow(truth) == before
    assert set(await flood(sidecar, insert(marker()), 10)) == {200}
