"""Consistency tokens for read-your-writes.

A token is the primary's WAL position after a write, as PostgreSQL prints it
(``0/3024670``). A sharded database has one primary per shard and their WAL
positions do not compare, so its token names the shard: ``user_shard_2@0/3024670``,
and several shards join with ``;``. The client keeps, per logical database,
the newest position per shard and sends them all back as ``route.after``.
"""

from __future__ import annotations

import re

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def lsn_to_int(lsn: str) -> int:
    match = _LSN.fullmatch(lsn)
    if match is None:
        raise ValueError(f"not a WAL position: {lsn!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_token(token: str) -> dict[str, int]:
    """``"0/10;s1@0/20"`` -> ``{"": 16, "s1": 32}``; raises ValueError when malformed."""
    out: dict[str, int] = {}
    for part in filter(None, token.split(";")):
        shard, _, lsn = part.rpartition("@")
        out[shard] = max(out.get(shard, 0), lsn_to_int(lsn))
    return out


def format_token(positions: dict[str, int]) -> str:
    return ";".join(
        f"{s}@{int_to_lsn(v)}" if s else int_to_lsn(v) for s, v in sorted(positions.items())
    )


def merge_tokens(current: str | None, new: str | None) -> str | None:
    """The newest position per shard of both tokens."""
    if not new:
        return current
    if not current:
        return format_token(parse_token(new))
    merged = parse_token(current)
    for shard, value in parse_token(new).items():
        merged[shard] = max(merged.get(shard, 0), value)
    return format_token(merged)
