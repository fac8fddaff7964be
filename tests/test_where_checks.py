"""Where-trees in plans: normalization, malformed nodes, bounds counted before decoding.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.compiler import Compiler
from sidecar.errors import SidecarError
from sidecar.statuses import status_of
from wire.protocol import Count, Delete, Insert, Update

from .plans import eq, isin, select

T: dict[str, Any] = {"and": []}  # the spellings of TRUE and FALSE the folding starts from
F: dict[str, Any] = {"or": []}


@pytest.mark.parametrize(
    ("where", "sql", "params"),
    [
        (T, None, []),
        (F, "FALSE", []),
        ({"not": T}, "FALSE", []),
        ({"not": F}, None, []),
        ({"not": {"not": T}}, None, []),
        ({"or": [T]}, None, []),
        ({"and": [T]}, None, []),
        ({"and": [T, {"or": [T, F]}]}, None, []),
        ({"or": [eq("a", 1), T]}, None, []),
        ({"and": [eq("a", 1), F, eq("b", 2)]}, "FALSE", []),
        ({"or": [F, eq("a", 1), F]}, '"a" = $1', [1]),
        ({"and": [T, eq("a", 1), T, eq("b", 2)]}, '("a" = $1 AND "b" = $2)', [1, 2]),
        ({"or": [{"and": [eq("a", 1), F]}, eq("b", 2)]}, '"b" = $1', [2]),
        ({"and": [eq("a", 1), {"or": [eq("b", 2), T]}]}, '"a" = $1', [1]),
        ({"not": {"and": [eq("a", 1), T]}}, 'NOT ("a" = $1)', [1]),
        (isin("a", []), "FALSE", []),
        ({"col": "a", "op": "not_in", "value": []}, None, []),
        ({"not": isin("a", [])}, None, []),
        ({"or": [isin("a", []), eq("b", 2)]}, '"b" = $1', [2]),
    ],
)  # fmt: skip
def test_where_trees_are_normalized(where: Any, sql: str | None, params: list[Any]) -> None:
    compiler = Compiler()
    compiled = compiler.compile(Count(database="orders", table="orders", where=where))
    base = 'SELECT count(*) AS count FROM "orders"'
    assert compiled.statement.sql == (base if sql is None else f"{base} WHERE {sql}")
    assert compiled.params == params
    # None: no condition at all, which an update or delete must not take for a where.
    for plan in (
        Update(database="orders", table="orders", values={"s": "x"}, where=where),
        Delete(database="orders", table="orders", where=where),
    ):
        if sql is None:
            with pytest.raises(SidecarError) as raised:
                compiler.compile(plan)
            assert raised.value.code == "where_required"
            assert compiler.compile(type(plan)(**{**_fields(plan), "all_rows": True}))
        elif isinstance(plan, Delete):
            assert compiler.compile(plan).statement.sql == f'DELETE FROM "orders" WHERE {sql}'
        else:
            assert " WHERE " in compiler.compile(plan).statement.sql


def _fields(plan: Any) -> dict[str, Any]:
    return {f: getattr(plan, f) for f in plan.__struct_fields__}


def test_spellings_of_one_condition_share_one_shape() -> None:
    compiler = Compiler()
    for where in (eq("a", 1), {"and": [eq("a", 2)]}, {"or": [F, {"and": [T, eq("a", 3)]}]}):
        compiler.compile(Count(database="orders", table="orders", where=where))
    assert (compiler.misses, compiler.hits) == (1, 2)


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ({"col": "a", "op": ["="], "value": 1}, "bad_operator"),
        ({"col": "a", "op": {"=": 1}, "value": 1}, "bad_operator"),
        ({"col": 1, "op": "=", "value": 1}, "bad_identifier"),
        ({"col": ["a"], "op": "=", "value": 1}, "bad_identifier"),
        ({"col": "a", "op": "is_null", "value": 1}, "bad_plan"),
        ({"col": "a", "op": "in", "value": {"a": 1}}, "bad_plan"),
        ({"col": "a", "op": "=", "value": {"a": 1, "b": 2}}, "bad_value"),
        ({"not": [eq("a", 1)]}, "bad_plan"),
        ({"and": eq("a", 1)}, "bad_plan"),
        ({"or": [["a"]]}, "bad_plan"),
        ({"or": [eq("a", 1), "a"]}, "bad_plan"),
        # A sibling that folds away is still checked.
        ({"and": [F, {"col": "a", "op": ["="], "value": 1}]}, "bad_operator"),
    ],
)  # fmt: skip
def test_malformed_where_nodes(where: Any, code: str) -> None:
    with pytest.raises(SidecarError) as raised:
        Compiler().compile(Count(database="orders", table="orders", where=where))
    assert (status_of(raised.value.code), raised.value.code) == (400, code)


def test_list_values_are_bounded_before_decoding() -> None:
    compiler = Compiler(max_in_values=10)
    ok = compiler.compile(select(where=isin("id", list(range(10)))))
    assert ok.params == [list(range(10))]
    # Undecodable values past the limit: refused by the count, never decoded.
    too_many = [{"$nope": i} for i in range(11)]
    for where in (
        isin("id", too_many),
        {"col": "id", "op": "not_in", "value": too_many},
        eq("ints", too_many),
        eq("ints", [[1] * 6, [2] * 5]),
    ):
        with pytest.raises(SidecarError) as raised:
            compiler.compile(select(where=where))
        assert raised.value.code == "plan_too_complex"
        assert "10" in raised.value.message
    with pytest.raises(SidecarError) as raised:
        compiler.compile(Insert(database="orders", table="orders", rows=[{"ints": too_many}]))
    assert raised.value.code == "plan_too_complex"


def test_insert_parameters_are_counted_before_decoding() -> None:
    rows = [{"a": {"$nope": 1}, "b": 1}] * 20_000  # 40k values, the first one undecodable
    with pytest.raises(SidecarError) as raised:
        Compiler().compile(Insert(database="orders", table="orders", rows=rows))
    assert raised.value.code == "plan_too_complex"
