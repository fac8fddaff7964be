"""Registry-driven configuration: Consul KV and catalog (through the Consul test server,
which speaks Consul's HTTP API), file and SIGHUP/API reloads, and zero failed requests
while the configuration changes under load."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from client import DbSidecarError
from client.connection import DatabaseHandle
from client.transport import Transport
from devstack.postgres import LocalTopology, PgServer
from wire.protocol import Insert, Raw, Route, Select

from .consul_server import ConsulTestServer
from .harness import SidecarProcess, answers, eventually, free_port, http_get, statements

pytestmark = pytest.mark.slow


def node(topo: LocalTopology, server: PgServer, name: str, database: str = "orders") -> dict:
    return {"name": name, "host": "127.0.0.1", "port": server.port, "database": database,
            "user": topo.user, "password": topo.password}  # fmt: skip


def base_config(**extra: object) -> dict:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "health": {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2},
        **extra,
    }


async def doc(proc: SidecarProcess, path: str = "/healthz") -> dict:
    async with aiohttp.ClientSession() as http, http.get(proc.ops + path) as resp:
        return await resp.json()


async def admin_reload(proc: SidecarProcess) -> dict:
    async with aiohttp.ClientSession() as http, http.post(proc.url + "/v1/admin/reload") as r:
        return await r.json()


def write_atomically(path: Path, config: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


@pytest.fixture
async def handle() -> AsyncIterator[list[Transport]]:
    transports: list[Transport] = []
    yield transports
    for t in transports:
        await t.close()


def database(
    proc: SidecarProcess, transports: list[Transport], name: str = "orders", **options: Any
) -> DatabaseHandle:
    transport = Transport(proc.url)
    transports.append(transport)
    return DatabaseHandle(
        name, transport=transport, database=name, consistency="eventual", **options
    )


async def test_one_hundred_reloads_under_load_fail_no_request(topology, tmp_path, handle) -> None:
    with_replica = base_config(databases={"orders": {
        "primary": node(topology, topology.primary, "p"),
        "replicas": [node(topology, topology.replica, "r")],
        "read_default": "replica", "pool": {"max_size": 5},
    }})  # fmt: skip
    without = base_config(databases={"orders": {
        "primary": node(topology, topology.primary, "p"),
        "read_default": "primary", "pool": {"max_size": 8},
    }})  # fmt: skip
    without["listen"], without["ops"] = with_replica["listen"], with_replica["ops"]
    proc = SidecarProcess(with_replica, tmp_path, "reload")
    proc.start()
    try:
        # No client retries: every failure the sidecar answers reaches a client. Half the
        # clients send one request per plan, half let the client bundle their plans.
        handles = [database(proc, handle, read_retries=0, batching=b) for b in (False, True)]
        failures: list[BaseException] = []
        served: set[str] = set()
        stop = asyncio.Event()
        count = 0

        async def client(i: int) -> None:
            nonlocal count
            while not stop.is_set():
                plan = (
                    Insert(
                        database="orders", table="kv", rows=[{"k": f"load-{i}-{count}", "v": "x"}]
                    )
                    if i % 2
                    else Select(database="orders", table="kv", limit=1, route=Route())
                )
                try:
                    result = await handles[i % 4 // 2].run(plan)
                    served.update(s.node for s in result.served_by)
                    count += 1
                except DbSidecarError as exc:
                    failures.append(exc)

        answers_before = answers(proc.ops)
        statements_before = statements(proc.ops, "orders")
        clients = [asyncio.create_task(client(i)) for i in range(32)]
        results = []
        for i in range(100):
            write_atomically(proc.config_path, without if i % 2 == 0 else with_replica)
            results.append((await admin_reload(proc))["result"])
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        # The file watcher may notice a change before the API call does; either applies it.
        assert set(results) <= {"applied", "unchanged"}
        assert served <= {"p", "r"} and "r" in served
        assert count > 500
        # The sidecar's own counts agree: every request answered 200, and it ran one
        # statement per plan, every one ok.
        answered = answers(proc.ops) - answers_before
        assert set(answered) == {"200"}, answered
        ran = statements(proc.ops, "orders") - statements_before
        assert {outcome for _, outcome in ran} == {"ok"}, ran
        assert ran.total() == count, (ran, count)
        metrics = http_get(proc.ops + "/metrics")[1].decode()
        applied = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("dbsidecar_config_reloads_total")
            and 'result="success"' in line
            and 'source="startup"' not in line
        )
        assert applied == 100
    finally:
        proc.terminate()


async def test_a_reload_that_changes_nothing_does_nothing(sidecar_pair_file) -> None:
    proc, _ = sidecar_pair_file
    before = await doc(proc)
    assert (await admin_reload(proc))["result"] == "unchanged"
    proc.proc.send_signal(signal.SIGHUP)

    async def signal_handled() -> bool:
        metrics = http_get(proc.ops + "/metrics")[1].decode()
        return 'dbsidecar_config_reloads_total{result="unchanged",source="signal"} 1.0' in metrics

    await eventually(signal_handled, 5, "SIGHUP to reload (and find nothing changed)")
    after = await doc(proc)
    assert after["config"]["last_applied"] == before["config"]["last_applied"]


@pytest.fixture
def sidecar_pair_file(topology, tmp_path) -> Iterator[tuple[SidecarProcess, dict]]:
    config = base_config(databases={"orders": {"primary": node(topology, topology.primary, "p")}})
    proc = SidecarProcess(config, tmp_path, "file")
    proc.start()
    yield proc, config
    proc.terminate()


async def test_configmap_symlink_swap_triggers_a_reload(topology, tmp_path, handle) -> None:
    # Kubernetes mounts a ConfigMap as config.yaml -> ..data/config.yaml, ..data -> ..v1,
    # and updates it by pointing ..data at a new directory in one rename.
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    first = base_config(databases={"orders": {"primary": node(topology, topology.primary, "p")}})
    (mount / "..v1" / "config.yaml").write_text(yaml.safe_dump(first))
    (mount / "..data").symlink_to("..v1")
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    proc = SidecarProcess(first, tmp_path, "cm")
    proc.config_path = mount / "config.yaml"
    proc.start()
    try:
        second = dict(first, databases={**first["databases"], "inventory": {
            "primary": node(topology, topology.primary, "inv", "inventory")}})  # fmt: skip
        (mount / "..v2").mkdir()
        (mount / "..v2" / "config.yaml").write_text(yaml.safe_dump(second))
        (mount / "..data_tmp").symlink_to("..v2")
        os.replace(mount / "..data_tmp", mount / "..data")

        async def has_inventory() -> bool:
            return "inventory" in (await doc(proc))["databases"]

        await eventually(has_inventory, 10, "the swapped ConfigMap to be applied")
        inventory = database(proc, handle, "inventory")
        result = await inventory.run(Raw(database="inventory", sql="SELECT 1", writes=False))
        assert result.served_by[0].node == "inv"
    finally:
        proc.terminate()


@pytest.fixture
def consul() -> Iterator[ConsulTestServer]:
    server = ConsulTestServer(acl_token="consul-secret-token")
    server.start()
    yield server
    server.stop()


def registry(consul: ConsulTestServer, tmp_path: Path, **extra: object) -> dict:
    return {"consul": {"address": consul.address, "wait": 2}, "service": "shop",
            "cache_path": str(tmp_path / "registry-cache.yaml"), **extra}  # fmt: skip


@pytest.fixture
def consul_env(monkeypatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "consul-secret-token")


KEY = "dbsidecar/shop/config"


async def test_consul_kv_document_is_applied_and_invalid_ones_refused(
    topology, tmp_path, consul, consul_env, handle
) -> None:
    good = {"databases": {"orders": {"primary": node(topology, topology.primary, "p")}}}
    consul.kv_put(KEY, yaml.safe_dump(good))
    proc = SidecarProcess(base_config(registry=registry(consul, tmp_path)), tmp_path, "kv")
    proc.start()
    try:
        db = database(proc, handle)
        assert (await db.run(Raw(database="orders", sql="SELECT 1", writes=False))).rows
        # A valid change arrives through the blocking query.
        better = {"databases": {**good["databases"], "payments": {
            "primary": node(topology, topology.primary, "pay", "payments")}}}  # fmt: skip
        consul.kv_put(KEY, yaml.safe_dump(better))

        async def has_payments() -> bool:
            return "payments" in (await doc(proc))["databases"]

        await eventually(has_payments, 5, "the new KV document to be applied")
        # Consul restarted with a lower index: the watch starts over and still follows.
        consul.reset_index(1)
        with_inventory = {"databases": {**better["databases"], "inventory": {
            "primary": node(topology, topology.primary, "inv", "inventory")}}}  # fmt: skip
        consul.kv_put(KEY, yaml.safe_dump(with_inventory))

        async def has_inventory() -> bool:
            return "inventory" in (await doc(proc))["databases"]

        await eventually(has_inventory, 10, "the document written after the index reset")
        bad_documents = [
            ("bad yaml", "databases: {orders: [unclosed"),
            ("unknown key", yaml.safe_dump({"databases": {"orders": {"primari": {}}}})),
            (
                "range shard map with a hole",
                yaml.safe_dump(
                    {
                        "databases": {
                            "users": {
                                "sharding": {"key": "id", "function": "range", "bounds": [10]},
                                "shards": [
                                    {
                                        "name": f"s{i}",
                                        "primary": node(topology, topology.primary, f"s{i}"),
                                    }
                                    for i in range(3)
                                ],
                            }
                        }
                    }
                ),
            ),
            ("empty value", ""),
        ]
        for what, text in bad_documents:
            errors_before = await _errors(proc)
            consul.kv_put(KEY, text)

            async def refused(before: float = errors_before) -> bool:
                return await _errors(proc) > before

            await eventually(refused, 5, f"the {what} document to be refused")
            health = await doc(proc)
            assert health["config"]["last_error"]["source"] == "consul", what
            assert "payments" in health["databases"], what  # the last good one still serves
            assert (await doc(proc, "/healthz"))["config"]["last_error"]
        topology_doc = await _data(proc, "/v1/topology")
        assert topology_doc["config"]["last_error"]["message"]
        errors_before = await _errors(proc)
        consul.kv_delete(KEY)
        await eventually(lambda: _more_errors(proc, errors_before), 5, "a deleted key refused")
        payments = database(proc, handle, "payments")
        assert (await payments.run(Raw(database="payments", sql="SELECT 1", writes=False))).rows
        # The token travelled as a header, never in a URL.
        assert all("token" not in r.query for r in consul.requests)
        assert any(r.token == "consul-secret-token" for r in consul.requests)
        assert "consul-secret-token" not in proc.log()
    finally:
        proc.terminate()


async def _errors(proc: SidecarProcess) -> float:
    text = http_get(proc.ops + "/metrics")[1].decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dbsidecar_config_reloads_total") and 'result="error"' in line
    )


async def _more_errors(proc: SidecarProcess, before: float) -> bool:
    return await _errors(proc) > before


async def _data(proc: SidecarProcess, path: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(proc.url + path) as resp:
        return await resp.json()


async def test_consul_down_at_start_uses_the_cache_or_waits_when_required(
    topology, tmp_path, consul, consul_env, handle
) -> None:
    payments = node(topology, topology.primary, "pay", "payments")
    good = {
        "databases": {
            "orders": {"primary": node(topology, topology.primary, "p")},
            "payments": {"primary": payments},
        }
    }
    consul.kv_put(KEY, yaml.safe_dump(good))
    config = base_config(registry=registry(consul, tmp_path))
    first = SidecarProcess(config, tmp_path, "first")
    first.start()  # caches the registry document
    first.terminate()
    assert (tmp_path / "registry-cache.yaml").exists()
    consul.pause()
    cached = SidecarProcess(dict(config, listen={"host": "127.0.0.1", "port": free_port()},
                                 ops={"host": "127.0.0.1", "port": free_port()}),
                            tmp_path, "cached")  # fmt: skip
    cached.start()
    try:
        assert "payments" in (await doc(cached))["databases"]
        metrics = http_get(cached.ops + "/metrics")[1].decode()
        assert "dbsidecar_registry_up 0.0" in metrics
    finally:
        cached.terminate()
    required = dict(config, registry=registry(consul, tmp_path, required=True),
                    listen={"host": "127.0.0.1", "port": free_port()},
                    ops={"host": "127.0.0.1", "port": free_port()})  # fmt: skip
    waiting = SidecarProcess(required, tmp_path, "required")
    waiting.proc = None
    try:
        with pytest.raises(TimeoutError):
            waiting.start(timeout=3)
        assert http_get(waiting.ops + "/startupz")[0] == 503
        consul.resume()

        async def started() -> bool:
            return http_get(waiting.ops + "/startupz")[0] == 200

        await eventually(started, 15, "the sidecar to start once Consul is back")
        # Consul going away later: serving goes on, and it recovers when Consul returns.
        consul.pause()

        async def registry_down() -> bool:
            return "dbsidecar_registry_up 0.0" in http_get(waiting.ops + "/metrics")[1].decode()

        await eventually(registry_down, 10, "the registry to be seen down")
        db = database(waiting, handle)
        assert (await db.run(Raw(database="orders", sql="SELECT 1", writes=False))).rows
        consul.resume()

        async def registry_up() -> bool:
            return "dbsidecar_registry_up 1.0" in http_get(waiting.ops + "/metrics")[1].decode()

        await eventually(registry_up, 40, "the registry to be seen up again")
    finally:
        waiting.terminate()


async def test_catalog_instances_become_nodes(
    topology, tmp_path, consul, consul_env, handle
) -> None:
    template = {"database": "orders", "user": topology.user, "password": topology.password}
    config = base_config(
        registry=registry(consul, tmp_path),
        databases={"orders": {"service": {"name": "orders-db", "node": template}}},
    )
    consul.register_service("pg-a", "orders-db", "127.0.0.1", topology.primary.port, ["primary"])
    proc = SidecarProcess(config, tmp_path, "catalog")
    proc.start()
    try:
        db = database(proc, handle)
        result = await db.run(Raw(database="orders", sql="SELECT 1", writes=True))
        assert result.served_by[0].node == "orders-db/pg-a"
        consul.register_service(
            "pg-b", "orders-db", "127.0.0.1", topology.replica.port, ["replica"]
        )
        read = Raw(database="orders", sql="SELECT 1", writes=False, route=Route(role="replica"))

        async def on_replica() -> bool:
            return (await db.run(read)).served_by[0].node == "orders-db/pg-b"

        await eventually(on_replica, 2, "reads to reach the registered replica")
        consul.deregister_service("pg-b")

        async def drained() -> bool:
            return (await db.run(read)).served_by[0].node == "orders-db/pg-a"

        await eventually(drained, 2, "reads to leave the deregistered replica")
        nodes = {n["name"] for n in (await doc(proc))["databases"]["orders"]["nodes"]}
        assert nodes == {"orders-db/pg-a"}
    finally:
        proc.terminate()


async def test_patroni_style_failover_moves_writes(
    pair, tmp_path, consul, consul_env, handle
) -> None:
    template = {"database": "orders", "user": pair.user, "password": pair.password}
    config = base_config(
        registry=registry(consul, tmp_path),
        databases={"orders": {"service": {"name": "pg", "node": template}}},
    )
    consul.register_service("a", "pg", "127.0.0.1", pair.primary.port, ["master"])
    consul.register_service("b", "pg", "127.0.0.1", pair.replica.port, ["replica"])
    proc = SidecarProcess(config, tmp_path, "patroni")
    proc.start()
    try:
        db = database(proc, handle)
        write = Raw(database="orders", sql="SELECT 1", writes=True)
        assert (await db.run(write)).served_by[0].node == "pg/a"
        await asyncio.to_thread(pair.primary.stop, "immediate")
        replica = await asyncpg.connect(pair.replica.dsn("orders", pair.user, pair.password))
        await replica.execute("SELECT pg_promote()")
        await replica.close()

        async def writes_on_b() -> bool:
            try:
                return (await db.run(write)).served_by[0].node == "pg/b"
            except DbSidecarError:
                return False

        # The probe sees the promotion before the registry says anything, and fences the old
        # primary. Only then does the registry change: were it first, the reload would rebuild
        # pg/b as a primary and the probe would have no change to see.
        async def promotion_seen() -> bool:
            return "pg/b now reports primary role" in proc.log()

        await eventually(promotion_seen, 10, "the probe to see pg/b promoted")
        assert "pg/a fenced" in proc.log()
        await eventually(writes_on_b, 10, "writes to move to the promoted node")
        # Patroni swaps the tags and the old leader's check fails; writes stay on pg/b.
        consul.register_service("b", "pg", "127.0.0.1", pair.replica.port, ["master"])
        consul.set_check_status("a", "critical")

        async def a_retired() -> bool:
            return "retired" in proc.log()

        await eventually(a_retired, 10, "the reload to retire pg/a")
        assert await writes_on_b()
        assert (await doc(proc))["config"]["last_error"] is None
    finally:
        proc.terminate()
