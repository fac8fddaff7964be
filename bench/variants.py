"""The ways the client reaches PostgreSQL, each able to run every workload's operation.

A variant is opened for one repetition (pools / HTTP sessions created, not measured) and
closed after it, so at most one variant's direct connections exist at a time.

Direct variants (asyncpg, asyncpg-default-reset, pgbouncer) use one pool of 10 for
``orders`` and one per user shard; their scatter-gather is 4 concurrent queries on the 4
shard pools merged in Python, the same work the sidecar does for the client. Sidecar
variants use :class:`client.connection.DatabaseHandle` with hand-made plans (eventual
consistency) and decode result values as the model layer does. ActiveRecord variants do
what a service writes: ``Order.find_by_id(k).using(db).one()``, ``Order(...).save()``,
``User.find().count()`` through the models in bench/models.py (session consistency, the
client's default). Both kinds take the client transport's mode (``http`` or ``channel``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal, Protocol

import asyncpg

from client import ActiveRecord
from client.connection import DatabaseHandle
from client.transport import Transport
from devstack.topology import USER_SHARDS
from wire.protocol import Count, Insert, OrderBy, Result, Select, Update
from wire.values import encode_value, row_converters

from .models import Order, User
from .stack import POOL_SIZE

SHARDS = len(USER_SHARDS)
ORDER_COLUMNS = ["id", "user_id", "status", "amount"]
USER_COLUMNS = ["id", "name", "score"]
TOP_N = 20
AMOUNT = Decimal("12.50")

POINT_SQL = "SELECT id, user_id, status, amount FROM orders WHERE id = $1"
INSERT_SQL = "INSERT INTO orders (user_id, status, amount) VALUES ($1, $2, $3)"
UPDATE_SQL = "UPDATE orders SET status = $1 WHERE id = $2"
COUNT_SQL = "SELECT count(*) FROM users"
TOP_SQL = f"SELECT id, name, score FROM users ORDER BY score DESC, id LIMIT {TOP_N}"
USER_SQL = "SELECT id, name, score FROM users WHERE id = $1"


class Variant(Protocol):
    name: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def point_read(self, key: int) -> Any: ...
    async def insert(self, user_id: int) -> Any: ...
    async def transaction(self, key: int, user_id: int) -> Any: ...
    async def scatter_count(self) -> int: ...
    async def scatter_top(self) -> list[Any]: ...
    async def shard_read(self, key: int) -> Any: ...


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Leave the session as it is on release (the pool's callers always end their work)."""


class DirectVariant:
    """asyncpg pools of 10 straight to PostgreSQL, or to pgbouncer."""

    def __init__(
        self,
        name: str,
        dsn: Callable[[str], str],
        *,
        default_reset: bool = False,
        statement_cache: bool = True,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.default_reset = default_reset
        self.statement_cache = statement_cache
        self.orders: asyncpg.Pool | None = None
        self.shards: list[asyncpg.Pool] = []

    async def _pool(self, db: str) -> asyncpg.Pool:
        kwargs: dict[str, Any] = {}
        if not self.default_reset:
            kwargs["reset"] = _no_reset
        if not self.statement_cache:
            # pgbouncer in transaction mode: no named prepared statements across transactions.
            kwargs["statement_cache_size"] = 0
        pool = await asyncpg.create_pool(
            self.dsn(db), min_size=POOL_SIZE, max_size=POOL_SIZE, **kwargs
        )
        assert pool is not None
        return pool

    async def open(self) -> None:
        pools = await asyncio.gather(*(self._pool(db) for db in ["orders", *USER_SHARDS]))
        self.orders, self.shards = pools[0], list(pools[1:])

    async def close(self) -> None:
        pools = [p for p in [self.orders, *self.shards] if p is not None]
        self.orders, self.shards = None, []
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)

    def _orders(self) -> asyncpg.Pool:
        assert self.orders is not None, "variant not open"
        return self.orders

    async def point_read(self, key: int) -> Any:
        return await self._orders().fetch(POINT_SQL, key)

    async def insert(self, user_id: int) -> Any:
        return await self._orders().execute(INSERT_SQL, user_id, "new", AMOUNT)

    async def transaction(self, key: int, user_id: int) -> Any:
        async with self._orders().acquire() as conn, conn.transaction():
            row = await conn.fetch(POINT_SQL, key)
            await conn.execute(UPDATE_SQL, "paid", key)
            await conn.execute(INSERT_SQL, user_id, "new", AMOUNT)
            return row

    async def scatter_count(self) -> int:
        counts = await asyncio.gather(*(p.fetchval(COUNT_SQL) for p in self.shards))
        return sum(counts)

    async def scatter_top(self) -> list[Any]:
        parts = await asyncio.gather(*(p.fetch(TOP_SQL) for p in self.shards))
        merged = heapq.merge(*parts, key=lambda r: (-r["score"], r["id"]))
        return list(itertools.islice(merged, TOP_N))

    async def shard_read(self, key: int) -> Any:
        return await self.shards[key % SHARDS].fetch(USER_SQL, key)


Mode = Literal["http", "channel"]


def make_transport(url: str, mode: Mode) -> Transport:
    """A transport in ``mode``, named explicitly so a changed default changes no variant."""
    return Transport(url, mode=mode)


def _rows(result: Result) -> list[list[Any]]:
    """Result values back to Python (Decimal, ...), as the model layer does."""
    converters = row_converters(result.types)
    if not any(converters):
        return result.rows
    return [
        [v if c is None else c(v) for v, c in zip(row, converters, strict=True)]
        for row in result.rows
    ]


def _eq(col: str, value: Any) -> dict[str, Any]:
    return {"col": col, "op": "=", "value": value}


class _ThroughSidecar:
    """What both kinds of sidecar variant share: a transport in a given mode and two handles
    (``orders``, and the sharded ``users``), opened per repetition."""

    consistency: Literal["session", "eventual"] = "session"

    def __init__(self, name: str, url: str, mode: Mode = "http") -> None:
        self.name = name
        self.url = url
        self.mode = mode
        self.transport: Transport | None = None
        self.orders: DatabaseHandle | None = None
        self.users: DatabaseHandle | None = None

    async def open(self) -> None:
        self.transport = make_transport(self.url, self.mode)
        self.orders = DatabaseHandle(
            "orders", transport=self.transport, database="orders", consistency=self.consistency
        )
        self.users = DatabaseHandle(
            "users", transport=self.transport, database="users", consistency=self.consistency
        )

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        self.transport = self.orders = self.users = None

    def transport_problem(self) -> str | None:
        """Why this variant did not measure its transport, if it did not: the channel
        transport goes over HTTP, silently, once the sidecar turns the channel down."""
        fell_back = self.transport is not None and getattr(self.transport, "http_only", False)
        if self.mode == "channel" and fell_back:
            return "the sidecar refused the channel: its requests went over HTTP"
        return None

    def _db(self, users: bool = False) -> DatabaseHandle:
        db = self.users if users else self.orders
        assert db is not None, "variant not open"
        return db


class SidecarVariant(_ThroughSidecar):
    """client.connection.DatabaseHandle with hand-made plans through the sidecar, over TCP or a
    Unix socket, HTTP or the channel."""

    consistency = "eventual"

    def _insert(self, user_id: int) -> Insert:
        row = {"user_id": user_id, "status": "new", "amount": encode_value(AMOUNT)}
        return Insert(database="orders", table="orders", rows=[row])

    def _point(self, key: int) -> Select:
        return Select(
            database="orders", table="orders", columns=ORDER_COLUMNS, where=_eq("id", key)
        )

    async def point_read(self, key: int) -> Any:
        return _rows(await self._db().run(self._point(key)))

    async def insert(self, user_id: int) -> Any:
        return (await self._db().run(self._insert(user_id))).rowcount

    async def transaction(self, key: int, user_id: int) -> Any:
        async with self._db().transaction() as tx:
            rows = _rows(await tx.run(self._point(key)))
            update = Update(
                database="orders", table="orders", values={"status": "paid"}, where=_eq("id", key)
            )
            await tx.run(update)
            await tx.run(self._insert(user_id))
            return rows

    async def scatter_count(self) -> int:
        result = await self._db(users=True).run(Count(database="users", table="users"))
        return int(result.rows[0][0])

    async def scatter_top(self) -> list[Any]:
        plan = Select(
            database="users",
            table="users",
            columns=USER_COLUMNS,
            order_by=[OrderBy("score", desc=True), OrderBy("id")],
            limit=TOP_N,
        )
        return _rows(await self._db(users=True).run(plan))

    async def shard_read(self, key: int) -> Any:
        plan = Select(database="users", table="users", columns=USER_COLUMNS, where=_eq("id", key))
        return _rows(await self._db(users=True).run(plan))


class ActiveRecordVariant(_ThroughSidecar):
    """The ActiveRecord API (bench/models.py) through the sidecar: what a service calls.

    The handles are the client's own ``DatabaseHandle`` with its defaults (session
    consistency, auto-batching); queries name them with ``using()``, as a service does with
    ``ConnectionManager.get(...)``'s handles.
    """

    async def point_read(self, key: int) -> Any:
        return await Order.find_by_id(key).using(self._db()).one()

    async def insert(self, user_id: int) -> Any:
        return await Order(user_id=user_id, status="new", amount=AMOUNT).save(using=self._db())

    async def transaction(self, key: int, user_id: int) -> Any:
        async with self._db().transaction() as tx:
            order = await Order.find_by_id(key).using(tx).one()
            read = order.to_dict()  # as read, before the update below changes the record
            order.status = "paid"
            await order.save()  # read through tx: saved in it
            await Order(user_id=user_id, status="new", amount=AMOUNT).save(using=tx)
            return read

    async def scatter_count(self) -> int:
        return await User.find().using(self._db(users=True)).count()

    async def scatter_top(self) -> list[Any]:
        query = User.find().order_by(User.score.desc(), User.id).limit(TOP_N)
        return await query.using(self._db(users=True)).all()

    async def shard_read(self, key: int) -> Any:
        return await User.find_by_id(key).using(self._db(users=True)).one()


# Answers in one comparable form, whatever shape a variant returns (asyncpg records, lists of
# values from a hand-made plan, model records or their dicts). Outside the measured path.


def answer_rows(found: Any, columns: list[str]) -> list[list[str]]:
    """Rows as lists of ``str(value)`` in ``columns`` order."""
    if found is None:
        return []
    if not isinstance(found, list):
        found = [found]
    out = []
    for row in found:
        if isinstance(row, ActiveRecord):
            row = row.to_dict()
        # A hand-made plan's values come as a list, in ``columns`` order.
        mapped = isinstance(row, dict | asyncpg.Record)
        values = [row[c] for c in columns] if mapped else list(row)
        out.append([str(v) for v in values])
    return out


def answer_inserted(outcome: Any) -> int:
    """How many rows an insert wrote: asyncpg's status text, a rowcount, or a saved record."""
    if isinstance(outcome, str):  # "INSERT 0 1"
        return int(outcome.split()[-1])
    if isinstance(outcome, ActiveRecord):
        return 1 if outcome.persisted and outcome.to_dict().get("id") is not None else 0
    return int(outcome)
