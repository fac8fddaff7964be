"""etcd as the registry: the configuration document under a key, watched through a real
etcd (authentication on, TLS in its own test), with invalid documents refused, a watch
resumed across a cut connection, history compacted while the sidecar was away, the disk
cache, and registry.required."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from client.transport import Transport
from devstack.postgres import LocalTopology
from wire.protocol import Raw

from .etcd_server import Certificates, CuttableProxy, EtcdServer
from .harness import SidecarProcess, eventually, free_port, http_get
from .test_reload import _errors, base_config, database, doc, node

pytestmark = pytest.mark.slow

KEY = "dbsidecar/shop/config"
PASSWORD_ENV = "DBSIDECAR_TEST_ETCD_PASSWORD"


@pytest.fixture
async def handle() -> AsyncIterator[list[Transport]]:
    transports: list[Transport] = []
    yield transports
    for transport in transports:
        await transport.close()


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    """The etcd root password, in the environment the sidecar children inherit."""
    value = secrets.token_urlsafe(18)
    monkeypatch.setenv(PASSWORD_ENV, value)
    return value


@pytest.fixture
def etcd(tmp_path: Path, password: str) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path)
    server.start()
    try:
        server.enable_auth(password)
        yield server
    finally:
        server.stop()


@pytest.fixture
async def proxy(etcd: EtcdServer) -> AsyncIterator[CuttableProxy]:
    async with CuttableProxy(etcd.port) as cuttable:
        yield cuttable


def registry(endpoint: str, tmp_path: Path, **extra: object) -> dict:
    etcd = {"endpoints": [endpoint], "username": "root", "password_env": PASSWORD_ENV}
    return {"etcd": etcd, "service": "shop", "cache_path": str(tmp_path / "cache.yaml"), **extra}


def orders(topology: LocalTopology, *more: str) -> str:
    databases = {"orders": {"primary": node(topology, topology.primary, "p")}}
    for name in more:
        databases[name] = {"primary": node(topology, topology.primary, name, name)}
    return yaml.safe_dump({"databases": databases})


async def has(proc: SidecarProcess, name: str) -> bool:
    return name in (await doc(proc))["databases"]


async def test_etcd_document_watched_refused_resumed_and_compacted(
    topology, tmp_path, etcd, proxy, password, handle
) -> None:
    etcd.put(KEY, orders(topology))
    config = base_config(registry=registry(proxy.endpoint, tmp_path))
    proc = SidecarProcess(config, tmp_path, "etcd")
    # In a thread: the proxy runs on this event loop, and start() blocks until ready.
    await asyncio.to_thread(proc.start)
    try:
        db = database(proc, handle)
        assert (await db.run(Raw(database="orders", sql="SELECT 1", writes=False))).rows
        # A change arrives through the watch.
        etcd.put(KEY, orders(topology, "payments"))
        await eventually(lambda: has(proc, "payments"), 5, "the new document to be applied")

        bad_documents = [
            ("bad yaml", "databases: {orders: [unclosed"),
            ("unknown key", yaml.safe_dump({"databases": {"orders": {"primari": {}}}})),
            ("registry inside", yaml.safe_dump({"registry": {"service": "other"}})),
            ("empty value", ""),
        ]
        for what, text in bad_documents:
            before = await _errors(proc)
            etcd.put(KEY, text)

            async def refused(before: float = before) -> bool:
                return await _errors(proc) > before

            await eventually(refused, 5, f"the {what} document to be refused")
            health = await doc(proc)
            assert health["config"]["last_error"]["source"] == "etcd", what
            assert "payments" in health["databases"], what  # the last good one serves
        before = await _errors(proc)
        etcd.delete(KEY)
        await eventually(lambda: _more(proc, before), 5, "a deleted key to be refused")
        etcd.put(KEY, orders(topology, "payments"))

        async def good_again() -> bool:
            return (await doc(proc))["config"]["last_error"] is None

        await eventually(good_again, 5, "the good document to clear the error")

        # The connection is cut; changes made meanwhile arrive when the watch resumes
        # after the last revision it saw.
        proxy.cut()
        await eventually(lambda: _registry_up(proc, 0), 10, "the registry to be seen down")
        etcd.put(KEY, orders(topology, "payments", "inventory"))
        proxy.restore()
        await eventually(lambda: has(proc, "inventory"), 20, "the change made while cut off")
        assert "compacted" not in full_log(proc)

        # Cut again, and etcd compacts its history past every revision the watch could
        # resume from: the watch starts over from a fresh read.
        proxy.cut()
        await eventually(lambda: _registry_up(proc, 0), 10, "the registry to be seen down")
        etcd.put(KEY, orders(topology, "payments", "inventory", "users"))
        etcd.compact(etcd.put("unrelated", "x"))
        proxy.restore()
        await eventually(lambda: has(proc, "users"), 20, "the document after the compaction")
        assert "etcd compacted its history" in full_log(proc)
        assert (await doc(proc))["config"]["last_error"] is None
        assert yaml.safe_load((tmp_path / "cache.yaml").read_text())["databases"]["users"]
        assert password not in full_log(proc)
    finally:
        proc.terminate()


def full_log(proc: SidecarProcess) -> str:
    return proc.log_path.read_text(errors="replace")


async def _more(proc: SidecarProcess, before: float) -> bool:
    return await _errors(proc) > before


async def _registry_up(proc: SidecarProcess, up: int) -> bool:
    metrics = http_get(proc.ops + "/metrics")[1].decode()
    return f"dbsidecar_registry_up {up:.1f}" in metrics


def _fresh_ports(config: dict) -> dict:
    return dict(config, listen={"host": "127.0.0.1", "port": free_port()},
                ops={"host": "127.0.0.1", "port": free_port()})  # fmt: skip


async def test_etcd_down_at_start_uses_the_cache_or_waits_when_required(
    topology, tmp_path, etcd, proxy, handle
) -> None:
    etcd.put(KEY, orders(topology, "payments"))
    config = base_config(registry=registry(proxy.endpoint, tmp_path))
    first = SidecarProcess(config, tmp_path, "first")
    try:
        await asyncio.to_thread(first.start)  # caches the registry document
    finally:
        first.terminate()
    proxy.cut()
    cached = SidecarProcess(_fresh_ports(config), tmp_path, "cached")
    await asyncio.to_thread(cached.start)
    try:
        assert await has(cached, "payments")
        assert await _registry_up(cached, 0)
    finally:
        cached.terminate()
    required = _fresh_ports(
        dict(config, registry=registry(proxy.endpoint, tmp_path, required=True))
    )
    waiting = SidecarProcess(required, tmp_path, "required")
    try:
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(waiting.start, 3)
        assert http_get(waiting.ops + "/startupz")[0] == 503
        proxy.restore()

        async def started() -> bool:
            return http_get(waiting.ops + "/startupz")[0] == 200

        await eventually(started, 15, "the sidecar to start once etcd answers")
        db = database(waiting, handle, "payments")
        assert (await db.run(Raw(database="payments", sql="SELECT 1", writes=False))).rows
        assert await _registry_up(waiting, 1)
    finally:
        waiting.terminate()


async def test_etcd_over_tls_with_a_client_certificate(topology, tmp_path, handle) -> None:
    certificates = Certificates(tmp_path / "tls").create()
    server = EtcdServer(tmp_path, tls=certificates)
    server.start()
    try:
        server.put(KEY, orders(topology, "payments"))
        tls = {"ca_file": str(certificates.ca), "cert_file": str(certificates.client_cert),
               "key_file": str(certificates.client_key)}  # fmt: skip
        config = base_config(registry={"etcd": {"endpoints": [server.endpoint], **tls},
                                       "service": "shop"})  # fmt: skip
        proc = SidecarProcess(config, tmp_path, "tls")
        proc.start()
        try:
            assert await has(proc, "payments")
            server.put(KEY, orders(topology, "payments", "inventory"))
            await eventually(lambda: has(proc, "inventory"), 5, "a change over TLS")
        finally:
            proc.terminate()
    finally:
        server.stop()


def test_check_config_names_a_bad_etcd_key_without_its_value(tmp_path) -> None:
    secret = "pw-" + secrets.token_urlsafe(12)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"registry": {"etcd": {"endpoints": ["127.0.0.1:2379"],
                                                          "pasword": secret}}}))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pasword" in result.stderr and "registry.etcd" in result.stderr
    assert secret not in result.stderr + result.stdout
