"""Optional Prometheus metrics for sagas run by this process's orchestrators.

``client.saga_metrics.enable()`` (once, at startup) registers
``dbsidecar_client_sagas_started_total{saga}``, ``..._completed_total{saga}``,
``..._compensated_total{saga}`` and the gauge ``dbsidecar_client_sagas_stuck{saga}``
(sagas this process is retrying a compensation of past ``stuck_after`` attempts).
prometheus-client is imported only here, only when enabled: the client stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (saga name, outcome) -> None for counters; (saga name, +1/-1) for the stuck gauge.
_count: Callable[[str, str], None] | None = None
_stuck: Callable[[str, int], None] | None = None


def enable(registry: Any = None) -> None:
    """Start recording into ``registry`` (default: prometheus-client's global one)."""
    global _count, _stuck
    from prometheus_client import REGISTRY, Counter, Gauge

    target = REGISTRY if registry is None else registry
    counters = {
        outcome: Counter(
            f"dbsidecar_client_sagas_{outcome}_total",
            f"Sagas {outcome} by this process's orchestrators.",
            ["saga"],
            registry=target,
        )
        for outcome in ("started", "completed", "compensated")
    }
    stuck = Gauge(
        "dbsidecar_client_sagas_stuck",
        "Sagas whose compensation this process keeps retrying past stuck_after attempts.",
        ["saga"],
        registry=target,
    )

    def count(saga: str, outcome: str) -> None:
        counters[outcome].labels(saga).inc()

    def move_stuck(saga: str, delta: int) -> None:
        stuck.labels(saga).inc(delta)

    _count, _stuck = count, move_stuck


def disable() -> None:
    global _count, _stuck
    _count = _stuck = None


def counted(saga: str, outcome: str) -> None:
    """One saga ``started``, ``completed`` or ``compensated``."""
    if _count is not None:
        _count(saga, outcome)


def stuck(saga: str, delta: int) -> None:
    """A saga became stuck (+1) or is no longer (-1)."""
    if _stuck is not None:
        _stuck(saga, delta)
