"""Running a routed plan on one shard: the node, the statement, and what wraps it once.

For each target of a :class:`~sidecar.route.Route` the runner picks the node (the
shard's primary for a write, the router's choice for a read), runs the compiled
statement there through the executor, counts it, logs it when slow (its shape, never
its values) and, for a read whose node failed or had no free connection, tries once
more on another eligible node. A write is never retried: it may have committed.
Interactive transactions use :func:`observed` around the statements they run on the
connection they hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from wire.protocol import Plan, Raw

from . import metrics
from .compiler import Compiled
from .errors import SidecarError
from .executor import Outcome, execute
from .route import REFUSALS, Intent, Route, Target, route
from .runtime import Runtime
from .topology import Database, Node, Shard

log = logging.getLogger("dbsidecar.queries")
T = TypeVar("T")

# Failures a read may leave behind on one node and try on another: nothing ran.
_RETRYABLE_READ = frozenset({"node_unavailable", "pool_timeout"})


def plan_op(plan: Plan | None) -> str:
    """The plan's operation as a metric label ("batch" for a whole batch)."""
    return "batch" if plan is None else str(plan.__struct_config__.tag)


def routed(rt: Runtime, plan: Plan, **binding: Any) -> Route:
    """route(), with its refusals counted as routing decisions."""
    try:
        return route(plan, rt.topology, **binding)
    except SidecarError as exc:
        if exc.code in REFUSALS:
            found = rt.topology.lookup(plan.database)
            if found is not None:
                rt.router.count(found[0], "refused")
        raise


async def run_target(
    rt: Runtime, route: Route, target: Target, compiled: Compiled, *, count: bool = True
) -> list[Outcome]:
    """Run one target's statement on the node that should serve it."""
    db, shard = route.db, target.shard
    if route.writes:
        node, role = rt.router.writer(db, shard), "primary"
        if count:
            rt.router.count(db, "primary")
    else:
        node, role = await _read_node(rt, route, target, count)
    try:
        return await _execute(rt, route, target, node, role, compiled)
    except SidecarError as exc:
        if route.writes or exc.code not in _RETRYABLE_READ:
            raise
        again, again_role = await _read_node(rt, route, target, False, exclude=node)
        if again is node:
            raise
        return await _execute(rt, route, target, again, again_role, compiled)


def _execute(
    rt: Runtime, route: Route, target: Target, node: Node, role: str, compiled: Compiled
) -> Awaitable[list[Outcome]]:
    plan = target.plan
    statement = execute(
        node,
        role,
        target.shard.name,
        [compiled],
        writes=route.writes,
        transaction=False,
        readonly=isinstance(plan, Raw) and not route.writes,
        pool=route.db.settings.pool,
    )
    return observed(rt, route.db, target.shard, node, role, plan, statement)


async def _read_node(
    rt: Runtime, route: Route, target: Target, count: bool, exclude: Node | None = None
) -> tuple[Node, str]:
    choice = await rt.router.choose(
        route.db,
        target.shard,
        replica=route.intent is Intent.READ_REPLICA,
        after=target.after,
        count=count,
        exclude=exclude,
    )
    return choice.node, choice.role


async def observed(
    rt: Runtime,
    db: Database,
    shard: Shard,
    node: Node,
    role: str,
    plan: Plan | None,
    work: Awaitable[T],
) -> T:
    """Await work on a node, counting it and logging it if slow (shape, never values)."""
    op = plan_op(plan)
    began = time.perf_counter()
    outcome = "ok"
    try:
        return await work
    except SidecarError as exc:
        outcome = exc.code
        raise
    finally:
        elapsed = time.perf_counter() - began
        shard_label = shard.name or ""
        metrics.query_seconds(db.name, shard_label, role, op).observe(elapsed)
        metrics.query_count(db.name, shard_label, role, op, outcome).inc()
        if elapsed * 1000 >= rt.settings.logging.slow_query_ms:
            log.warning(
                "slow query",
                extra={
                    "database": db.name,
                    "shard": shard.name,
                    "node": node.name,
                    "role": role,
                    "op": op,
                    "table": getattr(plan, "table", None),
                    "duration_ms": round(elapsed * 1000, 3),
                    "outcome": outcome,
                },
            )
