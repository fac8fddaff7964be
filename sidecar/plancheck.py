"""Plan checking: identifiers, where-trees and values, before anything is compiled.

Identifiers are restricted to plain SQL names (optionally ``schema.name`` for
tables) and always quoted, so a quote, semicolon or comment in a name is a 400,
never SQL. Values are decoded from the wire and only ever bound as parameters.

A where-tree is walked once per request: the walk checks it, collects its
values in parameter order and returns its *shape* (everything but the values),
which is what the compiler caches SQL by. The shape comes out normalized:
constants fold (an empty ``and`` is TRUE, an empty ``or`` or ``in []`` is FALSE,
``not`` flips them, ``and``/``or`` absorb or drop them, one child unwraps), so
every spelling of "no condition" is the one shape TRUE, whatever rule looks at it.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

from wire.errors import ErrorCode
from wire.protocol import COMPARISON_OPS
from wire.values import WireValueError, decode_value

from .errors import SidecarError, bad_plan

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

Shape = tuple[Any, ...]

# Constant where-shapes, the results of folding.
TRUE: Shape = ("true",)
FALSE: Shape = ("false",)

# PostgreSQL's limit on bind parameters in one statement.
MAX_PARAMS = 32767
# Values in one list value (limits.max_in_values' default).
MAX_LIST_VALUES = 10_000

_LEAF_KEYS = frozenset({"col", "op", "value"})

# Error messages quote what the caller sent, but never more than a line of it.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 60, 60
_brief = _repr.repr


def column(name: Any) -> str:
    """A checked, quoted column (or alias) name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad_plan(
            f"invalid identifier {_brief(name)}: use letters, digits and _",
            ErrorCode.BAD_IDENTIFIER,
        )
    return f'"{name}"'


def table(name: Any) -> str:
    """A checked, quoted table name, optionally schema-qualified."""
    if not isinstance(name, str) or not name:
        raise bad_plan(f"invalid table name {_brief(name)}", ErrorCode.BAD_IDENTIFIER)
    parts = name.split(".")
    if len(parts) > 2:
        raise bad_plan(f"invalid table name {_brief(name)}", ErrorCode.BAD_IDENTIFIER)
    return ".".join(column(p) for p in parts)


def value(raw: Any, max_items: int = MAX_LIST_VALUES) -> Any:
    """A decoded wire value; a list may hold at most max_items values, nested ones included,
    counted before anything is decoded (decoding a million values stalls the event loop)."""
    if type(raw) is list and _count_items(raw, max_items) > max_items:
        raise bad_plan(
            f"a list value may hold at most {max_items} values (limits.max_in_values); "
            "put a larger set in a table",
            ErrorCode.PLAN_TOO_COMPLEX,
        )
    try:
        return decode_value(raw)
    except WireValueError as exc:
        raise bad_plan(str(exc), ErrorCode.BAD_VALUE) from None


def _count_items(raw: list[Any], budget: int) -> int:
    """The values in a list and its nested lists, counting stops once past budget."""
    count = len(raw)
    if count > budget:
        return count
    for item in raw:
        if type(item) is list:
            count += _count_items(item, budget - count)
            if count > budget:
                break
    return count


def too_many_params() -> SidecarError:
    return bad_plan(
        f"a plan may bind at most {MAX_PARAMS} values; split it", ErrorCode.PLAN_TOO_COMPLEX
    )


def non_negative(name: str, number: int | None) -> None:
    if number is not None and number < 0:
        raise bad_plan(f"{name} must not be negative")


def where_shape(
    node: Any, params: list[Any], max_depth: int, max_items: int = MAX_LIST_VALUES, depth: int = 0
) -> Shape:
    """Check a where-tree, append its values to params, return its normalized shape."""
    if depth > max_depth:
        raise bad_plan(f"where-tree deeper than {max_depth} levels", ErrorCode.PLAN_TOO_COMPLEX)
    if not isinstance(node, dict):
        raise bad_plan(f"a where node must be an object, got {_brief(node)}")
    if len(node) == 1:
        ((kind, inner),) = node.items()
        if kind in ("and", "or"):
            if not isinstance(inner, list):
                raise bad_plan(f"'{kind}' takes a list of conditions, got {_brief(inner)}")
            start = len(params)
            parts = [where_shape(n, params, max_depth, max_items, depth + 1) for n in inner]
            return _fold(kind, parts, params, start)
        if kind == "not":
            shape = where_shape(inner, params, max_depth, max_items, depth + 1)
            if shape == TRUE:
                return FALSE
            if shape == FALSE:
                return TRUE
            return ("not", shape)
    if not node.keys() <= _LEAF_KEYS or "col" not in node or "op" not in node:
        raise bad_plan(
            "a where node is {and|or: [...]}, {not: ...} or {col, op, value}; "
            f"got {_brief(node)}"
        )
    col, op, raw = node["col"], node["op"], node.get("value")
    column(col)
    if not isinstance(op, str) or op not in COMPARISON_OPS:
        raise bad_plan(
            f"unknown operator {_brief(op)}; use one of {sorted(COMPARISON_OPS)}",
            ErrorCode.BAD_OPERATOR,
        )
    # Checked per leaf, so a huge tree is refused before all of it is decoded.
    if len(params) >= MAX_PARAMS:
        raise too_many_params()
    if op == "is_null":
        if not isinstance(raw, bool):
            raise bad_plan("is_null takes true or false")
        return ("is_null", col, raw)
    if op in ("in", "not_in"):
        if not isinstance(raw, list):
            raise bad_plan(f"{op} takes a list of values")
        if not raw:  # x IN () is false for every row, even a null x
            return FALSE if op == "in" else TRUE
        params.append(value(raw, max_items))
        return (op, col)
    if op == "between":
        if not isinstance(raw, list) or len(raw) != 2:
            raise bad_plan("between takes a list of two values")
        params.append(value(raw[0], max_items))
        params.append(value(raw[1], max_items))
        return (op, col)
    if raw is None:
        raise bad_plan(f"{col} {op} null is never true in SQL; use the is_null operator")
    params.append(value(raw, max_items))
    return (op, col)


def _fold(kind: str, parts: list[Shape], params: list[Any], start: int) -> Shape:
    """An and/or of checked children with its constants folded away."""
    absorbing, neutral = (FALSE, TRUE) if kind == "and" else (TRUE, FALSE)
    if absorbing in parts:
        del params[start:]  # the values of children that no longer appear in the SQL
        return absorbing
    kept = [p for p in parts if p != neutral]
    if not kept:
        return neutral
    if len(kept) == 1:
        return kept[0]
    return (kind, tuple(kept))
