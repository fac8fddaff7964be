"""The client on its own: filter values pass the same field checks as saved values,
``DecimalField`` bounds, and a handle leaving its caller's plan as it was."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from client import (
    ActiveRecord,
    DatabaseHandle,
    DecimalField,
    IntegerField,
    PrimaryKeyField,
    StringField,
    ValidationError,
)
from client.transport import Transport
from wire.protocol import Insert, Select


class Invoice(ActiveRecord):
    __tablename__ = "invoices"
    id = PrimaryKeyField()
    user_id = IntegerField()
    code = StringField(max_length=5)
    total = DecimalField(5, 2, null=True)


# Nothing listens here: a value the client refuses never leaves the process, and one it
# let through would fail as SidecarUnreachable instead of ValidationError.
OFFLINE = DatabaseHandle("offline", transport=Transport("http://127.0.0.1:9"), database="x")


async def save_error(**values: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        await Invoice(**{"user_id": 1, "code": "a", **values}).save(using=OFFLINE)
    return str(raised.value)


# Every way a value reaches a where-tree.
FILTERS: dict[str, Callable[[str, Any], object]] = {
    "==": lambda name, v: getattr(Invoice, name) == v,
    "!=": lambda name, v: getattr(Invoice, name) != v,
    "<": lambda name, v: getattr(Invoice, name) < v,
    "<=": lambda name, v: getattr(Invoice, name) <= v,
    ">": lambda name, v: getattr(Invoice, name) > v,
    ">=": lambda name, v: getattr(Invoice, name) >= v,
    "in_": lambda name, v: getattr(Invoice, name).in_([v]),
    "not_in": lambda name, v: getattr(Invoice, name).not_in([v]),
    "between": lambda name, v: getattr(Invoice, name).between(v, v),
    "filter": lambda name, v: Invoice.find().filter(**{name: v}),
}


@pytest.mark.parametrize("how", FILTERS)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("user_id", "abc", id="wrong-type"),
        pytest.param("user_id", True, id="bool-for-int"),
        pytest.param("code", "too-long", id="max-length"),
        pytest.param("total", Decimal("1.005"), id="decimal-places"),
        pytest.param("total", Decimal("1000"), id="decimal-digits"),
    ],
)
async def test_a_filter_value_fails_as_saving_it_does(how: str, name: str, value: Any) -> None:
    expected = await save_error(**{name: value})
    with pytest.raises(ValidationError) as raised:
        FILTERS[how](name, value)
    assert str(raised.value) == expected
    assert raised.value.code == "validation"


def test_find_by_id_checks_the_key() -> None:
    with pytest.raises(ValidationError, match="id takes int, not str"):
        Invoice.find_by_id("1 OR 1=1")


def test_none_is_a_null_test_not_an_operand() -> None:
    is_null = {"col": "user_id", "op": "is_null", "value": True}
    assert (Invoice.user_id == None).to_wire() == is_null  # noqa: E711
    with pytest.raises(ValidationError, match="user_id must not be None"):
        Invoice.user_id < None  # noqa: B015


def test_checked_filter_values_travel_in_wire_form() -> None:
    assert (Invoice.total >= 12).to_wire() == {"col": "total", "op": ">=", "value": 12}
    assert Invoice.total.in_([Decimal("1.50")]).to_wire()["value"] == [{"$decimal": "1.50"}]


@pytest.mark.parametrize(
    "value",
    [
        Decimal("999.99"),
        Decimal("-999.99"),
        Decimal("1.50"),
        Decimal("1.500000"),  # trailing zeros: it still fits two places
        Decimal("0.00000"),
        Decimal("1E+2"),
        Decimal("NaN"),  # numeric(p, s) holds NaN
        999,
        None,
    ],
)
def test_decimal_values_that_fit(value: Any) -> None:
    assert Invoice.total.check(value) is value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Decimal("0.001"), "total takes at most 2 decimal places"),
        (Decimal("1000"), "total takes at most 3 digits before the decimal point"),
        (Decimal("1E+3"), "total takes at most 3 digits before the decimal point"),
        (1000, "total takes at most 3 digits before the decimal point"),
        (Decimal("-Infinity"), "total cannot hold an infinite value"),
        (1.5, "total takes Decimal or int, not float"),
    ],
)
async def test_decimal_values_that_do_not_fit(value: Any, message: str) -> None:
    assert await save_error(total=value) == message


def test_decimal_bounds() -> None:
    assert DecimalField().check(Decimal("123456789.123456789")) is not None  # unbounded
    whole = DecimalField(3)  # numeric(3) is numeric(3, 0)
    assert whole.check(Decimal("999")) == Decimal("999")
    with pytest.raises(ValidationError, match="at most 0 decimal places"):
        whole.check(Decimal("1.5"))
    with pytest.raises(ValueError, match="decimal_places <= max_digits"):
        DecimalField(2, 3)


async def test_running_a_read_leaves_the_callers_plan_as_it_was(sidecar) -> None:
    transport = Transport(sidecar.url)
    db = DatabaseHandle("copy", transport=transport, database="orders")
    try:
        await db.run(
            Insert(database="orders", table="orders", rows=[{"user_id": 1, "status": "s"}])
        )
        assert db.token is not None  # reads through db now carry the write's token
        plan = Select(database="orders", table="orders", limit=1)
        sent = msgspec.json.encode(plan)
        await db.run(plan)
        assert plan.route.after is None
        assert msgspec.json.encode(plan) == sent
    finally:
        await transport.close()
