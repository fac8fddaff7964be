"""The ActiveRecord base class.

A model class names its table and fields; instances save, update and delete
themselves through the sidecar and remember which handle they came from, so
a record read with ``using('user_shard_2')`` is written back there too.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar, Self

from wire.protocol import Delete, Insert, Raw, Route, ServedBy, Update
from wire.values import encode_value

from .connection import ConnectionManager, Handle
from .errors import DbSidecarError, RecordNotFound
from .fields import Field, PrimaryKeyField, TimestampField, UUIDField
from .pending import PendingWrite
from .query import Query
from .results import Rows, decode


class ActiveRecord:
    __tablename__: ClassVar[str]
    # A handle name or logical database; default: the 'default' handle.
    __database__: ClassVar[str | None] = None
    _fields: ClassVar[dict[str, Field]] = {}
    _pk: ClassVar[Field | None] = None
    # Result column -> attribute name, for loading rows.
    _attributes: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Field] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Field):
                    fields[name] = value
        cls._fields = fields
        cls._pk = next((f for f in fields.values() if f.primary_key), None)
        cls._attributes = {f.column: f.name for f in fields.values()}
        if "__tablename__" not in cls.__dict__ and fields:
            cls.__tablename__ = cls.__name__.lower() + "s"

    def __init__(self, **values: Any) -> None:
        self._dirty: set[str] = set()
        self._persisted = False
        self._db: Handle | None = None
        self._served_by: list[ServedBy] = []
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        for name, field in self._fields.items():
            self.__dict__[name] = values[name] if name in values else field.initial()
        self._dirty = set(values)

    def __repr__(self) -> str:
        # Through the class: a field read through an instance is its value, not the field.
        pk = type(self)._pk
        if pk is None:
            return f"<{type(self).__name__}>"
        return f"<{type(self).__name__} {pk.name}={self.__dict__.get(pk.name)!r}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]

    # What a query builds its plans with
    @classmethod
    def field_named(cls, name: str) -> Field:
        """The field with this attribute name; AttributeError if the model has none."""
        try:
            return cls._fields[name]
        except KeyError:
            raise AttributeError(f"{cls.__name__} has no field {name!r}") from None

    @classmethod
    def column_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``{field name: value}`` as an update sends it: column -> checked wire value."""
        fields = {name: cls.field_named(name) for name in values}
        return {field.column: field.wire_value(values[name]) for name, field in fields.items()}

    @classmethod
    def resolve_handle(cls, using: str | Handle | None = None) -> Handle:
        """The handle plans run through: ``using``, else the model's ``__database__``."""
        return ConnectionManager.resolve(using if using is not None else cls.__database__)

    @classmethod
    def from_rows(cls, rows: Rows, db: Handle) -> list[Self]:
        """Records for result rows read through ``db`` (where they are written back)."""
        records = []
        for row in rows:
            record = cls.__new__(cls)
            record._loaded(row, db, rows.served_by)
            records.append(record)
        return records

    @classmethod
    def _pk_field(cls) -> Field:
        if cls._pk is None:
            raise TypeError(f"{cls.__name__} has no primary key field")
        return cls._pk

    # Queries
    @classmethod
    def find(cls) -> Query[Self]:
        return Query(cls)

    @classmethod
    def find_by_id(cls, id_: Any) -> Query[Self]:
        return Query(cls).where(cls._pk_field() == id_)

    @classmethod
    async def get(cls, id_: Any, using: str | Handle | None = None) -> Self:
        query = cls.find_by_id(id_)
        return await (query.using(using) if using is not None else query).one()

    @classmethod
    async def create(cls, using: str | Handle | None = None, **values: Any) -> Self:
        return await cls(**values).save(using=using)

    @classmethod
    async def insert_many(
        cls, records: list[Self], using: str | Handle | None = None
    ) -> list[Self]:
        """Insert several records in one plan (one statement, or one per shard)."""
        if not records:
            return []
        db = cls.resolve_handle(using)
        rows = [r._insert_row() for r in records]
        keys = set(rows[0])
        for row in rows:
            keys |= set(row)
        # Every row of one insert names the same columns; missing ones stay None.
        rows = [{k: row.get(k) for k in sorted(keys)} for row in rows]
        plan = Insert(database=db.database, table=cls.__tablename__, rows=rows, returning=["*"])
        result = decode(await db.run(plan))
        for record, row in zip(records, result, strict=True):
            record._loaded(row, db, result.served_by)
        return records

    @classmethod
    async def execute_raw(
        cls,
        sql: str,
        *params: Any,
        writes: bool = True,
        using: str | Handle | None = None,
        replica: bool = False,
    ) -> Rows:
        """SQL text with $1.. parameters; say ``writes=False`` for a read (it then runs
        read-only, and ``replica=True`` may send it to a replica)."""
        db = cls.resolve_handle(using)
        plan = Raw(
            database=db.database,
            sql=sql,
            params=[encode_value(p) for p in params],
            writes=writes,
            route=Route(role="replica" if replica else None),
        )
        return decode(await db.run(plan))

    # Instance operations
    @property
    def served_by(self) -> list[ServedBy]:
        """Which node(s) served the read or write that produced this record."""
        return self._served_by

    @property
    def persisted(self) -> bool:
        return self._persisted

    def to_dict(self) -> dict[str, Any]:
        return {name: self.__dict__.get(name) for name in self._fields}

    def _insert_row(self) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        row: dict[str, Any] = {}
        for name, field in self._fields.items():
            value = self.__dict__.get(name)
            if value is None:
                if isinstance(field, PrimaryKeyField) and field.generator is not None:
                    value = self.__dict__[name] = field.generator()
                elif isinstance(field, TimestampField) and (field.auto_now_add or field.auto_now):
                    value = self.__dict__[name] = now
                elif isinstance(field, UUIDField) and field.auto:
                    value = self.__dict__[name] = uuid.uuid4()
                elif field.primary_key or name not in self._dirty:
                    # Let the database fill it (serial key, column default).
                    continue
            row[field.column] = field.wire_value(value)
        return row

    def _loaded(self, row: dict[str, Any], db: Handle, served_by: list[ServedBy]) -> None:
        attributes, state = self._attributes, self.__dict__
        for column, value in row.items():
            state[attributes.get(column, column)] = value
        self._dirty, self._persisted, self._db, self._served_by = set(), True, db, served_by

    def _written_through(self) -> Handle:
        """Where this record's writes go: the handle it was read through (a transaction
        while it is open, its database once it is over), else the model's database."""
        return self._db.home if self._db is not None else self.resolve_handle()

    def _pk_condition(self) -> dict[str, Any]:
        pk = self._pk_field()
        value = self.__dict__.get(pk.name)
        if value is None:
            raise DbSidecarError(
                f"{type(self).__name__} has no {pk.name} yet", code="no_primary_key"
            )
        return {"col": pk.column, "op": "=", "value": pk.wire_value(value)}

    def save(self, using: str | Handle | None = None) -> PendingWrite[Self]:
        """Insert a new record (filling generated columns) or update changed fields:
        ``await record.save()``, or ``await record.save().using(shard)`` to write
        through another handle, transaction, database or shard."""
        return PendingWrite(self._save, using, f"{self!r}.save()")

    async def _save(self, using: str | Handle | None) -> Self:
        db = self._written_through() if using is None else self.resolve_handle(using)
        if not self._persisted:
            plan: Insert | Update = Insert(
                database=db.database,
                table=self.__tablename__,
                rows=[self._insert_row()],
                returning=["*"],
            )
        else:
            for field in self._fields.values():
                if isinstance(field, TimestampField) and field.auto_now:
                    self.__dict__[field.name] = dt.datetime.now(dt.UTC)
                    self._dirty.add(field.name)
            if not self._dirty:
                return self
            values = self.column_values({n: self.__dict__.get(n) for n in sorted(self._dirty)})
            plan = Update(
                database=db.database,
                table=self.__tablename__,
                values=values,
                where=self._pk_condition(),
                returning=["*"],
            )
        result = decode(await db.run(plan))
        if not result:
            raise RecordNotFound(f"{self!r} no longer exists", code="not_found")
        self._loaded(result[0], db, result.served_by)
        return self

    async def update(self, **values: Any) -> Self:
        """Set fields and save them: ``await order.update(status='paid')``."""
        for name, value in values.items():
            self.field_named(name)
            setattr(self, name, value)
        return await self.save()

    def delete(self, using: str | Handle | None = None) -> PendingWrite[None]:
        """Delete the record: ``await record.delete()`` or ``.delete().using(shard)``."""
        return PendingWrite(self._delete, using, f"{self!r}.delete()")

    async def _delete(self, using: str | Handle | None) -> None:
        db = self._written_through() if using is None else self.resolve_handle(using)
        plan = Delete(database=db.database, table=self.__tablename__, where=self._pk_condition())
        await db.run(plan)
        self._persisted = False

    async def reload(self) -> Self:
        """Read the record again from the primary."""
        db = self._written_through()
        fresh = (
            await type(self)
            .find_by_id(self.__dict__[self._pk_field().name])
            .using(db)
            .using_primary()
            .one()
        )
        self._loaded(fresh.to_dict(), db, fresh.served_by)
        return self
