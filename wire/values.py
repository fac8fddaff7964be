"""Typed values on the wire, shared by the client and the sidecar.

JSON has no datetime, decimal, UUID or bytes, so values that JSON cannot carry
exactly travel as one-key objects, in the style of MongoDB's extended JSON:
``{"$datetime": "2024-05-01T12:00:00+00:00"}``, ``{"$decimal": "10.50"}``,
``{"$uuid": "..."}``, ``{"$bytes": "<base64>"}``, ``{"$date": ...}``,
``{"$time": ...}``, ``{"$interval": "P1DT2S"}`` and ``{"$json": <any JSON>}``.
A plain JSON object is never a value, so a JSON document can not be mistaken
for a tag. Lists are lists of values (``in`` operands, array columns).

Values JSON has no spelling for travel as strings PostgreSQL's own input reads:
``{"$float": "NaN"}`` (also ``"Infinity"``, ``"-Infinity"``), and
``{"$datetime": "infinity"}`` / ``{"$date": "-infinity"}`` for PostgreSQL's
infinite timestamps and dates. Python has no infinite datetime, so these follow
asyncpg's convention: ``datetime.max``/``date.max`` *are* +infinity and
``datetime.min``/``date.min`` -infinity, both ways (asyncpg binds them as
infinity and reads infinity back as them, naive even for timestamptz).

Result rows go the other way: the sidecar names each column's kind once
(``types`` in a result) and sends plain JSON, which the client converts back;
``wire_rows`` puts the non-JSON values of a result into the same strings.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import uuid
from base64 import b64decode, b64encode
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import msgspec

__all__ = [
    "KIND_TYPES",
    "WireValueError",
    "decode_value",
    "encode_value",
    "json_value",
    "row_converters",
    "wire_rows",
]


class WireValueError(ValueError):
    """A wire value that is not one of the documented shapes."""


# The strings PostgreSQL's float8in reads and float8out writes.
_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_word(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _datetime_word(value: dt.datetime) -> str | None:
    """'infinity'/'-infinity' for the datetimes asyncpg binds as PostgreSQL's infinities."""
    if value.tzinfo is None or value.utcoffset() == dt.timedelta(0):
        plain = value.replace(tzinfo=None)
        if plain == dt.datetime.max:
            return "infinity"
        if plain == dt.datetime.min:
            return "-infinity"
    return None


def _date_word(value: dt.date) -> str | None:
    if value == dt.date.max:
        return "infinity"
    return "-infinity" if value == dt.date.min else None


def _iso(value: Any) -> str:
    return value.isoformat()


def _datetime(value: dt.datetime) -> str:
    return _datetime_word(value) or value.isoformat()


def _date(value: dt.date) -> str:
    return _date_word(value) or value.isoformat()


def _duration(value: dt.timedelta) -> str:
    return msgspec.json.encode(value).decode()[1:-1]


# Order matters: datetime is a subclass of date.
_ENCODERS: tuple[tuple[type, str, Callable[[Any], Any]], ...] = (
    (dt.datetime, "$datetime", _datetime),
    (dt.date, "$date", _date),
    (dt.time, "$time", _iso),
    (dt.timedelta, "$interval", _duration),
    (Decimal, "$decimal", str),
    (uuid.UUID, "$uuid", str),
    (bytes, "$bytes", lambda v: b64encode(v).decode("ascii")),
    (bytearray, "$bytes", lambda v: b64encode(bytes(v)).decode("ascii")),
    (memoryview, "$bytes", lambda v: b64encode(bytes(v)).decode("ascii")),
)

# The kinds a result column can have, and the Python type each converts to.
KIND_TYPES: dict[str, type] = {
    "float": float,
    "datetime": dt.datetime,
    "date": dt.date,
    "time": dt.time,
    "interval": dt.timedelta,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": bytes,
}

_TAG_TYPES: dict[str, type] = {f"${kind}": typ for kind, typ in KIND_TYPES.items()}
_TAG_TYPES["$float"] = float

# The words each kind may carry instead of a JSON value, and what they mean.
_WORDS: dict[type, dict[str, Any]] = {
    float: _FLOAT_WORDS,
    dt.datetime: {"infinity": dt.datetime.max, "-infinity": dt.datetime.min},
    dt.date: {"infinity": dt.date.max, "-infinity": dt.date.min},
}


class Json:
    """Marks a value as a JSON document, whatever its shape: ``Json([1, 2])`` is one
    JSON array, where a plain list would be an SQL array or an ``in`` list."""

    __slots__ = ("doc",)

    def __init__(self, doc: Any) -> None:
        self.doc = doc


def encode_value(value: Any) -> Any:
    """A Python value as it travels in a plan."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": _float_word(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Json):
        return {"$json": value.doc}
    if isinstance(value, list | tuple | set | frozenset):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {"$json": value}
    for typ, tag, conv in _ENCODERS:
        if isinstance(value, typ):
            return {tag: conv(value)}
    raise WireValueError(f"cannot send a value of type {type(value).__name__}")


def json_value(value: Any) -> dict[str, Any]:
    """A value meant as a JSON document (a JSON column), whatever its shape."""
    return {"$json": value}


def decode_value(value: Any) -> Any:
    """A wire value back to Python; raises WireValueError for unknown shapes."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise WireValueError(
                'an object value must be one tag such as {"$json": ...} or {"$datetime": ...}'
            )
        ((tag, inner),) = value.items()
        if tag == "$json":
            return inner
        typ = _TAG_TYPES.get(tag)
        if typ is None:
            raise WireValueError(f"unknown value tag {tag!r}")
        words = _WORDS.get(typ)
        if words is not None and isinstance(inner, str) and inner in words:
            return words[inner]
        if typ is float and isinstance(inner, str):
            raise WireValueError('$float takes a number, "NaN", "Infinity" or "-Infinity"')
        if typ is bytes:
            if not isinstance(inner, str):
                raise WireValueError("$bytes takes a base64 string")
            try:
                return b64decode(inner, validate=True)
            except ValueError as exc:
                raise WireValueError(f"$bytes is not valid base64: {exc}") from None
        try:
            return msgspec.convert(inner, typ)
        except msgspec.ValidationError as exc:
            raise WireValueError(f"bad {tag} value {inner!r}: {exc}") from None
    raise WireValueError(f"unsupported value {value!r}")


def _converter(kind: str | None) -> Callable[[Any], Any] | None:
    if kind is None or kind == "json":
        return None
    if kind.startswith("array:"):
        inner = _converter(kind[6:])
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(x) for x in v]
    typ = KIND_TYPES[kind]
    if typ is bytes:
        return lambda v: None if v is None else b64decode(v)
    if typ is float:
        return lambda v: None if v is None else (_FLOAT_WORDS[v] if isinstance(v, str) else v)
    words = _WORDS.get(typ)
    if words is not None:

        def convert(v: Any) -> Any:
            if v is None:
                return None
            return words[v] if v in words else msgspec.convert(v, typ)

        return convert
    return lambda v: None if v is None else msgspec.convert(v, typ)


def row_converters(kinds: list[str | None]) -> list[Callable[[Any], Any] | None]:
    """One converter per result column (None where JSON already gives the value)."""
    return list(_converters(tuple(kinds)))


@functools.lru_cache(maxsize=1024)
def _converters(kinds: tuple[str | None, ...]) -> tuple[Callable[[Any], Any] | None, ...]:
    # A service reads the same few result shapes over and over.
    return tuple(_converter(k) for k in kinds)


def _float_out(v: Any) -> Any:
    return v if v is None or math.isfinite(v) else _float_word(v)


def _datetime_out(v: Any) -> Any:
    return v if v is None else (_datetime_word(v) or v)


def _date_out(v: Any) -> Any:
    return v if v is None else (_date_word(v) or v)


# Result kinds whose values JSON (msgspec) would change: NaN becomes null, and an
# infinite timestamp would read as a real one in year 9999 or 1.
_OUT: dict[str, Callable[[Any], Any]] = {
    "float": _float_out,
    "datetime": _datetime_out,
    "date": _date_out,
}


def _out(kind: str | None) -> Callable[[Any], Any] | None:
    if kind is None:
        return None
    if kind.startswith("array:"):
        inner = _out(kind[6:])
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(x) for x in v]
    return _OUT.get(kind)


def wire_rows(kinds: Sequence[str | None], rows: list[Any]) -> list[Any]:
    """Result rows as they must travel: the given rows themselves unless a column's kind
    has values JSON cannot carry (non-finite floats, infinite timestamps and dates)."""
    outs = [(i, conv) for i, kind in enumerate(kinds) if (conv := _out(kind)) is not None]
    if not outs or not rows:
        return rows
    wired = []
    for row in rows:
        cells = list(row)
        for i, conv in outs:
            cells[i] = conv(cells[i])
        wired.append(cells)
    return wired
