"""Patroni clusters followed through their REST API, for clusters whose keys are not in
the registry's etcd (Kubernetes or Consul DCS, another etcd).

``GET /cluster`` on any member answers every member (name, host, port, role). Patroni has
no blocking query, so it is polled every ``patroni.interval``; each answer also teaches
the members' own API addresses, so the cluster is still followed when the configured
member is the one that is gone. The sidecar's probes decide, as with every catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .registry import OnCatalog, all_seen, cancel_all
from .settings import PatroniSettings
from .topology import CatalogNode

log = logging.getLogger("dbsidecar.registry")

# Patroni's roles that take writes (a standby cluster's leader replicates from outside
# and is in recovery; its probe says so).
_LEADER_ROLES = ("leader", "standby_leader", "master", "primary")


def cluster_members(document: dict[str, Any]) -> list[CatalogNode]:
    """The members of a ``GET /cluster`` answer, the leader tagged ``primary``."""
    found = []
    for member in document.get("members") or []:
        try:
            name, host, port = str(member["name"]), str(member["host"]), int(member["port"])
        except (KeyError, TypeError, ValueError):
            continue
        role = "primary" if member.get("role") in _LEADER_ROLES else "replica"
        found.append(CatalogNode(id=name, address=host, port=port, tags=(role,)))
    return sorted(found, key=lambda node: node.id)


def _api_base(url: str) -> str | None:
    """``http://host:8008`` from a member's ``api_url`` (``http://host:8008/patroni``)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


class PatroniRest:
    """One polling task per cluster followed through REST, named by its catalog name."""

    def __init__(self, on_catalog: OnCatalog) -> None:
        self.on_catalog = on_catalog
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._seen: dict[str, asyncio.Event] = {}
        # The settings each poll runs with.
        self._clusters: dict[str, PatroniSettings] = {}
        self._session: aiohttp.ClientSession | None = None

    def watch(self, clusters: dict[str, PatroniSettings]) -> None:
        """Follow exactly these clusters (start new polls, restart those whose settings
        changed, stop dropped ones)."""
        for name, cluster in clusters.items():
            if name in self._tasks and self._clusters[name] == cluster:
                continue
            # A reload that changes a cluster's rest addresses or interval (same scope)
            # restarts its poll: kept running with the old ones, it ignored the change.
            if name in self._tasks:
                self._tasks.pop(name).cancel()
            self._seen.setdefault(name, asyncio.Event())
            self._clusters[name] = cluster
            self._tasks[name] = asyncio.create_task(
                self._poll(name, cluster), name=f"patroni rest {name}"
            )
        for name in list(self._tasks.keys() - clusters.keys()):
            self._tasks.pop(name).cancel()
            del self._seen[name], self._clusters[name]

    async def seen(self, within: float) -> bool:
        """Wait until every cluster answered once; False if that took too long."""
        return await all_seen(self._seen.values(), within)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()

    async def _poll(self, name: str, cluster: PatroniSettings) -> None:
        # Configured members first, then those the cluster's last answer reported.
        configured = [u.rstrip("/") for u in cluster.rest]
        urls = list(configured)
        reported: list[CatalogNode] | None = None
        failing = False
        # An answer may take up to an interval (at least a second): a member that accepts
        # and never answers must not stall the poll.
        limit = max(cluster.interval, 1.0)
        while True:
            for url in list(urls):
                try:
                    async with asyncio.timeout(limit):
                        document = await self._get(url + "/cluster")
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    if not failing:
                        log.warning("Patroni REST API at %s: %s", url, exc or type(exc).__name__)
                    failing = True
                    continue
                if failing:
                    log.warning("Patroni REST API at %s answers", url)
                failing = False
                found = cluster_members(document)
                # Only the last answer's members: kept from every answer, the addresses
                # of members long gone (a rescheduled pod's old IP) piled up for as long
                # as the sidecar ran, each tried in turn while the configured ones fail.
                urls = list(configured)
                for member in document.get("members") or []:
                    base = _api_base(str(member.get("api_url") or ""))
                    if base is not None and base not in urls:
                        urls.append(base)
                if found != reported:
                    reported = found
                    await self.on_catalog(name, found)
                self._seen[name].set()
                break
            await asyncio.sleep(cluster.interval)

    async def _get(self, url: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(url) as resp:
            resp.raise_for_status()
            document = await resp.json(content_type=None)
        if not isinstance(document, dict):
            raise ValueError("GET /cluster did not answer an object")
        return document
