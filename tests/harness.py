"""Test helpers: sidecar processes, ports and waiting on conditions (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.02)


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


class SidecarProcess:
    """`dbsidecar run` in a child process with a given configuration document."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "sidecar") -> None:
        SECRETS.update(_config_secrets(config))
        self.workdir = workdir
        self.config = config
        self.port = config["listen"].get("port")
        self.ops_port = config["ops"]["port"]
        self.uds = config["listen"].get("uds")
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        SIDECAR_LOGS.append(self.log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def started() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(self.ops + "/startupz", 0.5)[0] == 200
            except OSError:
                return False

        wait_until(started, timeout, "the sidecar to start")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


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
