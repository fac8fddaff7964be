"""route(): where a plan runs, decided without PostgreSQL (a topology without pools).

Table-driven: every target kind (one shard, some shards, all shards), every intent,
every merge, and every refusal route() decides.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar.compiler import Compiler
from sidecar.errors import SidecarError
from sidecar.route import Intent, Merge, Scope, batch_shard
from sidecar.route import route as route_checked
from sidecar.settings import build_settings
from sidecar.statuses import status_of
from sidecar.topology import Topology, build
from wire.consistency import format_token
from wire.protocol import Plan

SHARDS = ["s0", "s1", "s2", "s3"]


def _node(name: str) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": 5432, "user": "u", "password": "p"}


@pytest.fixture(scope="module")
def topology() -> Topology:
    settings = build_settings(
        {
            "databases": {
                "orders": {"primary": _node("o1"), "replicas": [_node("o2")]},
                "reports": {"primary": _node("r1"), "read_default": "replica"},
                "users": {
                    "sharding": {"key": "id", "function": "modulo"},
                    "shards": [{"name": s, "primary": _node(f"{s}p")} for s in SHARDS],
                },
            }
        }
    )
    return build(settings)


def route(p: Plan, topology: Topology, **binding: Any):
    """route() on the plan as the request path hands it over: checked and compiled."""
    return route_checked(p, Compiler().compile(p), topology, **binding)


def plan(**fields: Any) -> Plan:
    fields.setdefault("database", "users")
    fields.setdefault("table", "users") if fields.get("op") != "raw" else None
    return msgspec.convert(fields, Plan)


def key(op: str, value: Any) -> dict[str, Any]:
    return {"col": "id", "op": op, "value": value}


# (plan, scope, shard names, intent, merge)
CASES = [
    (plan(op="select", database="orders"), Scope.ONE, ["orders"], Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="select", database="orders", route={"role": "replica"}), Scope.ONE, ["orders"],
     Intent.READ_REPLICA, Merge.NONE),
    (plan(op="select", database="reports"), Scope.ONE, ["reports"], Intent.READ_REPLICA,
     Merge.NONE),
    (plan(op="select", database="reports", route={"role": "primary"}), Scope.ONE, ["reports"],
     Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="delete", database="orders", all_rows=True), Scope.ONE, ["orders"], Intent.WRITE,
     Merge.NONE),
    (plan(op="select", where=key("=", 5)), Scope.ONE, ["s1"], Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="select", where=key("in", [1, 2, 6])), Scope.SOME, ["s1", "s2"],
     Intent.READ_PRIMARY, Merge.SELECT),
    (plan(op="select", where={"and": [key("=", 3), {"col": "name", "op": "=", "value": "x"}]}),
     Scope.ONE, ["s3"], Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="select"), Scope.ALL, SHARDS, Intent.READ_PRIMARY, Merge.SELECT),
    (plan(op="select", where={"or": [key("=", 1), key("=", 2)]}), Scope.ALL, SHARDS,
     Intent.READ_PRIMARY, Merge.SELECT),
    (plan(op="count"), Scope.ALL, SHARDS, Intent.READ_PRIMARY, Merge.COUNT),
    (plan(op="aggregate", aggregates=[{"fn": "count"}]), Scope.ALL, SHARDS,
     Intent.READ_PRIMARY, Merge.AGGREGATE),
    (plan(op="raw", sql="SELECT 1", writes=False, route={"shard": "*"}), Scope.ALL, SHARDS,
     Intent.READ_PRIMARY, Merge.ROWS),
    (plan(op="raw", sql="SELECT 1", writes=True, route={"shard": "*"}), Scope.ALL, SHARDS,
     Intent.WRITE, Merge.CONCAT),
    (plan(op="raw", sql="SELECT 1", writes=False, route={"shard": "s2"}), Scope.ONE, ["s2"],
     Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="raw", sql="SELECT 1", writes=False, route={"shard": 3}), Scope.ONE, ["s3"],
     Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="update", set={"name": "x"}, where=key("=", 2)), Scope.ONE, ["s2"], Intent.WRITE,
     Merge.NONE),
    (plan(op="update", set={"name": "x"}, all_rows=True, route={"shard": "*"}), Scope.ALL,
     SHARDS, Intent.WRITE, Merge.CONCAT),
    (plan(op="insert", rows=[{"id": 4}, {"id": 8}]), Scope.ONE, ["s0"], Intent.WRITE,
     Merge.NONE),
    (plan(op="insert", rows=[{"id": 1}, {"id": 2}, {"id": 5}]), Scope.SOME, ["s1", "s2"],
     Intent.WRITE, Merge.INSERT),
    # A shard's own name as the database pins that shard.
    (plan(op="select", database="s2"), Scope.ONE, ["s2"], Intent.READ_PRIMARY, Merge.NONE),
    (plan(op="insert", database="s1", rows=[{"id": 5}]), Scope.ONE, ["s1"], Intent.WRITE,
     Merge.NONE),
    # A key pinned to no value: one shard answers "nothing".
    (plan(op="select", where=key("in", [])), Scope.ONE, ["s0"], Intent.READ_PRIMARY,
     Merge.NONE),
]  # fmt: skip


@pytest.mark.parametrize(("p", "scope", "shards", "intent", "merge"), CASES)
def test_targets_intent_and_merge(topology, p, scope, shards, intent, merge) -> None:
    r = route(p, topology)
    assert r.scope is scope
    assert [t.shard.name or r.db.name for t in r.targets] == shards
    assert r.intent is intent and r.merge is merge
    assert r.writes == (intent is Intent.WRITE)


def test_a_split_insert_gives_each_shard_its_own_rows_in_order(topology) -> None:
    given = plan(op="insert", rows=[{"id": 1}, {"id": 2}, {"id": 5}, {"id": 9}])
    r = route(given, topology)
    assert {t.shard.name: [row["id"] for row in t.plan.rows] for t in r.targets} == {
        "s1": [1, 5, 9],
        "s2": [2],
    }
    assert r.plan is given and len(given.rows) == 4  # the caller's plan, unchanged
    # Each target's rows are the caller's own row objects (RETURNING order relies on it).
    assert {id(row) for t in r.targets for row in t.plan.rows} == {id(row) for row in given.rows}


def test_read_your_writes_positions_per_shard(topology) -> None:
    token = format_token({"s1": 100, "s2": 200})
    r = route(plan(op="select", where=key("in", [1, 2, 3]), route={"after": token}), topology)
    assert {t.shard.name: t.after for t in r.targets} == {"s1": 100, "s2": 200, "s3": None}
    unsharded = route(
        plan(op="select", database="orders", route={"after": format_token({"": 7})}), topology
    )
    assert unsharded.targets[0].after == 7


REFUSALS = [
    (plan(op="update", set={"name": "x"}, all_rows=True), "shard_key_required"),
    (plan(op="delete", where={"col": "name", "op": "=", "value": "x"}), "shard_key_required"),
    (plan(op="raw", sql="SELECT 1", writes=True), "shard_required"),
    (plan(op="raw", sql="SELECT 1", writes=False), "shard_required"),
    (plan(op="select", database="orders", route={"shard": "s1"}), "not_sharded"),
    (plan(op="select", route={"shard": "nope"}), "unknown_shard"),
    (plan(op="select", route={"shard": 9}), "unknown_shard"),
    (plan(op="select", database="ghost"), "unknown_database"),
    (plan(op="insert", rows=[{"name": "no key"}]), "shard_key_required"),
    (plan(op="insert", database="s1", rows=[{"id": 2}]), "wrong_shard"),
    (plan(op="insert", rows=[]), "bad_plan"),
    (plan(op="select", route={"after": "not a token"}), "bad_token"),
    (plan(op="select", where=key("=", "text")), "bad_plan"),  # modulo wants an integer
]


@pytest.mark.parametrize(("p", "code"), REFUSALS)
def test_refusals(topology, p, code: str) -> None:
    with pytest.raises(SidecarError) as err:
        route(p, topology)
    assert err.value.code == code and status_of(err.value.code) in (400, 404)


def test_transactions_stay_on_one_shard(topology) -> None:
    s1, s2 = topology.databases["users"].shards[1:3]
    pinned = route(plan(op="select", where=key("=", 1)), topology, transaction=True)
    assert [t.shard for t in pinned.targets] == [s1] and pinned.intent is Intent.WRITE
    keyless = plan(op="update", set={"name": "x"}, where={"col": "name", "op": "=", "value": "y"})
    stays = route(keyless, topology, transaction=True, bound=s1)
    assert [t.shard for t in stays.targets] == [s1]
    for p, bound in [
        (keyless, None),  # not bound yet and no key: which shard?
        (plan(op="select", where=key("in", [1, 2])), None),
        (plan(op="select", where=key("=", 2)), s1),
        (plan(op="insert", rows=[{"id": 1}, {"id": 2}]), None),
    ]:
        with pytest.raises(SidecarError) as err:
            route(p, topology, transaction=True, bound=bound)
        assert err.value.code == "cross_shard_transaction"
    assert route(plan(op="select", where=key("=", 2)), topology, transaction=True, bound=s2)


def test_a_batch_runs_on_one_shard(topology) -> None:
    s1 = topology.databases["users"].shards[1]
    same = [route(plan(op="select", where=key("=", k)), topology) for k in (1, 5)]
    assert batch_shard(same) is s1
    for routes, code in [
        ([same[0], route(plan(op="select", where=key("=", 2)), topology)], "cross_shard_batch"),
        ([same[0], route(plan(op="select"), topology)], "cross_shard_batch"),
        ([same[0], route(plan(op="select", database="orders"), topology)], "bad_plan"),
    ]:
        with pytest.raises(SidecarError) as err:
            batch_shard(routes)
        assert err.value.code == code
    orders = route(plan(op="select", database="orders"), topology)
    assert batch_shard([orders]) is topology.databases["orders"].shards[0]


def test_values_are_decoded_once_by_the_check_never_by_routing(topology, monkeypatch) -> None:
    import sidecar.plancheck as plancheck

    decoded: list[Any] = []
    original = plancheck.value

    def counting(raw: Any, *args: Any) -> Any:
        decoded.append(raw)
        return original(raw, *args)

    monkeypatch.setattr(plancheck, "value", counting)
    p = plan(op="insert", rows=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    checked = Compiler().compile(p)
    assert len(decoded) == 4
    r = route_checked(p, checked, topology)
    assert len(decoded) == 4 and r.merge is Merge.INSERT
    q = plan(op="select", where=key("in", [1, 2, 6]))
    checked = Compiler().compile(q)
    route_checked(q, checked, topology)
    assert len(decoded) == 5  # the IN list: one value, decoded once
