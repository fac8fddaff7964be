"""Shard functions (sidecar.sharding): pinned placement, modulo, range, map, and shard keys
in where-trees.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest

from sidecar.compiler import Compiler
from sidecar.errors import SidecarError
from sidecar.settings import ShardingSettings
from sidecar.sharding import ShardFunction, key_values, stable_hash64
from sidecar.statuses import status_of
from wire.protocol import Select

from .plans import eq, isin

# These vectors pin placement across versions: a row with this key is stored on this shard,
# so a change to stable_hash64 (or to how keys become text) would silently move rows.
# Never update these numbers to make a failing test pass; migrate data instead.
HASH_VECTORS: list[tuple[Any, int, int]] = [
    # (key, stable_hash64(key), shard index of 4)
    (0, 9523843951405948789, 1),
    (1, 17797172410793473910, 2),
    (42, 6319743179241711738, 2),
    (-7, 7251330064161976088, 0),
    (2**62, 2661270477536733339, 3),
    ("alice", 5614559425216174729, 1),
    ("", 16476032584258269876, 0),
    ("é", 14635220546840893743, 3),
]

FOUR = ["s0", "s1", "s2", "s3"]


def shard_function(function: str, names: list[str] = FOUR, **options: Any) -> ShardFunction:
    return ShardFunction(ShardingSettings(key="id", function=function, **options), names)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "digest", "shard"), HASH_VECTORS)
def test_hash_is_pinned(key: Any, digest: int, shard: int) -> None:
    assert stable_hash64(key) == digest
    assert digest % 4 == shard
    assert shard_function("hash").shard_of(key) == shard
    # The documented definition: BLAKE2b-64 of the key's text in UTF-8, big-endian.
    spec = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    assert int.from_bytes(spec, "big") == digest


def test_hash_of_int_and_its_text_agree() -> None:
    fn = shard_function("hash")
    assert fn.shard_of(42) == fn.shard_of("42")


@pytest.mark.parametrize(
    ("key", "shard"), [(0, 0), (1, 1), (4, 0), (7, 3), (-1, 3), (-4, 0), (-7, 1), (2**70 + 2, 2)]
)
def test_modulo_is_floor_modulo(key: int, shard: int) -> None:
    assert shard_function("modulo").shard_of(key) == shard


@pytest.mark.parametrize("key", ["5", 5.0, True])
def test_modulo_needs_an_integer(key: Any) -> None:
    with pytest.raises(SidecarError) as raised:
        shard_function("modulo").shard_of(key)
    assert raised.value.code == "bad_plan"
    assert status_of(raised.value.code) == 400


def test_null_shard_key() -> None:
    with pytest.raises(SidecarError) as raised:
        shard_function("hash").shard_of(None)
    assert raised.value.code == "shard_key_required"


@pytest.mark.parametrize(
    ("key", "shard"),
    [(-(10**9), 0), (99, 0), (100, 1), (199, 1), (200, 2), (299, 2), (300, 3), (10**9, 3)],
)
def test_range(key: int, shard: int) -> None:
    assert shard_function("range", bounds=[100, 200, 300]).shard_of(key) == shard


def test_range_key_of_the_wrong_type() -> None:
    with pytest.raises(SidecarError) as raised:
        shard_function("range", bounds=[100, 200, 300]).shard_of("abc")
    assert raised.value.code == "bad_plan"


def test_range_over_text_bounds() -> None:
    fn = shard_function("range", ["a_to_l", "m_to_z"], bounds=["m"])
    assert fn.shard_of("alice") == 0
    assert fn.shard_of("mallory") == 1


def test_map_with_default() -> None:
    fn = shard_function(
        "map", ["eu", "us", "rest"], map={"de": "eu", "ca": "us", "7": "us"}, default="rest"
    )
    assert fn.shard_of("de") == 0
    assert fn.shard_of("ca") == 1
    assert fn.shard_of(7) == 1  # keys are looked up by their text
    assert fn.shard_of("jp") == 2


def test_map_without_default_refuses_unmapped_keys() -> None:
    fn = shard_function("map", ["eu", "us"], map={"de": "eu", "ca": "us"})
    assert fn.shard_of("ca") == 1
    with pytest.raises(SidecarError) as raised:
        fn.shard_of("jp")
    assert raised.value.code == "shard_key_unmapped"
    assert status_of(raised.value.code) == 400


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (None, None),
        (eq("id", 5), [5]),
        (isin("id", [1, 2, 3]), [1, 2, 3]),
        (eq("other", 5), None),
        ({"col": "id", "op": ">", "value": 5}, None),
        ({"col": "id", "op": "!=", "value": 5}, None),
        ({"col": "id", "op": "not_in", "value": [5]}, None),
        ({"and": [eq("status", "new"), eq("id", 5)]}, [5]),
        ({"and": [eq("status", "new"), isin("id", [7, 8])]}, [7, 8]),
        # Two pins intersect; the smallest one is a correct superset of the intersection.
        ({"and": [isin("id", [1, 2, 3]), eq("id", 2)]}, [2]),
        ({"and": [isin("id", [1, 2, 3]), isin("id", [2, 3])]}, [2, 3]),
        ({"and": [{"and": [eq("x", 1), eq("id", 9)]}]}, [9]),
        ({"and": []}, None),
        ({"or": [eq("id", 1), eq("id", 2)]}, None),
        # A one-condition or is that condition (where-trees are normalized before routing).
        ({"or": [eq("id", 1)]}, [1]),
        ({"not": eq("id", 1)}, None),
        ({"and": [eq("x", 1), {"or": [eq("id", 1), eq("x", 2)]}]}, None),
        ({"and": [eq("x", 1), {"not": isin("id", [1])}]}, None),
        (eq("id", {"$uuid": "00000000-0000-0000-0000-000000000001"}), [uuid.UUID(int=1)]),
    ],
)
def test_key_values(where: dict[str, Any] | None, expected: list[Any] | None) -> None:
    # Routing reads the key from the checked plan: its normalized shape, decoded values.
    checked = Compiler().compile(Select(database="d", table="t", where=where))
    shape, at = checked.where()
    assert key_values(shape, checked.params, at, "id") == expected
