"""Plans to SQL text and bind parameters, with a cache keyed by the plan's shape.

A shape is a plan without its values: repeated shapes (the common case, since
limits, offsets and IN lists are parameters too) cost one walk of the plan to
collect values and a dict lookup, no SQL building.

The cache is bounded by bytes, not entries, since one shape can be a where-tree
of thousands of leaves. Eviction is second chance (CLOCK): a hit only marks its
statement, so the hot path stays one lookup; when room is needed, the oldest
entry goes unless it was used since it was last looked at, in which case it
moves to the back once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wire.errors import ErrorCode
from wire.protocol import (
    EVENT_PLANS,
    AggregateQuery,
    Count,
    Delete,
    Insert,
    Plan,
    Raw,
    Select,
    Update,
)

from . import eventstore, outbox, plancheck, rawsql
from .errors import SidecarError, bad_plan
from .plancheck import MAX_LIST_VALUES, MAX_PARAMS, TRUE, Shape, column, table

# Estimated bytes of one where node or name in a cached shape key: a small tuple, its
# slot in the parent tuple, the column name string. Measured with tracemalloc on
# CPython 3.11, the whole estimate is 1.7-2.3x the real size of 20k-leaf shapes
# (63-character names included), never below it.
NODE_BYTES = 160
# Estimated bytes of a cache entry besides its SQL and where nodes: the Statement,
# the OrderedDict slot and link, the top-level shape tuple.
ENTRY_BYTES = 512

# Coalesced forms are built for small statements only, a few per statement: each is a
# copy of the statement's SQL, and a where-tree of many values could otherwise ask for
# one per value.
MAX_COALESCED_SQL = 8 * 1024
MAX_COALESCED_FORMS = 4

_SQL_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">=",
            "like": "LIKE", "ilike": "ILIKE"}  # fmt: skip


@dataclass(slots=True)
class Statement:
    """Cached SQL for one shape; ``kinds`` (result column kinds) is learnt on first run."""

    sql: str
    returns_rows: bool
    kinds: list[str | None] | None = None
    columns: list[str] | None = None
    # False for raw SQL, which may change session state (SET, LISTEN, PREPARE, ...).
    session_safe: bool = True
    # Rows a read may answer with; more is refused (memory stays bounded).
    row_cap: int | None = None
    # What the compile cache counts for this statement, and its second-chance mark.
    size: int = 0
    used: bool = False
    # Per bind parameter, its SQL type when a coalesced statement may carry it as an
    # array (a scalar type), else None; learnt on first run like ``kinds``.
    param_types: list[str | None] | None = None
    # Coalesced forms of this statement by the position of the value that varies
    # (None: that form failed once and is not tried again).
    coalesced: dict[int, Statement | None] = field(default_factory=dict)


@dataclass(slots=True)
class Compiled:
    """A checked plan: its SQL, its decoded values, and its shape (what routing reads the
    shard key from, so values are checked and decoded once). An event-store plan is
    ``work`` instead: statements it runs itself on the connection, in a transaction."""

    statement: Statement
    params: list[Any]
    shape: Shape = ()
    database: str = ""
    work: eventstore.Work | None = None
    # Outbox messages inserted before the statement, in its transaction.
    outbox: outbox.OutboxWork | None = None

    @property
    def transactional(self) -> bool:
        """Whether it needs a transaction even alone (work holding locks to COMMIT, or a
        write and its outbox messages)."""
        return self.work is not None or self.outbox is not None

    def on_shard(self, key: str) -> Compiled:
        """The plan as it runs on the shard whose checkpoint key is ``key`` (event reads
        answer from that shard's checkpoint and name it in their rows)."""
        if self.work is None:
            return self
        return Compiled(self.statement, self.params, self.shape, self.database,
                        self.work.on_shard(key), self.outbox)  # fmt: skip

    @property
    def coalescible(self) -> bool:
        """A compiled read (select, count, aggregate): one a coalescer may group."""
        return bool(self.shape) and self.shape[0] in ("select", "count", "aggregate")

    def where_params(self) -> range:
        """Positions in ``params`` of the where-tree's values in a read (select, count,
        aggregate): what a coalesced statement may vary. Empty for anything else."""
        kind = self.shape[0] if self.shape else None
        if kind == "count":
            return range(len(self.params))
        if kind == "select":
            return range(len(self.params) - self.shape[5] - self.shape[6])
        if kind == "aggregate":
            return range(len(self.params) - self.shape[6] - self.shape[7])
        return range(0)

    def where(self) -> tuple[Shape | None, int]:
        """The normalized where shape (None: no condition) and the index of its first
        value in ``params``; for plans without one (insert, raw), (None, 0)."""
        kind = self.shape[0] if self.shape else None
        if kind in ("select", "update"):
            at = len(self.shape[2]) if kind == "update" else 0
            return self.shape[3], at
        if kind in ("count", "delete"):
            return self.shape[2], 0
        if kind == "aggregate":
            return self.shape[4], 0
        return None, 0


# What an event-store plan carries as its statement: its work runs its own SQL.
_EVENT_STATEMENT = Statement("", True)


@dataclass
class Compiler:
    max_where_depth: int = 32
    max_in_values: int = MAX_LIST_VALUES
    # Rows a read may answer with (None: no cap; the sidecar passes limits.max_result_rows).
    max_result_rows: int | None = None
    cache_bytes: int = 16 * 1024 * 1024
    hits: int = 0
    misses: int = 0
    # Estimated bytes the cache holds (the sum of its statements' sizes).
    size: int = 0
    _cache: OrderedDict[Shape, Statement] = field(default_factory=OrderedDict)

    def compile(self, plan: Plan) -> Compiled:
        compiled = self._compile(plan)
        messages = getattr(plan, "outbox", None)
        if messages:
            if isinstance(plan, Raw) and not plan.writes:
                raise bad_plan("outbox messages ride on a write: a raw plan with writes=true")
            compiled.outbox = outbox.prepare(messages)
        return compiled

    def _compile(self, plan: Plan) -> Compiled:
        if isinstance(plan, EVENT_PLANS):
            work = eventstore.prepare(plan, self.max_result_rows)
            tag = plan.__struct_config__.tag
            return Compiled(_EVENT_STATEMENT, [], (tag,), plan.database, work)
        if isinstance(plan, Raw):
            # Raw SQL is the caller's own text: nothing to cache by shape.
            rawsql.check(plan.sql, plan.writes)
            if len(plan.params) > MAX_PARAMS:
                raise plancheck.too_many_params()
            statement = Statement(plan.sql, True, session_safe=False, row_cap=self.max_result_rows)
            return Compiled(
                statement, [plancheck.value(p, self.max_in_values) for p in plan.params]
            )
        params: list[Any] = []
        key = self._shape(plan, params)
        if len(params) > MAX_PARAMS:
            raise plancheck.too_many_params()
        return Compiled(self._statement(plan.database, key), params, key, plan.database)

    def insert_part(self, compiled: Compiled, rows: Sequence[int]) -> Compiled:
        """The insert of some of a checked insert's rows (one shard's), from the values
        already decoded."""
        kind, table, cols, _, returning = compiled.shape
        width = len(cols)
        params = [v for r in rows for v in compiled.params[r * width : (r + 1) * width]]
        key = (kind, table, cols, len(rows), returning)
        return Compiled(self._statement(compiled.database, key), params, key, compiled.database)

    def coalesced(self, compiled: Compiled, at: int) -> Statement | None:
        """The statement that runs ``compiled``'s shape once per element of an array of
        values for parameter ``at`` (the last parameter; the others keep their order):
        ``unnest(...) WITH ORDINALITY`` joined LATERAL to the plan's own SELECT, so each
        element keeps its own where, order and limit. Each row starts with its element's
        ordinal and ends with its position in that element's result; at most
        ``max_result_rows`` + 1 rows in all. None when the type of ``at`` is unknown or
        not a scalar."""
        stmt = compiled.statement
        if at in stmt.coalesced:
            return stmt.coalesced[at]
        types = stmt.param_types
        if types is None or types[at] is None or len(stmt.sql) > MAX_COALESCED_SQL:
            return None
        if len(stmt.coalesced) >= MAX_COALESCED_FORMS:
            return None
        num = _Numbers(key=at)
        inner = _build(compiled.shape, num, self.max_result_rows).sql
        cap = "" if self.max_result_rows is None else f" LIMIT {self.max_result_rows + 1}"
        sql = (
            f'SELECT "dbsidecar.k".o, "dbsidecar.s".* FROM unnest(${len(types)}::{types[at]}[])'
            ' WITH ORDINALITY AS "dbsidecar.k"(v, o) CROSS JOIN LATERAL (SELECT'
            ' "dbsidecar.i".*, row_number() OVER () AS "dbsidecar.n" FROM'
            f' ({inner}) AS "dbsidecar.i") AS "dbsidecar.s" ORDER BY 1, "dbsidecar.n"{cap}'
        )
        form = Statement(sql, True, row_cap=self.max_result_rows)
        stmt.coalesced[at] = form
        if self._cache.get((compiled.database, compiled.shape)) is stmt:
            # Counted with its statement: evicting the statement drops its forms too.
            stmt.size += len(sql) + ENTRY_BYTES
            self.size += len(sql) + ENTRY_BYTES
            self._evict(keep=stmt)
        return form

    def _statement(self, database: str, shape: Shape) -> Statement:
        # Per database: the same table name in two databases is two tables, whose result
        # columns (learnt on the first run) must never be mixed up.
        key = (database, shape)
        stmt = self._cache.get(key)
        if stmt is None:
            self.misses += 1
            num = _Numbers()
            stmt = _build(shape, num, self.max_result_rows)
            stmt.size = _size(shape, stmt.sql, num.nodes)
            self._store(key, stmt)
        else:
            self.hits += 1
            stmt.used = True
        return stmt

    def _store(self, key: Shape, stmt: Statement) -> None:
        if stmt.size > self.cache_bytes:
            return  # compiled for this request, never cached: it would push out everything
        self.size += stmt.size
        self._evict()
        self._cache[key] = stmt

    def _evict(self, keep: Statement | None = None) -> None:
        """Second chance until the cache fits its bytes again (``keep`` stays: it grew)."""
        cache = self._cache
        # Each entry comes up at most twice (a second chance clears its mark): bounded.
        for _ in range(2 * len(cache)):
            if self.size <= self.cache_bytes:
                return
            old_key, old = cache.popitem(last=False)
            if old.used or old is keep:
                old.used = False
                cache[old_key] = old
            else:
                self.size -= old.size

    def _where(self, where: dict[str, Any] | None, params: list[Any]) -> Shape | None:
        """The normalized where shape; None when it is no condition at all (TRUE)."""
        if where is None:
            return None
        shape = plancheck.where_shape(where, params, self.max_where_depth, self.max_in_values)
        return None if shape == TRUE else shape

    def _shape(self, plan: Plan, params: list[Any]) -> Shape:
        if isinstance(plan, Select):
            where = self._where(plan.where, params)
            _limits(plan.limit, plan.offset, params, self.max_result_rows)
            cols = tuple(plan.columns) if plan.columns is not None else None
            order = tuple((o.col, o.desc) for o in plan.order_by)
            return ("select", plan.table, cols, where, order, plan.limit is not None,
                    plan.offset is not None)  # fmt: skip
        if isinstance(plan, Count):
            return ("count", plan.table, self._where(plan.where, params))
        if isinstance(plan, AggregateQuery):
            where = self._where(plan.where, params)
            _limits(plan.limit, plan.offset, params, self.max_result_rows)
            aggs = tuple((a.fn, a.col, a.name) for a in plan.aggregates)
            order = tuple((o.col, o.desc) for o in plan.order_by)
            return ("aggregate", plan.table, aggs, tuple(plan.group_by), where, order,
                    plan.limit is not None, plan.offset is not None)  # fmt: skip
        if isinstance(plan, Insert):
            if not plan.rows:
                raise bad_plan("an insert needs at least one row")
            cols = tuple(plan.rows[0])
            # Counted before any value is decoded.
            if len(plan.rows) * len(cols) > MAX_PARAMS:
                raise plancheck.too_many_params()
            names = set(cols)
            for i, row in enumerate(plan.rows):
                if row.keys() != names:
                    raise bad_plan(
                        f"row {i} has other columns than row 0; every row needs the same"
                    )
                params.extend(plancheck.value(row[c], self.max_in_values) for c in cols)
            if not cols and len(plan.rows) > 1:
                raise bad_plan("several rows of only default values: insert them one by one")
            returning = tuple(plan.returning) if plan.returning is not None else None
            return ("insert", plan.table, cols, len(plan.rows), returning)
        if isinstance(plan, Update):
            if not plan.values:
                raise bad_plan("an update needs at least one column in 'set'")
            cols = tuple(plan.values)
            params.extend(plancheck.value(v, self.max_in_values) for v in plan.values.values())
            where = self._where(plan.where, params)
            _require_where(where, plan.all_rows, "update")
            returning = tuple(plan.returning) if plan.returning is not None else None
            return ("update", plan.table, cols, where, returning)
        if isinstance(plan, Delete):
            where = self._where(plan.where, params)
            _require_where(where, plan.all_rows, "delete")
            returning = tuple(plan.returning) if plan.returning is not None else None
            return ("delete", plan.table, where, returning)
        raise bad_plan(f"unsupported plan {type(plan).__name__}")


def _limits(limit: int | None, offset: int | None, params: list[Any], cap: int | None) -> None:
    plancheck.non_negative("limit", limit)
    plancheck.non_negative("offset", offset)
    if cap is not None and limit is not None and limit > cap:
        raise too_many_rows(cap)
    if limit is not None:
        params.append(limit)
    if offset is not None:
        params.append(offset)


def too_many_rows(cap: int) -> SidecarError:
    return SidecarError(
        ErrorCode.RESULT_TOO_LARGE,
        f"a read answers at most {cap} rows (limits.max_result_rows): page it with "
        "limit and a key condition, or narrow its where",
    )


def _require_where(where: Shape | None, all_rows: bool, op: str) -> None:
    # where is normalized: None is every spelling of "no condition".
    if where is None and not all_rows:
        raise bad_plan(
            f"{'an' if op == 'update' else 'a'} {op} without a where clause touches every row; "
            "set all_rows to mean it",
            ErrorCode.WHERE_REQUIRED,
        )


class _Numbers:
    """Hands out $1, $2, ... in the order the shape walk collected the values, and
    counts the where nodes rendered (for the cache's size estimate). With ``key``, the
    value at that position is the coalesced statement's per-element value instead, and
    the later ones move up by one."""

    def __init__(self, key: int | None = None) -> None:
        self.n = 0
        self.nodes = 0
        self.key = key

    def next(self) -> str:
        at, self.n = self.n, self.n + 1
        if self.key is None or at < self.key:
            return f"${self.n}"
        return '"dbsidecar.k".v' if at == self.key else f"${at}"


def _where_sql(shape: Shape, num: _Numbers) -> str:
    num.nodes += 1
    kind = shape[0]
    if kind in ("true", "false"):
        return kind.upper()
    if kind in ("and", "or"):
        joiner = " AND " if kind == "and" else " OR "
        return "(" + joiner.join(_where_sql(s, num) for s in shape[1]) + ")"
    if kind == "not":
        return f"NOT ({_where_sql(shape[1], num)})"
    col = column(shape[1])
    if kind == "is_null":
        return f"{col} IS NULL" if shape[2] else f"{col} IS NOT NULL"
    if kind == "in":
        return f"{col} = ANY({num.next()})"
    if kind == "not_in":
        return f"NOT ({col} = ANY({num.next()}))"
    if kind == "between":
        return f"{col} BETWEEN {num.next()} AND {num.next()}"
    return f"{col} {_SQL_OPS[kind]} {num.next()}"


def _where_clause(shape: Shape | None, num: _Numbers) -> str:
    return "" if shape is None else " WHERE " + _where_sql(shape, num)


def _order_clause(order: tuple[tuple[str, bool], ...]) -> str:
    if not order:
        return ""
    return " ORDER BY " + ", ".join(column(c) + (" DESC" if d else "") for c, d in order)


def _limit_clause(has_limit: bool, has_offset: bool, num: _Numbers, cap: int | None) -> str:
    # Without a caller's limit, one row past the cap tells "too many" from "just enough".
    if has_limit:
        return f" LIMIT {num.next()}" + (f" OFFSET {num.next()}" if has_offset else "")
    capped = "" if cap is None else f" LIMIT {cap + 1}"
    return capped + (f" OFFSET {num.next()}" if has_offset else "")


def _columns(cols: tuple[str, ...] | None) -> str:
    return "*" if cols is None else ", ".join(column(c) for c in cols)


def _returning(cols: tuple[str, ...] | None) -> str:
    if cols is None:
        return ""
    return " RETURNING " + ("*" if cols == ("*",) else _columns(cols))


def _size(key: Shape, sql: str, where_nodes: int) -> int:
    """The cache's estimate of an entry's bytes: its SQL, and its key's where nodes and
    names (columns, order, group, aggregates, returning: the key's tuple fields)."""
    names = sum(len(part) for part in key if type(part) is tuple)
    return ENTRY_BYTES + len(sql) + NODE_BYTES * (where_nodes + names)


def _build(key: Shape, num: _Numbers, cap: int | None) -> Statement:
    kind = key[0]
    if kind == "select":
        _, tbl, cols, where, order, has_limit, has_offset = key
        if cols == ():
            raise bad_plan("select at least one column, or none to mean all")
        sql = f"SELECT {_columns(cols)} FROM {table(tbl)}" + _where_clause(where, num)
        sql += _order_clause(order) + _limit_clause(has_limit, has_offset, num, cap)
        return Statement(sql, True, row_cap=cap)
    if kind == "count":
        _, tbl, where = key
        return Statement(
            f"SELECT count(*) AS count FROM {table(tbl)}" + _where_clause(where, num), True
        )
    if kind == "aggregate":
        _, tbl, aggs, group_by, where, order, has_limit, has_offset = key
        if not aggs:
            raise bad_plan("an aggregate plan needs at least one aggregate")
        names = [name for _, _, name in aggs]
        if len(set(names)) != len(names) or set(names) & set(group_by):
            raise bad_plan("aggregate aliases must be unique and differ from group_by columns")
        allowed = set(group_by) | set(names)
        for col, _ in order:
            if col not in allowed:
                raise bad_plan(f"order_by {col!r} must be a group_by column or an aggregate alias")
        parts = [column(g) for g in group_by]
        for fn, col, name in aggs:
            if col is None and fn != "count":
                raise bad_plan(f"{fn} needs a column")
            arg = "*" if col is None else column(col)
            parts.append(f"{fn}({arg}) AS {column(name)}")
        sql = f"SELECT {', '.join(parts)} FROM {table(tbl)}" + _where_clause(where, num)
        if group_by:
            sql += " GROUP BY " + ", ".join(column(g) for g in group_by)
        sql += _order_clause(order) + _limit_clause(has_limit, has_offset, num, cap)
        return Statement(sql, True, row_cap=cap)
    if kind == "insert":
        _, tbl, cols, nrows, returning = key
        if not cols:
            sql = f"INSERT INTO {table(tbl)} DEFAULT VALUES"
        else:
            rows = ", ".join("(" + ", ".join(num.next() for _ in cols) + ")" for _ in range(nrows))
            sql = f"INSERT INTO {table(tbl)} ({_columns(cols)}) VALUES {rows}"
        return Statement(sql + _returning(returning), returning is not None)
    if kind == "update":
        _, tbl, cols, where, returning = key
        sets = ", ".join(f"{column(c)} = {num.next()}" for c in cols)
        sql = f"UPDATE {table(tbl)} SET {sets}" + _where_clause(where, num) + _returning(returning)
        return Statement(sql, returning is not None)
    if kind == "delete":
        _, tbl, where, returning = key
        sql = f"DELETE FROM {table(tbl)}" + _where_clause(where, num) + _returning(returning)
        return Statement(sql, returning is not None)
    raise AssertionError(f"unknown shape {kind}")
