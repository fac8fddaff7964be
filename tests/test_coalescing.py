"""Read coalescing: concurrent reads of one shape run as one statement, and answer exactly
what each read answers alone.

The property test runs seeded random bundles of reads twice through the session sidecar:
one plan at a time (nothing to coalesce with) and all at once in one bundle (coalesced),
and compares every result. The mechanism tests count statements where PostgreSQL counts
them, in pg_stat_statements.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from client.connection import DatabaseHandle
from client.errors import DbSidecarError
from client.transport import Transport
from wire.protocol import Aggregate, AggregateQuery, Count, OrderBy, Plan, Raw, Result, Select
from wire.values import encode_value

from .harness import counter

TABLE = "coalesce_probe"
BASE = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
UUIDS = [uuid.UUID(int=n * 7919) for n in range(1, 4)]
ROWS = 60
COALESCED_SQL = f"""
SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
WHERE query LIKE '%dbsidecar.k%' AND query LIKE '%{TABLE}%'"""
ALONE_SQL = f"""
SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
WHERE query LIKE 'SELECT%FROM "{TABLE}"%' AND query NOT LIKE '%dbsidecar.k%'"""


@pytest.fixture(scope="module")
async def probe(sidecar, topology) -> AsyncIterator[str]:
    """A table of 60 rows whose columns repeat values (keys shared by several rows), hold
    NULLs, and have types that must round-trip exactly."""
    from .conftest import server_dsn

    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    await conn.execute(
        f"""DROP TABLE IF EXISTS {TABLE};
        CREATE TABLE {TABLE} (id integer PRIMARY KEY, grp integer, tag text, ts timestamptz,
                              amount numeric(10, 2), u uuid, f double precision)"""
    )
    rows = [
        (
            i,
            None if i % 11 == 0 else i % 7,
            f"a{i % 5}",
            BASE + datetime.timedelta(hours=i % 4),
            Decimal(i) * Decimal("1.25"),
            UUIDS[i % 3],
            float("nan") if i % 13 == 0 else i / 3,
        )
        for i in range(1, ROWS + 1)
    ]
    await conn.copy_records_to_table(TABLE, records=rows)
    yield TABLE
    await conn.execute(f"DROP TABLE {TABLE}")
    await conn.close()


def _eq(col: str, value: Any) -> dict[str, Any]:
    return {"col": col, "op": "=", "value": encode_value(value)}


def _order(rng: random.Random) -> list[OrderBy]:
    return [OrderBy("id", desc=rng.random() < 0.5)]


def _plan(kind: str, rng: random.Random) -> Plan:
    """One read of a family; the key comes from a small range, so bundles hold duplicate
    keys, keys of no row and (for grp) NULL."""
    grp = rng.choice([*range(9), None])
    tag = f"a{rng.randrange(7)}"
    if kind == "by_grp":
        limit = rng.choice([None, 1, 2, 5])
        return Select(database="orders", table=TABLE, columns=["id", "grp", "tag", "amount"],
                      where=_eq("grp", grp), order_by=_order(rng), limit=limit)  # fmt: skip
    if kind == "by_grp_and_tag":
        where = {"and": [_eq("tag", tag), _eq("grp", grp)]}
        return Select(database="orders", table=TABLE, where=where, order_by=_order(rng))
    if kind == "by_ts":
        ts = BASE + datetime.timedelta(hours=rng.randrange(6))
        return Select(database="orders", table=TABLE, columns=["id", "ts", "f"],
                      where=_eq("ts", ts), order_by=_order(rng))  # fmt: skip
    if kind == "by_uuid":
        u = rng.choice([*UUIDS, uuid.UUID(int=1)])
        return Select(database="orders", table=TABLE, columns=["id", "u"], where=_eq("u", u))
    if kind == "count_tag":
        return Count(database="orders", table=TABLE, where=_eq("tag", tag))
    if kind == "sum_by_grp":
        return AggregateQuery(
            database="orders",
            table=TABLE,
            aggregates=[Aggregate("sum", "amount", "total"), Aggregate("count", None, "n")],
            group_by=["grp"],
            where=_eq("tag", tag),
            order_by=[OrderBy("grp")],
        )
    raise AssertionError(kind)


KINDS = ["by_grp", "by_grp_and_tag", "by_ts", "by_uuid", "count_tag", "sum_by_grp"]


def _comparable(plan: Plan, outcome: Result | DbSidecarError) -> Any:
    if isinstance(outcome, DbSidecarError):
        return ("error", outcome.code)
    rows = [repr(r) for r in outcome.rows]  # repr: NaN equals itself as text
    if isinstance(plan, Select) and not plan.order_by:
        rows.sort()  # no order asked for: any order is the same answer
    return outcome.columns, outcome.types, rows, outcome.rowcount


def handle(sidecar, batching: bool) -> DatabaseHandle:
    return DatabaseHandle("coalesce", transport=Transport(sidecar.url), database="orders",
                          consistency="eventual", batching=batching, read_retries=0)  # fmt: skip


async def _outcome(db: DatabaseHandle, plan: Plan) -> Result | DbSidecarError:
    try:
        return await db.run(plan)
    except DbSidecarError as exc:
        return exc


async def test_coalesced_reads_answer_exactly_what_each_answers_alone(sidecar, probe) -> None:
    alone, together = handle(sidecar, batching=False), handle(sidecar, batching=True)
    before = counter(sidecar.ops, "dbsidecar_coalesced_statements_total")
    try:
        for seed in range(40):
            rng = random.Random(seed)
            kinds = rng.sample(KINDS, rng.choice([1, 1, 2]))
            plans = [_plan(rng.choice(kinds), rng) for _ in range(rng.randrange(2, 25))]
            expected = [_comparable(p, await _outcome(alone, p)) for p in plans]
            got = await asyncio.gather(*(_outcome(together, p) for p in plans))
            assert [_comparable(p, g) for p, g in zip(plans, got, strict=True)] == expected, seed
    finally:
        await alone.transport.close()
        await together.transport.close()
    assert counter(sidecar.ops, "dbsidecar_coalesced_statements_total") > before


async def test_a_bundle_of_point_reads_is_one_statement(sidecar, probe, primary) -> None:
    db = handle(sidecar, batching=True)
    plans = [
        Select(database="orders", table=TABLE, columns=["id", "tag"], where=_eq("id", k))
        for k in [*range(1, 31), 5, 999]  # a duplicate and a key of no row
    ]
    try:
        await db.run(plans[0])  # the shape's first run learns its parameter types
        coalesced, alone = await primary.fetchval(COALESCED_SQL), await primary.fetchval(ALONE_SQL)
        results = await asyncio.gather(*(db.run(p) for p in plans))
    finally:
        await db.transport.close()
    assert [r.rows for r in results] == [[[k, f"a{k % 5}"]] for k in range(1, 31)] + [
        [[5, "a0"]],
        [],
    ]
    assert await primary.fetchval(COALESCED_SQL) == coalesced + 1
    assert await primary.fetchval(ALONE_SQL) == alone


async def test_a_failing_read_gets_its_own_error_and_the_others_their_rows(sidecar, probe) -> None:
    """A LIKE pattern ending in the escape character fails in PostgreSQL once a match
    reaches it; coalesced with
    good patterns, the statement fails, and each read runs again alone."""
    db = handle(sidecar, batching=True)
    like = [Select(database="orders", table=TABLE, columns=["id"],
                   where={"col": "tag", "op": "like", "value": p}, order_by=[OrderBy("id")])
            for p in ["a1%", "%\\", "a2%"]]  # fmt: skip
    try:
        await db.run(like[0])
        first, bad, last = await asyncio.gather(*(_outcome(db, p) for p in like))
    finally:
        await db.transport.close()
    assert isinstance(bad, DbSidecarError) and bad.status == 422 and "escape" in str(bad), bad
    assert isinstance(first, Result) and [r[0] for r in first.rows] == list(range(1, 61, 5))
    assert isinstance(last, Result) and [r[0] for r in last.rows] == list(range(2, 61, 5))


async def test_coalescing_never_crosses_writes_or_transactions(sidecar, probe, primary) -> None:
    """Reads inside a transaction see the transaction's own writes: they never join a
    group that runs on another connection."""
    db = handle(sidecar, batching=True)
    try:
        async with db.transaction() as tx:
            await tx.run(Select(database="orders", table=TABLE, where=_eq("id", 1)))
            update = f"UPDATE {TABLE} SET tag = 'in-tx' WHERE id = 1"
            await tx.run(Raw(database="orders", sql=update, writes=True))
            inside, outside = await asyncio.gather(
                tx.run(Select(database="orders", table=TABLE, columns=["tag"], where=_eq("id", 1))),
                db.run(Select(database="orders", table=TABLE, columns=["tag"], where=_eq("id", 1))),
            )
            assert inside.rows == [["in-tx"]] and outside.rows == [["a1"]]
            await tx.rollback()
    finally:
        await db.transport.close()
    assert await primary.fetchval(f"SELECT tag FROM {TABLE} WHERE id = 1") == "a1"
