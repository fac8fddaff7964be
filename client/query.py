"""The chainable query: ``Order.find().where(...).order_by(...).limit(10).all()``.

Each call returns a new query, so a base query can be shared and refined.
Terminal methods (``all``, ``first``, ``one``, ``count``, ``exists``,
``aggregate``, ``update``, ``delete``) build one plan and send it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from wire.protocol import (
    ALL_SHARDS,
    Aggregate,
    AggregateQuery,
    Count,
    Delete,
    OrderBy,
    Route,
    Select,
    Update,
)

from .connection import Handle
from .errors import RecordNotFound
from .expressions import And, Expr
from .fields import Field
from .results import Rows, decode

if TYPE_CHECKING:
    from .model import ActiveRecord

M = TypeVar("M", bound="ActiveRecord")


class Query(Generic[M]):
    def __init__(self, model: type[M]) -> None:
        self.model = model
        self._where: list[Expr] = []
        self._order: list[OrderBy] = []
        self._group: list[str] = []
        self._columns: list[str] | None = None
        self._limit: int | None = None
        self._offset: int | None = None
        self._target: str | Handle | None = None
        self._role: str | None = None
        self._shard: str | int | None = None

    def _copy(self) -> Query[M]:
        # By hand: copy.copy's generic protocol costs more than the rest of a point read.
        clone: Query[M] = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._where, clone._order, clone._group = (
            list(self._where),
            list(self._order),
            list(self._group),
        )
        return clone

    # Refinements
    def where(self, *conditions: Expr) -> Query[M]:
        clone = self._copy()
        clone._where.extend(conditions)
        return clone

    def filter(self, **equals: Any) -> Query[M]:
        """``filter(status='new')`` is ``where(Model.status == 'new')``."""
        field = self.model.field_named
        return self.where(*(field(name) == value for name, value in equals.items()))

    def order_by(self, *keys: Field | OrderBy | str) -> Query[M]:
        """Fields, ``Field.desc()``/``-Field``, or names (``'-created_at'`` for descending)."""
        clone = self._copy()
        for key in keys:
            if isinstance(key, OrderBy):
                clone._order.append(key)
            elif isinstance(key, Field):
                clone._order.append(key.asc())
            else:
                desc = key.startswith("-")
                clone._order.append(OrderBy(self.model.field_named(key.lstrip("-")).column, desc))
        return clone

    def group_by(self, *fields: Field) -> Query[M]:
        clone = self._copy()
        clone._group.extend(f.column for f in fields)
        return clone

    def select(self, *fields: Field) -> Query[M]:
        clone = self._copy()
        clone._columns = [f.column for f in fields]
        return clone

    def limit(self, n: int) -> Query[M]:
        clone = self._copy()
        clone._limit = n
        return clone

    def offset(self, n: int) -> Query[M]:
        clone = self._copy()
        clone._offset = n
        return clone

    def using(self, target: str | Handle) -> Query[M]:
        """A handle, a handle's name, a logical database or a shard name (``'user_shard_2'``)."""
        clone = self._copy()
        clone._target = target
        return clone

    def using_read_replica(self) -> Query[M]:
        clone = self._copy()
        clone._role = "replica"
        return clone

    def using_primary(self) -> Query[M]:
        clone = self._copy()
        clone._role = "primary"
        return clone

    def all_shards(self) -> Query[M]:
        """Mean every shard: lets an update or delete without the shard key run everywhere."""
        clone = self._copy()
        clone._shard = ALL_SHARDS
        return clone

    def shard(self, shard: str | int) -> Query[M]:
        clone = self._copy()
        clone._shard = shard
        return clone

    # Plan building
    def handle(self) -> Handle:
        return self.model.resolve_handle(self._target)

    def _where_wire(self) -> dict[str, Any] | None:
        if not self._where:
            return None
        if len(self._where) == 1:
            return self._where[0].to_wire()
        return And(self._where).to_wire()

    def _route(self) -> Route:
        return Route(role=self._role, shard=self._shard)  # type: ignore[arg-type]

    def select_plan(self, db: Handle, limit: int | None = None) -> Select:
        return Select(
            database=db.database,
            table=self.model.__tablename__,
            columns=self._columns,
            where=self._where_wire(),
            order_by=self._order,
            limit=self._limit if limit is None else limit,
            offset=self._offset,
            route=self._route(),
        )

    # Terminal operations
    async def rows(self) -> Rows:
        """Matching rows as dicts (with ``served_by``), without building models."""
        db = self.handle()
        return decode(await db.run(self.select_plan(db)))

    async def all(self) -> list[M]:
        db = self.handle()
        return self.model.from_rows(decode(await db.run(self.select_plan(db))), db)

    async def first(self) -> M | None:
        db = self.handle()
        found = self.model.from_rows(decode(await db.run(self.select_plan(db, limit=1))), db)
        return found[0] if found else None

    async def one(self) -> M:
        found = await self.first()
        if found is None:
            raise RecordNotFound(
                f"no {self.model.__name__} matches {self._where_wire()}", code="not_found"
            )
        return found

    async def count(self) -> int:
        db = self.handle()
        plan = Count(
            database=db.database,
            table=self.model.__tablename__,
            where=self._where_wire(),
            route=self._route(),
        )
        result = await db.run(plan)
        return int(result.rows[0][0])

    async def exists(self) -> bool:
        return await self.limit(1).first() is not None

    async def aggregate(self, **aggregates: Aggregate) -> Rows:
        """``aggregate(n=Count(), total=Sum(Order.amount))``, per ``group_by`` group."""
        db = self.handle()
        plan = AggregateQuery(
            database=db.database,
            table=self.model.__tablename__,
            aggregates=[Aggregate(a.fn, a.col, alias) for alias, a in aggregates.items()],
            group_by=self._group,
            where=self._where_wire(),
            order_by=self._order,
            limit=self._limit,
            offset=self._offset,
            route=self._route(),
        )
        return decode(await db.run(plan))

    async def update(self, **values: Any) -> int:
        """Update every matching row; returns how many changed."""
        db = self.handle()
        plan = Update(
            database=db.database,
            table=self.model.__tablename__,
            values=self.model.column_values(values),
            where=self._where_wire(),
            route=self._route(),
        )
        return (await db.run(plan)).rowcount

    async def delete(self) -> int:
        """Delete every matching row; returns how many went."""
        db = self.handle()
        plan = Delete(
            database=db.database,
            table=self.model.__tablename__,
            where=self._where_wire(),
            route=self._route(),
        )
        return (await db.run(plan)).rowcount
