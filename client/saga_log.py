"""The saga log and the step ledgers: their tables and every statement on them.

Two kinds of table, both created by :func:`install_log` / :func:`install_ledger`
(``CREATE ... IF NOT EXISTS``, so installing twice is harmless):

- ``dbsidecar_sagas``, in the orchestrator's database: one row per saga (its definition,
  state, current step, attempts, deadline, data, the transaction of each step attempt,
  errors) and its lease (``owner``, ``lease_until``). Every write of a running saga is
  *fenced*: it names the owner, and matching no row means another orchestrator took the
  saga over (:class:`LeaseLost`). Times come from the database's clock, never a pod's.
- ``dbsidecar_saga_steps``, in every database a step runs in: the ledger. A step inserts
  its row in the same transaction as its effect, before the effect; the primary key
  ``(saga_id, step, phase)`` makes a second application impossible: an insert that
  conflicts with a committed row does nothing (the step was applied: take its output),
  one that conflicts with a row still in flight waits for it (PostgreSQL settles it).

Everything goes through raw plans, so the sidecar checks each statement like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from wire.protocol import ALL_SHARDS, Raw, Route
from wire.values import Json, encode_value

from . import tables
from .connection import DatabaseHandle
from .errors import DbSidecarError
from .results import Rows, decode
from .transactions import Transaction

LOG_TABLE = "dbsidecar_sagas"
LEDGER_TABLE = "dbsidecar_saga_steps"
# The states a saga can be in; the first two are unfinished (an orchestrator resumes them).
STATES = ("running", "compensating", "completed", "compensated")
Phase = Literal["action", "compensation"]
XactStatus = Literal["committed", "aborted", "in progress"]

_CREATE_LOG = f"""
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    id text PRIMARY KEY,
    name text NOT NULL,
    -- The step names when the saga began: a changed definition is never resumed.
    definition jsonb NOT NULL,
    state text NOT NULL CHECK (state IN {STATES!r}),
    -- Running: the next step to apply. Compensating: the next step to compensate.
    step integer NOT NULL,
    -- Failed attempts at the current step.
    attempts integer NOT NULL DEFAULT 0,
    deadline timestamptz,
    data jsonb NOT NULL,
    owner text,
    lease_until timestamptz,
    -- 'action/2': the attempt whose transaction may still be in flight (see transactions).
    pending text,
    -- Per 'phase/step': its request id (the ledger key), shard, and last txid and tx id.
    transactions jsonb NOT NULL DEFAULT '{{}}',
    -- Why the saga compensates; the last failed attempt's error.
    error text,
    last_error text,
    stuck_since timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
)"""
_CREATE_LOG_INDEX = (
    f"CREATE INDEX IF NOT EXISTS {LOG_TABLE}_unfinished ON {LOG_TABLE} (updated_at)"
    " WHERE state IN ('running', 'compensating')"
)
_CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    saga_id text NOT NULL,
    step integer NOT NULL,
    phase text NOT NULL CHECK (phase IN ('action', 'compensation')),
    request_id text NOT NULL,
    output jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, phase)
)"""

_COLUMNS = (
    "id, name, definition, state, step, attempts, data, owner, pending, transactions, error,"
    " last_error, stuck_since IS NOT NULL AS stuck,"
    " extract(epoch FROM deadline - now())::float8 AS remaining"
)
_UNFINISHED = "state IN ('running', 'compensating')"


class LeaseLost(Exception):
    """Another orchestrator holds the saga now: this one must stop working on it."""


@dataclass
class LogRow:
    id: str
    name: str
    definition: list[str]
    state: str
    step: int
    attempts: int
    data: dict[str, Any]
    owner: str | None
    pending: str | None
    transactions: dict[str, dict[str, Any]]
    error: str | None
    last_error: str | None
    stuck: bool
    # Seconds left until the saga's deadline (database clock); None without one.
    remaining: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LogRow:
        return cls(**row)


async def _raw(
    db: DatabaseHandle | Transaction,
    sql: str,
    *params: Any,
    writes: bool,
    shard: str | int | None = None,
) -> Rows:
    if isinstance(db, Transaction):
        # The sidecar wants a raw plan on a sharded database to name its shard, even in a
        # transaction already bound to one.
        shard = db.shard
    # Reads go to the primary too: a replica's stale row could hide a committed step.
    route = Route(role=None if writes else "primary", shard=shard)
    plan = Raw(
        database=db.database,
        sql=sql,
        params=[encode_value(p) for p in params],
        writes=writes,
        route=route,
    )
    return decode(await db.run(plan))


async def install_log(db: DatabaseHandle) -> None:
    await tables.create(db, _CREATE_LOG)
    await tables.create(db, _CREATE_LOG_INDEX)


async def install_ledger(db: DatabaseHandle, sharded: bool) -> None:
    """The ledger in ``db`` (on every shard of a sharded database)."""
    await tables.create(db, _CREATE_LEDGER, shard=ALL_SHARDS if sharded else None)


async def create(
    db: DatabaseHandle,
    saga_id: str,
    name: str,
    definition: list[str],
    data: dict[str, Any],
    deadline: float | None,
    owner: str | None,
    lease: float,
) -> bool:
    """A new running saga, due ``deadline`` seconds from now (None: never), owned by
    ``owner`` if given; False if ``saga_id`` exists."""
    rows = await _raw(
        db,
        f"INSERT INTO {LOG_TABLE} (id, name, definition, state, step, data, deadline, owner,"
        " lease_until) VALUES ($1, $2, $4, 'running', 0, $5,"
        " now() + $6::float8 * interval '1 second', $7,"
        " CASE WHEN $7::text IS NULL THEN NULL ELSE now() + $3::float8 * interval '1 second' END)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        saga_id,
        name,
        lease,
        Json(definition),
        Json(data),
        deadline,
        owner,
        writes=True,
    )
    return bool(rows)


async def claim(
    db: DatabaseHandle, saga_id: str, names: list[str], owner: str, lease: float
) -> LogRow | None:
    """Take the lease of an unfinished saga that is free, expired or already ours."""
    rows = await _raw(
        db,
        f"UPDATE {LOG_TABLE} SET owner = $2, updated_at = now(),"
        " lease_until = now() + $3::float8 * interval '1 second'"
        f" WHERE id = $1 AND name = ANY($4::text[]) AND {_UNFINISHED}"
        " AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until < now())"
        f" RETURNING {_COLUMNS}",
        saga_id,
        owner,
        lease,
        names,
        writes=True,
    )
    return LogRow.from_row(rows[0]) if rows else None


# What a fenced write may set; the values are bound, only these names reach the SQL.
_SETTABLE = ("state", "step", "attempts", "data", "pending", "transactions", "error", "last_error")
_JSON = ("data", "transactions")


async def write(
    db: DatabaseHandle,
    saga_id: str,
    owner: str,
    lease: float,
    *,
    stuck: bool | None = None,
    finished: bool = False,
    **changes: Any,
) -> float | None:
    """Change the saga's row if ``owner`` still holds it, renewing the lease (or ending it:
    ``finished``); the seconds left until its deadline. LeaseLost if it is not ours."""
    sets: list[str] = []
    params: list[Any] = [saga_id, owner]
    for column, value in changes.items():
        if column not in _SETTABLE:
            raise ValueError(f"not a saga log column: {column!r}")
        params.append(Json(value) if column in _JSON else value)
        sets.append(f"{column} = ${len(params)}")
    if stuck is not None:
        sets.append("stuck_since = " + ("coalesce(stuck_since, now())" if stuck else "NULL"))
    if finished:
        sets.append("lease_until = NULL, finished_at = now()")
    else:
        params.append(lease)
        sets.append(f"lease_until = now() + ${len(params)}::float8 * interval '1 second'")
    sets.append("updated_at = now()")
    rows = await _raw(
        db,
        f"UPDATE {LOG_TABLE} SET {', '.join(sets)} WHERE id = $1 AND owner = $2"
        " RETURNING extract(epoch FROM deadline - now())::float8 AS remaining",
        *params,
        writes=True,
    )
    if not rows:
        raise LeaseLost(f"saga {saga_id}: another orchestrator holds it now")
    return rows[0]["remaining"]


async def read(db: DatabaseHandle, saga_id: str) -> LogRow | None:
    rows = await _raw(
        db, f"SELECT {_COLUMNS} FROM {LOG_TABLE} WHERE id = $1", saga_id, writes=False
    )
    return LogRow.from_row(rows[0]) if rows else None


async def claimable(db: DatabaseHandle, names: list[str], limit: int) -> list[str]:
    """Unfinished sagas of these names that no orchestrator holds (free or expired)."""
    rows = await _raw(
        db,
        f"SELECT id FROM {LOG_TABLE} WHERE {_UNFINISHED} AND name = ANY($1::text[])"
        " AND (owner IS NULL OR lease_until IS NULL OR lease_until < now())"
        " ORDER BY updated_at LIMIT $2::int",
        names,
        limit,
        writes=False,
    )
    return [row["id"] for row in rows]


# The step's own transaction
async def current_txid(tx: Transaction) -> str:
    """The transaction's id in PostgreSQL (assigned now if it had none)."""
    rows = await _raw(tx, "SELECT pg_current_xact_id()::text AS txid", writes=True)
    return str(rows[0]["txid"])


async def ledger_begin(
    tx: Transaction, saga_id: str, step: int, phase: Phase, request: str
) -> bool:
    """Claim (saga, step, phase) in the step's transaction: False if it was applied already.
    A row still in flight in another transaction makes this wait for its outcome."""
    rows = await _raw(
        tx,
        f"INSERT INTO {LEDGER_TABLE} (saga_id, step, phase, request_id)"
        " VALUES ($1, $2::int, $3, $4) ON CONFLICT DO NOTHING RETURNING request_id",
        saga_id,
        step,
        phase,
        request,
        writes=True,
    )
    return bool(rows)


async def ledger_finish(
    tx: Transaction, saga_id: str, step: int, phase: Phase, output: dict[str, Any]
) -> None:
    """Store the step's output with its effect, for a rerun that finds the step applied."""
    await _raw(
        tx,
        f"UPDATE {LEDGER_TABLE} SET output = $4 WHERE saga_id = $1 AND step = $2::int"
        " AND phase = $3",
        saga_id,
        step,
        phase,
        Json(output),
        writes=True,
    )


async def ledger_output(
    db: DatabaseHandle | Transaction,
    saga_id: str,
    step: int,
    phase: Phase,
    shard: str | int | None = None,
) -> dict[str, Any] | None:
    """The committed output of an applied step ({} if it had none); None if not applied."""
    rows = await _raw(
        db,
        f"SELECT coalesce(output, '{{}}'::jsonb) AS output FROM {LEDGER_TABLE}"
        " WHERE saga_id = $1 AND step = $2::int AND phase = $3",
        saga_id,
        step,
        phase,
        writes=False,
        shard=shard,
    )
    return rows[0]["output"] if rows else None


async def xact_status(db: DatabaseHandle, txid: str, shard: str | int | None) -> XactStatus | None:
    """PostgreSQL's word on a transaction: committed, aborted or in progress; None when it
    is too old for the commit log to say (it is certainly over then), or not assigned yet
    on this server: after a failover to an asynchronous replica the log may name a
    transaction of the old primary's that the new one never saw (pg_xact_status raises
    "in the future" for it). The ledger decides then."""
    try:
        rows = await _raw(
            db,
            "SELECT pg_xact_status($1::text::xid8) AS status",
            txid,
            writes=False,
            shard=shard,
        )
    except DbSidecarError as exc:
        # invalid_parameter_value: for a well-formed xid8, only "in the future".
        if exc.sqlstate == "22023":
            return None
        raise
    return rows[0]["status"]
