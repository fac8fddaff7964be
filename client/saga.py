"""Sagas: steps in several services' databases, each a local transaction through the sidecar,
undone in reverse by compensations when one fails, resumable by any pod after a crash.

::

    saga = Saga("order", [
        Step("reserve", reserve, compensation=release, database="inventory"),
        Step("create_order", create_order, compensation=cancel_order, database="orders"),
        Step("charge", charge, compensation=refund, database="payments"),
    ], timeout=60)
    orchestrator = Orchestrator([saga], log="default")   # the log lives in that database
    await orchestrator.install()                          # tables, once (idempotent)
    outcome = await orchestrator.start(saga, {"sku": "A-1", "qty": 2, "amount": "20.00"})

An action (and a compensation) is ``async def step(tx, data) -> dict | None``: ``tx`` is an
open :class:`~client.transactions.Transaction` on the step's database (``using(tx)``,
``save(using=tx)``, ``tx.run(Raw(...))``), ``data`` a copy of the saga's JSON data; the
dict it returns merges into the data. The step commits when it returns.

What makes it safe:

- **Exactly once per step.** The step's transaction first inserts its ledger row
  (:mod:`client.saga_log`), keyed by (saga, step, phase), then runs the action: the effect
  and the row commit together or not at all, and a rerun (a retry, a resumed saga, a second
  orchestrator) finds the row and takes the stored output instead of applying it again.
- **No guessing after a lost commit answer.** Before the action runs, the transaction's
  PostgreSQL id (``pg_current_xact_id()``) is written to the saga's log row. When a commit
  answer is lost, or an orchestrator resumes a saga a crashed one left mid-step, that
  transaction is settled with ``pg_xact_status()`` on its database and shard: committed,
  aborted, or in progress (waited for, with backoff; an orphan left open on this
  orchestrator's own sidecar is rolled back by its sidecar transaction id).
- **One orchestrator per saga.** An orchestrator claims a saga by a lease on its log row;
  each log write names the owner and renews the lease, and one that matches nothing stops
  the orchestrator (:class:`LeaseLost`). A step already running when its lease ran out is
  still applied at most once: the ledger settles that.
- **Compensations are never skipped.** On a failure, the applied steps are compensated in
  reverse order, each exactly once through the ledger, retried with capped jittered backoff
  for as long as it takes; past ``stuck_after`` attempts the saga counts as stuck (its log
  row says since when, the ``stuck`` event and gauge say so) and retrying goes on.
- **Timeouts.** A step's action runs under its ``timeout`` (the transaction rolls back);
  a saga past its deadline compensates (an action runs at most until the deadline).

The lease should be longer than any step's timeout: a step outlasting it lets another
orchestrator take the saga over (safely, but the first one's work is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from wire.errors import ErrorCode

from . import saga_log, saga_metrics
from .connection import ConnectionManager, DatabaseHandle
from .errors import DbSidecarError
from .saga_log import LeaseLost, LogRow, Phase, XactStatus
from .transactions import Transaction
from .transport import request_id

__all__ = ["LeaseLost", "Orchestrator", "Saga", "SagaOutcome", "Step"]

log = logging.getLogger("dbsidecar.saga")

Action = Callable[[Transaction, dict[str, Any]], Awaitable[dict[str, Any] | None]]
# A shard name or index, or a function of the saga's data choosing one.
ShardChoice = str | int | Callable[[dict[str, Any]], str | int] | None
# on_event(event, saga_id, step): sync or async; see Orchestrator for the events.
EventHook = Callable[[str, str, int], Awaitable[None] | None]


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    compensation: Action | None = None
    # A logical database behind the orchestrator's sidecar; None: the log's database.
    database: str | None = None
    # Required on a sharded database: the step's transaction runs on one shard, chosen
    # when the action first runs and kept for its compensation.
    shard: ShardChoice = None
    # Seconds the action may run (its transaction rolls back after that).
    timeout: float = 10.0
    # Retries of an action failing with a retryable error (sidecar or database not
    # reachable, commit rolled back) before the saga compensates; other errors compensate.
    retries: int = 2


class Saga:
    def __init__(self, name: str, steps: Sequence[Step], *, timeout: float | None = None) -> None:
        names = [s.name for s in steps]
        if not steps or len(set(names)) != len(names):
            raise ValueError(f"saga {name!r} needs steps with distinct names, got {names}")
        self.name = name
        self.steps = list(steps)
        # Seconds from its start until the saga compensates instead of going on.
        self.timeout = timeout

    @property
    def definition(self) -> list[str]:
        return [s.name for s in self.steps]

    def __repr__(self) -> str:
        return f"<Saga {self.name!r} {self.definition}>"


@dataclass(frozen=True)
class SagaOutcome:
    """A saga as its log row has it."""

    id: str
    name: str
    state: str
    step: int
    attempts: int
    data: dict[str, Any]
    error: str | None
    last_error: str | None
    stuck: bool

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "compensated")

    @classmethod
    def of(cls, row: LogRow) -> SagaOutcome:
        return cls(
            row.id, row.name, row.state, row.step, row.attempts, row.data, row.error,
            row.last_error, row.stuck,
        )  # fmt: skip


@dataclass
class _Applied:
    output: dict[str, Any]


@dataclass
class _Failed:
    error: str
    # A retry may succeed (the sidecar or database was unreachable, a commit rolled back).
    retryable: bool


@dataclass
class _Run:
    """A saga this orchestrator holds: the log row as it last wrote it."""

    id: str
    saga: Saga
    state: str
    step: int
    attempts: int
    data: dict[str, Any]
    pending: str | None
    transactions: dict[str, dict[str, Any]]
    error: str | None
    last_error: str | None
    stuck: bool
    # time.monotonic() at the saga's deadline, None without one.
    deadline: float | None = field(default=None)

    def outcome(self) -> SagaOutcome:
        return SagaOutcome(
            self.id, self.saga.name, self.state, self.step, self.attempts, self.data,
            self.error, self.last_error, self.stuck,
        )  # fmt: skip


def _plain(doc: Any) -> Any:
    """``doc`` as JSON gives it back (Decimal -> str, tuple -> list): the data a step sees
    is the same whether it came from the step just run or from the log after a resume."""
    return msgspec.json.decode(msgspec.json.encode(doc))


# Characters of an error kept in the log: a step's exception may carry a payload larger
# than a request body may be, and a log write refused for it would stop the saga from
# ever compensating (each resume failing the same way).
MAX_ERROR_CHARS = 4000


# Bytes of JSON a saga's data may take. Every log write carries the data whole, and the
# sidecar takes bodies of limits.max_body_bytes at most (8 MiB by default): data that grew
# past it would make every write after the step that grew it fail, and the saga could
# neither go on nor compensate. A step whose output would pass this fails instead.
MAX_DATA_BYTES = 1024 * 1024


def _data_size(data: dict[str, Any]) -> int:
    return len(msgspec.json.encode(data))


def _clip(error: str) -> str:
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[:MAX_ERROR_CHARS]}... ({len(error) - MAX_ERROR_CHARS} more characters)"


def _key(phase: Phase, step: int) -> str:
    return f"{phase}/{step}"


def _to_compensate(saga: Saga, index: int) -> int:
    """The step at or before ``index`` to compensate next (-1: none left); steps without a
    compensation have nothing to undo. The log points at it, so a resumed saga settles the
    right pending attempt."""
    while index >= 0 and saga.steps[index].compensation is None:
        index -= 1
    return index


class _DeadlinePassed(Exception):
    """The saga's deadline cut a step's action short."""


class Orchestrator:
    """Runs sagas and resumes unfinished ones from the log.

    ``log`` is a handle (or its name) on the database holding ``dbsidecar_sagas``; steps
    run through the same sidecar. ``on_event(event, saga_id, step)`` (sync or async; its
    errors are logged, never raised) sees, in order: ``started`` (the log row exists),
    ``claimed``, then per step attempt ``<phase>.begun`` (inside the step's transaction:
    ledger row inserted, action not run yet), ``<phase>.committing`` (action done, before
    the commit), ``<phase>.unknown`` (the commit's answer was lost: settling),
    ``<phase>.committed``, ``<phase>.logged`` (the log moved past the step), or
    ``<phase>.replayed`` (the ledger had it already) or ``<phase>.failed``; and
    ``compensating``, ``stuck``, ``completed``, ``compensated``. ``<phase>`` is ``action``
    or ``compensation``.
    """

    def __init__(
        self,
        sagas: Sequence[Saga],
        *,
        log: str | DatabaseHandle = "default",
        owner: str | None = None,
        lease: float = 30.0,
        stuck_after: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        concurrency: int = 16,
        on_event: EventHook | None = None,
    ) -> None:
        handle = ConnectionManager.resolve(log)
        if not isinstance(handle, DatabaseHandle):
            raise TypeError("the saga log is written through a handle, not a transaction")
        self.log = handle
        self.sagas = {s.name: s for s in sagas}
        if len(self.sagas) != len(sagas):
            raise ValueError("two sagas share a name")
        # Unique per orchestrator, readable in the log and the CLI: which pod holds a saga.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease = lease
        self.stuck_after = stuck_after
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.on_event = on_event

    def _database(self, step: Step) -> DatabaseHandle:
        if step.database is None:
            return self.log
        return ConnectionManager.handle_for(self.log, step.database)

    async def install(self) -> None:
        """Create the log and a ledger in every database the sagas' steps use."""
        await saga_log.install_log(self.log)
        sharded: dict[str, bool] = {}
        for saga in self.sagas.values():
            for step in saga.steps:
                db = self._database(step).database
                sharded[db] = sharded.get(db, False) or step.shard is not None
        for database, on_shards in sharded.items():
            handle = ConnectionManager.handle_for(self.log, database)
            await saga_log.install_ledger(handle, on_shards)

    # Starting and resuming
    async def begin(self, saga: Saga, data: dict[str, Any], saga_id: str | None = None) -> str:
        """Log a new saga without running it (a ``resume()`` anywhere picks it up); its id.
        An existing ``saga_id`` is left as it is: beginning twice begins once."""
        return await self._create(saga, data, saga_id, owner=None)

    async def start(
        self, saga: Saga, data: dict[str, Any], saga_id: str | None = None
    ) -> SagaOutcome | None:
        """Log a new saga and run it to its end: completed or compensated. None if another
        orchestrator holds it (a ``saga_id`` started before). If a log write fails (the
        sidecar is unreachable), the error is raised and the saga is resumed later."""
        saga_id = await self._create(saga, data, saga_id, owner=self.owner)
        return await self.run(saga_id)

    async def _create(
        self, saga: Saga, data: dict[str, Any], saga_id: str | None, owner: str | None
    ) -> str:
        if self.sagas.get(saga.name) is not saga:
            raise ValueError(f"{saga!r} is not one of this orchestrator's sagas")
        saga_id = saga_id or str(uuid.uuid4())
        data = _plain(data)
        if (size := _data_size(data)) > MAX_DATA_BYTES:
            raise ValueError(f"a saga's data takes at most {MAX_DATA_BYTES} bytes, not {size}")
        created = await saga_log.create(
            self.log, saga_id, saga.name, saga.definition, data, saga.timeout,
            owner, self.lease,
        )  # fmt: skip
        if created:
            saga_metrics.counted(saga.name, "started")
            await self._event("started", saga_id, 0)
        return saga_id

    async def run(self, saga_id: str) -> SagaOutcome | None:
        """Claim an unfinished saga and run it to its end. None if another orchestrator
        holds it (or took it over midway), or it is finished, or not one of ours, or its
        definition changed since it began (its ``last_error`` says so; it is left as is)."""
        row = await saga_log.claim(self.log, saga_id, list(self.sagas), self.owner, self.lease)
        if row is None:
            return None
        saga = self.sagas[row.name]
        if row.definition != saga.definition:
            # Steps renamed, added or removed since it began: indexes would not match.
            await saga_log.write(
                self.log, saga_id, self.owner, self.lease,
                last_error=f"not resumed: the log has steps {row.definition}, "
                f"the code {saga.definition}",
            )  # fmt: skip
            log.error("saga %s: definition changed, not resumed", saga_id)
            return None
        run = _Run(
            row.id, saga, row.state, row.step, row.attempts, row.data, row.pending,
            row.transactions, row.error, row.last_error, row.stuck,
        )  # fmt: skip
        self._remaining(run, row.remaining)
        if run.stuck:
            saga_metrics.stuck(saga.name, +1)
        await self._event("claimed", saga_id, run.step)
        try:
            await self._drive(run)
        except LeaseLost:
            log.warning("saga %s: taken over by another orchestrator", saga_id)
            return None
        finally:
            if run.stuck:
                saga_metrics.stuck(saga.name, -1)
        return run.outcome()

    async def resume(self) -> list[SagaOutcome]:
        """Run every unfinished saga of ours that no orchestrator holds (a crashed one's
        lease expired): what each ended as. One whose log could not be written stays for
        the next call."""
        ids = await saga_log.claimable(self.log, list(self.sagas), limit=1000)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(saga_id: str) -> SagaOutcome | None:
            async with gate:
                try:
                    return await self.run(saga_id)
                except Exception:
                    # One saga's failure must not stop the others; its lease expires and
                    # a later resume() tries it again.
                    log.exception("saga %s: not resumed this time", saga_id)
                    return None

        outcomes = await asyncio.gather(*(one(i) for i in ids))
        return [o for o in outcomes if o is not None]

    async def serve(self, interval: float = 5.0) -> None:
        """Resume unfinished sagas every ``interval`` seconds (jittered, so pods started
        together do not scan together) until cancelled: run it as a background task."""
        while True:
            try:
                await self.resume()
            except DbSidecarError as exc:
                log.warning("resuming sagas failed, trying again: %s", exc)
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    async def get(self, saga_id: str) -> SagaOutcome | None:
        """The saga as its log row says now."""
        row = await saga_log.read(self.log, saga_id)
        return SagaOutcome.of(row) if row is not None else None

    # Driving one saga
    async def _drive(self, run: _Run) -> None:
        if run.pending is not None:
            await self._settle_pending(run)
        while True:
            steps = run.saga.steps
            if run.state == "running":
                if run.step == len(steps):
                    await self._finish(run, "completed")
                    return
                if self._expired(run):
                    await self._compensate(run, "the saga's deadline passed")
                    continue
                result = await self._attempt(run, "action", run.step)
                if isinstance(result, _Applied):
                    await self._applied(run, "action", result.output)
                elif result.retryable and run.attempts < steps[run.step].retries:
                    await self._retry_later(run, result.error)
                else:
                    await self._compensate(run, f"step {steps[run.step].name}: {result.error}")
            else:
                if run.step < 0:
                    await self._finish(run, "compensated")
                    return
                result = await self._attempt(run, "compensation", run.step)
                if isinstance(result, _Applied):
                    await self._applied(run, "compensation", result.output)
                else:
                    await self._retry_later(run, result.error)

    async def _attempt(self, run: _Run, phase: Phase, index: int) -> _Applied | _Failed:
        """One attempt at a step's action or compensation, in its own transaction."""
        step = run.saga.steps[index]
        function = step.action if phase == "action" else step.compensation
        assert function is not None
        key = _key(phase, index)
        entry = self._entry(run, key, step)
        db = self._database(step)
        # The sidecar logs every plan of the attempt under this id.
        token = request_id.set(entry["request_id"])
        try:
            tx = db.transaction(shard=entry["shard"])
            try:
                await tx.__aenter__()
                output = await self._apply(run, phase, index, tx, entry, function)
            except BaseException as exc:
                await self._quiet_rollback(tx)
                if isinstance(exc, LeaseLost):
                    raise
                if isinstance(exc, asyncio.CancelledError):
                    # Only a cancellation of this task stops the orchestrator. One the step
                    # raised by itself (it awaited a future cancelled elsewhere) is the
                    # step's failure: raised on, it would end resume() and serve() on
                    # every pod that picks the saga up.
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise
                elif not isinstance(exc, Exception):
                    raise
                failure = self._failure(run, step, exc)
                log.warning("saga %s: %s %s failed: %s", run.id, phase, step.name, failure.error)
                await self._event(f"{phase}.failed", run.id, index)
                return failure
            if output is None:  # the ledger had it: applied before, by this or another run
                stored = await saga_log.ledger_output(tx, run.id, index, phase)
                await self._quiet_rollback(tx)
                await self._event(f"{phase}.replayed", run.id, index)
                return _Applied(stored or {})
            await self._event(f"{phase}.committing", run.id, index)
            try:
                await tx.commit()
            except DbSidecarError as exc:
                await self._event(f"{phase}.unknown", run.id, index)
                if await self._settle(run, key, entry, orphan=False) == "aborted":
                    await self._event(f"{phase}.failed", run.id, index)
                    error = _clip(f"the commit failed and rolled back: {exc}")
                    return _Failed(error, retryable=True)
            await self._event(f"{phase}.committed", run.id, index)
            return _Applied(output)
        finally:
            request_id.reset(token)

    async def _apply(
        self,
        run: _Run,
        phase: Phase,
        index: int,
        tx: Transaction,
        entry: dict[str, Any],
        function: Action,
    ) -> dict[str, Any] | None:
        """Inside the step's transaction: record it, claim the ledger row, run the step.
        None if the ledger shows the step applied already."""
        key = _key(phase, index)
        # The txid goes to the log before anything is locked, so whoever resumes this saga
        # knows every transaction of it that may still commit.
        entry["txid"] = await saga_log.current_txid(tx)
        entry["tx"] = tx.id
        run.transactions[key] = entry
        run.pending = key
        await self._write(run, pending=key, transactions=run.transactions)
        if not await saga_log.ledger_begin(tx, run.id, index, phase, entry["request_id"]):
            return None
        await self._event(f"{phase}.begun", run.id, index)
        limit = run.saga.steps[index].timeout
        by_deadline = False
        if phase == "action" and run.deadline is not None:
            left = run.deadline - time.monotonic()
            by_deadline, limit = left < limit, min(limit, left)
        try:
            async with asyncio.timeout(limit):
                output = await function(tx, _plain(run.data))
        except TimeoutError:
            if by_deadline:
                raise _DeadlinePassed() from None
            raise
        output = _plain(output or {})
        if not isinstance(output, dict):
            raise TypeError(f"step {key} returned {type(output).__name__}, not a dict or None")
        if (size := _data_size({**run.data, **output})) > MAX_DATA_BYTES:
            raise ValueError(
                f"step {key}: with its output the saga's data would take {size} bytes "
                f"(at most {MAX_DATA_BYTES}); keep large values in a table, ids in the data"
            )
        await saga_log.ledger_finish(tx, run.id, index, phase, output)
        return output

    def _entry(self, run: _Run, key: str, step: Step) -> dict[str, Any]:
        """The attempt's record: its request id (the ledger key) and its shard, which stay
        the same across attempts (a compensation runs where its action did)."""
        entry = dict(run.transactions.get(key, {}))
        entry.setdefault("request_id", f"saga:{run.id}:{key}")
        if "shard" not in entry:
            action = run.transactions.get(key.replace("compensation/", "action/"), {})
            if "shard" in action:
                entry["shard"] = action["shard"]
            else:
                entry["shard"] = step.shard(run.data) if callable(step.shard) else step.shard
        return entry

    def _failure(self, run: _Run, step: Step, exc: BaseException) -> _Failed:
        if isinstance(exc, _DeadlinePassed):
            return _Failed("the saga's deadline passed during the step", retryable=False)
        if isinstance(exc, TimeoutError):
            return _Failed(f"timed out after {step.timeout:g} s", retryable=False)
        # The sidecar no longer knowing the step's transaction (idle too long, restarted)
        # means it rolled back: a new one may succeed.
        retryable = isinstance(exc, DbSidecarError) and (
            exc.retryable or exc.code == ErrorCode.UNKNOWN_TRANSACTION
        )
        return _Failed(_clip(f"{type(exc).__name__}: {exc}"), retryable=retryable)

    async def _settle(self, run: _Run, key: str, entry: dict[str, Any], orphan: bool) -> XactStatus:
        """Whether a step's transaction committed, from PostgreSQL, waiting while it is in
        progress. An ``orphan`` (left by a crashed or slow orchestrator) still open on our
        own sidecar is rolled back there; elsewhere its sidecar's idle timeout ends it."""
        word, number = key.split("/")
        phase: Phase = "action" if word == "action" else "compensation"
        index = int(number)
        db = self._database(run.saga.steps[index])
        waited = 0
        while True:
            status = await saga_log.xact_status(db, entry["txid"], entry["shard"])
            if status is None or status == "committed":
                # None: too old for the commit log, long over. Committed: the step's
                # ledger row commits with it, so without that row the xid8 is another
                # transaction's (a failover to a replica that never saw the step's, a
                # restored backup) and the step was not applied. The ledger tells.
                found = await saga_log.ledger_output(db, run.id, index, phase, entry["shard"])
                status = "committed" if found is not None else "aborted"
            if status != "in progress":
                log.info("saga %s: %s settled as %s", run.id, key, status)
                return status
            if orphan and waited == 0 and entry.get("tx"):
                stale = Transaction(db, entry["shard"])
                stale.id = entry["tx"]
                await self._quiet_rollback(stale)
            await asyncio.sleep(self._delay(waited))
            waited += 1
            await self._write(run)  # keep the lease while waiting

    async def _settle_pending(self, run: _Run) -> None:
        """A claimed saga whose last attempt may have committed: settle it first."""
        key = run.pending
        assert key is not None
        phase: Phase = "action" if run.state == "running" else "compensation"
        if key != _key(phase, run.step):
            return  # an attempt of a step the log has moved past: settled then
        entry = run.transactions[key]
        if await self._settle(run, key, entry, orphan=True) == "committed":
            db = self._database(run.saga.steps[run.step])
            output = await saga_log.ledger_output(db, run.id, run.step, phase, entry["shard"])
            await self._event(f"{phase}.committed", run.id, run.step)
            await self._applied(run, phase, output or {})

    # Log writes (each fenced by the lease, each renewing it)
    async def _write(self, run: _Run, **changes: Any) -> None:
        remaining = await saga_log.write(self.log, run.id, self.owner, self.lease, **changes)
        self._remaining(run, remaining)

    def _remaining(self, run: _Run, remaining: float | None) -> None:
        run.deadline = None if remaining is None else time.monotonic() + remaining

    def _expired(self, run: _Run) -> bool:
        return run.deadline is not None and time.monotonic() >= run.deadline

    async def _applied(self, run: _Run, phase: Phase, output: dict[str, Any]) -> None:
        run.data = {**run.data, **output}
        index = run.step
        run.step = index + 1 if phase == "action" else _to_compensate(run.saga, index - 1)
        run.attempts, run.pending = 0, None
        was_stuck, run.stuck = run.stuck, False
        await self._write(run, step=run.step, data=run.data, attempts=0, pending=None, stuck=False)
        if was_stuck:
            saga_metrics.stuck(run.saga.name, -1)
        await self._event(f"{phase}.logged", run.id, index)

    async def _retry_later(self, run: _Run, error: str) -> None:
        run.attempts += 1
        run.last_error = error
        stuck = run.state == "compensating" and run.attempts >= self.stuck_after
        await self._write(run, attempts=run.attempts, last_error=error, stuck=stuck or None)
        if stuck and not run.stuck:
            run.stuck = True
            saga_metrics.stuck(run.saga.name, +1)
            log.error("saga %s stuck: compensation keeps failing: %s", run.id, error)
            await self._event("stuck", run.id, run.step)
        await asyncio.sleep(self._delay(run.attempts - 1))

    async def _compensate(self, run: _Run, reason: str) -> None:
        """Turn to compensating the steps applied so far, last first."""
        run.state, run.attempts, run.pending = "compensating", 0, None
        run.step = _to_compensate(run.saga, run.step - 1)
        run.error = reason
        await self._write(
            run, state=run.state, step=run.step, attempts=0, pending=None, error=reason
        )
        log.warning("saga %s compensating: %s", run.id, reason)
        await self._event("compensating", run.id, run.step)

    async def _finish(self, run: _Run, state: str) -> None:
        run.state = state
        await self._write(run, state=state, pending=None, finished=True)
        saga_metrics.counted(run.saga.name, state)
        await self._event(state, run.id, run.step)

    def _delay(self, attempt: int) -> float:
        """Capped exponential backoff with jitter (half fixed, half random)."""
        # The exponent is capped: a compensation may be retried for days.
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(attempt, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _quiet_rollback(self, tx: Transaction) -> None:
        """Roll back if still open; a rollback that fails leaves the transaction to the
        sidecar (its idle timeout) and the ledger, which keep it from ever counting."""
        if tx.id is None:
            return
        with contextlib.suppress(DbSidecarError):
            await tx.rollback()

    async def _event(self, name: str, saga_id: str, step: int) -> None:
        if self.on_event is None:
            return
        try:
            result = self.on_event(name, saga_id, step)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("saga event hook failed on %s", name)
