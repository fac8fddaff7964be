"""Every value type round-trips exactly: through models and through raw plans."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from client import ActiveRecord, Json

from .models import Typed

pytestmark = pytest.mark.usefixtures("handles")

AWARE = dt.datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))


async def test_model_fields_round_trip_exactly(primary) -> None:
    values = dict(
        ts=AWARE,
        d=dt.date(1999, 12, 31),
        t=dt.time(23, 59, 58, 999999),
        dec=Decimal("12345678901234567890.000000000123"),
        u=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b=bytes(range(256)),
        j={"nested": {"list": [1, 2.5, None, True, "é"]}, "empty": {}},
        flag=False,
        i=-(2**31),
        f=1.0000000000000002,
        txt="line\nbreak 'quote' \"dq\" \\ ☃ \x01",
    )
    saved = await Typed(**values).save()
    loaded = await Typed.find_by_id(saved.id).one()
    for name, value in values.items():
        got = getattr(loaded, name)
        assert got == value and type(got) is type(value), name
    assert loaded.ts.utcoffset() == dt.timedelta(0)  # same instant, reported in UTC
    # What PostgreSQL holds is the value itself, not a text rendering of it.
    row = await primary.fetchrow("SELECT * FROM typed WHERE id = $1", saved.id)
    assert row["dec"] == values["dec"] and row["b"] == values["b"] and row["ts"] == AWARE


async def test_nulls_round_trip() -> None:
    saved = await Typed().save()
    loaded = await Typed.find_by_id(saved.id).one()
    assert all(v is None for k, v in loaded.to_dict().items() if k != "id")


@pytest.mark.parametrize(
    ("sql_type", "value"),
    [
        ("timestamptz", AWARE),
        ("timestamp", dt.datetime(2020, 2, 29, 1, 2, 3, 4)),
        ("date", dt.date(2024, 2, 29)),
        ("time", dt.time(1, 2, 3, 4)),
        ("interval", dt.timedelta(days=3, seconds=7, microseconds=5)),
        ("numeric", Decimal("-0.000001")),
        ("numeric", Decimal("1.10")),
        ("uuid", uuid.UUID(int=7)),
        ("bytea", b"\x00\xff"),
        ("boolean", True),
        ("bigint", 2**63 - 1),
        ("double precision", -1.5e300),
        ("text", ""),
        ("integer[]", [1, None, 3]),
        ("uuid[]", [uuid.UUID(int=1), uuid.UUID(int=2)]),
        ("numeric[]", [Decimal("1.5"), None]),
    ],
)
async def test_raw_parameters_and_results_round_trip(sql_type: str, value: object) -> None:
    rows = await ActiveRecord.execute_raw(f"SELECT $1::{sql_type} AS v", value, writes=False)
    got = rows[0]["v"]
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, Decimal):
        assert str(got) == str(value)  # scale kept: 1.10 stays 1.10


async def test_json_documents_of_every_shape() -> None:
    for doc in [{"a": 1}, [1, "two", None], "just a string", 42, None, True]:
        rows = await ActiveRecord.execute_raw(
            "SELECT $1::jsonb AS j, $1::json AS js",
            Json(doc) if doc is not None else None,
            writes=False,
        )
        assert rows[0]["j"] == doc and rows[0]["js"] == doc


def test_values_json_cannot_spell_travel_as_postgresql_words() -> None:
    import math

    from wire.values import decode_value, encode_value, row_converters, wire_rows

    specials = [math.nan, math.inf, -math.inf, dt.datetime.max, dt.datetime.min, dt.date.max,
                dt.date.min]  # fmt: skip
    wires = [encode_value(v) for v in specials]
    assert wires == [
        {"$float": "NaN"}, {"$float": "Infinity"}, {"$float": "-Infinity"},
        {"$datetime": "infinity"}, {"$datetime": "-infinity"},
        {"$date": "infinity"}, {"$date": "-infinity"},
    ]  # fmt: skip
    back = [decode_value(w) for w in wires]
    assert math.isnan(back[0]) and back[1:] == specials[1:]
    # Results: the sidecar spells them out, the client reads them back.
    kinds = ["float", "datetime", "date", "array:float"]
    row = (math.nan, dt.datetime.max, dt.date.min, [-math.inf, 1.5, None])
    (wired,) = wire_rows(kinds, [row])
    assert wired == ["NaN", "infinity", "-infinity", ["-Infinity", 1.5, None]]
    got = [conv(v) for conv, v in zip(row_converters(kinds), wired, strict=True)]
    assert math.isnan(got[0]) and got[1:] == list(row[1:])
