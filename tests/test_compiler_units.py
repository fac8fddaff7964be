"""The SQL compiler (sidecar.compiler): shapes and the statement cache, values only ever
parameters, identifiers quoted.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from sidecar.compiler import Compiler
from sidecar.errors import SidecarError
from sidecar.statuses import status_of
from wire.protocol import Count, Delete, Insert, OrderBy, Select, Update

from .plans import eq, isin, select

UTC = dt.UTC


def test_same_shape_hits_the_cache() -> None:
    compiler = Compiler()
    a = compiler.compile(
        select(where=eq("status", "new"), order_by=[OrderBy("id", desc=True)], limit=5)
    )
    b = compiler.compile(
        select(where=eq("status", "paid"), order_by=[OrderBy("id", desc=True)], limit=50)
    )
    assert (compiler.misses, compiler.hits) == (1, 1)
    assert a.statement is b.statement
    assert (
        a.statement.sql == 'SELECT * FROM "orders" WHERE "status" = $1 ORDER BY "id" DESC LIMIT $2'
    )
    assert a.params == ["new", 5]
    assert b.params == ["paid", 50]


def test_different_shapes_miss() -> None:
    compiler = Compiler()
    compiler.compile(select(where=eq("status", "new")))
    compiler.compile(select(where=eq("status", "new"), limit=1))
    compiler.compile(select(where=eq("id", 1)))
    compiler.compile(select(columns=["id"], where=eq("id", 1)))
    assert (compiler.misses, compiler.hits) == (4, 0)


def test_in_lists_of_any_length_share_one_shape() -> None:
    compiler = Compiler()
    one = compiler.compile(select(where=isin("id", [1])))
    three = compiler.compile(select(where=isin("id", [1, 2, 3])))
    many = compiler.compile(select(where=isin("id", list(range(500)))))
    assert one.statement is three.statement is many.statement
    assert (compiler.misses, compiler.hits) == (1, 2)
    assert one.statement.sql == 'SELECT * FROM "orders" WHERE "id" = ANY($1)'
    assert three.params == [[1, 2, 3]]


def test_values_are_only_ever_parameters() -> None:
    evil = "'; DROP TABLE x; --"
    compiler = Compiler()
    plans = [
        select(where=eq("note", evil)),
        select(where=isin("note", [evil, "ok"])),
        Insert(database="orders", table="orders", rows=[{"note": evil}]),
        Update(database="orders", table="orders", values={"note": evil}, where=eq("note", evil)),
        Delete(database="orders", table="orders", where={"not": eq("note", evil)}),
        Count(database="orders", table="orders", where={"or": [eq("note", evil)]}),
    ]
    for plan in plans:
        compiled = compiler.compile(plan)
        assert evil not in compiled.statement.sql
        assert "DROP" not in compiled.statement.sql
        flat = [x for p in compiled.params for x in (p if isinstance(p, list) else [p])]
        assert evil in flat


def test_values_are_decoded_from_the_wire() -> None:
    bounds = [
        {"$datetime": "2024-01-01T00:00:00+00:00"},
        {"$datetime": "2024-02-01T00:00:00+00:00"},
    ]
    where = {"col": "created", "op": "between", "value": bounds}
    compiled = Compiler().compile(select(where=where))
    assert compiled.statement.sql == 'SELECT * FROM "orders" WHERE "created" BETWEEN $1 AND $2'
    assert compiled.params == [
        dt.datetime(2024, 1, 1, tzinfo=UTC),
        dt.datetime(2024, 2, 1, tzinfo=UTC),
    ]


def test_identifiers_are_double_quoted() -> None:
    compiler = Compiler()
    sql = compiler.compile(
        select(
            table="shop.Orders",
            columns=["id", "Total"],
            where=eq("user_id", 1),
            order_by=[OrderBy("id")],
        )
    ).statement.sql
    assert sql == 'SELECT "id", "Total" FROM "shop"."Orders" WHERE "user_id" = $1 ORDER BY "id"'
    insert = compiler.compile(
        Insert(
            database="orders",
            table="orders",
            rows=[{"a": 1, "b": 2}, {"a": 3, "b": 4}],
            returning=["a"],
        )
    )
    assert (
        insert.statement.sql
        == 'INSERT INTO "orders" ("a", "b") VALUES ($1, $2), ($3, $4) RETURNING "a"'
    )
    assert insert.params == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "plan",
    [
        select(columns=['id"; DROP TABLE x; --']),
        select(table="orders; DROP TABLE x"),
        select(table="a.b.c"),
        select(where=eq("id = 1 OR 1", 1)),
        select(order_by=[OrderBy("id DESC")]),
    ],
)
def test_bad_identifiers_are_refused(plan: Select) -> None:
    with pytest.raises(SidecarError) as raised:
        Compiler().compile(plan)
    assert raised.value.code == "bad_identifier"


def test_insert_rows_with_differing_columns() -> None:
    plan = Insert(database="orders", table="orders", rows=[{"a": 1, "b": 2}, {"a": 1, "c": 3}])
    with pytest.raises(SidecarError) as raised:
        Compiler().compile(plan)
    assert raised.value.code == "bad_plan"
    assert "row 1" in raised.value.message


@pytest.mark.parametrize(
    "plan",
    [
        Update(database="orders", table="orders", values={"status": "x"}),
        Delete(database="orders", table="orders"),
    ],
)
def test_update_and_delete_need_a_where(plan: Update | Delete) -> None:
    with pytest.raises(SidecarError) as raised:
        Compiler().compile(plan)
    assert raised.value.code == "where_required"
    assert status_of(raised.value.code) == 400


def test_all_rows_allows_no_where() -> None:
    compiler = Compiler()
    update = compiler.compile(
        Update(database="orders", table="orders", values={"status": "x"}, all_rows=True)
    )
    assert update.statement.sql == 'UPDATE "orders" SET "status" = $1'
    assert update.params == ["x"]
    delete = compiler.compile(Delete(database="orders", table="orders", all_rows=True))
    assert delete.statement.sql == 'DELETE FROM "orders"'
    assert delete.params == []


def test_update_sets_before_where_in_parameter_order() -> None:
    compiled = Compiler().compile(
        Update(database="orders", table="orders", values={"a": 1, "b": 2}, where=eq("id", 3))
    )
    assert compiled.statement.sql == 'UPDATE "orders" SET "a" = $1, "b" = $2 WHERE "id" = $3'
    assert compiled.params == [1, 2, 3]


def _wide(k: int, leaves: int) -> dict[str, Any]:
    return {"or": [eq("b" if i == k else "a", i) for i in range(leaves)]}


def test_compile_cache_stays_within_its_byte_budget() -> None:
    budget = 2 * 1024 * 1024
    compiler = Compiler(cache_bytes=budget)
    for k in range(40):
        compiler.compile(Count(database="orders", table="orders", where=_wide(k, 2_000)))
        assert compiler.size <= budget
        assert compiler.size == sum(s.size for s in compiler._cache.values())
    assert compiler.misses == 40
    assert 0 < len(compiler._cache) < 40


def test_compile_cache_estimate_is_not_below_the_real_size() -> None:
    import gc
    import tracemalloc

    compiler = Compiler(cache_bytes=1 << 40)
    plans = [Count(database="orders", table="orders", where=_wide(k, 5_000)) for k in range(3)]
    plans.append(select(columns=[f"column_{i}" for i in range(5_000)], order_by=[OrderBy("id")]))
    gc.collect()
    tracemalloc.start()
    try:
        for plan in plans:
            compiler.compile(plan)
        gc.collect()
        real = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert compiler.size >= real


def test_a_statement_larger_than_the_cache_is_compiled_but_not_cached() -> None:
    compiler = Compiler(cache_bytes=64 * 1024)
    small = compiler.compile(select(where=eq("a", 1)))
    wide = compiler.compile(Count(database="orders", table="orders", where=_wide(0, 2_000)))
    assert wide.statement.sql.startswith('SELECT count(*) AS count FROM "orders" WHERE (')
    assert len(wide.params) == 2_000
    assert list(compiler._cache.values()) == [small.statement]
    assert compiler.size == small.statement.size


def test_compile_cache_evicts_the_least_recently_used() -> None:
    plans = [select(where=eq(f"c{i}", i)) for i in range(4)]
    probe = Compiler()
    probe.compile(plans[0])
    # Room for three statements of this size, not four.
    compiler = Compiler(cache_bytes=probe.size * 3 + probe.size // 2)
    for plan in plans[:3]:
        compiler.compile(plan)
    compiler.compile(plans[0])  # used again: plans[1] is now the least recently used
    compiler.compile(plans[3])
    cached = {s.sql for s in compiler._cache.values()}
    assert cached == {compiler.compile(p).statement.sql for p in (plans[0], plans[2], plans[3])}
    assert compiler.compile(plans[1]) and compiler.misses == 5
