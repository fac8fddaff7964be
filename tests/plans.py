"""Shorthands for plans and where-trees in the unit tests."""

from __future__ import annotations

from typing import Any

from wire.protocol import Select


def eq(col: str, value: Any) -> dict[str, Any]:
    return {"col": col, "op": "=", "value": value}


def isin(col: str, values: list[Any]) -> dict[str, Any]:
    return {"col": col, "op": "in", "value": values}


def select(**kw: Any) -> Select:
    return Select(database="orders", table=kw.pop("table", "orders"), **kw)
