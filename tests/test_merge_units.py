"""Scatter-gather merges (sidecar.merge): orders, windows and aggregates across shards.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from sidecar.errors import SidecarError
from sidecar.executor import Outcome
from sidecar.merge import merge_aggregate, merge_select, shard_aggregate, shard_select
from wire.protocol import Aggregate, AggregateQuery, OrderBy

from .plans import select


def outcome(
    columns: list[str], rows: list[tuple[Any, ...]], kinds: list[str | None] | None = None
) -> Outcome:
    return Outcome(
        columns=columns,
        kinds=kinds if kinds is not None else [None] * len(columns),
        rows=rows,
        rowcount=len(rows),
        node=None,  # type: ignore[arg-type]  # merging never looks at the node
        role="primary",
        shard=None,
    )


def test_shard_select_adds_order_columns_and_widens_the_limit() -> None:
    plan = select(columns=["name"], order_by=[OrderBy("score")], limit=3, offset=2)
    per_shard, extra = shard_select(plan)
    assert per_shard.columns == ["name", "score"]
    assert (per_shard.limit, per_shard.offset) == (5, None)
    assert extra == 1


async def test_merge_select_ascending_nulls_last_with_window() -> None:
    plan = select(columns=["name"], order_by=[OrderBy("score")], limit=3, offset=1)
    _, extra = shard_select(plan)
    cols = ["name", "score"]
    # Each shard returns its rows already sorted the PostgreSQL way (NULLS LAST for ASC).
    shards = [
        outcome(cols, [("a", 1), ("c", 3), ("x", None)]),
        outcome(cols, [("b", 2), ("d", 4), ("y", None)]),
        outcome(cols, []),
    ]
    columns, rows = await merge_select(plan, shards, extra)
    assert columns == ["name"]  # the helper column is stripped
    assert rows == [("b",), ("c",), ("d",)]

    everything = select(columns=["name"], order_by=[OrderBy("score")])
    _, rows = await merge_select(everything, shards, extra)
    assert [r[0] for r in rows] == ["a", "b", "c", "d", "x", "y"]


async def test_merge_select_descending_nulls_first() -> None:
    plan = select(order_by=[OrderBy("score", desc=True)])
    cols = ["name", "score"]
    shards = [
        outcome(cols, [("x", None), ("d", 4), ("a", 1)]),
        outcome(cols, [("y", None), ("c", 3), ("b", 2)]),
    ]
    columns, rows = await merge_select(plan, shards, 0)
    assert columns == cols
    assert [r[1] for r in rows] == [None, None, 4, 3, 2, 1]


async def test_merge_select_two_keys() -> None:
    plan = select(order_by=[OrderBy("g"), OrderBy("n", desc=True)], limit=4)
    cols = ["g", "n"]
    shards = [
        outcome(cols, [(1, 9), (1, 1), (2, 5)]),
        outcome(cols, [(1, 5), (2, 7), (3, 0)]),
    ]
    _, rows = await merge_select(plan, shards, 0)
    assert rows == [(1, 9), (1, 5), (1, 1), (2, 7)]


async def test_merge_select_without_order_concatenates_and_windows() -> None:
    plan = select(limit=2, offset=1)
    shards = [outcome(["id"], [(1,), (2,)]), outcome(["id"], [(3,)])]
    _, rows = await merge_select(plan, shards, 0)
    assert rows == [(2,), (3,)]


async def test_merge_select_offset_past_the_end() -> None:
    plan = select(order_by=[OrderBy("id")], offset=10)
    _, rows = await merge_select(plan, [outcome(["id"], [(1,), (2,)])], 0)
    assert rows == []


async def test_merge_select_unknown_order_column() -> None:
    with pytest.raises(SidecarError):
        await merge_select(select(order_by=[OrderBy("missing")]), [outcome(["id"], [(1,)])], 0)


ALL_FUNCTIONS = [
    Aggregate("count"),
    Aggregate("sum", "n"),
    Aggregate("min", "n"),
    Aggregate("max", "n"),
    Aggregate("avg", "n"),
]
# What each shard returns for shard_aggregate(plan): count, sum, min, max, then avg's sum and count.
PARTIAL_COLUMNS = ["count", "_a1", "_a2", "_a3", "_s4", "_c4"]


def aggregate(**kw: Any) -> AggregateQuery:
    return AggregateQuery(database="orders", table="items", aggregates=ALL_FUNCTIONS, **kw)


def test_shard_aggregate_asks_for_partials() -> None:
    per_shard = shard_aggregate(aggregate(group_by=["g"], order_by=[OrderBy("g")], limit=1))
    assert [(a.fn, a.col, a.name) for a in per_shard.aggregates] == [
        ("count", None, "_a0"),
        ("sum", "n", "_a1"),
        ("min", "n", "_a2"),
        ("max", "n", "_a3"),
        ("sum", "n", "_s4"),
        ("count", "n", "_c4"),
    ]
    assert (per_shard.order_by, per_shard.limit, per_shard.offset) == ([], None, None)
    assert per_shard.group_by == ["g"]


async def test_merge_aggregate_grouped() -> None:
    plan = aggregate(group_by=["g"], order_by=[OrderBy("g")])
    cols = ["g", *PARTIAL_COLUMNS]
    shards = [
        # group x: values 1, 2 here; group y: 5 (one NULL n, so count(*) 2 but count(n) 1)
        outcome(cols, [("x", 2, 3, 1, 2, 3, 2), ("y", 2, 5, 5, 5, 5, 1)]),
        # group x: value 10; group z only here
        outcome(cols, [("z", 1, 7, 7, 7, 7, 1), ("x", 1, 10, 10, 10, 10, 1)]),
        outcome(cols, []),
    ]
    columns, kinds, rows = await merge_aggregate(plan, shards)
    assert columns == ["g", "count", "sum_n", "min_n", "max_n", "avg_n"]
    assert kinds[-1] == "decimal"
    assert rows == [
        ("x", 3, 13, 1, 10, Decimal(13) / Decimal(3)),
        ("y", 2, 5, 5, 5, Decimal(5)),
        ("z", 1, 7, 7, 7, Decimal(7)),
    ]
    assert all(isinstance(r[-1], Decimal) for r in rows)


async def test_merge_aggregate_avg_is_not_an_average_of_averages() -> None:
    plan = AggregateQuery(database="orders", table="items", aggregates=[Aggregate("avg", "n")])
    # Shard 0 holds 1, 2, 3 (avg 2); shard 1 holds 10 (avg 10). True avg is 16 / 4 = 4.
    shards = [outcome(["_s0", "_c0"], [(6, 3)]), outcome(["_s0", "_c0"], [(10, 1)])]
    columns, kinds, rows = await merge_aggregate(plan, shards)
    assert columns == ["avg_n"]
    assert rows == [(Decimal(4),)]
    assert kinds == ["decimal"]


async def test_merge_aggregate_avg_of_floats_is_a_float() -> None:
    plan = AggregateQuery(database="orders", table="items", aggregates=[Aggregate("avg", "x")])
    shards = [outcome(["_s0", "_c0"], [(1.5, 3)]), outcome(["_s0", "_c0"], [(0.5, 1)])]
    _, kinds, rows = await merge_aggregate(plan, shards)
    assert rows == [(0.5,)]
    assert isinstance(rows[0][0], float)
    # "float": a float column may hold NaN and infinities, which travel typed.
    assert kinds == ["float"]


async def test_merge_aggregate_nulls_from_some_shards() -> None:
    plan = aggregate()
    shards = [
        outcome(PARTIAL_COLUMNS, [(0, None, None, None, None, 0)]),  # an empty shard
        outcome(PARTIAL_COLUMNS, [(2, 9, 4, 5, 9, 2)]),
    ]
    _, _, rows = await merge_aggregate(plan, shards)
    assert rows == [(2, 9, 4, 5, Decimal("4.5"))]


async def test_merge_aggregate_over_nothing() -> None:
    plan = aggregate()
    # Shards that answered no rows at all: count is 0, every other aggregate NULL.
    columns, _, rows = await merge_aggregate(
        plan, [outcome(PARTIAL_COLUMNS, []), outcome(PARTIAL_COLUMNS, [])]
    )
    assert columns == ["count", "sum_n", "min_n", "max_n", "avg_n"]
    assert rows == [(0, None, None, None, None)]
    # PostgreSQL's own answer per empty shard gives the same result.
    empty = (0, None, None, None, None, 0)
    _, _, rows = await merge_aggregate(
        plan, [outcome(PARTIAL_COLUMNS, [empty]), outcome(PARTIAL_COLUMNS, [empty])]
    )
    assert rows == [(0, None, None, None, None)]


async def test_merge_aggregate_grouped_over_nothing_is_empty() -> None:
    _, _, rows = await merge_aggregate(
        aggregate(group_by=["g"]), [outcome(["g", *PARTIAL_COLUMNS], [])]
    )
    assert rows == []


async def test_merge_aggregate_order_desc_and_window() -> None:
    plan = AggregateQuery(
        database="orders",
        table="items",
        aggregates=[Aggregate("sum", "n", alias="total")],
        group_by=["g"],
        order_by=[OrderBy("total", desc=True)],
        limit=2,
        offset=1,
    )
    cols = ["g", "_a0"]
    shards = [
        outcome(cols, [("a", 1), ("b", 5), ("n", None)]),
        outcome(cols, [("a", 10), ("c", 3), ("d", 4)]),
    ]
    columns, _, rows = await merge_aggregate(plan, shards)
    assert columns == ["g", "total"]
    # Sorted: n (NULL first when descending), a 11, b 5, d 4, c 3; then offset 1, limit 2.
    assert rows == [("a", 11), ("b", 5)]


async def test_merge_aggregate_keeps_group_and_value_kinds() -> None:
    plan = AggregateQuery(
        database="orders",
        table="items",
        aggregates=[Aggregate("max", "at"), Aggregate("avg", "n")],
        group_by=["day"],
    )
    cols = ["day", "_a0", "_s1", "_c1"]
    kinds: list[str | None] = ["date", "datetime", "decimal", None]
    shards = [
        outcome(cols, [(dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, 9), Decimal("1.5"), 1)], kinds)
    ]
    columns, out_kinds, rows = await merge_aggregate(plan, shards)
    assert columns == ["day", "max_at", "avg_n"]
    assert out_kinds == ["date", "datetime", "decimal"]
    assert rows == [(dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, 9), Decimal("1.5"))]
