"""Typed wire values (wire.values): every type round-trips exactly, bad shapes are refused.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from wire.values import Json, WireValueError, decode_value, encode_value, row_converters

UTC = dt.UTC


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC), {"$datetime": "2024-05-01T12:00:00+00:00"}),
        (
            dt.datetime(
                2024, 5, 1, 12, 0, 1, 250000, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
            ),
            {"$datetime": "2024-05-01T12:00:01.250000+05:30"},
        ),
        (dt.datetime(2024, 5, 1, 12, 0, 0, 123456), {"$datetime": "2024-05-01T12:00:00.123456"}),
        (dt.date(2024, 2, 29), {"$date": "2024-02-29"}),
        (dt.time(23, 59, 59, 999999), {"$time": "23:59:59.999999"}),
        (dt.time(1, 2, tzinfo=UTC), {"$time": "01:02:00+00:00"}),
        (dt.timedelta(days=1, seconds=2, microseconds=5), {"$interval": "P1DT2.000005S"}),
        (dt.timedelta(days=-1, seconds=2), {"$interval": "-PT86398S"}),
        (dt.timedelta(0), {"$interval": "P0D"}),
        (Decimal("1.10"), {"$decimal": "1.10"}),
        (Decimal("-0.000"), {"$decimal": "-0.000"}),
        (Decimal("1E+2"), {"$decimal": "1E+2"}),
        (uuid.UUID(int=5), {"$uuid": "00000000-0000-0000-0000-000000000005"}),
        (b"\x00\xffhi", {"$bytes": "AP9oaQ=="}),
        (b"", {"$bytes": ""}),
        (None, None),
        (True, True),
        (False, False),
        (0, 0),
        (-(2**63), -(2**63)),
        (1.5, 1.5),
        ("", ""),
        ("héllo", "héllo"),
        ('{"$datetime": "not a tag, a string"}', '{"$datetime": "not a tag, a string"}'),
    ],
)
def test_value_round_trip(value: Any, wire: Any) -> None:
    assert encode_value(value) == wire
    decoded = decode_value(wire)
    assert decoded == value
    assert type(decoded) is type(value)


def test_decimal_keeps_its_scale() -> None:
    decoded = decode_value(encode_value(Decimal("1.10")))
    assert str(decoded) == "1.10"
    assert decoded.as_tuple().exponent == -2


def test_naive_and_aware_datetimes_stay_apart() -> None:
    naive = decode_value(encode_value(dt.datetime(2024, 1, 1)))
    aware = decode_value(encode_value(dt.datetime(2024, 1, 1, tzinfo=UTC)))
    assert naive.tzinfo is None
    assert aware.utcoffset() == dt.timedelta(0)


def test_bytes_like_values_travel_as_bytes() -> None:
    assert decode_value(encode_value(bytearray(b"ab"))) == b"ab"
    assert decode_value(encode_value(memoryview(b"cd"))) == b"cd"


def test_nested_lists_round_trip() -> None:
    value = [[1, 2], [uuid.UUID(int=1), None], [Decimal("0.5"), [dt.date(2024, 1, 2)]]]
    wire = encode_value(value)
    assert wire == [
        [1, 2],
        [{"$uuid": "00000000-0000-0000-0000-000000000001"}, None],
        [{"$decimal": "0.5"}, [{"$date": "2024-01-02"}]],
    ]
    assert decode_value(wire) == value


def test_tuples_and_sets_become_lists() -> None:
    assert encode_value((1, "a")) == [1, "a"]
    assert encode_value(frozenset({3})) == [3]


@pytest.mark.parametrize(
    "doc",
    [
        None,
        True,
        0,
        2.5,
        "text",
        [],
        [1, "two", None, {"three": 3}],
        {},
        {"a": {"b": [1, 2, {"c": None}]}},
        {"$datetime": "looks like a tag but is a document"},
        {"$json": "nested marker"},
        {"k1": 1, "k2": 2},
    ],
)
def test_json_documents_of_every_shape(doc: Any) -> None:
    wire = encode_value(Json(doc))
    assert wire == {"$json": doc}
    assert decode_value(wire) == doc


def test_plain_dict_is_a_json_document() -> None:
    assert encode_value({"a": 1}) == {"$json": {"a": 1}}


def test_unsendable_type() -> None:
    with pytest.raises(WireValueError):
        encode_value(object())


@pytest.mark.parametrize(
    "wire",
    [
        {"$nope": 1},
        {"$json": 1, "$datetime": "2024-01-01T00:00:00Z"},
        {},
        {"$bytes": "!!!!"},
        {"$bytes": "abc"},  # bad padding
        {"$bytes": 5},
        {"$datetime": "2024-13-01T00:00:00Z"},
        {"$datetime": "yesterday"},
        {"$datetime": 1714564800},
        {"$date": "2024-02-30"},
        {"$time": "25:00:00"},
        {"$decimal": "ten"},
        {"$uuid": "not-a-uuid"},
        {"$interval": "1 day"},
        [1, {"$nope": 2}],
    ],
)
def test_decode_rejects_bad_shapes(wire: Any) -> None:
    with pytest.raises(WireValueError):
        decode_value(wire)


def test_wire_value_error_is_a_value_error() -> None:
    assert issubclass(WireValueError, ValueError)


def test_row_converters() -> None:
    kinds: list[str | None] = [
        None,
        "json",
        "datetime",
        "date",
        "time",
        "interval",
        "decimal",
        "uuid",
        "bytes",
        "array:uuid",
        "array:decimal",
        "array:json",
    ]
    convs = row_converters(kinds)
    assert len(convs) == len(kinds)
    # Plain JSON needs no conversion.
    assert convs[0] is None and convs[1] is None and convs[11] is None
    u1, u2 = uuid.UUID(int=1), uuid.UUID(int=2)
    row = [
        "x",
        {"a": 1},
        "2024-05-01T12:00:00+00:00",
        "2024-05-01",
        "12:30:00",
        "P1DT2S",
        "1.10",
        str(u1),
        "aGk=",
        [str(u1), None, str(u2)],
        ["1.5", "2.50"],
        [1, 2],
    ]
    out = [v if conv is None else conv(v) for conv, v in zip(convs, row, strict=True)]
    assert out == [
        "x",
        {"a": 1},
        dt.datetime(2024, 5, 1, 12, tzinfo=UTC),
        dt.date(2024, 5, 1),
        dt.time(12, 30),
        dt.timedelta(days=1, seconds=2),
        Decimal("1.10"),
        u1,
        b"hi",
        [u1, None, u2],
        [Decimal("1.5"), Decimal("2.50")],
        [1, 2],
    ]
    assert str(out[6]) == "1.10"
    # NULL stays None for every converter.
    for conv in convs:
        if conv is not None:
            assert conv(None) is None
