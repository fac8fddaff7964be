"""Field types: what a column holds, how its values travel, and query operators.

``Order.status == 'new'`` builds a condition; ``Order.created_at.desc()`` an
ordering. Values are checked against the field's type before anything is sent.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from wire.protocol import OrderBy
from wire.values import encode_value, json_value

from .errors import ValidationError
from .expressions import Condition


class Field:
    python_types: tuple[type, ...] = (object,)

    def __init__(
        self,
        *,
        null: bool = False,
        default: Any = None,
        primary_key: bool = False,
        column: str | None = None,
    ) -> None:
        self.null = null
        self.default = default
        self.primary_key = primary_key
        self.name = ""
        self.column = column or ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.column = self.column or name

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        return instance.__dict__.get(self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = value
        instance._dirty.add(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # Values
    def initial(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def check(self, value: Any) -> Any:
        if value is None:
            if not self.null and not self.primary_key:
                raise ValidationError(f"{self.name} must not be None", code="validation")
            return None
        if not isinstance(value, self.python_types) or (
            isinstance(value, bool) and bool not in self.python_types
        ):
            raise ValidationError(
                f"{self.name} takes {' or '.join(t.__name__ for t in self.python_types)}, "
                f"not {type(value).__name__}",
                code="validation",
            )
        return value

    def to_wire(self, value: Any) -> Any:
        return encode_value(value)

    def wire_value(self, value: Any) -> Any:
        """A value checked against the field, in wire form: what saves and filters send."""
        return self.to_wire(self.check(value))

    # Query operators: operands pass the same check as saved values.
    def _cond(self, op: str, value: Any) -> Condition:
        return Condition(self.column, op, self.wire_value(value))

    def __eq__(self, value: Any) -> Condition:  # type: ignore[override]
        if value is None:
            return Condition(self.column, "is_null", True)
        return self._cond("=", value)

    def __ne__(self, value: Any) -> Condition:  # type: ignore[override]
        if value is None:
            return Condition(self.column, "is_null", False)
        return self._cond("!=", value)

    def __lt__(self, value: Any) -> Condition:
        return self._cond("<", value)

    def __le__(self, value: Any) -> Condition:
        return self._cond("<=", value)

    def __gt__(self, value: Any) -> Condition:
        return self._cond(">", value)

    def __ge__(self, value: Any) -> Condition:
        return self._cond(">=", value)

    __hash__ = object.__hash__

    def in_(self, values: Iterable[Any]) -> Condition:
        return Condition(self.column, "in", [self.wire_value(v) for v in values])

    def not_in(self, values: Iterable[Any]) -> Condition:
        return Condition(self.column, "not_in", [self.wire_value(v) for v in values])

    def like(self, pattern: str) -> Condition:
        return Condition(self.column, "like", pattern)

    def ilike(self, pattern: str) -> Condition:
        return Condition(self.column, "ilike", pattern)

    def is_null(self, yes: bool = True) -> Condition:
        return Condition(self.column, "is_null", yes)

    def between(self, low: Any, high: Any) -> Condition:
        return Condition(self.column, "between", [self.wire_value(low), self.wire_value(high)])

    def asc(self) -> OrderBy:
        return OrderBy(self.column)

    def desc(self) -> OrderBy:
        return OrderBy(self.column, desc=True)

    def __neg__(self) -> OrderBy:
        return self.desc()


class IntegerField(Field):
    python_types = (int,)


class PrimaryKeyField(IntegerField):
    """An integer primary key: assigned by the database (serial/identity), or by
    ``generator`` (e.g. ``client.ids.next_id``) when the table is sharded by it."""

    def __init__(self, *, generator: Callable[[], int] | None = None, column: str | None = None):
        super().__init__(primary_key=True, column=column)
        self.generator = generator


class StringField(Field):
    python_types = (str,)

    def __init__(self, max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length

    def check(self, value: Any) -> Any:
        value = super().check(value)
        if value is not None and self.max_length is not None and len(value) > self.max_length:
            raise ValidationError(
                f"{self.name} is longer than {self.max_length} characters", code="validation"
            )
        return value


class TextField(Field):
    python_types = (str,)


class BooleanField(Field):
    python_types = (bool,)


class FloatField(Field):
    python_types = (float, int)


class DecimalField(Field):
    """A numeric column; ``DecimalField(10, 2)`` is ``numeric(10, 2)``: at most 2 decimal
    places and 8 digits before the point. ``max_digits`` alone means ``numeric(p)``, no
    decimal places. A value that does not fit is refused rather than left to PostgreSQL,
    which would round extra decimal places away silently."""

    python_types = (Decimal, int)

    def __init__(self, max_digits: int | None = None, decimal_places: int | None = None, **kw: Any):
        super().__init__(**kw)
        if max_digits is not None:
            decimal_places = decimal_places or 0  # numeric(p) is numeric(p, 0)
            if not 0 <= decimal_places <= max_digits:
                raise ValueError("DecimalField needs 0 <= decimal_places <= max_digits")
        self.max_digits = max_digits
        self.decimal_places = decimal_places

    def check(self, value: Any) -> Any:
        value = super().check(value)
        if value is None or self.decimal_places is None:
            return value
        number = Decimal(value)
        if number.is_nan():
            return value  # numeric(p, s) holds NaN
        if number.is_infinite():
            raise ValidationError(f"{self.name} cannot hold an infinite value", code="validation")
        whole, places = _digits(number)
        if places > self.decimal_places:
            raise ValidationError(
                f"{self.name} takes at most {self.decimal_places} decimal places", code="validation"
            )
        if self.max_digits is not None and whole > self.max_digits - self.decimal_places:
            raise ValidationError(
                f"{self.name} takes at most {self.max_digits - self.decimal_places} digits "
                "before the decimal point",
                code="validation",
            )
        return value


def _digits(number: Decimal) -> tuple[int, int]:
    """Digits before the point and decimal places a finite number needs (``1.50``: 1, 1)."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # only NaN and infinities have a letter here
    if not any(digits):
        return 0, 0
    # Trailing zeros change nothing: 1.50 fits numeric(2, 1).
    zeros = len(digits) - len(bytes(digits).rstrip(b"\0"))
    return max(0, len(digits) + exponent), max(0, -(exponent + zeros))


class JSONField(Field):
    python_types = (dict, list, str, int, float, bool)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else json_value(value)


class TimestampField(Field):
    """A timestamptz column; ``auto_now_add`` sets it on insert, ``auto_now`` on every save."""

    python_types = (dt.datetime,)

    def __init__(self, *, auto_now_add: bool = False, auto_now: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.auto_now_add = auto_now_add
        self.auto_now = auto_now


class DateField(Field):
    python_types = (dt.date,)


class TimeField(Field):
    python_types = (dt.time,)


class UUIDField(Field):
    """A uuid column; ``auto=True`` fills a random UUID on insert."""

    python_types = (uuid.UUID,)

    def __init__(self, *, auto: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.auto = auto


class BytesField(Field):
    python_types = (bytes,)
