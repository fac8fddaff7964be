"""A plan end to end: route it, compile it, run it on its shards, merge the results.

Every request runs against the runtime snapshot it captured at entry, and entirely on
that snapshot's topology, even across a reload. Where it runs is :func:`route`'s
decision; how it runs on a node is the runner's; this module only joins the two and
shapes the shards' outcomes into one result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from wire.consistency import format_token, lsn_to_int
from wire.errors import ErrorCode
from wire.protocol import AggregateQuery, BatchResult, Plan, ReadCategory, Result, Select
from wire.values import wire_rows

from . import merge, metrics, runner, tracing
from .compiler import Compiled, Statement, too_many_rows
from .errors import SidecarError, bad_plan
from .eventstore import READ_COLUMNS
from .executor import Outcome, execute, to_result
from .route import Merge, Route, batch_shard, database, shard_key
from .runtime import Runtime
from .topology import Database


def _token(db: Database, outcomes: Sequence[Outcome]) -> str | None:
    positions = {
        (o.shard or "") if db.sharded else "": lsn_to_int(o.lsn) for o in outcomes if o.lsn
    }
    return format_token(positions) if positions else None


async def run(rt: Runtime, plan: Plan) -> Result:
    rt.topology.enter()
    try:
        checked = rt.compiler.compile(plan)  # values checked and decoded, once
        with (
            tracing.span("dbsidecar.route", {"db.namespace": plan.database,
                                             "dbsidecar.op": runner.plan_op(plan)})
            if tracing.ENABLED else tracing.NO_SPAN
        ) as span:  # fmt: skip
            r = runner.routed(rt, plan, checked)
            if span is not None:
                span.set_attribute("dbsidecar.shards", len(r.targets))
                span.set_attribute("dbsidecar.intent", r.intent.name.lower())
        return await _run(rt, r, checked)
    finally:
        rt.topology.leave()


async def _run(rt: Runtime, r: Route, checked: Compiled) -> Result:
    if checked.work is not None:
        return await _events(rt, r, checked)
    if r.merge is Merge.NONE:
        outcomes = await runner.run_target(rt, r, r.targets[0], checked)
        return to_result(outcomes[0], _token(r.db, outcomes))
    if r.merge is Merge.INSERT:
        return await _sharded_insert(rt, r, checked)
    if r.writes:
        return await _on_every_shard(rt, r, checked)
    rt.router.count(r.db, "scatter")
    return await _scatter(rt, r, checked)


async def _events(rt: Runtime, r: Route, checked: Compiled) -> Result:
    """An event-store plan, on each target shard as that shard's work (its checkpoint);
    the reads of several shards merge into one page."""
    one = len(r.targets) == 1
    if not one:
        rt.router.count(r.db, "scatter")
    groups = await asyncio.gather(
        *(
            runner.run_target(rt, r, t, checked.on_shard(shard_key(r.db, t.shard)), count=one)
            for t in r.targets
        )
    )
    outcomes = [o for group in groups for o in group]
    if one:
        return to_result(outcomes[0], _token(r.db, outcomes))
    assert isinstance(r.plan, ReadCategory) and r.merge is Merge.EVENTS
    at = READ_COLUMNS.index("recorded_at")
    rows = merge.merge_events([o.rows for o in outcomes], at, r.plan.limit)
    kinds = outcomes[0].kinds
    return Result(
        columns=outcomes[0].columns,
        types=kinds,
        rows=wire_rows(kinds, [list(row) for row in rows]),
        rowcount=len(rows),
        served_by=[o.served_by() for o in outcomes],
    )


async def _gather(rt: Runtime, r: Route, compiled: Compiled, count: bool) -> list[Outcome]:
    """One statement on every target shard at once."""
    groups = await asyncio.gather(
        *(runner.run_target(rt, r, t, compiled, count=count) for t in r.targets)
    )
    return [o for group in groups for o in group]


async def _write_every_shard(
    rt: Runtime, r: Route, statements: Sequence[Compiled]
) -> list[Outcome]:
    """A write on several shards, one transaction each, all awaited to the end: when some
    committed and some failed, the answer says which (never a plain error that hides
    committed rows)."""
    results = await asyncio.gather(
        *(runner.run_target(rt, r, t, c) for t, c in zip(r.targets, statements, strict=True)),
        return_exceptions=True,
    )
    failed = [
        (t, e) for t, e in zip(r.targets, results, strict=True) if isinstance(e, BaseException)
    ]
    if not failed:
        return [o for group in results for o in group]  # type: ignore[union-attr]
    first = failed[0][1]
    committed = [
        t.shard.name
        for t, e in zip(r.targets, results, strict=True)
        if not isinstance(e, BaseException)
    ]
    if not committed or not isinstance(first, SidecarError):
        raise first
    raise SidecarError(
        ErrorCode.PARTIAL_WRITE,
        f"committed on {committed}, not on {[t.shard.name for t, _ in failed]} "
        f"({first.code}: {first.message}); each shard is its own transaction",
    )


async def _on_every_shard(rt: Runtime, r: Route, checked: Compiled) -> Result:
    flat = await _write_every_shard(rt, r, [checked] * len(r.targets))
    return Result(
        columns=flat[0].columns,
        types=flat[0].kinds,
        rows=wire_rows(flat[0].kinds, [list(row) for o in flat for row in o.rows]),
        rowcount=sum(o.rowcount for o in flat),
        lsn=_token(r.db, flat),
        served_by=[o.served_by() for o in flat],
    )


async def _scatter(rt: Runtime, r: Route, checked: Compiled) -> Result:
    plan = r.targets[0].plan

    async def ask(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        # The merge asks PostgreSQL for orders Python cannot reproduce (collations).
        compiled = Compiled(Statement(sql, returns_rows=True), params)
        outcomes = await runner.run_target(rt, r, r.targets[0], compiled, count=False)
        return outcomes[0].rows

    if r.merge is Merge.SELECT:
        assert isinstance(plan, Select)
        shard_plan, extra = merge.shard_select(plan)
        # Each shard also returns the order columns: a plan of its own (values decoded
        # again: the one place a plan is checked twice).
        served = await _gather(rt, r, rt.compiler.compile(shard_plan), count=False)
        columns, rows = await merge.merge_select(plan, served, extra, ask)
        kinds = served[0].kinds[: len(columns)]
    elif r.merge is Merge.COUNT:
        served = await _gather(rt, r, checked, count=False)
        columns, kinds = ["count"], [None]
        rows = [(sum(o.rows[0][0] for o in served),)]
    elif r.merge is Merge.AGGREGATE:
        assert isinstance(plan, AggregateQuery)
        served = await _gather(rt, r, rt.compiler.compile(merge.shard_aggregate(plan)), count=False)
        columns, kinds, rows = await merge.merge_aggregate(plan, served, ask)
    else:
        # A raw read on every shard: the rows of all shards, in shard order.
        served = await _gather(rt, r, checked, count=False)
        columns, kinds = served[0].columns, served[0].kinds
        rows = [row for o in served for row in o.rows]
    cap = rt.settings.limits.max_result_rows
    if len(rows) > cap:
        raise too_many_rows(cap)  # each shard kept to the cap, together they passed it
    return Result(
        columns=columns,
        types=kinds,
        rows=wire_rows(kinds, [list(row) for row in rows]),
        rowcount=len(rows),
        served_by=[o.served_by() for o in served],
    )


async def _sharded_insert(rt: Runtime, r: Route, checked: Compiled) -> Result:
    """Rows split by shard, one insert (one transaction) per shard, at once; each shard's
    statement is built from the values already decoded."""
    outcomes = await _write_every_shard(
        rt, r, [rt.compiler.insert_part(checked, t.rows) for t in r.targets]
    )
    rows: list[list[object]] = []
    if getattr(r.plan, "returning", None) is not None:
        # Hand RETURNING rows back in the order the caller gave the rows.
        indexed = sorted(
            (index, list(ret))
            for t, outcome in zip(r.targets, outcomes, strict=True)
            for index, ret in zip(t.rows, outcome.rows, strict=True)
        )
        rows = [row for _, row in indexed]
    return Result(
        columns=outcomes[0].columns,
        types=outcomes[0].kinds,
        rows=wire_rows(outcomes[0].kinds, rows),
        rowcount=sum(o.rowcount for o in outcomes),
        lsn=_token(r.db, outcomes),
        served_by=[o.served_by() for o in outcomes],
    )


async def run_batch(rt: Runtime, plans: Sequence[Plan]) -> BatchResult:
    """Plans on one database and shard, in one transaction on its primary."""
    rt.topology.enter()
    try:
        return await _run_batch(rt, plans)
    finally:
        rt.topology.leave()


async def _run_batch(rt: Runtime, plans: Sequence[Plan]) -> BatchResult:
    if not plans:
        raise bad_plan("a batch needs at least one plan")
    limit = rt.settings.limits.max_batch_plans
    if len(plans) > limit:
        raise bad_plan(f"a batch holds at most {limit} plans")
    for plan in plans:
        database(rt.topology, plan.database)  # an unknown database is a 404 before all else
    compiled = []
    for i, plan in enumerate(plans):
        try:
            compiled.append(rt.compiler.compile(plan))
        except SidecarError as exc:
            exc.index = i
            raise
    routes = [runner.routed(rt, p, c) for p, c in zip(plans, compiled, strict=True)]
    with runner.refusals_counted(rt, plans[0].database):
        shard = batch_shard(routes)
    db = routes[0].db
    compiled = [c.on_shard(shard_key(db, shard)) for c in compiled]
    node = rt.router.writer(db, shard)
    rt.router.count(db, "primary")
    metrics.batch_size.observe(len(plans))
    statements = execute(
        node, "primary", shard.name, compiled, writes=True, transaction=True, pool=db.settings.pool
    )
    outcomes = await runner.observed(rt, db, shard, node, "primary", None, statements)
    token = _token(db, outcomes[-1:])
    return BatchResult(results=[to_result(o, token) for o in outcomes], lsn=token)
