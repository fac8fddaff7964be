"""Shard functions, and the shard-key values a checked where shape pins.

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

from .errors import SidecarError, bad_plan
from .plancheck import Shape
from .settings import ShardingSettings


def stable_hash64(key: Any) -> int:
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def stream_shard(stream: str, shards: int) -> int:
    """The shard an event stream lives on: ``hash`` of its name, whatever function the
    database's key column uses (a stream name is text; modulo and range want numbers).
    Pinned for ever like ``hash``: changing it would split streams across shards."""
    return stable_hash64(stream) % shards


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


def key_values(shape: Shape | None, params: Sequence[Any], at: int, key: str) -> list[Any] | None:
    """The values a checked where shape pins ``key`` to (= or in, under and only), or
    None. ``params`` are the plan's decoded values, the where's from index ``at``.

    Only conditions every matching row must meet count, so an ``or`` or ``not`` above
    the key condition leaves the key unknown.
    """
    if shape is None:
        return None
    return _pins(shape, params, at, key)[0]


def _pins(shape: Shape, params: Sequence[Any], at: int, key: str) -> tuple[list[Any] | None, int]:
    """(the values ``shape`` pins ``key`` to, or None; the index of its next value)."""
    kind = shape[0]
    if kind in ("and", "or"):
        found: list[Any] | None = None
        for child in shape[1]:
            vals, at = _pins(child, params, at, key)
            # Several pins intersect; the smallest is a correct superset.
            if kind == "and" and vals is not None and (found is None or len(vals) < len(found)):
                found = vals
        return found, at
    if kind == "not":
        return None, _pins(shape[1], params, at, key)[1]
    if kind == "false":
        return [], at  # no row matches: no value of the key either
    if kind in ("true", "is_null"):
        return None, at
    if kind == "between":
        return None, at + 2
    if shape[1] == key and kind == "=":
        return [params[at]], at + 1
    if shape[1] == key and kind == "in":
        return list(params[at]), at + 1
    return None, at + 1


def explicit_shard(shard: str | int, names: Sequence[str]) -> int:
    if isinstance(shard, int) and not isinstance(shard, bool):
        if 0 <= shard < len(names):
            return shard
    elif shard in names:
        return names.index(shard)
    raise SidecarError(ErrorCode.UNKNOWN_SHARD, f"no shard {shard!r}; shards are {list(names)}")
