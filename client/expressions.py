"""``Model.field == x`` trees, combined with ``&``, ``|`` and ``~``, and aggregates."""

from __future__ import annotations

from typing import Any

from wire.protocol import Aggregate


class Expr:
    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def __and__(self, other: Expr) -> Expr:
        return And([self, other])

    def __or__(self, other: Expr) -> Expr:
        return Or([self, other])

    def __invert__(self) -> Expr:
        return Not(self)

    def __bool__(self) -> bool:
        # `a == 1 and b == 2` would silently drop a condition; `&` is meant.
        raise TypeError("use & and | to combine conditions, not 'and'/'or'")


class Condition(Expr):
    __slots__ = ("column", "op", "value")

    def __init__(self, column: str, op: str, value: Any) -> None:
        self.column = column
        self.op = op
        self.value = value  # already in wire form

    def to_wire(self) -> dict[str, Any]:
        return {"col": self.column, "op": self.op, "value": self.value}

    def __repr__(self) -> str:
        return f"<{self.column} {self.op} {self.value!r}>"


class And(Expr):
    def __init__(self, items: list[Expr]) -> None:
        self.items = [i for e in items for i in (e.items if isinstance(e, And) else [e])]

    def to_wire(self) -> dict[str, Any]:
        return {"and": [e.to_wire() for e in self.items]}


class Or(Expr):
    def __init__(self, items: list[Expr]) -> None:
        self.items = [i for e in items for i in (e.items if isinstance(e, Or) else [e])]

    def to_wire(self) -> dict[str, Any]:
        return {"or": [e.to_wire() for e in self.items]}


class Not(Expr):
    def __init__(self, inner: Expr) -> None:
        self.inner = inner

    def to_wire(self) -> dict[str, Any]:
        return {"not": self.inner.to_wire()}


def _column(field: Any) -> str | None:
    return None if field is None else field.column


def Count(field: Any = None) -> Aggregate:
    return Aggregate("count", _column(field))


def Sum(field: Any) -> Aggregate:
    return Aggregate("sum", _column(field))


def Avg(field: Any) -> Aggregate:
    return Aggregate("avg", _column(field))


def Min(field: Any) -> Aggregate:
    return Aggregate("min", _column(field))


def Max(field: Any) -> Aggregate:
    return Aggregate("max", _column(field))
