"""Attacks on read coalescing: every read must answer exactly what it answers alone.

Each attack sends the same plans twice through a sidecar: one at a time (nothing to
coalesce with) and all at once in one bundle (one event-loop turn: the reads of one
statement on one node form a group), and compares every answer: status, error code and
SQLSTATE, columns, types, rows (in order where an order was asked) and rowcount. Where
it matters, the truth is also read straight from PostgreSQL. Shapes are warmed alone
first: a statement is coalesced only once its first run taught it its parameter types.

Two findings of these attacks were fixed in the sidecar, and are kept here:

- A list value at a scalar where-position (``grp = [1]`` on an integer column, or a
  JSON array document ``{"$json": [1, 2]}`` on a jsonb column) was packed as an element
  of the coalesced statement's ``unnest($n::type[])`` array; asyncpg reads a list
  element as a sub-array, so reads that alone are a 422 answered rows, and JSON array
  documents matched their elements (or ended in a 500). Such groups now run read by read.
- A value asyncpg refuses while encoding it, on a connection that has not run that SQL
  yet, left the connection in the pool inside an implicit transaction holding
  AccessShareLock on the table: DDL on it then waited forever. Such a connection is now
  closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from devstack.topology import USER_SHARDS

from ..conftest import server_dsn, sidecar_config
from ..harness import SidecarProcess, counter, eventually
from .attack import post, query, rss_bytes

T = "coal_atk"
NAMES_T = "coal_atk_names"
WEIRD_T = "coal_atk_weird"
LOCK_T = "coal_atk_lock"
REPL_T = "coal_atk_repl"
DDL_T = "coal_atk_ddl"
STATEMENTS = "dbsidecar_coalesced_statements_total"
# Users ids no other test writes (the users table is shared by the session).
USER_BASE = 9_310_000

SCHEMA = f"""
DROP TABLE IF EXISTS {T}, {DDL_T}, {NAMES_T}, {WEIRD_T}, {LOCK_T}, {REPL_T};
DROP TYPE IF EXISTS coal_atk_mood;
DROP DOMAIN IF EXISTS coal_atk_pos;
CREATE TYPE coal_atk_mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN coal_atk_pos AS integer CHECK (VALUE > 0);
CREATE TABLE {T} (
    id integer PRIMARY KEY, grp integer, bi bigint, num numeric(10, 2), f float8,
    ts timestamp, tstz timestamptz, flag boolean, c char(4), vc varchar(3), tag text,
    tagc text COLLATE "C", b bytea, u uuid, j jsonb, mood coal_atk_mood,
    pos coal_atk_pos, iv interval, d date, ints integer[]
);
CREATE TABLE {NAMES_T} (id integer PRIMARY KEY, o integer, v text, n integer, k text,
                        s text, i integer, ord integer);
CREATE TABLE {WEIRD_T} (id integer PRIMARY KEY, "dbsidecar.n" integer,
                        "dbsidecar.k" text, "dbsidecar.o" integer, grp integer);
CREATE TABLE {LOCK_T} (id integer PRIMARY KEY, grp integer);
CREATE TABLE {REPL_T} (id integer PRIMARY KEY, grp integer);
CREATE TABLE {DDL_T} (id integer PRIMARY KEY, grp integer);
"""

JSON_DOCS = [[1, 2], [3, 4], 1, 2, 3, 4, {"a": 1, "b": 2}, "x", [5]]


def _row(i: int) -> str:
    """Row ``i`` of the attack table as a VALUES tuple: values that repeat, NULLs,
    and the spellings PostgreSQL tells apart or not (1.0 vs 1.00, -0.0, NaN, ...)."""
    nums = ["1.00", "1.50", "2.00", "NaN", "0.00", "-1.00"]
    floats = ["0", "-0", "'NaN'", "'Infinity'", "1.5", "2"]
    moods = ["sad", "ok", "happy"]
    chars = ["ab", "ab  ", "AB", "a"]
    tags = ["a", "A", "a ", "", "b", "B"]
    doc = json.dumps(JSON_DOCS[i % len(JSON_DOCS)])
    grp = "NULL" if i % 11 == 0 else str(i % 5)
    return (
        f"({i}, {grp}, {2**40 + i % 3}, '{nums[i % 6]}', {floats[i % 6]}::float8,"
        f" '2026-01-01 00:00'::timestamp + interval '{i % 3} hour',"
        f" '2026-01-01 00:00+00'::timestamptz + interval '{i % 3} hour', {i % 2 == 0},"
        f" '{chars[i % 4]}', '{'abc' if i % 2 else 'ab'}', '{tags[i % 6]}', '{tags[i % 6]}',"
        f" '\\x{i % 3:02x}'::bytea, '00000000-0000-0000-0000-00000000000{i % 3}', '{doc}',"
        f" '{moods[i % 3]}', {i % 4 + 1}, interval '{i % 3} day', date '2026-01-01' + {i % 2},"
        f" ARRAY[{i % 3}, {i % 2}])"
    )


@pytest.fixture(scope="module")
async def tables(topology) -> AsyncIterator[None]:
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    await conn.execute(SCHEMA)
    await conn.execute(f"INSERT INTO {T} VALUES " + ", ".join(_row(i) for i in range(1, 61)))
    await conn.execute(
        f"INSERT INTO {NAMES_T} SELECT g, g % 3, 'v' || g % 4, g % 5, 'k' || g % 2, 's', g, g"
        " FROM generate_series(1, 30) g"
    )
    await conn.execute(
        f"INSERT INTO {WEIRD_T} SELECT g, g % 3, 'k' || g % 2, g, g % 4"
        " FROM generate_series(1, 30) g"
    )
    await conn.execute(f"INSERT INTO {LOCK_T} SELECT g, g % 4 FROM generate_series(1, 40) g")
    yield
    # Bounded: a connection left holding a lock on these tables fails the teardown
    # instead of hanging it (see test_a_refused_value_leaves_no_lock_behind).
    await conn.execute("SET lock_timeout = '10s'")
    await conn.execute(
        f"DROP TABLE {T}, {DDL_T}, {NAMES_T}, {WEIRD_T}, {LOCK_T}, {REPL_T};"
        " DROP TYPE coal_atk_mood; DROP DOMAIN coal_atk_pos"
    )
    await conn.close()


@pytest.fixture(scope="module")
async def own(topology, tables, tmp_path_factory) -> AsyncIterator[SidecarProcess]:
    """A sidecar of this module's own, stopped before the tables are dropped: attacks
    with values asyncpg refuses leave its connections holding locks on them (the
    finding below), which only closing its connections ends."""
    workdir: Path = tmp_path_factory.mktemp("coalesce-own")
    proc = SidecarProcess(
        sidecar_config(topology, workdir, "coalesce-own"), workdir, "coalesce-own"
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


# ---------------------------------------------------------------------------- helpers


def sel(
    where: dict[str, Any] | None,
    *,
    table: str = T,
    columns: list[str] | None = None,
    order: list[tuple[str, bool]] | None = (("id", False),),  # type: ignore[assignment]
    database: str = "orders",
    **extra: Any,
) -> dict[str, Any]:
    plan: dict[str, Any] = {"op": "select", "database": database, "table": table}
    if columns is not None:
        plan["columns"] = columns
    if where is not None:
        plan["where"] = where
    if order:
        plan["order_by"] = [{"col": c, "desc": d} for c, d in order]
    plan.update(extra)
    return plan


def eq(col: str, value: Any, op: str = "=") -> dict[str, Any]:
    return {"col": col, "op": op, "value": value}


def _normal(plan: dict[str, Any], status: int, body: Any) -> Any:
    """An answer as comparable data: rows in order where the plan asked for one."""
    if status != 200:
        error = (body or {}).get("error") or {}
        return ("error", status, error.get("code"), error.get("sqlstate"))
    rows = [json.dumps(r, sort_keys=True) for r in body.get("rows", [])]
    if not plan.get("order_by") and plan["op"] != "count":
        rows.sort()  # no order asked for: any order is the same answer
    return (body.get("columns"), body.get("types"), rows, body.get("rowcount", 0))


async def alone(url: str, plans: list[dict[str, Any]]) -> list[Any]:
    """Each plan on its own, one after the other: nothing to coalesce with."""
    return [_normal(p, *await query(url, p)) for p in plans]


async def together(url: str, plans: list[dict[str, Any]]) -> list[Any]:
    """All plans in one bundle: they reach the coalescer in one loop turn."""
    status, body = await post(url, "/v1/bundle", {"plans": plans})
    assert status == 200, body
    return [
        _normal(p, 200, item["result"]) if "result" in item else _normal(p, item["status"], item)
        for p, item in zip(plans, body["items"], strict=True)
    ]


def coalesced(proc: SidecarProcess, database: str = "orders") -> float:
    return counter(proc.ops, STATEMENTS, database=database)


async def same_as_alone(proc: SidecarProcess, plans: list[dict[str, Any]]) -> float:
    """Assert the bundle answers what each plan answers alone; the coalesced statements
    it ran."""
    expected = await alone(proc.url, plans)
    before = coalesced(proc)
    got = await together(proc.url, plans)
    for i, (p, g, e) in enumerate(zip(plans, got, expected, strict=True)):
        assert g == e, (i, p)
    return coalesced(proc) - before


# ---------------------------------------------------------------------------- findings


async def test_list_values_at_a_scalar_key_answer_their_own_error(own, tables) -> None:
    """``grp = [1]`` on an integer column is a 422 data_exception alone (asyncpg will
    not bind a list as int4). Coalesced with ``grp = [2]``, the coalescer binds
    ``[[1], [2]]`` as the int4[] of ``unnest``, which asyncpg sends as a 2x1 array:
    unnest yields 1 and 2, and both reads answer 200 with the rows of grp 1 and 2."""
    plans = [sel(eq("grp", [k]), columns=["id"]) for k in (1, 2)]
    await query(own.url, sel(eq("grp", 0), columns=["id"]))  # the shape learns its types
    expected = await alone(own.url, plans)
    assert [e[:3] for e in expected] == [("error", 422, "data_exception")] * 2, expected
    assert await together(own.url, plans) == expected


async def test_json_array_documents_as_keys(own, tables, primary) -> None:
    """jsonb documents that are JSON arrays, as the varying value: ``j = [1, 2]`` and
    ``j = [3, 4]`` each match their own rows alone. Coalesced, the array of keys becomes
    the 2-D jsonb[] {{1,2},{3,4}}: unnest yields the four documents 1, 2, 3, 4 with
    ordinals 1..4, so read 1 gets the rows of document 1, read 2 those of 2, and the rows
    of 3 and 4 (ordinals past the group) raise IndexError: both reads answer 500."""
    plans = [sel(eq("j", {"$json": doc}), columns=["id"]) for doc in ([1, 2], [3, 4])]
    await query(own.url, sel(eq("j", {"$json": "x"}), columns=["id"]))
    truth = [
        [json.dumps([i]) for i in await _ids(primary, f"SELECT id FROM {T} WHERE j = $1", doc)]
        for doc in ("[1, 2]", "[3, 4]")
    ]
    expected = await alone(own.url, plans)
    assert [e[2] for e in expected] == truth and all(truth), (expected, truth)
    assert await together(own.url, plans) == expected


async def test_a_callers_bad_value_does_not_turn_coalescing_off(own, tables) -> None:
    """Values asyncpg refuses before the server sees them (an int past int4, a string
    for an integer, a naive datetime... on their own 422 data_exception, SQLSTATE 22000)
    fail a coalesced statement: its reads run again one by one and each gets its own
    answer, and the form is still used afterwards (only class 42 marks it failed)."""
    shape = {"columns": ["id", "grp", "tag"]}
    await query(own.url, sel(eq("grp", 0), **shape))
    assert await same_as_alone(own, [sel(eq("grp", k), **shape) for k in (1, 2, 3)]) == 1
    for bad in (
        2**31,
        -(2**31) - 1,
        "1",
        {"$datetime": "2026-01-01T00:00:00"},
        {"$json": {"a": 1}},
    ):
        plans = [sel(eq("grp", 1), **shape), sel(eq("grp", bad), **shape)]
        assert await same_as_alone(own, plans) == 0, bad
    good = [sel(eq("grp", k), **shape) for k in (1, 2, 3, 4)]
    assert await same_as_alone(own, good) == 1, "the statement is no longer coalesced"


async def _lockable(primary: asyncpg.Connection, table: str) -> None:
    """DDL can take the table now: no connection holds a lock on it."""
    try:
        async with primary.transaction():
            await primary.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT")
        return
    except asyncpg.LockNotAvailableError:
        pass
    held = await primary.fetch(
        "SELECT a.pid, a.application_name, a.state, a.wait_event, l.mode, a.query"
        " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE l.relation = $1::regclass AND l.granted",
        table,
    )
    pytest.fail(f"{table} is still locked by {[dict(r) for r in held]}")


async def test_a_refused_value_leaves_no_lock_behind(own, tables, primary) -> None:
    """A value asyncpg refuses while encoding it (an int past int4, a string for an
    integer: 422 data_exception, SQLSTATE 22000) on a pooled connection whose asyncpg
    statement cache does not hold the statement's SQL yet: asyncpg 0.32 has already
    sent Parse/Describe and never sends Sync, so the backend stays 'active', wait_event
    ClientRead, in an implicit transaction holding AccessShareLock on the table. The
    pool's reset (pools._reset) does nothing for a clean connection, so it stays so,
    idle in the pool, until that connection runs something again. Any DDL on the table
    (a migration's ALTER, a DROP) waits behind it, and every read queued behind the DDL.

    The single bad read below lands on the connection that ran the first read (its
    cache has the SQL): no lock. The coalescer makes it likely: a group whose statement
    fails reruns its reads one by one at once, on connections that never ran that SQL."""
    shape = {"table": DDL_T, "columns": ["id", "grp"]}
    assert (await query(own.url, sel(eq("grp", 0), **shape)))[0] == 200  # first run: prepare
    status, body = await query(own.url, sel(eq("grp", 2**31), **shape))
    assert status == 422 and body["error"]["sqlstate"] == "22000", body
    await _lockable(primary, DDL_T)
    plans = [sel(eq("grp", g), **shape) for g in (1, 2**31, 2, 3, "x")]
    await same_as_alone(own, plans)
    await _lockable(primary, DDL_T)


async def _ids(conn: asyncpg.Connection, sql: str, *args: Any) -> list[int]:
    return [r[0] for r in await conn.fetch(sql + " ORDER BY id", *args)]


# ---------------------------------------------------------------------------- exact values

# Per column, values that PostgreSQL and Python tell apart differently, or that fail
# alone (bad enum label, a domain's check, a varchar(3) given 4 characters, a naive
# datetime for timestamp, an aware one, a date...). Integers past int4 and other values
# asyncpg refuses client-side are left to the finding above (they turn coalescing off).
FAMILIES: dict[str, list[Any]] = {
    "num": [{"$decimal": "1.0"}, {"$decimal": "1.00"}, {"$decimal": "1"}, 1, 1.0,
            {"$decimal": "NaN"}, {"$decimal": "-0"}, {"$decimal": "1.5"}, 1.5,
            {"$decimal": "1E+0"}, {"$decimal": "1.005"}, {"$decimal": "1e1000"}],
    "f": [0.0, -0.0, 0, {"$float": "NaN"}, {"$float": "Infinity"}, 1.5, 2, True,
          {"$decimal": "1.5"}],
    "tstz": [{"$datetime": "2026-01-01T00:00:00+00:00"},
             {"$datetime": "2026-01-01T01:00:00+01:00"},
             {"$datetime": "2025-12-31T19:00:00-05:00"},
             {"$datetime": "2026-01-01T01:00:00Z"},
             {"$datetime": "2026-01-01T01:00:00.000001+00:00"},
             {"$datetime": "2026-01-01T00:00:00"}, {"$datetime": "-infinity"}],
    "ts": [{"$datetime": "2026-01-01T00:00:00"}, {"$datetime": "2026-01-01T01:00:00"},
           {"$date": "2026-01-01"}, {"$datetime": "2026-01-01T00:00:00.000000"},
           {"$datetime": "2026-01-01T00:00:00+00:00"}, {"$datetime": "2026-01-01T01:00:00+01:00"},
           {"$datetime": "infinity"}],
    "c": ["ab", "ab ", "ab  ", "AB", "a", "a   ", "ab   x"],
    "vc": ["ab", "abc", "abcd", "ab "],
    "tag": ["a", "A", "a ", "", "b", "a\u0000", "\u00e9", "e\u0301"],
    "tagc": ["a", "A", "a ", "", "B"],
    "b": [{"$bytes": "AA=="}, {"$bytes": "AQ=="}, {"$bytes": ""}],
    "u": [{"$uuid": "00000000-0000-0000-0000-000000000001"},
          {"$uuid": "00000000000000000000000000000002"},
          "00000000-0000-0000-0000-000000000001"],
    "j": [{"$json": {"a": 1, "b": 2}}, {"$json": {"b": 2, "a": 1}}, {"$json": 1},
          {"$json": 1.0}, {"$json": "x"}, {"$json": {"a": 1.0, "b": 2}}, {"$json": None}],
    "mood": ["happy", "sad", "HAPPY", "ok"],
    "pos": [1, 2, -1, 0],
    "iv": [{"$interval": "P1D"}, {"$interval": "PT24H"}, {"$interval": "PT0S"}],
    "d": [{"$date": "2026-01-01"}, {"$date": "2026-01-02"}],
    "flag": [True, False],
    "grp": [1, True, 2, False, 4, 1.5, 2.0, -0.0],
    "bi": [2**40, 2**40 + 1, 2**40 + 2.0, True],
}  # fmt: skip


@pytest.mark.parametrize("col", sorted(FAMILIES))
async def test_values_at_the_varying_position(own, tables, col) -> None:
    """One read per value of the family at once (each twice: identical reads share a
    run), against each alone; and ``<`` and ``like`` forms where they apply."""
    values = FAMILIES[col]
    await query(own.url, sel(eq(col, values[0]), columns=["id", col]))
    plans = [sel(eq(col, v), columns=["id", col]) for v in values * 2]
    # A value that fails alone (a bad enum label, text with NUL, an aware datetime for a
    # timestamp) fails the whole coalesced statement: its reads run one by one.
    fails = any(e[0] == "error" for e in await alone(own.url, plans))
    assert await same_as_alone(own, plans) == (0 if fails else 1), col
    if col in ("tag", "tagc", "c", "vc"):
        like = [sel(eq(col, v + "%", "like"), columns=["id"]) for v in values]
        like += [sel(eq(col, v.upper() + "%", "ilike"), columns=["id"]) for v in values]
        await same_as_alone(own, like)
        ranged = [sel(eq(col, v, "<"), columns=["id", col], order=[(col, True), ("id", False)])
                  for v in values]  # fmt: skip
        await same_as_alone(own, ranged)


async def test_values_at_a_position_that_does_not_vary(own, tables) -> None:
    """The non-varying value is taken from the group's first read: reads whose fixed
    value only looks equal (1.0 and 1.00, the same instant in two zones, -0.0 and 0.0,
    'ab' and 'ab ' on char(4)) must not be put into one part as if it were the same."""
    fixed = {
        "num": [{"$decimal": "1.0"}, {"$decimal": "1.00"}, 1, 1.0],
        "tstz": [{"$datetime": "2026-01-01T00:00:00+00:00"},
                 {"$datetime": "2026-01-01T01:00:00+01:00"}],
        "f": [0.0, -0.0, 0],
        "c": ["ab", "ab ", "AB"],
        "j": [{"$json": {"a": 1, "b": 2}}, {"$json": {"b": 2, "a": 1}}],
    }  # fmt: skip
    for col, values in fixed.items():
        shape = {"columns": ["id", "grp", col]}
        await query(own.url, sel({"and": [eq(col, values[0]), eq("grp", 0)]}, **shape))
        plans = [
            sel({"and": [eq(col, v), eq("grp", g)]}, **shape) for v in values for g in range(5)
        ]
        random.Random(col).shuffle(plans)
        assert await same_as_alone(own, plans) >= 1, col


async def test_null_and_between_at_the_varying_position(own, tables) -> None:
    """A between bound may be NULL (x BETWEEN NULL AND 3 is never true): as the varying
    value, a NULL element of the unnest array."""
    shape = {"columns": ["id", "grp"]}
    await query(own.url, sel(eq("grp", [0, 1], "between"), **shape))
    plans = [sel(eq("grp", [lo, 3], "between"), **shape) for lo in (None, 0, 1, 2, None, 5)]
    plans += [sel(eq("grp", [1, hi], "between"), **shape) for hi in (None, 1, 4)]
    assert await same_as_alone(own, plans) >= 1


async def test_in_lists_and_array_columns(own, tables) -> None:
    """IN lists and arrays compared with = are array parameters: never the varying value
    of a coalesced statement, and exact."""
    before = coalesced(own)
    await query(own.url, sel(eq("grp", [1], "in"), columns=["id"]))
    await same_as_alone(
        own, [sel(eq("grp", ks, "in"), columns=["id"]) for ks in ([1], [1, 2], [3], [9])]
    )
    await query(own.url, sel(eq("ints", [0, 0]), columns=["id"]))
    await same_as_alone(
        own, [sel(eq("ints", a), columns=["id"]) for a in ([0, 0], [1, 1], [2, 0], [])]
    )
    assert coalesced(own) == before


# ---------------------------------------------------------------------------- shapes


async def test_limits_offsets_and_orders(own, tables) -> None:
    """Reads of one shape that differ in limit or offset only (never one part), in limit
    and key, with limit 0, and ordered by a non-unique column."""
    shape = {"columns": ["id", "grp", "tag"], "limit": 3, "offset": 1}
    await query(own.url, sel(eq("grp", 1), **shape))
    plans = [
        sel(eq("grp", g), columns=["id", "grp", "tag"], limit=lim, offset=off)
        for g in (1, 2, 9) for lim in (0, 1, 3) for off in (0, 2)
    ]  # fmt: skip
    assert await same_as_alone(own, plans) >= 1
    ties = [sel(eq("grp", g), columns=["tag"], order=[("tag", True)]) for g in range(5)]
    await query(own.url, ties[0])
    assert await same_as_alone(own, ties) >= 1


async def test_or_not_and_inequality_shapes(own, tables) -> None:
    """The varying value inside an or, under a not, in != (NULL rows excluded) and in the
    second of two values of one column; a group larger than coalescing.max_plans."""
    shapes = [
        lambda g: {"or": [eq("grp", g), eq("tag", "B")]},
        lambda g: {"not": {"and": [eq("grp", g), eq("flag", True)]}},
        lambda g: eq("grp", g, "!="),
        lambda g: {"and": [eq("grp", 1, ">="), eq("grp", g, "<=")]},
    ]
    for shape in shapes:
        await query(own.url, sel(shape(0), columns=["id", "grp"]))
        plans = [sel(shape(g), columns=["id", "grp"]) for g in (0, 1, 2, 3, 4, 9)]
        assert await same_as_alone(own, plans) == 1, shape(0)
    await query(own.url, sel(eq("id", 0), columns=["id", "tag", "tagc"]))
    many = [sel(eq("id", i % 70), columns=["id", "tag", "tagc"]) for i in range(600)]
    assert await same_as_alone(own, many) >= 2


async def test_a_nondeterministic_collation(own, tables, primary) -> None:
    """A case- and accent-insensitive ICU collation on the column: 'a', 'A' and 'á' are
    one value to PostgreSQL, three to the coalescer (three elements of the array, each
    compared under the column's collation). LIKE is refused under it (alone too)."""
    await primary.execute(
        "DROP TABLE IF EXISTS coal_atk_ci; DROP COLLATION IF EXISTS coal_atk_ci;"
        " CREATE COLLATION coal_atk_ci (provider = icu, locale = 'und-u-ks-level1',"
        " deterministic = false);"
        " CREATE TABLE coal_atk_ci (id integer PRIMARY KEY, name text COLLATE coal_atk_ci);"
        " INSERT INTO coal_atk_ci SELECT g, (ARRAY['a', 'A', 'á', 'b', 'B', 'ss', 'ß'])[g % 7 + 1]"
        " FROM generate_series(1, 28) g"
    )
    try:
        cols = {"table": "coal_atk_ci", "columns": ["id", "name"]}
        order = [("name", False), ("id", True)]
        for op in ("=", "<", "like"):
            plans = [sel(eq("name", v, op), **cols, order=order)
                     for v in ("a", "A", "á", "b", "ss", "ß", "x")]  # fmt: skip
            await query(own.url, plans[0])
            fails = any(e[0] == "error" for e in await alone(own.url, plans))
            assert await same_as_alone(own, plans) == (0 if fails else 1), op
    finally:
        await primary.execute("DROP TABLE coal_atk_ci; DROP COLLATION coal_atk_ci")


async def test_counts_and_aggregates(own, tables) -> None:
    counts = [{"op": "count", "database": "orders", "table": T, "where": eq("tag", t)}
              for t in ("a", "A", "a ", "", "zz", "a")]  # fmt: skip
    await query(own.url, counts[0])
    assert await same_as_alone(own, counts) >= 1
    aggs = [
        {"op": "aggregate", "database": "orders", "table": T, "group_by": ["grp"],
         "aggregates": [{"fn": "sum", "col": "num", "alias": "o"},
                        {"fn": "count", "alias": "n"}, {"fn": "avg", "col": "f", "alias": "v"}],
         "where": eq("tag", t), "order_by": [{"col": "n", "desc": True}, {"col": "grp"}],
         "limit": 3}
        for t in ("a", "A", "b", "none")
    ]  # fmt: skip
    await query(own.url, aggs[0])
    assert await same_as_alone(own, aggs) >= 1
    no_group = [{"op": "aggregate", "database": "orders", "table": T,
                 "aggregates": [{"fn": "max", "col": "tstz"}, {"fn": "min", "col": "num"}],
                 "where": eq("grp", g)} for g in (0, 1, 9)]  # fmt: skip
    await query(own.url, no_group[0])
    assert await same_as_alone(own, no_group) >= 1


async def test_select_star_with_names_of_the_coalesced_statement(own, tables) -> None:
    """Tables whose columns are named like the coalesced statement's own names: ``o``,
    ``v``, ``n``, ``k``, ``s``, ``i`` (coalesced), and "dbsidecar.n", "dbsidecar.k",
    "dbsidecar.o" (the form cannot work: the reads run one by one, exactly)."""
    await query(own.url, sel(eq("o", 0), table=NAMES_T, columns=None))
    plans = [sel(eq("o", g), table=NAMES_T) for g in (0, 1, 2, 7)]
    plans += [sel(eq("v", f"v{g}"), table=NAMES_T, order=[("n", True), ("id", False)])
              for g in range(4)]  # fmt: skip
    await query(own.url, plans[-1])
    assert await same_as_alone(own, plans) >= 1
    await query(own.url, sel(eq("grp", 0), table=WEIRD_T))
    weird = [sel(eq("grp", g), table=WEIRD_T) for g in (0, 1, 2, 3, 9)]
    for _ in range(2):  # the failed form is not tried again: both rounds exact
        await same_as_alone(own, weird)


# ---------------------------------------------------------------------------- the cap

CAP = 10


@pytest.fixture(scope="module")
async def capped(topology, tables, tmp_path_factory) -> AsyncIterator[SidecarProcess]:
    workdir: Path = tmp_path_factory.mktemp("coalesce-capped")
    config = sidecar_config(topology, workdir, "coalesce-capped")
    config["limits"] = {"max_result_rows": CAP}
    proc = SidecarProcess(config, workdir, "coalesce-capped")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


async def test_the_cap_per_read_not_per_group(capped, primary) -> None:
    """limits.max_result_rows = 10: reads of 10 rows each (40 together, past the
    coalesced statement's own LIMIT 11), reads of 20 to 40 rows among them (each its own
    result_too_large), counts of more reads than the cap, each exactly as alone."""
    ids = {g: await _ids(primary, f"SELECT id FROM {LOCK_T} WHERE grp = $1", g) for g in range(4)}
    assert all(len(v) == CAP for v in ids.values()), ids
    shape = {"columns": ["id", "grp"], "table": LOCK_T}
    await query(capped.url, sel(eq("grp", 0), **shape))
    assert await same_as_alone(capped, [sel(eq("grp", g), **shape) for g in range(4)]) == 0
    await query(capped.url, sel(eq("grp", 0, ">="), **shape))
    mixed = [sel(eq("grp", g, op), **shape) for g in range(5) for op in ("=", ">=")]
    got = await alone(capped.url, mixed)
    assert got.count(("error", 400, "result_too_large", None)) == 3, got
    await same_as_alone(capped, mixed)
    counts = [{"op": "count", "database": "orders", "table": T, "where": eq("id", i, "<")}
              for i in range(25)]  # fmt: skip
    await query(capped.url, counts[0])
    await same_as_alone(capped, counts)
    limited = [sel(eq("grp", g), **shape, limit=CAP, offset=1) for g in range(4)]
    await query(capped.url, limited[0])
    await same_as_alone(capped, limited)
    few = [sel(eq("grp", g), **shape, limit=2) for g in range(4)]
    await query(capped.url, few[0])
    assert await same_as_alone(capped, few) == 1


# ---------------------------------------------------------------------------- nodes


@pytest.fixture
async def users_rows(own, topology) -> AsyncIterator[list[dict[str, Any]]]:
    rows = [
        {"id": USER_BASE + i, "name": f"coal-{i % 4}", "country": ["fr", "de", None][i % 3],
         "score": i % 7, "balance": {"$decimal": f"{i}.50"}, "rating": i / 4}
        for i in range(24)
    ]  # fmt: skip
    status, body = await query(
        own.url, {"op": "insert", "database": "users", "table": "users", "rows": rows}
    )
    assert status == 200, body
    yield rows
    status, body = await query(
        own.url,
        {"op": "delete", "database": "users", "table": "users",
         "where": eq("id", [USER_BASE, USER_BASE + 999], "between"), "route": {"shard": "*"}},
    )  # fmt: skip
    assert status == 200, body


async def test_scatter_reads_on_the_sharded_database(own, users_rows) -> None:
    """Key-less reads fan out to every shard; several of one shape at once coalesce per
    shard node, then merge. Explicit shard routes and key reads too."""
    mine = eq("id", [USER_BASE, USER_BASE + 999], "between")

    def users(where: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return sel({"and": [mine, where]}, table="users", database="users", **kw)

    cols = {"columns": ["id", "name", "score", "balance", "rating"]}
    plans = [users(eq("name", f"coal-{k}"), **cols) for k in range(5)]
    plans += [users(eq("score", s, ">="), **cols, order=[("score", True), ("id", False)],
                    limit=4, offset=1) for s in range(4)]  # fmt: skip
    plans += [
        {
            "op": "count",
            "database": "users",
            "table": "users",
            "where": {"and": [mine, eq("country", c)]},
        }
        for c in ("fr", "de", "xx")
    ]
    plans += [
        {
            "op": "aggregate",
            "database": "users",
            "table": "users",
            "group_by": ["country"],
            "aggregates": [
                {"fn": "sum", "col": "balance", "alias": "total"},
                {"fn": "max", "col": "rating"},
            ],
            "where": {"and": [mine, eq("name", f"coal-{k}")]},
            "order_by": [{"col": "total", "desc": True}],
        }
        for k in range(3)
    ]
    plans += [
        users(eq("name", f"coal-{k}"), **cols, route={"shard": s})
        for k in range(2)
        for s in (USER_SHARDS[0], USER_SHARDS[2], 1)
    ]
    plans += [sel(eq("id", USER_BASE + i), table="users", database="users") for i in range(9)]
    for p in plans:
        await query(own.url, p)
    before = coalesced(own, "users")
    await same_as_alone(own, plans)
    assert coalesced(own, "users") > before


async def test_replica_and_primary_reads_never_mix(own, topology, primary) -> None:
    """The replica's replay is paused: a row written on the primary is there for primary
    reads and read-your-writes reads (their token sends them to the primary), not for
    replica reads of the same shape in the same bundle."""
    replica = await asyncpg.connect(server_dsn(topology, topology.replica, "orders"))
    try:
        await primary.execute(f"INSERT INTO {REPL_T} SELECT g, g % 3 FROM generate_series(1, 9) g")
        shape = {"columns": ["id", "grp"], "table": REPL_T}

        async def replicated() -> bool:
            return await replica.fetchval(f"SELECT count(*) FROM {REPL_T}") == 9

        await eventually(replicated, 10, "the replica to replay the table")
        for role in ("primary", "replica"):
            await query(own.url, sel(eq("grp", 0), **shape, route={"role": role}))
        await replica.execute("SELECT pg_wal_replay_pause()")
        status, body = await query(
            own.url,
            {"op": "insert", "database": "orders", "table": REPL_T,
             "rows": [{"id": 100 + g, "grp": g} for g in range(3)]},
        )  # fmt: skip
        assert status == 200, body
        token = body["lsn"]
        plans = [
            sel(eq("grp", g), **shape, route=route)
            for g in range(3)
            for route in ({"role": "replica"}, {"role": "primary"},
                          {"role": "replica", "after": token})
        ]  # fmt: skip
        status, body = await post(own.url, "/v1/bundle", {"plans": plans})
        assert status == 200, body
        for p, item in zip(plans, body["items"], strict=True):
            g, route = p["where"]["value"], p["route"]
            truth = await _ids(
                replica if route == {"role": "replica"} else primary,
                f"SELECT id FROM {REPL_T} WHERE grp = $1",
                g,
            )
            assert [r[0] for r in item["result"].get("rows", [])] == truth, (route, item)
            assert (100 + g in truth) == (route != {"role": "replica"})
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()


# ---------------------------------------------------------------------------- cancelling


@contextlib.asynccontextmanager
async def locked(primary: asyncpg.Connection, table: str) -> AsyncIterator[None]:
    """Reads of ``table`` wait behind an ACCESS EXCLUSIVE lock until the block ends."""
    tx = primary.transaction()
    await tx.start()
    try:
        await primary.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        await tx.rollback()


async def _waiting(topology, pattern: str) -> list[int]:
    conn = await asyncpg.connect(server_dsn(topology, topology.primary, "orders"))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND wait_event_type = 'Lock'"
            " AND pid <> pg_backend_pid()",
            pattern,
        )
        return [r[0] for r in rows]
    finally:
        await conn.close()


async def test_a_cancelled_coalesced_statement(own, topology, tables, primary) -> None:
    """pg_cancel_backend on the coalesced statement while it waits for a lock: each read
    answers what it answers alone (its reads run again one by one), or 409
    query_canceled, and nothing is left running."""
    shape = {"columns": ["id", "grp"], "table": LOCK_T}
    plans = [sel(eq("grp", g), **shape) for g in (0, 1, 2, 3, 9, 1)]
    expected = await alone(own.url, plans)
    pattern = f"%dbsidecar.k%{LOCK_T}%"
    async with locked(primary, LOCK_T):
        bundle = asyncio.ensure_future(together(own.url, plans))

        async def blocked() -> bool:
            return len(await _waiting(topology, pattern)) == 1

        await eventually(blocked, 10, "the coalesced statement to wait for the lock")
        (pid,) = await _waiting(topology, pattern)
        assert await primary.fetchval("SELECT pg_cancel_backend($1)", pid)

        async def gone() -> bool:
            return not await _waiting(topology, pattern)

        await eventually(gone, 10, "the coalesced statement to end")
    got = await bundle
    canceled = ("error", 409, "query_canceled", "57014")
    assert all(g in (e, canceled) for g, e in zip(got, expected, strict=True)), got
    assert not await _waiting(topology, f"%{LOCK_T}%")


async def test_a_channel_that_closes_mid_group(own, topology, tables, primary) -> None:
    """A channel sends a bundle frame whose group waits for a lock, then closes (the
    sidecar cancels its plans). An HTTP bundle of the same shape waiting meanwhile gets
    its exact answers, the sidecar's memory and later groups are unaffected."""
    shape = {"columns": ["id", "grp"], "table": LOCK_T, "order": [("id", True)]}
    plans = [sel(eq("grp", g), **shape) for g in (0, 1, 2, 3)]
    expected = await alone(own.url, plans)
    assert own.proc is not None
    rss = rss_bytes(own.proc.pid)
    pattern = f'%dbsidecar.k%{LOCK_T}%ORDER BY "id" DESC%'
    async with locked(primary, LOCK_T), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(own.url + "/v1/channel")
        await ws.send_json({"id": 1, "plans": plans * 3})

        async def one_waiting() -> bool:
            return len(await _waiting(topology, pattern)) == 1

        await eventually(one_waiting, 10, "the channel's group to wait")
        bundle = asyncio.ensure_future(together(own.url, plans))

        async def two_waiting() -> bool:
            return len(await _waiting(topology, pattern)) == 2

        await eventually(two_waiting, 10, "the bundle's group to wait")
        await ws.close()
    assert await bundle == expected
    assert await together(own.url, plans) == expected
    assert rss_bytes(own.proc.pid) - rss < 50 * 2**20


# ---------------------------------------------------------------------------- many clients


async def test_many_clients_at_once_against_postgres(own, tables, primary) -> None:
    """Twelve clients, each its own HTTP session, send seeded random bundles and single
    reads of overlapping keys at once; every answer is checked against PostgreSQL."""
    shape = {"columns": ["id", "tag", "num"]}
    await query(own.url, sel(eq("grp", 0), **shape))
    truth: dict[Any, list[int]] = {}
    for g in range(7):
        truth[g] = await _ids(primary, f"SELECT id FROM {T} WHERE grp = $1", g)
    before = coalesced(own)

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with aiohttp.ClientSession() as http:
            for _ in range(8):
                keys = [rng.randrange(7) for _ in range(rng.randrange(1, 12))]
                plans = [sel(eq("grp", k), **shape) for k in keys]
                if len(plans) == 1:
                    async with http.post(own.url + "/v1/query", json=plans[0]) as resp:
                        items = [{"result": await resp.json()}]
                else:
                    async with http.post(own.url + "/v1/bundle", json={"plans": plans}) as r:
                        items = (await r.json())["items"]
                for k, item in zip(keys, items, strict=True):
                    assert [row[0] for row in item["result"].get("rows", [])] == truth[k], (seed, k)

    await asyncio.gather(*(client(seed) for seed in range(12)))
    assert coalesced(own) > before
