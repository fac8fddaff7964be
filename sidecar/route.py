"""Where a plan runs, decided once: :func:`route` turns a plan into a :class:`Route`.

A route says which database, which shards (one, some or all) with the plan each one
runs and the read-your-writes position it must observe, the intent (a write, a read
kept on the primary, or a replica-eligible read) and how the shards' results merge.
Every refusal of routing (``shard_key_required``, ``not_sharded``, ``unknown_shard``,
``cross_shard_transaction``, ...) is decided here and nowhere else. The function is
pure: it reads the topology's configuration, never node health (which node of a shard
serves is the router's choice, at run time).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from wire.consistency import parse_token
from wire.errors import ErrorCode
from wire.protocol import (
    ALL_SHARDS,
    AggregateQuery,
    Append,
    Count,
    Insert,
    Plan,
    Raw,
    ReadCategory,
    ReadStream,
    Select,
    plan_writes,
)

from . import sharding
from .compiler import Compiled
from .errors import SidecarError, bad_plan
from .topology import Database, Shard, Topology


class Intent(enum.Enum):
    WRITE = "write"  # on the shard's primary, never retried
    READ_PRIMARY = "read_primary"  # a read the caller or the policy keeps on the primary
    READ_REPLICA = "read_replica"  # a replica may serve it (healthy, within lag, caught up)


class Scope(enum.Enum):
    ONE = "one"
    SOME = "some"
    ALL = "all"


class Merge(enum.Enum):
    NONE = "none"  # one shard: its result as it is
    CONCAT = "concat"  # a write on several shards: rows and counts added up
    SELECT = "select"  # a read on several shards: ordered, windowed (merge.merge_select)
    COUNT = "count"
    AGGREGATE = "aggregate"
    ROWS = "rows"  # a raw read on several shards: their rows in shard order
    INSERT = "insert"  # rows split by shard; RETURNING rows back in the caller's order
    EVENTS = "events"  # event reads of several shards, each from its own checkpoint


# Refusals counted as routing decisions (the "refused" decision in metrics).
REFUSALS = frozenset(
    {ErrorCode.SHARD_KEY_REQUIRED, ErrorCode.CROSS_SHARD_BATCH, ErrorCode.CROSS_SHARD_TRANSACTION}
)


@dataclass(frozen=True, slots=True)
class Target:
    shard: Shard
    # What runs there: the plan itself, or an insert's own rows.
    plan: Plan
    # A WAL position a read must observe on this shard (read-your-writes), if any.
    after: int | None = None
    # The caller's rows (indexes) this target inserts, when an insert is split by shard.
    rows: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    plan: Plan  # as the caller gave it
    db: Database
    intent: Intent
    scope: Scope
    targets: tuple[Target, ...]
    merge: Merge

    @property
    def writes(self) -> bool:
        return self.intent is Intent.WRITE


def database(topology: Topology, name: str) -> tuple[Database, int | None]:
    """The database a plan names, and the shard its name pins (a shard's own name)."""
    found = topology.lookup(name)
    if found is None:
        raise SidecarError(
            ErrorCode.UNKNOWN_DATABASE,
            f"no database {name!r} is configured; known: {sorted(topology.databases)}",
        )
    return found


def route(
    plan: Plan,
    checked: Compiled,
    topology: Topology,
    *,
    transaction: bool = False,
    bound: Shard | None = None,
) -> Route:
    """Where ``plan`` runs; ``checked`` is the plan checked and compiled, whose decoded
    values the shard key is read from. In an interactive transaction (``transaction``) a
    plan runs on one shard, as a write on its primary: ``bound`` is the shard the
    transaction holds (None until its first plan pins one), and a plan without the key
    stays there."""
    db, pinned = database(topology, plan.database)
    indexes = _shard_indexes(db, plan, checked, pinned)
    if transaction:
        indexes = _transaction_shard(db, plan, indexes, bound)
    writes = plan_writes(plan)
    if indexes is None and writes and plan.route.shard != ALL_SHARDS:
        assert db.shard_fn is not None
        raise bad_plan(
            f"a write on sharded {db.name!r} needs the shard key {db.shard_fn.key!r} in its "
            "where clause, or route.shard '*' (all_shards()) to mean every shard",
            ErrorCode.SHARD_KEY_REQUIRED,
        )
    every = list(range(len(db.shards)))
    # A key pinned to no value at all (`id in []`): one shard answers "nothing".
    chosen = every if indexes is None else (indexes or [0])
    if len(chosen) == len(every) and (indexes is None or len(every) > 1):
        scope = Scope.ALL
    else:
        scope = Scope.ONE if len(chosen) == 1 else Scope.SOME
    if writes or transaction:
        intent = Intent.WRITE
    elif isinstance(plan, ReadCategory) and plan.category is None:
        # Its barrier against gaps is a lock on the primary (see sidecar.eventstore).
        intent = Intent.READ_PRIMARY
    elif (plan.route.role or db.settings.read_default) == "replica":
        intent = Intent.READ_REPLICA
    else:
        intent = Intent.READ_PRIMARY
    if isinstance(plan, Insert) and db.sharded:
        targets = _insert_targets(db, plan, checked, chosen)
        merge = Merge.NONE if len(targets) == 1 else Merge.INSERT
    else:
        positions = _positions(db, plan.route.after)
        targets = tuple(
            Target(db.shards[i], plan, positions.get(shard_key(db, db.shards[i]))) for i in chosen
        )
        merge = _merge(plan, writes, len(targets))
    if len(targets) > 1 and getattr(plan, "outbox", None):
        raise bad_plan(
            "outbox messages commit with a write on one shard: pin the write to one shard "
            "(each shard is its own transaction)"
        )
    return Route(plan, db, intent, scope, targets, merge)


def _transaction_shard(
    db: Database, plan: Plan, indexes: list[int] | None, bound: Shard | None
) -> list[int]:
    if indexes is None and plan.route.shard is None and bound is not None:
        return [bound.index]  # a plan without the key stays on the transaction's shard
    if indexes is None or len(indexes) != 1:
        raise bad_plan(
            "a transaction on a sharded database stays on one shard: pin it when "
            "opening, or pin one shard in the first plan",
            ErrorCode.CROSS_SHARD_TRANSACTION,
        )
    if bound is not None and indexes[0] != bound.index:
        raise bad_plan(
            f"this transaction is bound to shard {bound.name!r}", ErrorCode.CROSS_SHARD_TRANSACTION
        )
    return indexes


def batch_shard(routes: Sequence[Route]) -> Shard:
    """The one shard a batch (one transaction) runs on."""
    dbs = {id(r.db) for r in routes}
    if len(dbs) != 1:
        raise bad_plan("a batch runs on one database: every plan must name the same one")
    if not routes[0].db.sharded:
        return routes[0].db.shards[0]
    if any(r.scope is Scope.ALL for r in routes):
        raise bad_plan(
            "every plan in a batch on a sharded database must pin one shard",
            ErrorCode.CROSS_SHARD_BATCH,
        )
    chosen = {t.shard.index for r in routes for t in r.targets}
    if len(chosen) != 1:
        raise bad_plan(
            f"a batch is one transaction on one shard; these plans touch shards {sorted(chosen)}",
            ErrorCode.CROSS_SHARD_BATCH,
        )
    return routes[0].targets[0].shard


def _shard_indexes(
    db: Database, plan: Plan, checked: Compiled, pinned: int | None
) -> list[int] | None:
    """The shard indexes a plan targets; None: every shard, for want of a key."""
    if not db.sharded:
        if plan.route.shard not in (None, ALL_SHARDS, 0):
            raise bad_plan(f"database {db.name!r} is not sharded", ErrorCode.NOT_SHARDED)
        return [0]
    if isinstance(plan, Append | ReadStream):
        return [_stream_home(db, plan.stream, plan.route.shard, pinned)]
    if pinned is not None and plan.route.shard is None:
        # An insert's rows are checked against the pinned shard with its targets.
        return [pinned]
    assert db.shard_fn is not None
    return _target_shards(plan, checked, db.shard_fn, db.shard_names)


def _stream_home(db: Database, stream: str, asked: str | int | None, pinned: int | None) -> int:
    """The shard a stream lives on; a plan naming another one is refused, since the
    stream's versions would split."""
    home = sharding.stream_shard(stream, len(db.shards))
    if asked is not None and asked != ALL_SHARDS:
        pinned = sharding.explicit_shard(asked, db.shard_names)
    if pinned is not None and pinned != home:
        raise bad_plan(
            f"stream {stream!r} lives on shard {db.shards[home].name!r}, not "
            f"{db.shards[pinned].name!r}",
            ErrorCode.WRONG_SHARD,
        )
    return home


def _insert_targets(
    db: Database, plan: Insert, checked: Compiled, chosen: list[int]
) -> tuple[Target, ...]:
    assert db.shard_fn is not None
    groups: dict[int, list[int]] = {}
    for row, shard in enumerate(_row_shards(checked, db.shard_fn)):
        groups.setdefault(shard, []).append(row)
    if set(groups) - set(chosen):
        index = chosen[0]
        raise bad_plan(
            f"rows whose {db.shard_fn.key!r} belongs to other shards cannot be inserted "
            f"into {db.shards[index].name!r}",
            ErrorCode.WRONG_SHARD,
        )
    if len(groups) == 1:
        return (Target(db.shards[next(iter(groups))], plan),)
    return tuple(
        Target(
            db.shards[i],
            msgspec.structs.replace(plan, rows=[plan.rows[r] for r in rows]),
            rows=tuple(rows),
        )
        for i, rows in groups.items()
    )


def _merge(plan: Plan, writes: bool, shards: int) -> Merge:
    if shards == 1:
        return Merge.NONE
    if isinstance(plan, ReadCategory):
        return Merge.EVENTS
    if writes:
        return Merge.CONCAT
    if isinstance(plan, Select):
        return Merge.SELECT
    if isinstance(plan, Count):
        return Merge.COUNT
    if isinstance(plan, AggregateQuery):
        return Merge.AGGREGATE
    return Merge.ROWS


def shard_key(db: Database, shard: Shard) -> str:
    """A shard's key in consistency tokens and event-read checkpoints ("" unsharded)."""
    return (shard.name or "") if db.sharded else ""


def _positions(db: Database, token: str | None) -> dict[str, int]:
    if not token:
        return {}
    try:
        return parse_token(token)
    except ValueError:
        raise bad_plan(
            f"route.after is not a consistency token: {token!r}", ErrorCode.BAD_TOKEN
        ) from None


def _target_shards(
    plan: Plan, checked: Compiled, fn: sharding.ShardFunction, names: Sequence[str]
) -> list[int] | None:
    """The shard indexes a checked plan must run on; None means every shard."""
    shard = plan.route.shard
    if shard == ALL_SHARDS:
        return None
    if shard is not None:
        return [sharding.explicit_shard(shard, names)]
    if isinstance(plan, Raw):
        raise bad_plan(
            "a raw plan on a sharded database needs route.shard: a shard name or '*'",
            ErrorCode.SHARD_REQUIRED,
        )
    if isinstance(plan, Insert):
        return sorted(set(_row_shards(checked, fn)))
    where, at = checked.where()
    keys = sharding.key_values(where, checked.params, at, fn.key)
    if keys is None:
        return None
    return sorted({fn.shard_of(k) for k in keys})


def _row_shards(checked: Compiled, fn: sharding.ShardFunction) -> list[int]:
    """The shard of each row of a checked insert, in row order."""
    _, _, cols, rows, _ = checked.shape
    if fn.key not in cols:
        raise bad_plan(
            f"every inserted row needs the shard key {fn.key!r} (client.ids can generate one)",
            ErrorCode.SHARD_KEY_REQUIRED,
        )
    index, width = cols.index(fn.key), len(cols)
    return [fn.shard_of(checked.params[r * width + index]) for r in range(rows)]
