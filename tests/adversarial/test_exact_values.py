"""Attacks on exactness: values JSON cannot spell, and orders only PostgreSQL knows.

A caller sends NaN/±Infinity floats and ±infinity timestamps and dates in inserts and
where-trees, and reads them back; the truth is what PostgreSQL holds. A key-less read on
the sharded ``users`` database orders text under an ICU collation (a column's
``COLLATE "en-x-icu"``, and databases created with an ICU locale) and asks min/max of
it; the oracle is the same rows in one unsharded table. Ordering by jsonb across shards
is refused with a 400, never a 500.

"""

from __future__ import annotations

import asyncpg
import pytest

from devstack.topology import USER_SHARDS

from ..conftest import server_dsn, shard_server, sidecar_config
from ..harness import SidecarProcess
from .attack import query

SPECIAL_FLOATS = ["NaN", "Infinity", "-Infinity"]
# Every ICU root-order subtlety at once: case (a < A), accents (e < é < f),
# punctuation ignored at the first level, digits before letters.
NAMES = ["b", "B", "a", "A", "é", "e", "f", "_x", "Z", "z9", "z10", "ß", "ss", "Å", "å", "1"]


def _insert(table: str, rows: list[dict], returning: list[str] | None = None) -> dict:
    plan = {"database": "orders", "op": "insert", "table": table, "rows": rows}
    if returning:
        plan["returning"] = returning
    return plan


async def test_non_finite_floats_are_stored_and_found_exactly(sidecar, primary) -> None:
    rows = [{"f": {"$float": w}, "txt": f"exact-{w}"} for w in SPECIAL_FLOATS]
    status, body = await query(sidecar.url, _insert("typed", rows, ["id"]))
    assert status == 200, body
    ids = [r[0] for r in body["rows"]]
    held = await primary.fetch("SELECT txt, f::text AS f FROM typed WHERE id = ANY($1)", ids)
    assert {r["txt"]: r["f"] for r in held} == {f"exact-{w}": w for w in SPECIAL_FLOATS}
    for word in SPECIAL_FLOATS:
        plan = {
            "database": "orders",
            "op": "count",
            "table": "typed",
            "where": {
                "and": [
                    {"col": "f", "op": "=", "value": {"$float": word}},
                    {"col": "id", "op": "in", "value": ids},
                ]
            },
        }
        status, body = await query(sidecar.url, plan)
        assert (status, body["rows"]) == (200, [[1]]), (word, body)
    await primary.execute("DELETE FROM typed WHERE id = ANY($1)", ids)


async def test_a_misspelt_special_float_is_a_400(sidecar) -> None:
    status, body = await query(sidecar.url, _insert("typed", [{"f": {"$float": "nan"}}]))
    assert status == 400 and body["error"]["code"] == "bad_value", body


async def test_infinite_timestamps_and_dates_are_stored_exactly(sidecar, primary) -> None:
    rows = [
        {"ts": {"$datetime": s}, "ts_naive": {"$datetime": s}, "d": {"$date": s}, "txt": s}
        for s in ("infinity", "-infinity")
    ]
    status, body = await query(sidecar.url, _insert("typed", rows, ["id"]))
    assert status == 200, body
    ids = [r[0] for r in body["rows"]]
    held = await primary.fetch(
        "SELECT txt, ts::text AS ts, ts_naive::text AS tn, d::text AS d FROM typed"
        " WHERE id = ANY($1) ORDER BY txt",
        ids,
    )
    assert [tuple(r) for r in held] == [
        ("-infinity",) * 4,
        ("infinity",) * 4,
    ]
    plan = {
        "database": "orders",
        "op": "select",
        "table": "typed",
        "columns": ["txt"],
        "where": {
            "and": [
                {"col": "ts", "op": "=", "value": {"$datetime": "infinity"}},
                {"col": "d", "op": ">", "value": {"$date": "2999-01-01"}},
                {"col": "id", "op": "in", "value": ids},
            ]
        },
    }
    status, body = await query(sidecar.url, plan)
    assert (status, body["rows"]) == (200, [["infinity"]]), body
    await primary.execute("DELETE FROM typed WHERE id = ANY($1)", ids)


async def test_special_values_read_back_as_written(sidecar, primary) -> None:
    rows = [
        dict(f={"$float": w}, ts={"$datetime": s}, ts_naive={"$datetime": s}, d={"$date": s})
        for w, s in zip(SPECIAL_FLOATS, ["infinity", "-infinity", "infinity"], strict=True)
    ]
    status, body = await query(sidecar.url, _insert("typed", rows, ["id"]))
    assert status == 200, body
    ids = [r[0] for r in body["rows"]]
    plan = {
        "database": "orders",
        "op": "select",
        "table": "typed",
        "columns": ["f", "ts", "ts_naive", "d"],
        "where": {"col": "id", "op": "in", "value": ids},
        "order_by": [{"col": "id"}],
    }
    status, body = await query(sidecar.url, plan)
    assert status == 200, body
    assert body["types"] == ["float", "datetime", "datetime", "date"]
    held = await primary.fetch(
        "SELECT f::text, ts::text, ts_naive::text, d::text FROM typed"
        " WHERE id = ANY($1) ORDER BY id",
        ids,
    )
    assert body["rows"] == [list(r) for r in held]
    await primary.execute("DELETE FROM typed WHERE id = ANY($1)", ids)


# -- scatter-gather orders -------------------------------------------------------------

COLL_TABLE = """
CREATE TABLE coll_t (
    id bigint PRIMARY KEY, name text COLLATE "en-x-icu", doc jsonb, f double precision
)"""


@pytest.fixture
async def coll_t(topology):
    """coll_t on every users shard and, holding every row, on the unsharded oracle."""
    conns = [await asyncpg.connect(server_dsn(topology, topology.primary, "users"))] + [
        await asyncpg.connect(server_dsn(topology, shard_server(topology, i), name))
        for i, name in enumerate(USER_SHARDS)
    ]
    try:
        for conn in conns:
            await conn.execute("DROP TABLE IF EXISTS coll_t; " + COLL_TABLE)
        yield conns[0]
    finally:
        for conn in conns:
            await conn.execute("DROP TABLE IF EXISTS coll_t")
            await conn.close()


async def _fill(url: str, oracle: asyncpg.Connection, database: str, table: str) -> None:
    rows = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    status, body = await query(
        url, {"database": database, "op": "insert", "table": table, "rows": rows}
    )
    assert status == 200, body
    await oracle.executemany(
        f"INSERT INTO {table} (id, name) VALUES ($1, $2)", [(r["id"], r["name"]) for r in rows]
    )


async def _orders_match(url: str, oracle: asyncpg.Connection, database: str, table: str) -> None:
    for desc in (False, True):
        for limit, offset in ((None, None), (5, 0), (4, 7)):
            plan = {
                "database": database,
                "op": "select",
                "table": table,
                "columns": ["id", "name"],
                "order_by": [{"col": "name", "desc": desc}, {"col": "id"}],
            }
            if limit is not None:
                plan.update(limit=limit, offset=offset)
            status, body = await query(url, plan)
            assert status == 200, body
            assert len(body["served_by"]) == 4  # a key-less read: every shard answered
            want = await oracle.fetch(
                f"SELECT id, name FROM {table} ORDER BY name {'DESC' if desc else ''}, id"
                " LIMIT $1 OFFSET $2",
                limit,
                offset or 0,
            )
            assert body["rows"] == [list(r) for r in want], (desc, limit, offset)
    plan = {
        "database": database,
        "op": "aggregate",
        "table": table,
        "aggregates": [
            {"fn": "min", "col": "name", "alias": "lo"},
            {"fn": "max", "col": "name", "alias": "hi"},
        ],
    }
    status, body = await query(url, plan)
    want = await oracle.fetchrow(f"SELECT min(name), max(name) FROM {table}")
    assert (status, body["rows"]) == (200, [list(want)]), body


async def test_scatter_order_and_min_max_follow_an_icu_column_collation(sidecar, coll_t) -> None:
    await _fill(sidecar.url, coll_t, "users", "coll_t")
    await _orders_match(sidecar.url, coll_t, "users", "coll_t")


async def test_scatter_order_by_jsonb_is_a_clear_400(sidecar, coll_t) -> None:
    rows = [{"id": i, "doc": {"$json": doc}} for i, doc in enumerate([{"a": 1}, [1], "s", 2])]
    status, body = await query(
        sidecar.url, {"database": "users", "op": "insert", "table": "coll_t", "rows": rows}
    )
    assert status == 200, body
    for agg in (False, True):
        plan: dict = {"database": "users", "table": "coll_t", "order_by": [{"col": "doc"}]}
        if agg:
            plan.update(op="aggregate", group_by=["doc"], aggregates=[{"fn": "count"}])
        else:
            plan.update(op="select")
        status, body = await query(sidecar.url, plan)
        assert status == 400 and body["error"]["code"] == "unsupported_merge", body
        assert "json" in body["error"]["message"]


async def test_scatter_orders_nan_and_infinity_as_postgresql(sidecar, coll_t) -> None:
    words = ["NaN", "Infinity", "-Infinity", 1.5, -0.0, None, "NaN", 3]
    rows = [{"id": i, "f": {"$float": w} if isinstance(w, str) else w} for i, w in enumerate(words)]
    status, body = await query(
        sidecar.url, {"database": "users", "op": "insert", "table": "coll_t", "rows": rows}
    )
    assert status == 200, body
    await coll_t.executemany(
        "INSERT INTO coll_t (id, f) VALUES ($1, $2::text::float8)",
        [(i, None if w is None else str(w)) for i, w in enumerate(words)],
    )
    for desc in (False, True):
        plan = {
            "database": "users",
            "op": "select",
            "table": "coll_t",
            "columns": ["id", "f"],
            "order_by": [{"col": "f", "desc": desc}, {"col": "id"}],
        }
        status, body = await query(sidecar.url, plan)
        want = await coll_t.fetch(
            f"SELECT id, f::text FROM coll_t ORDER BY coll_t.f {'DESC' if desc else ''}, id"
        )
        assert status == 200, body
        got = [[i, None if f is None else str(f)] for i, f in body["rows"]]
        want_rows = [[i, f] for i, f in want]
        assert [g[0] for g in got] == [w[0] for w in want_rows]
    plan = {
        "database": "users",
        "op": "aggregate",
        "table": "coll_t",
        "aggregates": [{"fn": "min", "col": "f", "alias": "lo"}, {"fn": "max", "col": "f"}],
    }
    status, body = await query(sidecar.url, plan)
    assert (status, body["rows"]) == (200, [["-Infinity", "NaN"]]), body


ICU_SHARDS = [f"icu_shard_{i}" for i in range(4)]


async def test_scatter_on_databases_created_with_an_icu_locale(topology, workdir) -> None:
    """Shards and oracle are databases whose default collation is ICU en-US; the table
    declares no collation at all."""
    servers = [(shard_server(topology, i), name) for i, name in enumerate(ICU_SHARDS)]
    servers.append((topology.primary, "icu_oracle"))
    made: list[tuple] = []
    proc = None
    try:
        for server, name in servers:
            admin = await asyncpg.connect(server_dsn(topology, server, "postgres"))
            try:
                await admin.execute(
                    f"CREATE DATABASE {name} LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                    " LOCALE 'C' TEMPLATE template0"
                )
            finally:
                await admin.close()
            made.append((server, name))
            conn = await asyncpg.connect(server_dsn(topology, server, name))
            await conn.execute("CREATE TABLE people (id bigint PRIMARY KEY, name text)")
            await conn.close()
        config = sidecar_config(topology, workdir, "icu-sidecar")
        users = config["databases"]["users"]
        for shard, name in zip(users["shards"], ICU_SHARDS, strict=True):
            shard["name"] = name
            shard["replicas"] = []
            shard["primary"]["database"] = name
            shard["primary"]["name"] = f"{shard['primary']['name']}-{name}"
        config["databases"] = {"icu": users}
        proc = SidecarProcess(config, workdir, "icu-sidecar")
        proc.start()
        oracle = await asyncpg.connect(server_dsn(topology, topology.primary, "icu_oracle"))
        try:
            await _fill(proc.url, oracle, "icu", "people")
            await _orders_match(proc.url, oracle, "icu", "people")
        finally:
            await oracle.close()
    finally:
        if proc is not None:
            proc.terminate()
        for server, name in made:
            admin = await asyncpg.connect(server_dsn(topology, server, "postgres"))
            try:
                await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            finally:
                await admin.close()
