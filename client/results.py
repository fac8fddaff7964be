"""Result rows as Python values, with where they were served from."""

from __future__ import annotations

from typing import Any

from wire.protocol import Result, ServedBy
from wire.values import row_converters


class Rows(list[dict[str, Any]]):
    """A list of row dicts that also says which node served it and the write's token."""

    served_by: list[ServedBy]
    rowcount: int
    lsn: str | None


def decode(result: Result) -> Rows:
    columns = result.columns
    converters = row_converters(result.types) if result.types else [None] * len(columns)
    rows = Rows()
    if any(c is not None for c in converters):
        for raw in result.rows:
            rows.append(
                {
                    col: (conv(v) if conv is not None else v)
                    for col, conv, v in zip(columns, converters, raw, strict=True)
                }
            )
    else:
        rows.extend(dict(zip(columns, raw, strict=True)) for raw in result.rows)
    rows.served_by = result.served_by
    rows.rowcount = result.rowcount
    rows.lsn = result.lsn
    return rows
