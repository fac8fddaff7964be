"""What a registry is to the configuration manager, whichever one is configured.

A registry (Consul: ``registry_consul``; etcd: ``registry_etcd``) holds the configuration
document under a key and, optionally, the nodes of databases that follow a catalog (a
Consul service, a Patroni cluster). It watches both and reports through two callbacks:
the document's raw bytes (None when the key is missing), and a catalog's current
members. The configuration manager validates and applies; the registry only reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from .topology import CatalogNode

OnDocument = Callable[[bytes | None], Awaitable[None]]
OnCatalog = Callable[[str, list[CatalogNode]], Awaitable[None]]


class Registry(Protocol):
    # The name reloads, errors and metrics give this source ("consul", "etcd").
    source: str
    # Where it is, for log lines (addresses only, never a credential).
    where: str
    key: str
    # None until the first answer; then whether the registry answers.
    up: bool | None
    # Set once the document was read (present or not).
    document_seen: asyncio.Event

    def start(self) -> None:
        """Start watching the document."""

    def watch_services(self, names: set[str]) -> None:
        """Watch exactly these catalogs (start new watches, stop dropped ones)."""

    async def services_seen(self, within: float) -> bool:
        """Wait until every watched catalog was read once; False if that took too long."""

    async def stop(self) -> None:
        """Stop every watch and close the connections."""


async def all_seen(events: Iterable[asyncio.Event], within: float) -> bool:
    """Wait until every watch has had its first answer; False if that took too long."""
    waits = [e.wait() for e in events]
    if not waits:
        return True
    try:
        await asyncio.wait_for(asyncio.gather(*waits), within)
    except TimeoutError:
        return False
    return True


async def cancel_all(tasks: dict[str, asyncio.Task[None]]) -> None:
    """Cancel every watch task, wait for them to end and forget them."""
    running = list(tasks.values())
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    tasks.clear()
