"""Named sidecar handles: which sidecar, which logical database, which consistency.

``ConnectionManager.configure({'default': {'sidecar': 'http://127.0.0.1:7432',
'database': 'orders'}})`` names handles; ``ConnectionManager.get(name)`` returns
one for ``using()``. A handle keeps the newest write token of its database and
sends it with reads (session consistency: a service reads its own writes even
from replicas), unless configured with ``consistency='eventual'``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, ClassVar, Literal

import msgspec

from wire.consistency import merge_tokens
from wire.protocol import Batch, BatchResult, Plan, Result, plan_writes

from . import metrics
from .errors import DbSidecarError
from .transactions import Transaction
from .transport import Transport, request_id

DEFAULT_URL = "http://127.0.0.1:7432"
MAX_BUNDLE = 256
_batch_result = msgspec.json.Decoder(BatchResult)


class DatabaseHandle:
    """A handle: one logical database behind one sidecar."""

    def __init__(
        self,
        name: str,
        *,
        transport: Transport,
        database: str,
        consistency: Literal["session", "eventual"] = "session",
        read_retries: int = 3,
        batching: bool = True,
    ) -> None:
        if consistency not in ("session", "eventual"):
            raise ValueError("consistency is 'session' or 'eventual'")
        self.name = name
        self.transport = transport
        self.database = database
        self.consistency = consistency
        self.read_retries = read_retries
        # The newest write token seen through this handle (read-your-writes).
        self.token: str | None = None
        # Auto-batching: plans issued in the same event-loop turn share one frame or request.
        self.batching = batching
        self._pending: list[tuple[bytes, bool, asyncio.Future[Result]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<DatabaseHandle {self.name!r} {self.database!r} via {self.transport.url}>"

    @property
    def home(self) -> DatabaseHandle:
        """Where records read through this handle are written back."""
        return self

    async def close(self) -> None:
        """Close the connections to the sidecar (shared by the handles of one sidecar URL
        and token). A handle used again afterwards reconnects."""
        await self.transport.close()

    async def __aenter__(self) -> DatabaseHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def transaction(self, shard: str | int | None = None) -> Transaction:
        """``async with db.transaction() as tx:`` — plans sent ``using(tx)`` run in it."""
        return Transaction(self, shard)

    def observe(self, lsn: str | None) -> None:
        """Remember a write's consistency token (session consistency)."""
        if lsn and self.consistency == "session":
            self.token = merge_tokens(self.token, lsn)

    async def run(self, plan: Plan) -> Result:
        """Run one plan. Reads are retried on retryable errors; writes never are."""
        writes = plan_writes(plan)
        if not writes and self.token and plan.route.after is None:
            # A copy: the caller may keep, reuse or resend its plan through another handle.
            route = msgspec.structs.replace(plan.route, after=self.token)
            plan = msgspec.structs.replace(plan, route=route)
        body = msgspec.json.encode(plan)
        op = str(plan.__struct_config__.tag)
        attempt = 0
        while True:
            began = time.perf_counter()
            try:
                result = await self._send(body, writes)
                metrics.observe(self.database, op, "ok", time.perf_counter() - began)
                break
            except DbSidecarError as exc:
                metrics.observe(self.database, op, exc.code, time.perf_counter() - began)
                if writes or not exc.retryable or attempt >= self.read_retries:
                    raise
                # Capped exponential backoff with full jitter.
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
                attempt += 1
        self.observe(result.lsn)
        return result

    async def _send(self, body: bytes, writes: bool) -> Result:
        if not self.batching or request_id.get() is not None:
            # A request id names one request, so plans carrying one go alone.
            return await self.transport.query(body, writes)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((body, writes, future))
        if len(self._pending) == 1:
            # Runs after every coroutine that is ready in this turn had its chance to queue.
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        # Bundles stay well under the sidecar's limits.max_batch_plans (1000 by default).
        for start in range(0, len(pending), MAX_BUNDLE):
            task = asyncio.ensure_future(self._deliver(pending[start : start + MAX_BUNDLE]))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _deliver(self, pending: list[tuple[bytes, bool, asyncio.Future[Result]]]) -> None:
        outcomes: list[Result | BaseException]
        try:
            if len(pending) == 1:
                body, writes, _ = pending[0]
                outcomes = [await self.transport.query(body, writes)]
            else:
                # The plans are JSON already: the bundle joins them as they are.
                bodies = [body for body, _, _ in pending]
                outcomes = list(await self.transport.bundle(bodies, [w for _, w, _ in pending]))
        except BaseException as exc:
            outcomes = [exc] * len(pending)
        for (_, _, future), outcome in zip(pending, outcomes, strict=True):
            if future.done():
                continue  # its caller gave up (cancelled)
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def batch(self, plans: list[Plan]) -> BatchResult:
        """Plans in one transaction: all succeed or none does."""
        body = msgspec.json.encode(Batch(plans))
        result = await self.transport.request("POST", "/v1/batch", body, _batch_result)
        self.observe(result.lsn)
        return result


# What using() accepts once resolved: a handle, or a transaction opened on one.
Handle = DatabaseHandle | Transaction


class ConnectionManager:
    """The process-wide registry of handles."""

    _config: ClassVar[dict[str, dict[str, Any]]] = {}
    _handles: ClassVar[dict[str, DatabaseHandle]] = {}
    _transports: ClassVar[dict[tuple[str, str | None, str], Transport]] = {}
    _derived: ClassVar[dict[tuple[int, str], DatabaseHandle]] = {}

    @classmethod
    def configure(cls, config: dict[str, dict[str, Any]]) -> None:
        """Name handles: ``{name: {sidecar, database, token?, timeout?, consistency?,
        batching?, transport?}}``; ``transport`` is ``'channel'`` (the default: one
        WebSocket, many plans in flight) or ``'http'`` (a request per plan or bundle).

        The read/write form ``{'orders': {'write': URL, 'read': [URL, ...]}}`` is accepted
        too: both name the sidecar (it routes writes to the primary and
        ``using_read_replica()`` reads to replicas), and ``database`` defaults to the name."""
        config = {name: _handle_entry(name, entry) for name, entry in config.items()}
        for name, entry in config.items():
            unknown = set(entry) - {
                "sidecar", "database", "token", "timeout", "consistency", "batching", "transport"
            }  # fmt: skip
            if unknown:
                raise ValueError(f"handle {name!r}: unknown settings {sorted(unknown)}")
            if "database" not in entry:
                raise ValueError(f"handle {name!r} needs a 'database'")
            if entry.get("transport", "channel") not in ("channel", "http"):
                raise ValueError(f"handle {name!r}: transport is 'channel' or 'http'")
        cls._config = {**cls._config, **config}
        for name in config:
            cls._handles.pop(name, None)

    @classmethod
    def _transport(
        cls, url: str, token: str | None, timeout: float, mode: Literal["channel", "http"]
    ) -> Transport:
        key = (url, token, mode)
        if key not in cls._transports:
            cls._transports[key] = Transport(url, token=token, timeout=timeout, mode=mode)
        return cls._transports[key]

    @classmethod
    def get(cls, name: str = "default") -> DatabaseHandle:
        handle = cls._handles.get(name)
        if handle is not None:
            return handle
        entry = cls._config.get(name)
        if entry is None:
            if name == "default":
                raise LookupError(
                    "no 'default' handle: call ConnectionManager.configure({'default': "
                    "{'sidecar': 'http://127.0.0.1:7432', 'database': '...'}}) first"
                )
            raise LookupError(f"no handle named {name!r}; configured: {sorted(cls._config)}")
        url = entry.get("sidecar") or os.environ.get("DBSIDECAR_URL") or DEFAULT_URL
        token = entry.get("token") or os.environ.get("DBSIDECAR_TOKEN")
        timeout = float(entry.get("timeout", 60.0))
        transport = cls._transport(url, token, timeout, entry.get("transport", "channel"))
        handle = DatabaseHandle(
            name,
            transport=transport,
            database=entry["database"],
            consistency=entry.get("consistency", "session"),
            batching=bool(entry.get("batching", True)),
        )
        cls._handles[name] = handle
        return handle

    @classmethod
    def resolve(cls, target: str | Handle | None) -> Handle:
        """A handle for ``using()``: a handle or transaction, a handle's name, or a logical
        database name."""
        if isinstance(target, Handle):
            return target
        if target is None:
            return cls.get("default")
        if target in cls._config:
            return cls.get(target)
        return cls.handle_for(cls.get("default"), target)

    @classmethod
    def handle_for(cls, base: DatabaseHandle, database: str) -> DatabaseHandle:
        if database == base.database:
            return base
        key = (id(base), database)
        handle = cls._derived.get(key)
        if handle is None:
            handle = DatabaseHandle(
                database,
                transport=base.transport,
                database=database,
                consistency=base.consistency,
                batching=base.batching,
            )
            cls._derived[key] = handle
        return handle

    @classmethod
    async def close_all(cls) -> None:
        for transport in cls._transports.values():
            await transport.close()

    @classmethod
    def reset(cls) -> None:
        """Forget every handle (tests, reconfiguration)."""
        cls._config, cls._handles, cls._transports, cls._derived = {}, {}, {}, {}


def _handle_entry(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A handle's settings, with the read/write form turned into ``sidecar``."""
    if "write" not in entry and "read" not in entry:
        return entry
    rest = {k: v for k, v in entry.items() if k not in ("write", "read")}
    if "sidecar" in rest:
        raise ValueError(f"handle {name!r}: give 'sidecar' or 'write'/'read', not both")
    write = entry.get("write")
    reads = entry.get("read", [])
    reads = [reads] if isinstance(reads, str) else list(reads)
    for url in [write, *reads]:
        if not isinstance(url, str) or not url.startswith(_SIDECAR_SCHEMES):
            # Never echo the value: a database URL here would carry a password.
            raise ValueError(
                f"handle {name!r}: 'write' and 'read' name the sidecar (http://host:port or "
                "unix:///path), never a database: the client holds no database credentials. "
                "Put the primary and replicas in the sidecar's configuration "
                f"(databases.{entry.get('database', name)}) and point both here at the sidecar"
            )
    if any(url.rstrip("/") != write.rstrip("/") for url in reads):  # type: ignore[union-attr]
        raise ValueError(
            f"handle {name!r}: 'read' must name the same sidecar as 'write'; the sidecar "
            "itself chooses among the replicas (using_read_replica())"
        )
    return {"database": name, **rest, "sidecar": write}


_SIDECAR_SCHEMES = ("http://", "https://", "unix://")
