"""W3C trace context on the sidecar calls, for apps that trace with OpenTelemetry.

``client.tracing.enable()`` (once, at startup) makes every plan carry the current
OpenTelemetry context as ``traceparent``/``tracestate`` (headers over HTTP, fields of a
channel frame), so the sidecar's spans (routing, pool acquire, statements) join the
app's trace. OpenTelemetry's API is imported only here, only when enabled: the client
stays light for services without it.
"""

from __future__ import annotations

from collections.abc import Callable

_inject: Callable[[dict[str, str]], None] | None = None


def enable() -> None:
    """Send the current context with every call (OpenTelemetry's configured propagator,
    W3C trace context by default)."""
    global _inject
    from opentelemetry.propagate import inject

    _inject = inject


def disable() -> None:
    global _inject
    _inject = None


def context() -> dict[str, str] | None:
    """The current trace context as headers; None when off or outside any span."""
    if _inject is None:
        return None
    carrier: dict[str, str] = {}
    _inject(carrier)
    return carrier or None
