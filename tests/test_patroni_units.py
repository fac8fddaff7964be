"""Patroni's keys read as members (pure), and the settings of the etcd registry and of
databases that follow a Patroni cluster (no servers needed)."""

from __future__ import annotations

import json

import pytest

from sidecar.patroni import members
from sidecar.patroni_rest import cluster_members
from sidecar.registry_etcd import _range_end
from sidecar.settings import ConfigError, build_settings
from sidecar.topology import CatalogNode, build

PREFIX = b"/service/pg/"


def member(port: int, role: str = "replica") -> bytes:
    return json.dumps({"conn_url": f"postgres://db-{port}:{port}/postgres",
                       "role": role, "state": "running", "xlog_location": 1}).encode()  # fmt: skip


def test_the_leader_key_names_the_primary_whatever_a_member_says() -> None:
    keys = {
        PREFIX + b"leader": b"b",
        # a's key still says primary (written before it was demoted): the leader key wins.
        PREFIX + b"members/a": member(5432, "primary"),
        PREFIX + b"members/b": member(5433),
        PREFIX + b"config": b"{}",
        PREFIX + b"status": b'{"optime": 1}',
    }
    assert members(PREFIX, keys) == [
        CatalogNode(id="a", address="db-5432", port=5432, tags=("replica",)),
        CatalogNode(id="b", address="db-5433", port=5433, tags=("primary",)),
    ]


def test_no_leader_means_no_primary_and_broken_members_are_skipped() -> None:
    keys = {
        PREFIX + b"members/a": member(5432),
        PREFIX + b"members/b": b"not json",
        PREFIX + b"members/c": b'{"role": "replica"}',
    }
    assert [(n.id, n.tags) for n in members(PREFIX, keys)] == [("a", ("replica",))]


def test_a_prefix_range_covers_exactly_the_prefix() -> None:
    assert _range_end(b"/service/pg/") == b"/service/pg0"
    assert _range_end(b"a\xff") == b"b"
    assert _range_end(b"\xff\xff") == b"\0"


def test_get_cluster_answers_become_members() -> None:
    document = {"scope": "pg", "members": [
        {"name": "b", "role": "replica", "state": "streaming", "host": "db-b", "port": 5433,
         "api_url": "http://db-b:8008/patroni", "lag": 0},
        {"name": "a", "role": "leader", "state": "running", "host": "db-a", "port": 5432},
        {"name": "broken", "role": "replica"},
    ]}  # fmt: skip
    assert cluster_members(document) == [
        CatalogNode(id="a", address="db-a", port=5432, tags=("primary",)),
        CatalogNode(id="b", address="db-b", port=5433, tags=("replica",)),
    ]


def test_a_patroni_cluster_through_rest_needs_no_registry() -> None:
    rest = {**PATRONI, "rest": ["http://db-a:8008"]}
    settings = build_settings({"databases": {"orders": {"patroni": rest}}})
    assert settings.databases["orders"].patroni is not None


ETCD = {"registry": {"etcd": {"endpoints": ["127.0.0.1:2379"]}}}
PATRONI = {"scope": "pg", "node": {"database": "orders", "user": "app", "password_env": "PW"}}


def test_a_patroni_database_becomes_nodes_named_after_the_scope() -> None:
    settings = build_settings({**ETCD, "databases": {"orders": {"patroni": PATRONI}}})
    assert settings.databases["orders"].patroni is not None
    prefix = settings.databases["orders"].patroni.prefix
    assert prefix == "/service/pg/"
    catalog = {prefix: members(PREFIX, {PREFIX + b"leader": b"b",
                                        PREFIX + b"members/a": member(5432),
                                        PREFIX + b"members/b": member(5433)})}  # fmt: skip
    shard = build(settings, catalog).databases["orders"].shards[0]
    assert shard.primary is not None and shard.primary.name == "pg/b"
    assert [n.name for n in shard.replicas] == ["pg/a"]
    # A failover flips the roles; the nodes (pools, probe state, fencing) are kept.
    flipped = {prefix: members(PREFIX, {PREFIX + b"leader": b"a",
                                        PREFIX + b"members/a": member(5432),
                                        PREFIX + b"members/b": member(5433)})}  # fmt: skip
    old = build(settings, catalog)
    new = build(settings, flipped, previous=old)
    assert {id(n) for n in new.nodes} == {id(n) for n in old.nodes}
    [primary] = [n for n in new.nodes if n.configured_role == "primary"]
    assert primary.name == "pg/a"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"databases": {"orders": {"patroni": PATRONI}}}, "rest addresses, or registry.etcd"),
        (
            {"databases": {"orders": {"patroni": {**PATRONI, "rest": ["pg-a:8008"]}}}},
            r"patroni.rest\[0\]: not an http",
        ),
        (
            {**ETCD, "databases": {"orders": {"service": {"name": "pg"}}}},
            "need registry.consul",
        ),
        (
            {**ETCD, "databases": {"orders": {"patroni": PATRONI, "primary": {"host": "x"}}}},
            "not both",
        ),
        ({"registry": {"etcd": {"endpoints": []}}}, "at least one"),
        ({"registry": {"etcd": {"endpoints": ["nohost"]}}}, "not host:port"),
        ({"registry": {"etcd": {"username": "root"}}}, "go together"),
        ({"registry": {"etcd": {"password_env": "X"}}}, "go together"),
        ({"registry": {"etcd": {"cert_file": "c.pem"}}}, "cert_file and key_file"),
        ({"registry": {"etcd": {}, "consul": {}}}, "not both"),
    ],
)
def test_etcd_and_patroni_settings_are_checked(document: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(document)
