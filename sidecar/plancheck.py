"""Plan checking: identifiers, where-trees and values, before anything is compiled.

Identifiers are restricted to plain SQL names (optionally ``schema.name`` for
tables) and always quoted, so a quote, semicolon or comment in a name is a 400,
never SQL. Values are decoded from the wire and only ever bound as parameters.

A where-tree is walked once per request: the walk checks it, collects its
values in parameter order and returns its *shape* (everything but the values),
which is what the compiler caches SQL by.
"""

from __future__ import annotations

import re
from typing import Any

from client.protocol import COMPARISON_OPS
from client.values import WireValueError, decode_value

from .errors import bad_plan

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

Shape = tuple[Any, ...]


def column(name: Any) -> str:
    """A checked, quoted column (or alias) name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad_plan(f"invalid identifier {name!r}: use letters, digits and _", "bad_identifier")
    return f'"{name}"'


def table(name: Any) -> str:
    """A checked, quoted table name, optionally schema-qualified."""
    if not isinstance(name, str) or not name:
        raise bad_plan(f"invalid table name {name!r}", "bad_identifier")
    parts = name.split(".")
    if len(parts) > 2:
        raise bad_plan(f"invalid table name {name!r}", "bad_identifier")
    return ".".join(column(p) for p in parts)


def value(raw: Any) -> Any:
    try:
        return decode_value(raw)
    except WireValueError as exc:
        raise bad_plan(str(exc), "bad_value") from None


def non_negative(name: str, number: int | None) -> None:
    if number is not None and number < 0:
        raise bad_plan(f"{name} must not be negative")


def where_shape(node: Any, params: list[Any], max_depth: int, depth: int = 0) -> Shape:
    """Check a where-tree, append its values to params, return its shape."""
    if depth > max_depth:
        raise bad_plan(f"where-tree deeper than {max_depth} levels", "plan_too_complex")
    if not isinstance(node, dict):
        raise bad_plan(f"a where node must be an object, got {node!r}")
    if len(node) == 1 and ("and" in node or "or" in node):
        ((kind, items),) = node.items()
        if not isinstance(items, list):
            raise bad_plan(f"'{kind}' takes a list of conditions")
        return (kind, tuple(where_shape(n, params, max_depth, depth + 1) for n in items))
    if len(node) == 1 and "not" in node:
        return ("not", where_shape(node["not"], params, max_depth, depth + 1))
    if set(node) - {"col", "op", "value"} or "col" not in node or "op" not in node:
        raise bad_plan(
            f"a where node is {{and|or: [...]}}, {{not: ...}} or {{col, op, value}}; got {node!r}"
        )
    col, op = node["col"], node["op"]
    column(col)
    if op not in COMPARISON_OPS:
        raise bad_plan(
            f"unknown operator {op!r}; use one of {sorted(COMPARISON_OPS)}", "bad_operator"
        )
    raw = node.get("value")
    if op == "is_null":
        if not isinstance(raw, bool):
            raise bad_plan("is_null takes true or false")
        return ("is_null", col, raw)
    if op in ("in", "not_in"):
        if not isinstance(raw, list):
            raise bad_plan(f"{op} takes a list of values")
        params.append(value(raw))
        return (op, col)
    if op == "between":
        if not isinstance(raw, list) or len(raw) != 2:
            raise bad_plan("between takes a list of two values")
        params.append(value(raw[0]))
        params.append(value(raw[1]))
        return (op, col)
    if raw is None:
        raise bad_plan(f"{col} {op} null is never true in SQL; use the is_null operator")
    params.append(value(raw))
    return (op, col)
