"""Consul as a configuration source: a KV key holding the document, and the health
catalog holding the nodes of databases that name a service.

Both are watched with blocking queries as Consul's documentation asks: an explicit
``wait`` well below the HTTP client's timeout, the index reset when Consul's goes
backwards or is not positive, and jittered exponential back-off on errors. The ACL
token comes from ``CONSUL_HTTP_TOKEN`` or a file and travels as the
``X-Consul-Token`` header (py-consul sends it so), never in a URL or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import consul
import consul.aio

from . import logs
from .registry import OnCatalog, OnDocument, all_seen, cancel_all
from .settings import ConfigError, ConsulSettings
from .topology import CatalogNode

log = logging.getLogger("dbsidecar.registry")

_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, consul.ConsulException)


def consul_token(settings: ConsulSettings) -> str | None:
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    if not token and settings.token_file:
        try:
            token = Path(settings.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"registry.consul.token_file: cannot read it: {exc.strerror}"
            ) from None
    logs.register_secret(token)
    return token or None


def _next_index(previous: int | None, reported: Any) -> int | None:
    """The index for the next blocking query (None: ask without blocking)."""
    index = int(reported) if reported is not None else 0
    if index <= 0:
        return None  # never block on a non-positive index
    if previous is not None and index < previous:
        log.warning("consul index went backwards (%d < %d); starting over", index, previous)
        return None
    return index


class ConsulRegistry:
    source = "consul"

    def __init__(
        self, settings: ConsulSettings, key: str, on_document: OnDocument, on_catalog: OnCatalog
    ) -> None:
        self.settings = settings
        self.where = settings.address
        self.key = key
        self.on_document = on_document
        self.on_catalog = on_catalog
        host, _, port = settings.address.rpartition(":")
        cert = (settings.cert_file, settings.key_file) if settings.cert_file else None
        self._client = consul.aio.Consul(
            host=host or settings.address,
            port=int(port) if port.isdigit() else 8500,
            scheme=settings.scheme,
            token=consul_token(settings),
            verify=settings.ca_file or (settings.scheme == "https"),
            cert=cert,
            # Blocking queries return after `wait` (plus up to wait/16 of jitter).
            connections_timeout=settings.wait * 1.25 + 10,
        )
        # None until the first answer; then whether Consul answers.
        self.up: bool | None = None
        self.document_seen = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._services_seen: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        self._tasks["kv"] = asyncio.create_task(self._watch_kv(), name="consul kv watch")

    def watch_services(self, names: set[str]) -> None:
        """Watch exactly these services (start new watches, stop dropped ones)."""
        for name in names - {n[8:] for n in self._tasks if n.startswith("service:")}:
            self._services_seen[name] = asyncio.Event()
            self._tasks[f"service:{name}"] = asyncio.create_task(
                self._watch_service(name), name=f"consul service {name}"
            )
        for task_name in [n for n in self._tasks if n.startswith("service:")]:
            if task_name[8:] not in names:
                self._tasks.pop(task_name).cancel()
                self._services_seen.pop(task_name[8:], None)

    async def services_seen(self, within: float) -> bool:
        """Wait until every watched service was read once; False if that took too long."""
        return await all_seen(self._services_seen.values(), within)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        with contextlib.suppress(Exception):
            await self._client.close()

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if up != self.up:
            if up:
                log.warning("consul at %s answers", self.settings.address)
            else:
                log.warning("consul at %s unreachable: %s", self.settings.address, error)
        self.up = up

    async def _watch(self, fetch: Callable[[int | None], Awaitable[int | None]]) -> None:
        index: int | None = None
        backoff = 0.5
        while True:
            try:
                index = await fetch(index)
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                self._mark(False, exc)
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, 30.0)
                continue
            self._mark(True)
            backoff = 0.5

    async def _watch_kv(self) -> None:
        wait = f"{self.settings.wait:g}s"

        async def fetch(index: int | None) -> int | None:
            reported, item = await self._client.kv.get(self.key, index=index, wait=wait)
            following = _next_index(index, reported)
            if following != index or not self.document_seen.is_set():
                await self.on_document(None if item is None else item.get("Value"))
                self.document_seen.set()
            return following

        await self._watch(fetch)

    async def _watch_service(self, name: str) -> None:
        wait = f"{self.settings.wait:g}s"
        seen = self._services_seen[name]

        async def fetch(index: int | None) -> int | None:
            reported, entries = await self._client.health.service(
                name, passing=True, index=index, wait=wait
            )
            following = _next_index(index, reported)
            if following != index or not seen.is_set():
                await self.on_catalog(name, [_instance(e) for e in entries])
                seen.set()
            return following

        await self._watch(fetch)


def _instance(entry: dict[str, Any]) -> CatalogNode:
    service = entry["Service"]
    return CatalogNode(
        id=service["ID"],
        address=service.get("Address") or entry["Node"]["Address"],
        port=int(service["Port"]),
        tags=tuple(service.get("Tags") or ()),
    )
