"""Test helpers: sidecar processes whose logs are scanned for secrets, ports, waiting on
conditions (never fixed sleeps) and reading a sidecar's metrics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import devstack.sidecar_process

# Re-exported (the `as` says so): test modules take every helper from this one place.
from devstack.http import http_get as http_get
from devstack.ports import free_port as free_port
from devstack.waiting import wait_until as wait_until


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {within} s waiting for {what}")
        await asyncio.sleep(interval)


# Every sidecar log of the session and every secret its configuration held: the
# session ends with a scan that fails the run if any secret reached a log line.
SIDECAR_LOGS: list[Path] = []
SECRETS: set[str] = set()


def _config_secrets(config: dict[str, Any]) -> set[str]:
    found = {config.get("auth_token") or ""}
    for db in config.get("databases", {}).values():
        nodes = [db.get("primary"), *db.get("replicas", [])]
        for shard in db.get("shards", []):
            nodes += [shard["primary"], *shard.get("replicas", [])]
        found |= {(n or {}).get("password") or "" for n in nodes}
    return {s for s in found if len(s) >= 4}


class SidecarProcess(devstack.sidecar_process.SidecarProcess):
    """A sidecar child whose configured secrets and log join the session's leak scan."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "sidecar") -> None:
        SECRETS.update(_config_secrets(config))
        super().__init__(config, workdir, name)
        SIDECAR_LOGS.append(self.log_path)


def samples(ops: str, name: str) -> list[tuple[dict[str, str], float]]:
    """A sidecar's samples named ``name`` (``dbsidecar_queries_total``, ...) with their
    labels, read from its ops port's /metrics."""
    # Imported here: the parser is a sidecar dependency the other helpers do not need.
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(ops + "/metrics")
    assert status == 200, status
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    ]


def counter(ops: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for have, v in samples(ops, name) if labels.items() <= have.items())


def answers(ops: str) -> Counter[str]:
    """A sidecar's answers to plans (/v1/query) and bundles (/v1/bundle) by status code.
    A bundle answers 200 with any per-plan errors inside it."""
    counts: Counter[str] = Counter()
    for labels, value in samples(ops, "dbsidecar_requests_total"):
        if labels["endpoint"] in ("/v1/query", "/v1/bundle"):
            counts[labels["code"]] += int(value)
    return counts


def statements(ops: str, database: str) -> Counter[tuple[str, str]]:
    """Statements a sidecar ran on one database's nodes, by (role, outcome)."""
    counts: Counter[tuple[str, str]] = Counter()
    for labels, value in samples(ops, "dbsidecar_queries_total"):
        if labels["database"] == database:
            counts[labels["role"], labels["outcome"]] += int(value)
    return counts
