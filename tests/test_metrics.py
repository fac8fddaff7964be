"""Metrics, logs and the status view: values move as they must, a real Prometheus
scrapes them, request ids flow end to end, and no secret ever reaches a log line."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import client.metrics
from client import ActiveRecord, ConnectionManager, PlanError
from client.connection import DatabaseHandle
from client.transport import Transport, request_id
from sidecar.status import quantile
from wire.protocol import Raw, Route, Select, Update

from .conftest import sidecar_config
from .harness import SidecarProcess, eventually, free_port, http_get, wait_until

pytestmark = pytest.mark.usefixtures("handles")


def scrape(proc: SidecarProcess, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(proc.ops + "/metrics", headers={"Accept": accept or ""})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_metrics_move_with_the_workload(sidecar) -> None:
    db = DatabaseHandle(
        "m", transport=Transport(sidecar.url), database="orders", consistency="eventual"
    )
    before, content_type = scrape(sidecar)
    assert content_type.startswith("text/plain")
    await db.run(Raw(database="orders", sql="SELECT 1", writes=False, route=Route(role="replica")))
    for _ in range(2):  # the same shape twice: the second compile is a cache hit
        await db.run(Select(database="orders", table="kv", limit=1))
    users = ConnectionManager.get("users")
    with pytest.raises(PlanError):
        await users.run(Update(database="users", table="users", values={"score": 1},
                               where={"col": "name", "op": "=", "value": "x"}))  # fmt: skip
    after, _ = scrape(sidecar)

    def moved(name: str, **labels: str) -> float:
        return samples(after, name, **labels) - samples(before, name, **labels)

    assert moved("dbsidecar_queries_total", database="orders", role="replica", op="raw",
                 outcome="ok") == 1  # fmt: skip
    assert moved("dbsidecar_routing_decisions_total", database="orders", decision="replica") == 1
    assert moved("dbsidecar_routing_decisions_total", database="users", decision="refused") == 1
    assert moved("dbsidecar_requests_total", endpoint="/v1/query", code="400") == 1
    assert moved("dbsidecar_query_duration_seconds_count", database="orders", role="replica") == 1
    assert samples(after, "dbsidecar_node_up", database="orders", node="replica/orders") == 1
    assert samples(after, "dbsidecar_node_role_is_primary", node="primary/orders") == 1
    assert samples(after, "dbsidecar_pool_max_connections", node="primary/orders") == 10
    assert samples(after, "dbsidecar_build_info") == 1
    assert samples(after, "dbsidecar_config_reloads_total", source="startup", result="success") == 1
    assert moved("dbsidecar_compile_cache_lookups_total", result="hit") >= 1
    # No unbounded labels: nothing that looks like SQL or a value.
    for family in text_string_to_metric_families(after):
        for sample in family.samples:
            for value in sample.labels.values():
                assert "SELECT" not in value and len(value) < 80, sample
    await db.transport.close()


async def test_lagging_replica_shows_lag_in_metrics(sidecar, topology, primary) -> None:
    import asyncpg

    from .conftest import server_dsn

    replica = await asyncpg.connect(server_dsn(topology, topology.replica, "orders"))
    await replica.execute("SELECT pg_wal_replay_pause()")
    try:
        await primary.execute("INSERT INTO kv VALUES ('lagmetric', repeat('x', 1000))")

        async def lagging() -> bool:
            text, _ = scrape(sidecar)
            return samples(text, "dbsidecar_replica_lag_bytes", node="replica/orders") > 0

        await eventually(lagging, 5, "lag to show in /metrics")
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()


def test_openmetrics_is_negotiated(sidecar) -> None:
    text, content_type = scrape(sidecar, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_a_real_prometheus_scrapes_the_sidecar(sidecar, tmp_path) -> None:
    # A required server: missing, the test fails (Debian package prometheus; .ci/run installs it).
    assert shutil.which("prometheus") and shutil.which("promtool"), "install prometheus"
    text, _ = scrape(sidecar)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dbsidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar.ops_port}']}}]\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("w"),
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1/query?query="
    try:

        def query(expr: str) -> list:
            status, body = http_get(api + urllib.parse.quote(expr), 2)
            return json.loads(body)["data"]["result"] if status == 200 else []

        def scraped_twice() -> bool:
            try:
                scrapes = query('count_over_time(up{job="dbsidecar"}[1m])')
            except OSError:
                return False
            return bool(scrapes) and float(scrapes[0]["value"][1]) >= 2

        # Traffic between scrapes, so the rate below has something to show.
        for _ in range(20):
            http_get(sidecar.ops + "/livez")
        asyncio.run(_some_queries(sidecar))
        wait_until(scraped_twice, 30, "two scrapes of the sidecar")
        asyncio.run(_some_queries(sidecar))

        def has_queries() -> bool:
            return bool(query("dbsidecar_queries_total"))

        wait_until(has_queries, 10, "dbsidecar_queries_total in Prometheus")
        up = query('up{job="dbsidecar"}')
        assert up and up[0]["value"][1] == "1"
        rate = "rate(dbsidecar_query_duration_seconds_bucket[1m])"
        p99 = query(f"histogram_quantile(0.99, sum by (le) ({rate}))")
        assert p99, "the histogram_quantile expression returned nothing"
    finally:
        prom.terminate()
        prom.wait(30)


async def _some_queries(proc: SidecarProcess) -> None:
    transport = Transport(proc.url)
    db = DatabaseHandle("p", transport=transport, database="orders", consistency="eventual")
    for _ in range(20):
        await db.run(Raw(database="orders", sql="SELECT 1", writes=False))
    await transport.close()


@pytest.fixture(scope="module")
def chatty_sidecar(topology, workdir) -> Iterator[SidecarProcess]:
    """Debug logs, the access log and every statement logged as slow, behind a token."""
    config = sidecar_config(topology, workdir, "chatty")
    config["auth_token"] = "tok-" + topology.password[::-1]
    config["logging"] = {"level": "debug", "access_log": True, "slow_query_ms": 0}
    proc = SidecarProcess(config, workdir, "chatty")
    proc.start()
    yield proc
    proc.terminate()


async def test_request_ids_flow_through_logs_and_back(chatty_sidecar) -> None:
    transport = Transport(chatty_sidecar.url, token=chatty_sidecar.config["auth_token"])
    db = DatabaseHandle("c", transport=transport, database="orders", read_retries=0)
    reset = request_id.set("req-12345")
    try:
        await db.run(Raw(database="orders", sql="SELECT 1", writes=False))
        with pytest.raises(PlanError) as err:
            await db.run(Raw(database="orders", sql="SELEC 1", writes=False))
        assert err.value.request_id == "req-12345"
    finally:
        request_id.reset(reset)
    await transport.close()
    lines = [json.loads(line) for line in chatty_sidecar.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-12345"]
    events = {line["event"] for line in mine}
    assert {"request", "slow query"} <= events, events
    slow = next(line for line in mine if line["event"] == "slow query")
    assert slow["database"] == "orders" and slow["node"] == "primary/orders"
    assert "SELEC" not in json.dumps(slow)  # the shape, never the text or values
    async with (
        aiohttp.ClientSession() as http,
        http.get(chatty_sidecar.url + "/v1/topology", headers={"X-Request-ID": "abc-1"}) as resp,
    ):
        assert resp.status == 401  # no token
        assert resp.headers["X-Request-ID"] == "abc-1"


async def test_no_secret_reaches_a_log_line(chatty_sidecar, topology) -> None:
    # Provoke errors: bad token, a failing statement, a refused plan.
    bearer = {"Authorization": f"Bearer {topology.password}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(chatty_sidecar.url + "/v1/query", json={"op": "count"}, headers=bearer),
    ):
        pass
    text = chatty_sidecar.log()
    assert text.strip(), "the sidecar logged nothing"
    for secret in (topology.password, chatty_sidecar.config["auth_token"]):
        assert secret not in text


def test_status_shows_traffic_and_nodes(sidecar) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "status", "--ops", sidecar.ops],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "REQ/S" in result.stdout and "P99" in result.stdout
    orders = next(line for line in result.stdout.splitlines() if line.startswith("orders "))
    assert float(orders.split()[1]) > 0  # orders has served requests


def test_quantile_matches_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.38)
    assert quantile(0.5, {float("inf"): 0.0}) is None


async def test_client_metrics_hook(sidecar) -> None:
    registry = CollectorRegistry()
    client.metrics.enable(registry)
    try:
        await ActiveRecord.execute_raw("SELECT 1", writes=False)
    finally:
        client.metrics.disable()
    value = registry.get_sample_value(
        "dbsidecar_client_requests_total", {"database": "orders", "op": "raw", "outcome": "ok"}
    )
    assert value == 1
    assert (
        registry.get_sample_value(
            "dbsidecar_client_request_duration_seconds_count", {"database": "orders", "op": "raw"}
        )
        == 1
    )


def test_grafana_dashboard_uses_only_exposed_metrics(sidecar) -> None:
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).parent.parent / "config" / "grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"dbsidecar_[a-z_]+", e)}
    text, _ = scrape(sidecar)
    exposed = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    } | {family.name for family in text_string_to_metric_families(text)}
    # registry_up only exists while a registry is configured.
    missing = used - exposed - {"dbsidecar_registry_up"}
    assert not missing, missing
