"""Scatter-gather: the per-shard plans of a read, and merging their answers exactly.

Ordered reads merge the shards' sorted rows, with LIMIT/OFFSET applied after it
(each shard is asked for limit+offset rows). Counts add up; sum/min/max combine;
avg is rebuilt from per-shard sums and counts; grouped aggregates merge per group
and are ordered and limited here.

The order must be PostgreSQL's, and Python's comparison equals it only for some
values, so the merge compares in Python only when every sort value is a number,
timestamp, date, naive time, interval, uuid, bytea or boolean (NULLs last ascending
and first descending, NaN above +Infinity, asyncpg's naive ``datetime.max``/``min``
as ±infinity even in a timestamptz column). Anything else (text, whose order is its
column's collation, enums, arrays, timetz) is ordered by PostgreSQL itself, on a node
of the database being read: one catalog query finds each sort column's type and
collation (``format_type``, ``pg_attribute.attcollation``), then the candidates' sort
values go back as typed arrays, ``unnest($1::text[]) AS c0 ... ORDER BY k.c0 COLLATE
pg_catalog."en-x-icu" DESC, ..., k.i LIMIT n``, and ``min``/``max`` partials of such
values are combined the same way. PostgreSQL 15 exposes no collation sort keys, so
this is the only exact way; it costs two round trips, only when Python cannot be
exact. Sums, counts and averages in such a sort travel as numeric (or float8) arrays.

Refused with 400: ordering or grouping by a json/jsonb column across shards. asyncpg
reads the JSON document ``null`` and SQL NULL both as None, so their places in
PostgreSQL's jsonb order (JSON null first, SQL NULL last) cannot be told apart here.
Not handled: grouping by text under a nondeterministic collation (groups are merged
by Python equality, which is PostgreSQL's only for deterministic collations).
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from wire.errors import ErrorCode
from wire.protocol import Aggregate, AggregateQuery, Select

from .errors import bad_plan
from .executor import Outcome
from .plancheck import table

Row = tuple[Any, ...]
# Runs one read-only statement with parameters on a node of the database being
# merged and returns its rows (the dispatcher provides it).
Ask = Callable[[str, list[Any]], Awaitable[list[Row]]]
# One sort key given to PostgreSQL: the table column whose type and collation the
# values have (None for computed aggregates), and whether it is descending.
Key = tuple[str | None, bool]

# Values whose Python order is PostgreSQL's (with _rank's fixes for NaN and infinity).
_PYTHON_ORDERED = (int, float, Decimal, dt.date, dt.timedelta, uuid.UUID, bytes)
_NAN = math.nan


def _python_ordered(value: Any) -> bool:
    if value is None or isinstance(value, _PYTHON_ORDERED):
        return True
    # A timetz orders by its UTC time, then by its zone: not Python's order.
    return isinstance(value, dt.time) and value.tzinfo is None


def _rank(value: Any) -> int:
    """-1/1 for values PostgreSQL sorts below/above every ordinary one, else 0."""
    if isinstance(value, float):
        return 1 if value != value else 0  # NaN is above +Infinity
    if isinstance(value, Decimal):
        return 1 if value.is_nan() else 0
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        # asyncpg's ±infinity, naive even in a timestamptz column of aware values.
        if value == dt.datetime.max:
            return 1
        if value == dt.datetime.min:
            return -1
    return 0


def _compare(a: Any, b: Any) -> int:
    if a is None or b is None:
        return (a is None) - (b is None)  # NULL sorts after any value
    ra, rb = _rank(a), _rank(b)
    if ra or rb:
        return (ra > rb) - (ra < rb) if ra != rb else 0
    return (a > b) - (a < b)


def _row_key(positions: Sequence[tuple[int, bool]]) -> Callable[[Row], Any]:
    def cmp(x: Row, y: Row) -> int:
        for pos, desc in positions:
            c = _compare(x[pos], y[pos])
            if c:
                return -c if desc else c
        return 0

    return functools.cmp_to_key(cmp)


def _refuse_json(kinds: Sequence[str | None], positions: Iterable[int], what: str) -> None:
    for pos in positions:
        kind = kinds[pos] if pos < len(kinds) else None
        if kind is not None and kind.removeprefix("array:") == "json":
            raise bad_plan(
                f"{what} a json/jsonb column across shards cannot be done exactly "
                "(JSON null and SQL NULL are indistinguishable after decoding); "
                "pin the read to one shard or use a scalar column",
                ErrorCode.UNSUPPORTED_MERGE,
            )


# The type and collation of the named columns of a table, as SQL to splice in: a
# type name from format_type and a quoted, schema-qualified collation (or NULL).
_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, NULL),
       CASE WHEN a.attcollation <> 0 THEN format('%I.%I', n.nspname, c.collname) END
FROM pg_attribute a
LEFT JOIN pg_collation c ON c.oid = a.attcollation
LEFT JOIN pg_namespace n ON n.oid = c.collnamespace
WHERE a.attrelid = $1::text::regclass AND a.attname = ANY($2::text[])
  AND a.attnum > 0 AND NOT a.attisdropped
"""


async def _sql_types(
    ask: Ask, tbl: str, sources: Sequence[str | None], values: Sequence[Sequence[Any]]
) -> list[tuple[str, str]]:
    """Per sort or combine slot: the SQL array type of its values and the COLLATE clause
    it sorts with. A table column's values keep the column's type and collation; computed
    ones (counts, sums, averages) are numeric, or float8 when they are floats."""
    wanted = sorted({c for c in sources if c is not None})
    found = {r[0]: (r[1], r[2]) for r in await ask(_COLUMNS_SQL, [tbl, wanted])} if wanted else {}
    out = []
    for col, vals in zip(sources, values, strict=True):
        if col is None:
            floats = any(isinstance(v, float) for v in vals)
            out.append(("float8[]" if floats else "numeric[]", ""))
        elif col not in found:
            raise bad_plan(f"{col!r} is not a column of {tbl}")
        else:
            sqltype, collation = found[col]
            out.append((f"{sqltype}[]", f" COLLATE {collation}" if collation else ""))
    return out


async def _postgres_order(
    ask: Ask, tbl: str, keys: Sequence[Key], columns: Sequence[list[Any]], limit: int | None
) -> list[int]:
    """The positions of the candidates in PostgreSQL's order for these keys
    (ties keep the given order), at most ``limit`` of them."""
    types = await _sql_types(ask, tbl, [col for col, _ in keys], columns)
    params: list[Any] = list(columns)
    arrays = [f"unnest(${j + 1}::{t}) AS c{j}" for j, (t, _) in enumerate(types)]
    order = [
        f"k.c{j}{collate}{' DESC' if desc else ''}"
        for j, ((_, collate), (_, desc)) in enumerate(zip(types, keys, strict=True))
    ]
    # Select-list set functions run in lockstep and never expand a composite value.
    sql = (
        f"SELECT k.i FROM (SELECT {', '.join(arrays)}, "
        f"generate_subscripts($1::{types[0][0]}, 1) AS i) AS k "
        f"ORDER BY {', '.join(order)}, k.i"
    )
    if limit is not None:
        params.append(limit)
        sql += f" LIMIT ${len(params)}"
    return [row[0] - 1 for row in await ask(sql, params)]


def _python_orderable(rows: Iterable[Row], positions: Sequence[tuple[int, bool]]) -> bool:
    return all(_python_ordered(r[p]) for r in rows for p, _ in positions)


async def _postgres_sorted(
    ask: Ask,
    tbl: str,
    rows: list[Row],
    positions: Sequence[tuple[int, bool]],
    key_columns: Sequence[str | None],
    limit: int | None,
) -> list[Row]:
    """Rows in PostgreSQL's order for these positions (ties keep the given order)."""
    if len(rows) < 2:
        return rows
    keys = [(col, desc) for col, (_, desc) in zip(key_columns, positions, strict=True)]
    columns = [[r[p] for r in rows] for p, _ in positions]
    return [rows[i] for i in await _postgres_order(ask, tbl, keys, columns, limit)]


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


async def merge_select(
    plan: Select, outcomes: Sequence[Outcome], extra: int, ask: Ask | None = None
) -> tuple[list[str], list[Row]]:
    """The shards' rows as one ordered, windowed result; ``ask`` runs SQL on a shard for
    orders Python cannot reproduce (without it, Python orders everything)."""
    columns = outcomes[0].columns
    merged: Iterable[Row]
    if plan.order_by:
        try:
            positions = [(columns.index(o.col), o.desc) for o in plan.order_by]
        except ValueError:
            raise bad_plan("order_by names a column the shards did not return") from None
        _refuse_json(outcomes[0].kinds, (p for p, _ in positions), "ordering by")
        if ask is None or _python_orderable((r for o in outcomes for r in o.rows), positions):
            merged = heapq.merge(*(o.rows for o in outcomes), key=_row_key(positions))
        else:
            stop = None if plan.limit is None else plan.limit + (plan.offset or 0)
            candidates = [row for o in outcomes for row in o.rows]
            keys = [o.col for o in plan.order_by]
            merged = await _postgres_sorted(
                ask, table(plan.table), candidates, positions, keys, stop
            )
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
    below = _compare(a, b) <= 0
    return a if below == (fn == "min") else b


def _group_key(values: Row) -> Row:
    # NaN is one group in PostgreSQL; in a dict only the same NaN object is.
    return tuple(_NAN if isinstance(v, float) and v != v else v for v in values)


async def _postgres_combine(
    ask: Ask,
    tbl: str,
    partial: Sequence[Aggregate],
    slots: Sequence[int],
    groups: Sequence[list[Row]],
    combined: list[list[Any]],
) -> None:
    """min/max of these partial slots per group, computed by PostgreSQL."""
    values = [[vals[j] for parts in groups for vals in parts] for j in slots]
    types = await _sql_types(ask, tbl, [partial[j].col for j in slots], values)
    params: list[Any] = [[g for g, parts in enumerate(groups) for _ in parts], *values]
    arrays = ["unnest($1::int[]) AS g"]
    aggs = []
    for n, (j, (sqltype, collate)) in enumerate(zip(slots, types, strict=True)):
        arrays.append(f"unnest(${n + 2}::{sqltype}) AS c{n}")
        aggs.append(f"{partial[j].fn}(k.c{n}{collate})")
    sql = f"SELECT k.g, {', '.join(aggs)} FROM (SELECT {', '.join(arrays)}) AS k GROUP BY k.g"
    for row in await ask(sql, params):
        for n, j in enumerate(slots):
            combined[row[0]][j] = row[n + 1]


async def merge_aggregate(
    plan: AggregateQuery, outcomes: Sequence[Outcome], ask: Ask | None = None
) -> tuple[list[str], list[str | None], list[Row]]:
    """The shards' partial aggregates combined per group (see merge_select for ``ask``)."""
    ngroup = len(plan.group_by)
    partial = [p for i, a in enumerate(plan.aggregates) for p in _partials(a, i)]
    kinds_out = list(outcomes[0].kinds) if outcomes else []
    _refuse_json(kinds_out, range(ngroup), "grouping by")
    groups: dict[Row, list[Row]] = {}
    for outcome in outcomes:
        for row in outcome.rows:
            groups.setdefault(_group_key(row[:ngroup]), []).append(row[ngroup:])
    if not groups and ngroup == 0:
        # No shard answered a row: aggregates over nothing (count 0, others null).
        groups[()] = [tuple(0 if p.fn == "count" else None for p in partial)]
    parts_per_group = list(groups.values())
    combined: list[list[Any]] = [[None] * len(partial) for _ in parts_per_group]
    deferred = []
    for j, p in enumerate(partial):
        if (
            ask is not None
            and p.fn in ("min", "max")
            and not all(_python_ordered(vals[j]) for parts in parts_per_group for vals in parts)
        ):
            deferred.append(j)  # e.g. text: its collation decides
            continue
        for g, parts in enumerate(parts_per_group):
            acc = None
            for vals in parts:
                acc = _combine(p.fn, acc, vals[j])
            combined[g][j] = acc
    tbl = table(plan.table)
    if ask is not None and deferred:
        await _postgres_combine(ask, tbl, partial, deferred, parts_per_group, combined)
    kinds_in = kinds_out[ngroup:]
    columns = [*plan.group_by, *(a.name for a in plan.aggregates)]
    kinds: list[str | None] = kinds_out[:ngroup] if outcomes else [None] * ngroup
    rows: list[Row] = []
    for key, acc in zip(groups, combined, strict=True):
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
            kinds.append("float" if floats else "decimal")
            j += 2
        else:
            kinds.append(kinds_in[j] if kinds_in else None)
            j += 1
    if plan.order_by:
        try:
            positions = [(columns.index(o.col), o.desc) for o in plan.order_by]
        except ValueError:
            raise bad_plan("order_by must name a group_by column or an aggregate alias") from None
        if ask is None or _python_orderable(rows, positions):
            rows.sort(key=_row_key(positions))
        else:
            # The table column each sort value has the type and collation of.
            sources = [
                *plan.group_by,
                *(a.col if a.fn in ("min", "max") else None for a in plan.aggregates),
            ]
            keys = [sources[p] for p, _ in positions]
            rows = await _postgres_sorted(ask, tbl, rows, positions, keys, None)
    return columns, kinds, _window(rows, plan.limit, plan.offset)


def merge_events(
    shards: Sequence[Sequence[tuple[Any, ...]]], at: int, limit: int
) -> list[tuple[Any, ...]]:
    """Event reads of several shards (each in its own position order) as one page of
    at most ``limit`` rows, ordered by the value at ``at`` (the time recorded) across
    shards. Each shard's rows stay in their order and only a shard's last rows are cut,
    so what comes back of a shard is a prefix: its checkpoint can move past all of it."""
    merged = heapq.merge(*shards, key=lambda row: row[at])
    return [row for _, row in zip(range(limit), merged, strict=False)]
