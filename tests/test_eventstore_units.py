"""The event store's pure parts, without PostgreSQL: where event plans run (route()),
what their checks refuse, and how reads of several shards merge."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec
import pytest

from sidecar.compiler import Compiler
from sidecar.errors import SidecarError
from sidecar.merge import merge_events
from sidecar.route import Intent, Merge, Scope, route
from sidecar.settings import build_settings
from sidecar.sharding import stream_shard
from sidecar.topology import Topology, build
from wire.protocol import Plan

SHARDS = ["s0", "s1", "s2", "s3"]


def _node(name: str) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": 5432, "user": "u", "password": "p"}


@pytest.fixture(scope="module")
def topology() -> Topology:
    return build(
        build_settings(
            {
                "databases": {
                    "orders": {
                        "primary": _node("o1"),
                        "read_default": "replica",
                        "replicas": [_node("o2")],
                    },
                    "users": {
                        "sharding": {"key": "id", "function": "modulo"},
                        "shards": [{"name": s, "primary": _node(f"{s}p")} for s in SHARDS],
                    },
                }
            }
        )
    )


def plan(**fields: Any) -> Plan:
    fields.setdefault("database", "users")
    return msgspec.convert(fields, Plan)


def routed(p: Plan, topology: Topology, **binding: Any):  # type: ignore[no-untyped-def]
    return route(p, Compiler().compile(p), topology, **binding)


def event() -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "E"}


def test_a_stream_lives_on_the_shard_its_name_hashes_to(topology: Topology) -> None:
    homes = set()
    for i in range(40):
        stream = f"order-{i}"
        home = SHARDS[stream_shard(stream, 4)]
        homes.add(home)
        for p in (plan(op="append", stream=stream, events=[event()]),
                  plan(op="read_stream", stream=stream)):  # fmt: skip
            r = routed(p, topology)
            assert [t.shard.name for t in r.targets] == [home] and r.merge is Merge.NONE
        assert routed(plan(op="append", stream=stream, events=[event()]), topology).writes
    assert homes == set(SHARDS)
    # Pinned elsewhere (by route.shard or by naming the shard), the stream would split.
    other = SHARDS[(stream_shard("order-1", 4) + 1) % 4]
    for p in (
        plan(op="append", stream="order-1", events=[event()], route={"shard": other}),
        plan(op="read_stream", stream="order-1", database=other),
    ):
        with pytest.raises(SidecarError) as refused:
            routed(p, topology)
        assert refused.value.code == "wrong_shard"


def test_category_reads_fan_out_and_reads_of_every_stream_stay_on_primaries(
    topology: Topology,
) -> None:
    r = routed(plan(op="read_category", category="order"), topology)
    assert r.scope is Scope.ALL and r.merge is Merge.EVENTS and len(r.targets) == 4
    pinned = routed(plan(op="read_category", category="order", route={"shard": "s2"}), topology)
    assert [t.shard.name for t in pinned.targets] == ["s2"] and pinned.merge is Merge.NONE
    # On a database whose reads default to replicas: a category read may use one, a read
    # of every stream never (its barrier is a lock on the primary).
    category = routed(plan(op="read_category", category="o", database="orders"), topology)
    assert category.intent is Intent.READ_REPLICA
    every = routed(plan(op="read_category", database="orders"), topology)
    assert every.intent is Intent.READ_PRIMARY


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"op": "append", "stream": "a-1", "events": []}, "at least one event"),
        ({"op": "append", "stream": "", "events": [event()]}, "stream name"),
        ({"op": "append", "stream": "a-1", "events": [{"id": "nope", "type": "E"}]}, "UUID"),
        ({"op": "append", "stream": "a-1", "events": [event()] * 2}, "once"),
        ({"op": "append", "stream": "a-1", "events": [event()], "expected_version": -2}, "-1"),
        ({"op": "read_stream", "stream": "a-1", "from_version": -1}, "negative"),
        ({"op": "read_stream", "stream": "a-1", "limit": 0}, "at least 1"),
        ({"op": "read_category", "member": 3, "group_size": 3}, "member"),
        ({"op": "read_category", "after": {"s0": -1}}, "negative"),
        (
            {
                "op": "insert",
                "table": "t",
                "rows": [{"id": 1}],
                "outbox": [{"id": str(uuid.uuid4()), "subject": "a b", "aggregate": "x"}],
            },
            "subject",
        ),
    ],
)
def test_event_and_outbox_plans_are_checked_before_anything_runs(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(SidecarError, match=says):
        Compiler(max_result_rows=1000).compile(plan(**fields))


def test_a_merged_page_keeps_a_prefix_of_every_shard() -> None:
    """Rows are ordered by time across shards, but a shard's own rows keep their order
    even when their times do not (a transaction that began earlier took a later
    position), so a checkpoint never moves past a row left out of the page."""
    t = [dt.datetime(2026, 1, 1, second=s, tzinfo=dt.UTC) for s in range(10)]
    s0 = [(1, "a", t[5]), (2, "b", t[1]), (3, "c", t[6])]
    s1 = [(1, "x", t[2]), (2, "y", t[3]), (3, "z", t[9])]
    page = merge_events([s0, s1], 2, 4)
    assert page == [(1, "x", t[2]), (2, "y", t[3]), (1, "a", t[5]), (2, "b", t[1])]
    assert merge_events([s0, []], 2, 10) == s0
