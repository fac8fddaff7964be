"""Scatter-gather: the per-shard plans of a read, and merging their answers exactly.

Ordered reads are a k-way merge of the shards' sorted rows, with LIMIT/OFFSET
applied after it (each shard is asked for limit+offset rows). Counts add up;
sum/min/max combine; avg is rebuilt from per-shard sums and counts; grouped
aggregates merge per group and are ordered and limited here.

Ordering follows PostgreSQL's defaults: NULLs last ascending, first descending.
Text compares by code point, which is PostgreSQL's order under COLLATE "C".
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from client.protocol import Aggregate, AggregateQuery, Select

from .errors import bad_plan
from .executor import Outcome

Row = tuple[Any, ...]


def _compare(a: Any, b: Any) -> int:
    if a is None or b is None:
        return (a is None) - (b is None)  # NULL sorts after any value
    return (a > b) - (a < b)


def _row_key(positions: Sequence[tuple[int, bool]]) -> Callable[[Row], Any]:
    def cmp(x: Row, y: Row) -> int:
        for pos, desc in positions:
            c = _compare(x[pos], y[pos])
            if c:
                return -c if desc else c
        return 0

    return functools.cmp_to_key(cmp)


def _window(rows: Iterable[Row], limit: int | None, offset: int | None) -> list[Row]:
    start = offset or 0
    stop = None if limit is None else start + limit
    out = []
    for i, row in enumerate(rows):
        if stop is not None and i >= stop:
            break
        if i >= start:
            out.append(row)
    return out


def shard_select(plan: Select) -> tuple[Select, int]:
    """The plan each shard runs, and how many helper columns to strip afterwards."""
    columns = plan.columns
    extra: list[str] = []
    if columns is not None:
        extra = [o.col for o in plan.order_by if o.col not in columns]
        columns = [*columns, *extra]
    limit = None if plan.limit is None else plan.limit + (plan.offset or 0)
    return msgspec.structs.replace(plan, columns=columns, limit=limit, offset=None), len(extra)


def merge_select(
    plan: Select, outcomes: Sequence[Outcome], extra: int
) -> tuple[list[str], list[Row]]:
    columns = outcomes[0].columns
    if plan.order_by:
        try:
            positions = [(columns.index(o.col), o.desc) for o in plan.order_by]
        except ValueError:
            raise bad_plan("order_by names a column the shards did not return") from None
        key = _row_key(positions)
        merged: Iterable[Row] = heapq.merge(*(o.rows for o in outcomes), key=key)
    else:
        merged = (row for o in outcomes for row in o.rows)
    rows = _window(merged, plan.limit, plan.offset)
    if extra:
        columns = columns[:-extra]
        rows = [row[:-extra] for row in rows]
    return columns, rows


def _partials(agg: Aggregate, i: int) -> list[Aggregate]:
    if agg.fn == "avg":
        return [Aggregate("sum", agg.col, f"_s{i}"), Aggregate("count", agg.col, f"_c{i}")]
    return [Aggregate(agg.fn, agg.col, f"_a{i}")]


def shard_aggregate(plan: AggregateQuery) -> AggregateQuery:
    """Per-shard partial aggregates over every group; ordering and limits come later."""
    partials = [p for i, a in enumerate(plan.aggregates) for p in _partials(a, i)]
    return msgspec.structs.replace(plan, aggregates=partials, order_by=[], limit=None, offset=None)


def _combine(fn: str, a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if fn in ("sum", "count"):
        return a + b
    return min(a, b) if fn == "min" else max(a, b)


def merge_aggregate(
    plan: AggregateQuery, outcomes: Sequence[Outcome]
) -> tuple[list[str], list[str | None], list[Row]]:
    ngroup = len(plan.group_by)
    partial_fns = [p.fn for i, a in enumerate(plan.aggregates) for p in _partials(a, i)]
    groups: dict[Row, list[Any]] = {}
    for outcome in outcomes:
        for row in outcome.rows:
            key, values = row[:ngroup], row[ngroup:]
            acc = groups.get(key)
            if acc is None:
                groups[key] = list(values)
            else:
                for j, fn in enumerate(partial_fns):
                    acc[j] = _combine(fn, acc[j], values[j])
    if not groups and ngroup == 0:
        # No shard answered a row: aggregates over nothing (count 0, others null).
        groups[()] = [0 if fn == "count" else None for fn in partial_fns]
    kinds_in = outcomes[0].kinds[ngroup:] if outcomes else []
    columns = [*plan.group_by, *(a.name for a in plan.aggregates)]
    kinds: list[str | None] = list(outcomes[0].kinds[:ngroup]) if outcomes else [None] * ngroup
    rows: list[Row] = []
    for key, acc in groups.items():
        values: list[Any] = []
        j = 0
        for agg in plan.aggregates:
            if agg.fn == "avg":
                total, count = acc[j], acc[j + 1]
                if total is None or not count:
                    values.append(None)
                elif isinstance(total, float):
                    values.append(total / count)
                else:
                    values.append(Decimal(total) / Decimal(count))
                j += 2
            else:
                values.append(acc[j])
                j += 1
        rows.append((*key, *values))
    j = 0
    for pos, agg in enumerate(plan.aggregates, start=ngroup):
        if agg.fn == "avg":
            # avg of integers or numerics is numeric; of floats, a float.
            floats = any(isinstance(row[pos], float) for row in rows)
            kinds.append(None if floats else "decimal")
            j += 2
        else:
            kinds.append(kinds_in[j] if kinds_in else None)
            j += 1
    if plan.order_by:
        try:
            positions = [(columns.index(o.col), o.desc) for o in plan.order_by]
        except ValueError:
            raise bad_plan("order_by must name a group_by column or an aggregate alias") from None
        rows.sort(key=_row_key(positions))
    return columns, kinds, _window(rows, plan.limit, plan.offset)
