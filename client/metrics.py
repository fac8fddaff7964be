"""Optional Prometheus metrics for the client's sidecar calls.

``client.metrics.enable()`` (once, at startup) registers
``dbsidecar_client_requests_total{database,op,outcome}`` and
``dbsidecar_client_request_duration_seconds{database,op}`` with prometheus-client,
so a service's own /metrics shows its sidecar calls. prometheus-client is imported
only here, only when enabled: the client stays light for services without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Recorder = Callable[[str, str, str, float], None]
_recorder: Recorder | None = None


def enable(registry: Any = None) -> None:
    """Start recording into ``registry`` (default: prometheus-client's global one)."""
    global _recorder
    from prometheus_client import REGISTRY, Counter, Histogram

    target = REGISTRY if registry is None else registry
    requests = Counter(
        "dbsidecar_client_requests_total",
        "Plans sent to the sidecar, by outcome (ok or the error code).",
        ["database", "op", "outcome"],
        registry=target,
    )
    latency = Histogram(
        "dbsidecar_client_request_duration_seconds",
        "Round trip of a plan through the sidecar, as the service sees it.",
        ["database", "op"],
        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0),
        registry=target,
    )  # fmt: skip

    def record(database: str, op: str, outcome: str, seconds: float) -> None:
        requests.labels(database, op, outcome).inc()
        latency.labels(database, op).observe(seconds)

    _recorder = record


def disable() -> None:
    global _recorder
    _recorder = None


def observe(database: str, op: str, outcome: str, seconds: float) -> None:
    if _recorder is not None:
        _recorder(database, op, outcome, seconds)
