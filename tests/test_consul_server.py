"""ConsulTestServer speaks the Consul API the way py-consul expects it.

Every test drives the server through py-consul over real HTTP (plus raw aiohttp where the wire
format itself matters). Blocking queries are ordered with the server's blocked-query counter,
never with sleeps; the only timed waits are the ``wait=`` timeouts under test.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from collections.abc import Iterator

import aiohttp
import consul
import consul.aio
import pytest

from .consul_server import ConsulTestServer, parse_duration

# py-consul's aio client builds its connector with aiohttp's deprecated ssl_context argument.
pytestmark = pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")

TOKEN = "b1gs3cret-acl-token"


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # py-consul prefers CONSUL_HTTP_TOKEN over an explicit token= (and reads CONSUL_HTTP_ADDR).
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[ConsulTestServer]:
    with ConsulTestServer() as srv:
        yield srv


@pytest.fixture
def acl_server() -> Iterator[ConsulTestServer]:
    with ConsulTestServer(acl_token=TOKEN) as srv:
        yield srv


def client(server: ConsulTestServer, token: str | None = None) -> consul.aio.Consul:
    # Must be built inside a running loop: its aiohttp connector needs one.
    return consul.aio.Consul(host="127.0.0.1", port=server.port, token=token)


async def test_kv_round_trip(server: ConsulTestServer) -> None:
    async with client(server) as c:
        assert await c.kv.put("cfg/db/dsn", b"\x00\xffbinary") is True
        index, entry = await c.kv.get("cfg/db/dsn")
        assert isinstance(index, str)  # py-consul returns the X-Consul-Index header verbatim
        assert entry["Key"] == "cfg/db/dsn" and entry["Value"] == b"\x00\xffbinary"
        assert int(index) == entry["ModifyIndex"] == entry["CreateIndex"] == server.index

        assert await c.kv.put("cfg/db/pool", "10") is True
        _, entries = await c.kv.get("cfg/", recurse=True)
        assert [(e["Key"], e["Value"]) for e in entries] == [
            ("cfg/db/dsn", b"\x00\xffbinary"),
            ("cfg/db/pool", b"10"),
        ]
        _, keys = await c.kv.get("cfg/", keys=True, separator="/")
        assert keys == ["cfg/db/"]

        pool_index = entries[1]["ModifyIndex"]
        assert await c.kv.put("cfg/db/pool", "20", cas=pool_index - 1) is False
        assert await c.kv.put("cfg/db/pool", "30", cas=0) is False  # 0 = only if absent
        assert await c.kv.put("cfg/db/pool", "20", cas=pool_index) is True

        assert await c.kv.delete("cfg/db/dsn") is True
        missing_index, missing = await c.kv.get("cfg/db/dsn")
        assert missing is None and int(missing_index) == server.index
    assert server.kv_get("cfg/db/pool") == b"20"


async def test_kv_wire_format(server: ConsulTestServer) -> None:
    index = server.kv_put("blob", b"raw\x00bytes")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/kv/blob") as resp:
            assert resp.status == 200
            assert await resp.json() == [
                {
                    "LockIndex": 0,
                    "Key": "blob",
                    "Flags": 0,
                    "Value": base64.b64encode(b"raw\x00bytes").decode(),
                    "CreateIndex": index,
                    "ModifyIndex": index,
                }
            ]
            assert resp.headers["X-Consul-Index"] == str(index)
            assert resp.headers["X-Consul-KnownLeader"] == "true"
            assert resp.headers["X-Consul-LastContact"] == "0"
        async with http.get(f"{server.url}/v1/kv/blob?raw") as resp:
            assert await resp.read() == b"raw\x00bytes"
        async with http.get(f"{server.url}/v1/kv/absent") as resp:
            assert resp.status == 404 and resp.headers["X-Consul-Index"] == str(index)
        async with http.put(f"{server.url}/v1/kv/empty?flags=7", data=b"") as resp:
            assert await resp.json() is True
        async with http.get(f"{server.url}/v1/kv/empty") as resp:
            [entry] = await resp.json()
            assert entry["Value"] is None and entry["Flags"] == 7  # Consul: empty -> null
        async with http.get(f"{server.url}/v1/kv/blob?index=1&wait=soon") as resp:
            assert resp.status == 400 and await resp.text() == "Invalid wait time"
        async with http.get(f"{server.url}/v1/kv/blob?dc=elsewhere") as resp:
            assert resp.status == 500 and await resp.text() == "No path to datacenter"


async def test_blocking_get_returns_only_after_a_write(server: ConsulTestServer) -> None:
    index = server.kv_put("cfg/mode", "a")
    async with client(server) as c:
        query = asyncio.create_task(c.kv.get("cfg/mode", index=index, wait="5s"))
        await server.wait_blocked(1, path="/v1/kv/cfg/mode")
        assert not query.done()

        # A write elsewhere re-checks the waiter but must not release it; the status
        # round trip is served after that re-check ran, so ``blocked`` is settled.
        server.kv_put("cfg/other", "x")
        assert await c.status.leader() == "127.0.0.1:8300"
        assert server.blocked == 1 and not query.done()

        written = server.kv_put("cfg/mode", "b")
        got, entry = await asyncio.wait_for(query, 2)
    assert int(got) == written == entry["ModifyIndex"] and entry["Value"] == b"b"
    assert server.requests[0].query == {"index": str(index), "wait": "5s"}


async def test_blocking_get_times_out_with_the_same_index(server: ConsulTestServer) -> None:
    index = server.kv_put("cfg/mode", "a")
    loop = asyncio.get_running_loop()
    async with client(server) as c:
        started = loop.time()
        got, entry = await asyncio.wait_for(c.kv.get("cfg/mode", index=index, wait="150ms"), 2)
        elapsed = loop.time() - started
    assert int(got) == index and entry["Value"] == b"a"
    assert 0.14 <= elapsed < 1.5


async def test_blocking_on_a_missing_key_wakes_when_it_is_created(
    server: ConsulTestServer,
) -> None:
    async with client(server) as c:
        index, value = await c.kv.get("feature/flag")
        assert value is None
        query = asyncio.create_task(c.kv.get("feature/flag", index=index, wait="5s"))
        await server.wait_blocked(1)
        created = server.kv_put("feature/flag", "on")
        got, entry = await asyncio.wait_for(query, 2)
    assert int(got) == created and entry["Value"] == b"on"


async def test_index_reset_answers_at_once(server: ConsulTestServer) -> None:
    server.kv_put("k", "v1")
    index = server.kv_put("k", "v2")
    async with client(server) as c:
        # A query parked at the old index is released by the reset ...
        query = asyncio.create_task(c.kv.get("k", index=index, wait="5s"))
        await server.wait_blocked(1)
        server.reset_index(1)
        got, entry = await asyncio.wait_for(query, 2)
        assert int(got) == 1 < index and entry["Value"] == b"v2"
        # ... and one arriving with the stale, higher index is answered without blocking.
        got, _ = await asyncio.wait_for(c.kv.get("k", index=index, wait="5s"), 1)
        assert int(got) == 1
    assert server.kv_put("k", "v3") == 2  # writes carry on from the lowered index


async def test_real_consul_mode_blocks_on_a_lower_index() -> None:
    # Consul's blockingQuery only returns early when the index rises above the client's.
    with ConsulTestServer(lower_index_blocks=True) as srv:
        index = srv.kv_put("k", "v")
        srv.reset_index(1)
        loop = asyncio.get_running_loop()
        async with client(srv) as c:
            started = loop.time()
            got, _ = await asyncio.wait_for(c.kv.get("k", index=index, wait="100ms"), 2)
            assert int(got) == 1 and loop.time() - started >= 0.09


async def test_health_passing_filter_and_tags(server: ConsulTestServer) -> None:
    server.register_service("db-1", "db", "10.0.0.1", 5432, ["primary", "v15"])
    server.register_service("db-2", "db", "10.0.0.2", 5432, ["replica"], status="critical")
    db_index = server.register_service(
        "db-3", "db", "10.0.0.3", 5433, ["replica"], status="warning", node="node2"
    )
    server.register_service("cache-1", "cache", "10.0.0.9", 6379, [])
    async with client(server) as c:
        index, instances = await c.health.service("db")
        assert [i["Service"]["ID"] for i in instances] == ["db-1", "db-2", "db-3"]
        # The index is that of the last change to "db", not the later "cache" write.
        assert int(index) == db_index < server.index

        _, passing = await c.health.service("db", passing=True)  # warning is not passing
        [only] = passing
        assert only["Node"]["Node"] == "node1" and only["Node"]["Address"] == "127.0.0.1"
        service = only["Service"]
        assert (service["ID"], service["Service"], service["Address"], service["Port"]) == (
            "db-1",
            "db",
            "10.0.0.1",
            5432,
        )
        assert service["Tags"] == ["primary", "v15"]
        assert {(ch["CheckID"], ch["Status"]) for ch in only["Checks"]} == {
            ("serfHealth", "passing"),
            ("service:db-1", "passing"),
        }

        _, replicas = await c.health.service("db", tag="replica")
        assert [i["Service"]["ID"] for i in replicas] == ["db-2", "db-3"]
        _, tagged = await c.health.service("db", tag=["primary", "v15"])
        assert [i["Service"]["ID"] for i in tagged] == ["db-1"]
        _, nothing = await c.health.service("unknown")
        assert nothing == []

        server.set_node_status("node1", "critical")  # a failed node fails its instances
        _, passing = await c.health.service("db", passing=True)
        assert passing == []


async def test_agent_register_check_and_deregister_wake_health_queries(
    server: ConsulTestServer,
) -> None:
    async with client(server) as c:
        index, instances = await c.health.service("api")
        assert instances == []
        query = asyncio.create_task(c.health.service("api", index=index, passing=True, wait="5s"))
        await server.wait_blocked(1, path="/v1/health/service/api")
        check = {**consul.Check.ttl("10s"), "Status": "passing"}
        registered = await c.agent.service.register(
            "api", service_id="api-1", address="10.1.0.1", port=8080, tags=["v1"], check=check
        )
        assert registered is True
        index, instances = await asyncio.wait_for(query, 2)
        assert [(i["Service"]["ID"], i["Service"]["Tags"]) for i in instances] == [
            ("api-1", ["v1"])
        ]

        # A failing check drops the instance from passing watchers.
        query = asyncio.create_task(c.health.service("api", index=index, passing=True, wait="5s"))
        await server.wait_blocked(1)
        server.set_check_status("api-1", "critical")
        index, instances = await asyncio.wait_for(query, 2)
        assert instances == []

        # Agent checks start critical unless told otherwise; a TTL pass heals them.
        await c.agent.service.register("api", service_id="api-2", check=consul.Check.ttl("10s"))
        _, instances = await c.health.service("api", passing=True)
        assert instances == []
        assert await c.agent.check.ttl_pass("service:api-2") is True
        index, instances = await c.health.service("api", passing=True)
        assert [i["Service"]["ID"] for i in instances] == ["api-2"]

        query = asyncio.create_task(c.health.service("api", index=index, wait="5s"))
        await server.wait_blocked(1)
        assert await c.agent.service.deregister("api-2") is True
        new_index, instances = await asyncio.wait_for(query, 2)
        assert int(new_index) > int(index)
        assert [i["Service"]["ID"] for i in instances] == ["api-1"]
        assert await c.agent.service.deregister("api-2") is False  # 404, which py-consul eats


async def test_catalog_register_and_deregister(acl_server: ConsulTestServer) -> None:
    async with client(acl_server, TOKEN) as c:
        index, _ = await c.health.service("pg")
        query = asyncio.create_task(c.health.service("pg", index=index, wait="5s"))
        await acl_server.wait_blocked(1)
        registered = await c.catalog.register(
            "ext-node",
            "10.2.0.1",
            service={"Service": "pg", "ID": "pg-ext", "Port": 5432, "Tags": ["external"]},
            check={
                "CheckID": "pg-alive",
                "Name": "alive",
                "Status": "passing",
                "ServiceID": "pg-ext",
            },
        )
        assert registered is True
        index, [instance] = await asyncio.wait_for(query, 2)
        assert instance["Node"]["Node"] == "ext-node" and instance["Node"]["Address"] == "10.2.0.1"
        # No service address given: Consul leaves it empty and clients use the node's.
        assert instance["Service"]["Address"] == "" and instance["Service"]["Port"] == 5432
        assert [(ch["CheckID"], ch["Status"]) for ch in instance["Checks"]] == [
            ("pg-alive", "passing")
        ]

        query = asyncio.create_task(c.health.service("pg", index=index, wait="5s"))
        await acl_server.wait_blocked(1)
        assert await c.catalog.deregister("ext-node", service_id="pg-ext") is True
        _, instances = await asyncio.wait_for(query, 2)
        assert instances == []

    by_path = {r.path: r for r in acl_server.requests}
    register, deregister = by_path["/v1/catalog/register"], by_path["/v1/catalog/deregister"]
    assert register.token == deregister.token == TOKEN
    # py-consul quirk: catalog.register also puts the token in the URL; deregister does not.
    assert register.query["token"] == TOKEN and "token" not in deregister.query


async def test_acl_rejects_wrong_and_missing_tokens(acl_server: ConsulTestServer) -> None:
    acl_server.kv_put("secret/dsn", "postgres://app@db/app")
    acl_server.register_service("db-1", "db", "10.0.0.1", 5432, ["primary"])
    async with client(acl_server, "not-the-token") as c:
        with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
            await c.kv.get("secret/dsn")
        with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
            await c.health.service("db")
    async with client(acl_server) as c:
        with pytest.raises(consul.ACLPermissionDenied, match="Permission denied: anonymous"):
            await c.kv.get("secret/dsn")
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.put("secret/dsn", "stolen")
        with pytest.raises(consul.ACLPermissionDenied):
            await c.agent.service.register("evil")
        # Like Consul, list reads are filtered for the anonymous token rather than refused.
        _, instances = await c.health.service("db")
        assert instances == []
        assert await c.status.leader() == "127.0.0.1:8300"  # needs no token
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{acl_server.url}/v1/health/service/db") as resp:
            assert resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        # Consul also takes ?token= and Bearer; accepted, but recorded so tests can object.
        async with http.get(f"{acl_server.url}/v1/kv/secret/dsn?token={TOKEN}") as resp:
            assert resp.status == 200
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(f"{acl_server.url}/v1/kv/secret/dsn", headers=bearer) as resp:
            assert resp.status == 200
    assert acl_server.requests[-2].query["token"] == TOKEN
    assert acl_server.kv_get("secret/dsn") == b"postgres://app@db/app"


async def test_acl_token_travels_in_the_header(acl_server: ConsulTestServer) -> None:
    acl_server.register_service("db-1", "db", "10.0.0.1", 5432, ["primary"])
    async with client(acl_server, TOKEN) as c:
        assert await c.kv.put("cfg/k", "v") is True
        index, _ = await c.kv.get("cfg/k")
        await c.kv.get("cfg/k", index=index, wait="10ms")
        await c.kv.get("cfg/", recurse=True)
        _, instances = await c.health.service("db", passing=True)
        assert [i["Service"]["ID"] for i in instances] == ["db-1"]
        assert await c.kv.delete("cfg/k") is True
    assert len(acl_server.requests) == 6
    assert all(r.token == TOKEN and "token" not in r.query for r in acl_server.requests)


async def test_pause_drops_connections_and_resume_reuses_the_port(
    server: ConsulTestServer,
) -> None:
    index = server.kv_put("k", "v")
    address = server.address
    async with client(server) as c:
        query = asyncio.create_task(c.kv.get("k", index=index, wait="5s"))
        await server.wait_blocked(1)
        server.pause()
        with pytest.raises(aiohttp.ClientConnectionError):
            await asyncio.wait_for(query, 2)
        with pytest.raises(aiohttp.ClientConnectionError):
            await c.kv.get("k")
        await server.wait_until(lambda s: s.blocked == 0)

        server.kv_put("k", "written while down")  # state stays scriptable while paused
        server.resume()
        assert server.address == address
        _, entry = await c.kv.get("k")
        assert entry["Value"] == b"written while down"


async def test_stop_releases_blocked_queries_and_is_idempotent() -> None:
    srv = ConsulTestServer()
    srv.start()
    index = srv.kv_put("k", "v")
    async with client(srv) as c:
        query = asyncio.create_task(c.kv.get("k", index=index, wait="5s"))
        await srv.wait_blocked(1)
        srv.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await asyncio.wait_for(query, 2)
        srv.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await c.kv.get("k")


def test_sync_client_and_direct_manipulation(server: ConsulTestServer) -> None:
    with consul.Consul(host="127.0.0.1", port=server.port) as c:
        assert c.kv.put("k", "v") is True
        index, entry = c.kv.get("k")
        assert entry["Value"] == b"v"
        server.register_service("db-1", "db", "10.0.0.1", 5432, ["primary"])
        _, instances = c.health.service("db", passing=True)
        assert [i["Service"]["ID"] for i in instances] == ["db-1"]

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            query = pool.submit(c.kv.get, "k", index=index, wait="5s")
            server.wait_until_sync(lambda s: s.blocked == 1)
            written = server.kv_put("k", "w")
            got, entry = query.result(timeout=2)
        assert int(got) == written and entry["Value"] == b"w"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5h", 5400.0), ("0", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10x", "1m 30s", "-"])
def test_parse_duration_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
