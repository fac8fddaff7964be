"""Tracing: the client sends the app's OpenTelemetry context, and a sidecar configured with
``tracing.otlp_endpoint`` continues the trace with spans for the request, routing, each
statement and each pool acquire, exported by OpenTelemetry's own OTLP/HTTP exporter to a
receiver here that decodes them with OpenTelemetry's protobuf types. The app's side is
traced with the SDK's in-memory exporter. Spans never carry a value."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client import UniqueViolation, tracing
from client.connection import DatabaseHandle
from client.transport import Transport
from devstack.postgres import LocalTopology
from wire.protocol import Insert, Raw, Select

from .conftest import sidecar_config
from .harness import SidecarProcess, eventually

pytestmark = pytest.mark.slow


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent: str
    name: str
    attributes: dict[str, Any]
    status: int
    message: str


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1/traces"

    async def _export(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    self.spans.append(Span(s.trace_id.hex(), s.span_id.hex(),
                                           s.parent_span_id.hex(), s.name, attributes,
                                           s.status.code, s.status.message))  # fmt: skip
        return web.Response(content_type="application/x-protobuf", body=b"")

    def of(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    yield found
    assert found.runner is not None
    await found.runner.cleanup()


@pytest.fixture
def traced(topology: LocalTopology, tmp_path: Path, receiver: Receiver) -> Iterator[SidecarProcess]:
    config = sidecar_config(topology, tmp_path, "traced")
    config["tracing"] = {"otlp_endpoint": receiver.url, "export_interval": 0.05,
                         "headers": {"x-api-key": "tracing-secret-key"}}  # fmt: skip
    proc = SidecarProcess(config, tmp_path, "traced")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture
def app_tracer() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable()
    try:
        yield provider.get_tracer("shop"), exporter
    finally:
        tracing.disable()
        provider.shutdown()


@pytest.mark.parametrize("mode", ["channel", "http"])
async def test_the_sidecar_continues_the_apps_trace_without_values(
    traced: SidecarProcess, receiver: Receiver, app_tracer: Any, mode: str
) -> None:
    tracer, exported = app_tracer
    marker = f"never-in-a-span-{uuid.uuid4().hex}"
    transport = Transport(traced.url, mode=mode)  # type: ignore[arg-type]
    db = DatabaseHandle("traced", transport=transport, database="orders", read_retries=0)
    key = f"trace-{uuid.uuid4().hex}"
    try:
        with tracer.start_as_current_span("checkout"):
            where = {"col": "status", "op": "=", "value": marker}
            await db.run(Select(database="orders", table="orders", where=where))
            await db.run(Insert(database="orders", table="kv", rows=[{"k": key, "v": marker}]))
            with pytest.raises(UniqueViolation):
                await db.run(Insert(database="orders", table="kv", rows=[{"k": key, "v": "x"}]))
    finally:
        await transport.close()
    (app_span,) = exported.get_finished_spans()
    trace_id = f"{app_span.context.trace_id:032x}"

    async def exported_all() -> bool:
        return len([s for s in receiver.of(trace_id) if s.name == "dbsidecar.execute"]) == 3

    await eventually(exported_all, 10, "the sidecar's spans to be exported")
    spans = receiver.of(trace_id)
    servers = [s for s in spans if s.name == "dbsidecar /v1/query"]
    assert len(servers) == 3
    # Each request is a child of the app's span, and the rest hangs under it.
    assert {s.parent for s in servers} == {f"{app_span.context.span_id:016x}"}
    by_id = {s.span_id: s for s in spans}
    for name in ("dbsidecar.route", "dbsidecar.execute"):
        assert {by_id[s.parent].name for s in spans if s.name == name} == {"dbsidecar /v1/query"}
    acquires = [s for s in spans if s.name == "dbsidecar.pool.acquire"]
    assert len(acquires) == 3 and {by_id[s.parent].name for s in acquires} == {"dbsidecar.execute"}
    executes = [s for s in spans if s.name == "dbsidecar.execute"]
    assert {(s.attributes["db.namespace"], s.attributes["dbsidecar.role"]) for s in executes} == {
        ("orders", "primary")
    }
    assert {s.attributes["dbsidecar.op"] for s in executes} == {"select", "insert"}
    assert all(s.attributes["dbsidecar.node"] for s in executes)
    # The failed insert: its statement's span is marked by the error code, its message
    # (which quotes the key) kept out; the request's span is not failed by a 4xx.
    failed = [s for s in spans if s.status == 2]
    assert [(s.name, s.message) for s in failed] == [("dbsidecar.execute", "unique_violation")]
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 200, 409]
    for span in spans:
        text = repr(span.attributes) + span.message
        assert marker not in text and key not in text


async def test_without_enable_the_apps_trace_is_not_sent(
    traced: SidecarProcess, receiver: Receiver
) -> None:
    """Inside an app's span but without client.tracing.enable(), nothing is sent: the
    sidecar's spans make a trace of their own (sampled at its ratio)."""
    provider = TracerProvider()
    transport = Transport(traced.url, mode="http")
    db = DatabaseHandle("traced", transport=transport, database="orders")
    try:
        with provider.get_tracer("shop").start_as_current_span("checkout") as app_span:
            await db.run(Raw(database="orders", sql="SELECT 1", writes=False))
    finally:
        await transport.close()
        provider.shutdown()
    app_trace = f"{app_span.get_span_context().trace_id:032x}"

    async def exported() -> bool:
        return any(s.name == "dbsidecar /v1/query" for s in receiver.spans)

    await eventually(exported, 10, "the sidecar's request span")
    requests = [s for s in receiver.spans if s.name == "dbsidecar /v1/query"]
    assert requests and all(not s.parent and s.trace_id != app_trace for s in requests)


def test_off_by_default_nothing_of_opentelemetry_is_loaded() -> None:
    """The request path's modules, loaded as `dbsidecar run` loads them, import no
    OpenTelemetry while tracing is not configured (the hot path checks one flag), nor
    any other optional client: etcd's (gRPC, ~10 MiB resident), NATS'."""
    code = (
        "import sys, sidecar.app, sidecar.cli, sidecar.reload, client; "
        "loaded = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('opentelemetry', 'aetcd', 'grpc', 'nats')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_bad_tracing_setting_is_named_and_its_secret_not_echoed(tmp_path: Path) -> None:
    tracing_section = {"otlp_endpoint": "http://collector:4318/v1/traces", "sample_ratio": 2,
                       "headers": {"x-api-key": "hush-hush-key"}}  # fmt: skip
    config = {"listen": {"port": 7999}, "databases": {}, "tracing": tracing_section}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "tracing" in done.stderr and "sample_ratio" in done.stderr
    assert "hush-hush-key" not in done.stderr + done.stdout


async def test_a_malformed_trace_context_is_ignored_not_refused(
    traced: SidecarProcess, receiver: Receiver
) -> None:
    """A hostile or broken traceparent/tracestate starts a trace of the sidecar's own; the
    plan runs as it would without them."""
    plan = {"op": "raw", "database": "orders", "sql": "SELECT 1", "writes": False}
    bad = [
        {"traceparent": "00-not-a-trace-01"},
        {"traceparent": "ff" * 40, "tracestate": "x" * 4000},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},  # all-zero ids: invalid
    ]
    async with aiohttp.ClientSession() as http:
        for headers in bad:
            async with http.post(traced.url + "/v1/query", json=plan, headers=headers) as resp:
                assert resp.status == 200, await resp.text()

    async def exported() -> bool:
        return len([s for s in receiver.spans if s.name == "dbsidecar /v1/query"]) >= len(bad)

    await eventually(exported, 10, "the sidecar's request spans")
    assert all(not s.parent for s in receiver.spans if s.name == "dbsidecar /v1/query")
