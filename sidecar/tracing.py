"""OpenTelemetry tracing of the request path, when ``tracing.otlp_endpoint`` is set.

A request continues the caller's trace (W3C ``traceparent``/``tracestate``, from HTTP
headers or a channel frame) with a server span, and under it a span for routing, one
per statement on a node (``dbsidecar.execute``) and one for each pool acquire. Spans
carry the database, shard, node, role and the plan's kind, never a value or SQL text.
Spans are exported by OpenTelemetry's OTLP/HTTP exporter in batches.

Off (the default), nothing of OpenTelemetry is imported, and the request path checks
one module flag, :data:`ENABLED`, before it builds anything. The SDK is an optional
extra (``pip install 'dbsidecar[tracing]'``). Tracing is set up at start: a reload
does not change it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from .settings import TracingSettings

# The one flag the request path reads; True only after setup() succeeded.
ENABLED = False
# What the request path enters instead of a span while tracing is off: ``with (span(...)
# if ENABLED else NO_SPAN) as s`` builds no attributes then, and ``s`` is None.
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


class TracingUnavailable(RuntimeError):
    """Tracing is configured but OpenTelemetry's SDK is not installed."""


def setup(settings: TracingSettings) -> None:
    """Start exporting spans as ``settings`` says (no-op without an endpoint)."""
    global ENABLED, _tracer, _provider
    if settings.otlp_endpoint is None:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing.otlp_endpoint is set but OpenTelemetry is missing ({exc.name}): "
            "pip install 'dbsidecar[tracing]'"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        # The caller's sampling decision wins; a root span samples at the ratio.
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, headers=settings.headers)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=settings.export_interval * 1000)
    )
    # A provider of our own, not the global one: a library in the process that traces
    # cannot take it over, and we never replace someone else's.
    _provider, _tracer = provider, provider.get_tracer("dbsidecar")
    ENABLED = True


def shutdown() -> None:
    """Flush what is buffered and stop exporting (at exit)."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    ENABLED, _tracer, _provider = False, None, None


@contextlib.contextmanager
def request(name: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """The server span of one request, continuing the trace its headers carry."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    carrier = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    with _tracer.start_as_current_span(
        f"dbsidecar {name}", context=extract(carrier), kind=SpanKind.SERVER,
        record_exception=False, set_status_on_exception=False,
    ) as current:  # fmt: skip
        current.set_attribute("dbsidecar.endpoint", name)
        with _failures_named(current):
            yield current


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, str | int | None]) -> Iterator[Any]:
    """A span under the current one; attributes that are None are left out."""
    assert _tracer is not None
    with _tracer.start_as_current_span(
        name, record_exception=False, set_status_on_exception=False
    ) as current:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(key, value)
        with _failures_named(current):
            yield current


@contextlib.contextmanager
def _failures_named(current: Any) -> Iterator[None]:
    """A failure marks the span by its error code only: an exception's message (which
    OpenTelemetry records by default) may quote a value, such as a duplicate key's."""
    from opentelemetry.trace import Status, StatusCode

    try:
        yield
    except BaseException as exc:
        current.set_status(Status(StatusCode.ERROR, getattr(exc, "code", type(exc).__name__)))
        raise


def answered(current: Any, status: int) -> None:
    """A request span's HTTP status; as OpenTelemetry's HTTP conventions say, only a 5xx
    (the sidecar's failure) marks a server span failed, a 4xx is the caller's."""
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute("http.response.status_code", status)
    if status >= 500:
        current.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
