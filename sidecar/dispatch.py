"""Running a plan end to end: find the database, route, compile, execute, merge.

This is the one place that knows how a sharded plan splits: a key-pinned plan
runs on its shard, a read without a key fans out and merges, a write without a
key is refused unless it explicitly targets every shard, and a multi-row insert
is split per shard (one transaction per shard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import msgspec

from wire.consistency import format_token, lsn_to_int, parse_token
from wire.protocol import (
    ALL_SHARDS,
    AggregateQuery,
    BatchResult,
    Count,
    Insert,
    Plan,
    Raw,
    Result,
    Select,
    plan_writes,
)
from wire.values import wire_rows

from . import merge, metrics, sharding
from .compiler import Compiled, Compiler, Statement
from .errors import SidecarError, bad_plan
from .executor import Outcome, execute, to_result
from .router import Router
from .settings import Settings
from .topology import Database, Node, Shard, Topology

log = logging.getLogger("dbsidecar.queries")
T = TypeVar("T")


def plan_op(plan: Plan | None) -> str:
    """The plan's operation as a metric label ("batch" for a whole batch)."""
    return "batch" if plan is None else str(plan.__struct_config__.tag)


def _token(db: Database, outcomes: Sequence[Outcome]) -> str | None:
    positions = {
        (o.shard or "") if db.sharded else "": lsn_to_int(o.lsn) for o in outcomes if o.lsn
    }
    return format_token(positions) if positions else None


def _after(db: Database, shard: Shard, token: str | None) -> int | None:
    if not token:
        return None
    try:
        positions = parse_token(token)
    except ValueError:
        raise bad_plan(f"route.after is not a consistency token: {token!r}", "bad_token") from None
    return positions.get(shard.name or "" if db.sharded else "")


class Dispatcher:
    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology = topology
        self.settings = settings
        limits = settings.limits
        self.compiler = Compiler(
            max_where_depth=limits.max_where_depth,
            max_in_values=limits.max_in_values,
            cache_bytes=limits.compile_cache_bytes,
        )
        self.router = Router()

    def database(self, name: str, topology: Topology | None = None) -> tuple[Database, int | None]:
        found = (topology or self.topology).lookup(name)
        if found is None:
            raise SidecarError(
                404,
                "unknown_database",
                f"no database {name!r} is configured; known: {sorted(self.topology.databases)}",
            )
        return found

    def _shards(self, db: Database, plan: Plan, pinned: int | None) -> list[Shard] | None:
        """The shards a plan runs on (None: every shard, a scatter)."""
        if not db.sharded:
            if plan.route.shard not in (None, ALL_SHARDS, 0):
                raise bad_plan(f"database {db.name!r} is not sharded", "not_sharded")
            return [db.shards[0]]
        if pinned is not None and plan.route.shard is None:
            return [db.shards[pinned]]
        assert db.shard_fn is not None
        indexes = sharding.target_shards(plan, db.shard_fn, db.shard_names)
        if indexes is None:
            if plan_writes(plan) and plan.route.shard != ALL_SHARDS:
                self.router.count(db, "refused")
                raise bad_plan(
                    f"a write on sharded {db.name!r} needs the shard key "
                    f"{db.shard_fn.key!r} in its where clause, or route.shard '*' "
                    "(all_shards()) to mean every shard",
                    "shard_key_required",
                )
            return None
        return [db.shards[i] for i in indexes]

    async def run(self, plan: Plan) -> Result:
        # A request runs entirely on the table it started with, even across a reload.
        topology = self.topology
        topology.enter()
        try:
            return await self._run(plan, topology)
        finally:
            topology.leave()

    async def _run(self, plan: Plan, topology: Topology) -> Result:
        db, pinned = self.database(plan.database, topology)
        writes = plan_writes(plan)
        if db.sharded and isinstance(plan, Insert):
            return await self._sharded_insert(db, plan, pinned)
        shards = self._shards(db, plan, pinned) or db.shards
        if not writes and len(shards) > 1:
            self.router.count(db, "scatter")
            return await self._scatter(db, plan, shards)
        if len(shards) == 1:
            flat = await self._on_shard(db, shards[0], plan, writes)  # no task for one shard
        else:
            compiled = self.compiler.compile(plan)  # one plan, the same SQL on every shard
            groups = await asyncio.gather(
                *(self._on_shard(db, s, plan, writes, compiled=compiled) for s in shards)
            )
            flat = [o for group in groups for o in group]
        if len(flat) == 1:
            return to_result(flat[0], _token(db, flat))
        return Result(
            columns=flat[0].columns,
            types=flat[0].kinds,
            rows=wire_rows(flat[0].kinds, [list(r) for o in flat for r in o.rows]),
            rowcount=sum(o.rowcount for o in flat),
            lsn=_token(db, flat),
            served_by=[o.served_by() for o in flat],
        )

    async def _on_shard(
        self,
        db: Database,
        shard: Shard,
        plan: Plan,
        writes: bool,
        count: bool = True,
        compiled: Compiled | None = None,
    ) -> list[Outcome]:
        compiled = compiled or self.compiler.compile(plan)
        if writes:
            node, role = self.router.writer(db, shard), "primary"
            if count:
                self.router.count(db, "primary")
        else:
            node, role = await self._read_node(db, shard, plan, count)

        try:
            return await self._execute(db, shard, node, role, plan, compiled, writes)
        except SidecarError as exc:
            # A read whose node failed, or had no free connection, is tried once more on
            # another eligible node. A write never is: it may have committed.
            if writes or exc.code not in ("node_unavailable", "pool_timeout"):
                raise
            again, again_role = await self._read_node(db, shard, plan, count=False, exclude=node)
            if again is node:
                raise
            return await self._execute(db, shard, again, again_role, plan, compiled, writes)

    def _execute(
        self,
        db: Database,
        shard: Shard,
        node: Node,
        role: str,
        plan: Plan,
        compiled: Compiled,
        writes: bool,
    ) -> Awaitable[list[Outcome]]:
        statement = execute(
            node,
            role,
            shard.name,
            [compiled],
            writes=writes,
            transaction=False,
            readonly=isinstance(plan, Raw) and not writes,
            pool=db.settings.pool,
        )
        return self.observed(db, shard, node, role, plan, statement)

    async def observed(
        self,
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
            if elapsed * 1000 >= self.settings.logging.slow_query_ms:
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

    async def _read_node(
        self, db: Database, shard: Shard, plan: Plan, count: bool, exclude: Node | None = None
    ) -> tuple[Node, str]:
        replica = (plan.route.role or db.settings.read_default) == "replica"
        after = _after(db, shard, plan.route.after)
        choice = await self.router.choose(
            db, shard, replica=replica, after=after, count=count, exclude=exclude
        )
        return choice.node, choice.role

    async def _gather(self, db: Database, plan: Plan, shards: list[Shard]) -> list[Outcome]:
        compiled = self.compiler.compile(plan)
        groups = await asyncio.gather(
            *(self._on_shard(db, s, plan, False, False, compiled) for s in shards)
        )
        return [o for group in groups for o in group]

    async def _scatter(self, db: Database, plan: Plan, shards: list[Shard]) -> Result:
        served: list[Outcome]

        async def ask(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
            # The merge asks PostgreSQL for orders Python cannot reproduce (collations).
            compiled = Compiled(Statement(sql, returns_rows=True), params)
            outcomes = await self._on_shard(db, shards[0], plan, False, False, compiled)
            return outcomes[0].rows

        if isinstance(plan, Select):
            shard_plan, extra = merge.shard_select(plan)
            served = await self._gather(db, shard_plan, shards)
            columns, rows = await merge.merge_select(plan, served, extra, ask)
            kinds = served[0].kinds[: len(columns)]
        elif isinstance(plan, Count):
            served = await self._gather(db, plan, shards)
            columns, kinds = ["count"], [None]
            rows = [(sum(o.rows[0][0] for o in served),)]
        elif isinstance(plan, AggregateQuery):
            served = await self._gather(db, merge.shard_aggregate(plan), shards)
            columns, kinds, rows = await merge.merge_aggregate(plan, served, ask)
        else:
            # A raw read on every shard: the rows of all shards, in shard order.
            served = await self._gather(db, plan, shards)
            columns, kinds = served[0].columns, served[0].kinds
            rows = [r for o in served for r in o.rows]
        return Result(
            columns=columns,
            types=kinds,
            rows=wire_rows(kinds, [list(r) for r in rows]),
            rowcount=len(rows),
            served_by=[o.served_by() for o in served],
        )

    async def _sharded_insert(self, db: Database, plan: Insert, pinned: int | None) -> Result:
        assert db.shard_fn is not None
        if not plan.rows:
            raise bad_plan("an insert needs at least one row")
        groups = sharding.split_rows(plan, db.shard_fn)
        if plan.route.shard is not None:
            pinned = sharding.explicit_shard(plan.route.shard, db.shard_names)
        if pinned is not None and set(groups) != {pinned}:
            raise bad_plan(
                f"rows whose {db.shard_fn.key!r} belongs to other shards cannot be inserted "
                f"into {db.shards[pinned].name!r}",
                "wrong_shard",
            )
        order = {id(row): i for i, row in enumerate(plan.rows)}
        per_shard = [
            (db.shards[i], msgspec.structs.replace(plan, rows=rows)) for i, rows in groups.items()
        ]
        results = await asyncio.gather(
            *(self._on_shard(db, shard, sub, writes=True) for shard, sub in per_shard)
        )
        outcomes = [group[0] for group in results]
        rows: list[list[object]] = []
        if plan.returning is not None:
            # Hand RETURNING rows back in the order the rows were given.
            indexed = [
                (order[id(src)], list(ret))
                for (_, sub), outcome in zip(per_shard, outcomes, strict=True)
                for src, ret in zip(sub.rows, outcome.rows, strict=True)
            ]
            rows = [r for _, r in sorted(indexed, key=lambda x: x[0])]
        return Result(
            columns=outcomes[0].columns,
            types=outcomes[0].kinds,
            rows=wire_rows(outcomes[0].kinds, rows),
            rowcount=sum(o.rowcount for o in outcomes),
            lsn=_token(db, outcomes),
            served_by=[o.served_by() for o in outcomes],
        )

    async def run_batch(self, plans: Sequence[Plan]) -> BatchResult:
        """Plans on one database and shard, in one transaction on its primary."""
        topology = self.topology
        topology.enter()
        try:
            return await self._run_batch(plans, topology)
        finally:
            topology.leave()

    async def _run_batch(self, plans: Sequence[Plan], topology: Topology) -> BatchResult:
        if not plans:
            raise bad_plan("a batch needs at least one plan")
        if len(plans) > self.settings.limits.max_batch_plans:
            raise bad_plan(f"a batch holds at most {self.settings.limits.max_batch_plans} plans")
        names = {p.database for p in plans}
        resolved = {self.database(n, topology) for n in names}
        dbs = {id(db): db for db, _ in resolved}
        if len(dbs) != 1:
            raise bad_plan("a batch runs on one database: every plan must name the same one")
        db = next(iter(dbs.values()))
        shard = self._batch_shard(db, plans, {n: self.database(n, topology)[1] for n in names})
        node = self.router.writer(db, shard)
        self.router.count(db, "primary")
        compiled = []
        for i, plan in enumerate(plans):
            try:
                compiled.append(self.compiler.compile(plan))
            except SidecarError as exc:
                exc.index = i
                raise
        metrics.batch_size.observe(len(plans))
        outcomes = await self.observed(
            db,
            shard,
            node,
            "primary",
            None,
            execute(
                node,
                "primary",
                shard.name,
                compiled,
                writes=True,
                transaction=True,
                pool=db.settings.pool,
            ),
        )
        token = _token(db, outcomes[-1:])
        return BatchResult(results=[to_result(o, token) for o in outcomes], lsn=token)

    def _batch_shard(
        self, db: Database, plans: Sequence[Plan], pinned: dict[str, int | None]
    ) -> Shard:
        if not db.sharded:
            return db.shards[0]
        chosen: set[int] = set()
        for plan in plans:
            shards = self._shards(db, plan, pinned[plan.database])
            if shards is None:
                raise bad_plan(
                    "every plan in a batch on a sharded database must pin one shard",
                    "cross_shard_batch",
                )
            chosen.update(s.index for s in shards)
        if len(chosen) != 1:
            raise bad_plan(
                "a batch is one transaction on one shard; these plans touch shards "
                f"{sorted(chosen)}",
                "cross_shard_batch",
            )
        return db.shards[chosen.pop()]
