"""Shard functions, and which shards a plan touches.

``hash`` is pinned for ever, because changing it would move rows: the key's
text form (``str(key)`` for ints and strings alike) in UTF-8, hashed with
BLAKE2b at an 8-byte digest, read as a big-endian unsigned 64-bit integer,
modulo the number of shards. ``modulo`` is floor modulo of an integer key
(always non-negative, unlike SQL's ``%``). ``range`` puts a key in the first
shard whose exclusive upper bound is above it. ``map`` looks the key's text up.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from wire.errors import ErrorCode
from wire.protocol import ALL_SHARDS, Insert, Plan, Raw

from . import plancheck
from .errors import SidecarError, bad_plan
from .settings import ShardingSettings


def stable_hash64(key: Any) -> int:
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ShardFunction:
    def __init__(self, settings: ShardingSettings, shard_names: Sequence[str]) -> None:
        self.key = settings.key
        self.function = settings.function
        self.count = len(shard_names)
        self._bounds = settings.bounds or []
        index = {name: i for i, name in enumerate(shard_names)}
        self._map = {k: index[v] for k, v in (settings.map or {}).items()}
        self._default = index[settings.default] if settings.default is not None else None

    def shard_of(self, key: Any) -> int:
        if key is None:
            raise bad_plan(
                f"the shard key {self.key!r} must not be null", ErrorCode.SHARD_KEY_REQUIRED
            )
        fn = self.function
        if fn == "modulo":
            if not isinstance(key, int) or isinstance(key, bool):
                raise bad_plan(f"modulo sharding needs an integer {self.key!r}, got {key!r}")
            return key % self.count
        if fn == "hash":
            return stable_hash64(key) % self.count
        if fn == "range":
            try:
                return bisect_right(self._bounds, key)
            except TypeError:
                raise bad_plan(
                    f"{self.key!r} value {key!r} does not compare with the bounds"
                ) from None
        found = self._map.get(str(key), self._default)
        if found is None:
            raise bad_plan(
                f"no shard is mapped for {self.key}={key!r}", ErrorCode.SHARD_KEY_UNMAPPED
            )
        return found


def key_values(node: dict[str, Any] | None, key: str) -> list[Any] | None:
    """The values a where-tree pins ``key`` to (= or in, under and only), or None.

    Only conditions every matching row must meet count, so an ``or`` or ``not``
    above the key condition leaves the key unknown.
    """
    if node is None:
        return None
    if len(node) == 1 and isinstance(node.get("and"), list):
        found: list[Any] | None = None
        for child in node["and"]:
            vals = key_values(child, key) if isinstance(child, dict) else None
            # Several pins intersect; the smallest is a correct superset.
            if vals is not None and (found is None or len(vals) < len(found)):
                found = vals
        return found
    if node.get("col") != key:
        return None
    if node.get("op") == "=" and node.get("value") is not None:
        return [plancheck.value(node["value"])]
    if node.get("op") == "in" and isinstance(node.get("value"), list):
        return plancheck.value(node["value"])
    return None


def explicit_shard(shard: str | int, names: Sequence[str]) -> int:
    if isinstance(shard, int) and not isinstance(shard, bool):
        if 0 <= shard < len(names):
            return shard
    elif shard in names:
        return names.index(shard)
    raise SidecarError(ErrorCode.UNKNOWN_SHARD, f"no shard {shard!r}; shards are {list(names)}")


def target_shards(plan: Plan, fn: ShardFunction, names: Sequence[str]) -> list[int] | None:
    """The shard indexes a plan must run on; None means every shard."""
    shard = plan.route.shard
    if shard == ALL_SHARDS:
        return None
    if shard is not None:
        return [explicit_shard(shard, names)]
    if isinstance(plan, Raw):
        raise bad_plan(
            "a raw plan on a sharded database needs route.shard: a shard name or '*'",
            ErrorCode.SHARD_REQUIRED,
        )
    if isinstance(plan, Insert):
        return sorted({fn.shard_of(_row_key(row, fn.key)) for row in plan.rows})
    keys = key_values(plan.where, fn.key)
    if keys is None:
        return None
    return sorted({fn.shard_of(k) for k in keys})


def _row_key(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise bad_plan(
            f"every inserted row needs the shard key {key!r} (client.ids can generate one)",
            ErrorCode.SHARD_KEY_REQUIRED,
        )
    return plancheck.value(row[key])


def split_rows(plan: Insert, fn: ShardFunction) -> dict[int, list[dict[str, Any]]]:
    """The rows of a sharded insert, grouped by shard, in their original order."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in plan.rows:
        groups.setdefault(fn.shard_of(_row_key(row, fn.key)), []).append(row)
    return groups
