"""Patroni's keys read as members (pure), and the settings of the etcd registry and of
databases that follow a Patroni cluster (no servers needed)."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from sidecar import logs
from sidecar.patroni import members
from sidecar.patroni_rest import PatroniRest, cluster_members
from sidecar.registry_etcd import _range_end
from sidecar.reload import _register_secrets
from sidecar.settings import ConfigError, PatroniSettings, build_settings
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


@pytest.mark.parametrize(
    "document",
    [
        {"databases": {"orders": {"patroni": {**PATRONI, "rest": ["http://db-a:8008"]}}}},
        {
            "registry": {"consul": {}},
            "databases": {"orders": {"service": {"name": "pg", "node": PATRONI["node"]}}},
        },
        {
            **ETCD,
            "databases": {
                "orders": {
                    "sharding": {"function": "modulo", "key": "id"},
                    "shards": [{"name": "s0", "patroni": PATRONI}],
                }
            },
        },
    ],
    ids=["patroni-rest", "consul-service", "shard-patroni"],
)
def test_the_password_discovered_nodes_connect_with_is_masked(
    document: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes found in a catalog connect with the section's node template: its password is
    registered as a secret like a listed node's (it was not, so a log line quoting it
    showed it)."""
    secret = f"template-pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("PW", secret)
    _register_secrets(build_settings(document))
    assert secret not in logs.redact(f"connecting with {secret}")


async def test_rest_polling_forgets_members_the_cluster_no_longer_reports() -> None:
    """Each answer's members are where to ask next; one no longer reported (a rescheduled
    pod's old address) is not asked again. Kept from every answer, they piled up, and
    while the configured member failed every one of them was tried, in turn, each poll."""
    seed = "http://seed:8008"
    answers = 0
    failing = False
    tried: list[str] = []
    round_done = asyncio.Event()

    async def get(url: str) -> dict:
        nonlocal answers, failing
        url = url.removesuffix("/cluster")
        tried.append(url)
        if not failing:
            answers += 1
            failing = answers == 20
            # The leader moved to a new address each time (the old one is gone).
            return {"members": [{"name": "a", "role": "leader", "host": f"db-{answers}",
                                 "port": 5432,
                                 "api_url": f"http://db-{answers}:8008/patroni"}]}  # fmt: skip
        if url == seed and tried.count(seed) > answers + 1:
            round_done.set()  # the seed failed twice: a whole round in between
        raise aiohttp.ClientConnectionError("down")

    async def on_catalog(name: str, found: list[CatalogNode]) -> None:
        return None

    poller = PatroniRest(on_catalog)
    poller._get = get  # type: ignore[method-assign]
    settings = build_settings(
        {"databases": {"orders": {"patroni": {**PATRONI, "rest": [seed], "interval": 0.001}}}}
    )
    cluster = settings.databases["orders"].patroni
    assert cluster is not None
    poller.watch({cluster.prefix: cluster})
    try:
        await asyncio.wait_for(round_done.wait(), 10)
    finally:
        await poller.stop()
    first_failure = tried.index(seed, answers)
    last_round = tried[first_failure + 1 : tried.index(seed, first_failure + 1)]
    assert last_round == ["http://db-20:8008"], last_round


async def test_a_reload_changing_the_rest_addresses_polls_the_new_ones() -> None:
    """Before: a cluster's poll kept the settings it started with, so a reload giving the
    same scope other rest addresses (or interval) changed nothing until a restart."""
    asked: dict[str, asyncio.Event] = {"old": asyncio.Event(), "new": asyncio.Event()}

    async def get(url: str) -> dict:
        asked["old" if url.startswith("http://old") else "new"].set()
        return {"members": [{"name": "a", "role": "leader", "host": "db-a", "port": 5432}]}

    async def on_catalog(name: str, found: list[CatalogNode]) -> None:
        return None

    def cluster(rest: str) -> PatroniSettings:
        document = {"patroni": {**PATRONI, "rest": [rest], "interval": 0.01}}
        found = build_settings({"databases": {"orders": document}}).databases["orders"].patroni
        assert found is not None
        return found

    poller = PatroniRest(on_catalog)
    poller._get = get  # type: ignore[method-assign]
    try:
        old = cluster("http://old:8008")
        poller.watch({old.prefix: old})
        await asyncio.wait_for(asked["old"].wait(), 10)
        first = poller._tasks[old.prefix]
        poller.watch({old.prefix: old})  # unchanged: the same poll goes on
        assert poller._tasks == {old.prefix: first}
        new = cluster("http://new:8008")
        poller.watch({new.prefix: new})
        await asyncio.wait_for(asked["new"].wait(), 10)
        await asyncio.gather(first, return_exceptions=True)
        assert first.cancelled()  # the poll of the old addresses is gone
    finally:
        await poller.stop()
