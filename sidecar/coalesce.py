"""Read coalescing: concurrent reads of one statement on one node run as one statement.

Plans a client issues at once (a bundle, or requests arriving in the same event-loop
turn) are often the same read with another key: ``find_by_id(k)`` for many ``k``. No
SQL proxy can merge them; the sidecar can, since it sees the plan's shape. The first
read of a statement on a node opens a group and yields once; reads of the same
statement on the same node that arrive meanwhile join it. Then:

- reads with identical values run once and share the rows;
- reads that differ in one where-value run as one coalesced statement
  (:meth:`~sidecar.compiler.Compiler.coalesced`), the rows split back by ordinal;
- anything else runs as it would alone.

Results are exactly those of separate execution: each read keeps its own where, order
and limit inside the LATERAL subquery. A coalesced statement that fails for any reason
but an unreachable node or no free connection is not trusted with the error: its reads
run again one by one, so each gets its own answer (a form that failed for a reason of
its own, SQLSTATE class 42 or a statement asyncpg refused, is not tried again). Only plain
reads outside transactions come here (the runner decides); a node and a statement
decide the group, so different nodes never mix.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wire.errors import ErrorCode

from . import metrics
from .compiler import Compiled, Compiler, Statement
from .errors import SidecarError
from .executor import Outcome, execute
from .settings import CoalescingSettings, PoolSettings
from .topology import Node

# Failures that say nothing ran, or the node is gone: every read of the group would
# have had them alone, and the runner retries each on another node.
_SHARED_FAILURES = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.POOL_TIMEOUT})
_FORM_ERRORS = frozenset({ErrorCode.BAD_STATEMENT, ErrorCode.DATA_EXCEPTION, ErrorCode.INTERNAL})
# Values compared by their text: equal Python values that PostgreSQL may still tell apart
# (Decimal("1.0") and Decimal("1.00"), datetimes in other zones, -0.0).
_BY_TEXT = (decimal.Decimal, float, datetime.datetime, datetime.time, list, dict, tuple)


def _token(value: Any) -> Any:
    if isinstance(value, _BY_TEXT) or type(value).__hash__ is None:
        return (type(value), repr(value))
    return (type(value), value)


@dataclass(slots=True)
class _Read:
    compiled: Compiled
    future: asyncio.Future[list[Outcome]] | None  # None: the group's leader, awaiting itself
    signature: tuple[Any, ...] = ()


@dataclass(slots=True)
class _Group:
    node: Node
    role: str
    shard: str | None
    pool: PoolSettings
    reads: list[_Read] = field(default_factory=list)


class Coalescer:
    """One per process: the open groups, by node and statement."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, int], _Group] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def read(
        self,
        compiler: Compiler,
        settings: CoalescingSettings,
        node: Node,
        role: str,
        shard: str | None,
        compiled: Compiled,
        pool: PoolSettings,
    ) -> list[Outcome]:
        """Run one read, in a group when others of its statement arrive on its node."""
        if not settings.enabled:
            return await _run_alone(node, role, shard, compiled, pool)
        key = (id(node), id(compiled.statement))
        group = self._open.get(key)
        if group is not None:
            future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
            group.reads.append(_Read(compiled, future))
            if len(group.reads) >= settings.max_plans:
                del self._open[key]  # full: the next read opens a new group
            return await future
        group = _Group(node, role, shard, pool, [_Read(compiled, None)])
        self._open[key] = group
        try:
            await asyncio.sleep(0)  # one loop turn: the reads arriving now join
        except BaseException:
            self._close(key, group)
            if len(group.reads) > 1:
                # The leader was cancelled: the others still get their answers.
                self._start(compiler, group, group.reads[1:])
            raise
        self._close(key, group)
        if len(group.reads) == 1:
            return await _run_alone(node, role, shard, compiled, pool)
        mine: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        group.reads[0].future = mine
        self._start(compiler, group, group.reads)
        return await mine

    def _close(self, key: tuple[int, int], group: _Group) -> None:
        if self._open.get(key) is group:
            del self._open[key]

    def _start(self, compiler: Compiler, group: _Group, reads: list[_Read]) -> None:
        # A task of its own: a caller that gives up must not stop the others' statement.
        task = asyncio.ensure_future(self._run(compiler, group, reads))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, compiler: Compiler, group: _Group, reads: list[_Read]) -> None:
        try:
            await asyncio.gather(*(self._batch(compiler, group, part) for part in _split(reads)))
        except BaseException as exc:  # only a bug gets here: answer every caller
            for r in reads:
                _settle(r, exc)
            if not isinstance(exc, Exception):
                raise

    async def _batch(self, compiler: Compiler, group: _Group, part: _Part) -> None:
        """One part of a group: reads sharing every value, or differing at ``part.at``."""
        at, buckets = part
        try:
            if len(buckets) == 1:
                outcome = (await self._alone(group, buckets[0][0].compiled))[0]
                for r in buckets[0]:
                    _settle(r, [_copy(outcome)])
                return
            assert at is not None
            form = compiler.coalesced(buckets[0][0].compiled, at)
            if form is None:
                await self._one_by_one(group, [r for b in buckets for r in b])
                return
            outcomes = await self._coalesced(group, form, at, buckets)
        except SidecarError as exc:
            if at is None or exc.code in _SHARED_FAILURES:
                # One statement ran for them all (or none could): one answer for all.
                for b in buckets:
                    for r in b:
                        _settle(r, exc)
                return
            if _form_failed(exc):
                # The coalesced form itself is wrong here (a type it cannot carry, ...):
                # not tried again for this statement. A caller's bad value is no reason.
                buckets[0][0].compiled.statement.coalesced[at] = None
            await self._one_by_one(group, [r for b in buckets for r in b])
            return
        for bucket, outcome in zip(buckets, outcomes, strict=True):
            for r in bucket:
                _settle(r, [_copy(outcome)])

    async def _coalesced(
        self, group: _Group, form: Statement, at: int, buckets: list[list[_Read]]
    ) -> list[Outcome]:
        first = buckets[0][0].compiled
        params = [v for i, v in enumerate(first.params) if i != at]
        params.append([b[0].compiled.params[at] for b in buckets])
        combined = (await self._alone(group, Compiled(form, params)))[0]
        row_cap = first.statement.row_cap
        per: list[list[tuple[Any, ...]]] = [[] for _ in buckets]
        for row in combined.rows:
            if not 0 < row[0] <= len(per):
                # unnest saw other elements than the keys given: never trust the rows.
                raise SidecarError(ErrorCode.INTERNAL, "a coalesced statement's ordinals")
            per[row[0] - 1].append(row[1:-1])
        if row_cap is not None and any(len(rows) > row_cap for rows in per):
            # One read is past the cap: alone, it answers result_too_large, the rest rows.
            raise SidecarError(ErrorCode.RESULT_TOO_LARGE, "a coalesced read passed the cap")
        columns, kinds = combined.columns[1:-1], combined.kinds[1:-1]
        labels = (group.node.db_label, group.node.shard_label, group.node.name)
        metrics.coalesced_plans.labels(*labels).inc(sum(len(b) for b in buckets))
        metrics.coalesced_statements.labels(*labels).inc()
        return [
            Outcome(columns, kinds, rows, len(rows), group.node, group.role, group.shard)
            for rows in per
        ]

    async def _one_by_one(self, group: _Group, reads: list[_Read]) -> None:
        async def alone(r: _Read) -> None:
            try:
                _settle(r, await self._alone(group, r.compiled))
            except SidecarError as exc:
                _settle(r, exc)

        await asyncio.gather(*(alone(r) for r in reads))

    def _alone(self, group: _Group, compiled: Compiled) -> Awaitable[list[Outcome]]:
        return _run_alone(group.node, group.role, group.shard, compiled, group.pool)


def _run_alone(
    node: Node, role: str, shard: str | None, compiled: Compiled, pool: PoolSettings
) -> Awaitable[list[Outcome]]:
    """A read as it runs without coalescing."""
    return execute(node, role, shard, [compiled], writes=False, transaction=False, pool=pool)


# A part of a group: the position of the value that varies (None: no value varies) and
# the reads by their values, one bucket per distinct set of values.
_Part = tuple[int | None, list[list[_Read]]]


def _split(reads: Sequence[_Read]) -> list[_Part]:
    """Reads with the same values share a bucket; buckets that differ only at one
    where-value position share a part. Buckets left over run in parts of their own."""
    buckets: dict[tuple[Any, ...], list[_Read]] = {}
    for r in reads:
        r.signature = tuple(_token(v) for v in r.compiled.params)
        buckets.setdefault(r.signature, []).append(r)
    groups = list(buckets.values())
    if len(groups) == 1:
        return [(None, groups)]
    signatures = [g[0].signature for g in groups]
    span = groups[0][0].compiled.where_params()
    varying = [i for i in span if len({s[i] for s in signatures}) > 1]
    if not varying:
        # They differ in a limit or an offset only: each as it is.
        return [(None, [g]) for g in groups]
    at = varying[0]
    if any(isinstance(g[0].compiled.params[at], list | tuple) for g in groups):
        # A list inside the array of keys would become one more dimension of it (a list
        # for a jsonb document, or a caller's wrong value for a scalar column).
        return [(None, [g]) for g in groups]
    parts: dict[tuple[Any, ...], list[list[_Read]]] = {}
    for g, s in zip(groups, signatures, strict=True):
        parts.setdefault(s[:at] + s[at + 1 :], []).append(g)
    return [(at if len(p) > 1 else None, p) for p in parts.values()]


def _form_failed(exc: SidecarError) -> bool:
    """A syntax or access rule violation (SQLSTATE class 42), or a statement or value
    asyncpg refused before the server saw it: what the reads alone did not have."""
    if exc.sqlstate is not None:
        return exc.sqlstate.startswith("42")
    return exc.code in _FORM_ERRORS


def _settle(r: _Read, outcome: list[Outcome] | BaseException) -> None:
    if r.future is None or r.future.done():
        return  # its caller gave up
    if isinstance(outcome, SidecarError):
        # Each caller its own error: one may add its index or its traceback.
        own = SidecarError(outcome.code, outcome.message, sqlstate=outcome.sqlstate)
        r.future.set_exception(own)
    elif isinstance(outcome, BaseException):
        r.future.set_exception(outcome)
    else:
        r.future.set_result(outcome)


def _copy(outcome: Outcome) -> Outcome:
    """Each caller gets its own row list (merges may reorder them)."""
    return Outcome(outcome.columns, outcome.kinds, list(outcome.rows), outcome.rowcount,
                   outcome.node, outcome.role, outcome.shard, outcome.lsn)  # fmt: skip
