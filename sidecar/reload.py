"""Configuration at run time: its sources, reloads, and applying a change safely.

Sources, later winning: the file, ``DBSIDECAR_*`` environment variables, the registry's
document (a Consul KV key or an etcd key); plus the Consul catalog for databases that name
a service, and Patroni's keys in etcd for databases that follow a Patroni cluster. A
reload (file change, SIGHUP, ``POST /v1/admin/reload``, a registry change) composes them
and validates the result before anything changes: an invalid, unparsable, empty or
deleted document is refused, the last good configuration keeps serving, and the
error is kept for /healthz, /v1/topology and ``dbsidecar_config_reloads_total``.

Applying builds the new routing table completely first (pools for new nodes, their
first probes), swaps it in at once, and retires removed nodes only after every
request that started on the old table has finished. Unchanged nodes keep their
pools and probes; a reload that changes nothing does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from . import logs, metrics
from .health import Prober
from .patroni_rest import PatroniRest
from .registry import Registry
from .runtime import Runtime
from .settings import (
    ConfigError,
    PatroniSettings,
    Settings,
    build_settings,
    env_overrides,
    merge,
    parse_document,
    read_document,
)
from .topology import CatalogNode, Node, Topology, build, close_pools, open_pools


class Host(Protocol):
    """What a configuration is applied to: the running sidecar (its SidecarState). A
    protocol, so this module needs nothing of the state's own module."""

    runtime: Runtime
    started: bool
    prober: Prober

    @property
    def topology(self) -> Topology: ...


log = logging.getLogger("dbsidecar.config")

Result = Literal["applied", "unchanged", "error"]
# Settings that only take effect when the process starts.
_RESTART_ONLY = ("listen", "ops", "registry")


def _services(settings: Settings) -> set[str]:
    """The catalogs the registry watches: Consul services, Patroni clusters' etcd keys."""
    names = set()
    for db in settings.databases.values():
        for holder in (db, *db.shards):
            if holder.service is not None:
                names.add(holder.service.name)
            if holder.patroni is not None and not holder.patroni.rest:
                names.add(holder.patroni.prefix)
    return names


def _rest_clusters(settings: Settings) -> dict[str, PatroniSettings]:
    """The Patroni clusters followed through their REST API, by catalog name."""
    return {
        holder.patroni.prefix: holder.patroni
        for db in settings.databases.values()
        for holder in (db, *db.shards)
        if holder.patroni is not None and holder.patroni.rest
    }


def _register_secrets(settings: Settings) -> None:
    """Mask every secret of these settings in logs and answers, before anything runs
    with them (a reload may bring new passwords)."""
    for secret in settings.secrets():
        logs.register_secret(secret)


class ConfigManager:
    def __init__(self, path: str | None, environ: Mapping[str, str] = os.environ) -> None:
        self.path = path
        self.env_doc = env_overrides(environ)
        self.file_doc = self._read_file()
        self.current = build_settings(merge(self.file_doc, self.env_doc))
        self.bootstrap = self.current
        self.registry_doc: dict[str, Any] | None = None
        self.catalog: dict[str, list[CatalogNode]] = {}
        self._applied_catalog: dict[str, list[CatalogNode]] = {}
        self.registry: Registry | None = None
        self.patroni_rest = PatroniRest(self._on_catalog)
        self.state: Host | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_applied = time.time()
        self._lock = asyncio.Lock()
        self._file_signature = self._signature()
        self._tasks: set[asyncio.Task[None]] = set()

    # Sources
    def _read_file(self) -> dict[str, Any]:
        return {} if self.path is None else read_document(self.path)

    def _signature(self) -> tuple[object, ...] | None:
        """What changes when the file does, including a ConfigMap's symlink swap."""
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return ("missing",)
        return (os.path.realpath(self.path), st.st_ino, st.st_mtime_ns, st.st_size)

    def compose(self, registry_doc: dict[str, Any] | None = None) -> Settings:
        doc = merge(self.file_doc, self.env_doc)
        registry_doc = self.registry_doc if registry_doc is None else registry_doc
        if registry_doc is not None:
            if "registry" in registry_doc:
                raise ConfigError("registry: where the registry is cannot come from the registry")
            doc = merge(doc, registry_doc)
        return build_settings(doc)

    # Startup
    async def start(self, state: Host) -> None:
        """Read the registry (waiting for it if required), then build the first table."""
        self.state = state
        self.registry = self._open_registry()
        if self.registry is not None:
            self.registry.start()
            await self._first_document()
        settings = self._startup_settings()
        _register_secrets(settings)
        if self.registry is not None:
            self.registry.watch_services(_services(settings))
            if not await self.registry.services_seen(5.0):
                log.warning("some catalogs did not answer yet; their nodes come later")
        self.patroni_rest.watch(_rest_clusters(settings))
        if not await self.patroni_rest.seen(5.0):
            log.warning("some Patroni REST APIs did not answer yet; their nodes come later")
        topology = build(settings, self.catalog)
        await open_pools(topology)
        await state.prober.watch(topology.nodes)
        self._swap(settings, topology)
        self._applied_catalog = dict(self.catalog)
        metrics.config_reloads.labels("startup", "success").inc()
        metrics.config_last_success.set(time.time())
        if self.path is not None:
            self._background(self._watch_file())

    def _open_registry(self) -> Registry | None:
        # Imported only when configured: etcd's client brings gRPC (~10 MiB resident).
        bootstrap = self.bootstrap.registry
        if bootstrap.consul is not None:
            from .registry_consul import ConsulRegistry

            return ConsulRegistry(
                bootstrap.consul, bootstrap.key, self._on_document, self._on_catalog
            )
        if bootstrap.etcd is not None:
            from .registry_etcd import EtcdRegistry

            return EtcdRegistry(bootstrap.etcd, bootstrap.key, self._on_document, self._on_catalog)
        return None

    async def _first_document(self) -> None:
        assert self.registry is not None
        required = self.bootstrap.registry.required
        while True:
            try:
                await asyncio.wait_for(self.registry.document_seen.wait(), 5.0)
                return
            except TimeoutError:
                if not required:
                    break
                log.warning(
                    "waiting for the registry at %s (registry.required)", self.registry.where
                )
        cached = self._read_cache()
        if cached is not None:
            log.warning("registry unreachable; starting from its cached document")
            self.registry_doc = cached
        else:
            log.warning("registry unreachable and no cached document; starting from file and env")

    def _startup_settings(self) -> Settings:
        try:
            return self.compose()
        except ConfigError as exc:
            # A bad registry document must not stop the start: file and env still hold.
            assert self.registry is not None  # only a registry document can be bad here
            self._failed(self.registry.source, exc)
            self.registry_doc = None
            return self.compose()

    def _read_cache(self) -> dict[str, Any] | None:
        path = self.bootstrap.registry.cache_path
        if not path or not os.path.exists(path):
            return None
        try:
            return parse_document(Path(path).read_text(), path)
        except (OSError, ConfigError) as exc:
            log.warning("ignoring the registry cache %s: %s", path, exc)
            return None

    def _write_cache(self, text: str) -> None:
        path = self.bootstrap.registry.cache_path
        if not path:
            return
        tmp = f"{path}.tmp"
        try:
            Path(tmp).write_text(text)
            os.replace(tmp, path)  # atomic: a crash never leaves half a document
        except OSError as exc:
            log.warning("cannot write the registry cache %s: %s", path, exc.strerror)

    # Registry callbacks
    async def _on_document(self, raw: bytes | None) -> None:
        assert self.registry is not None
        source = self.registry.source
        try:
            if raw is None or not raw.strip():
                if self.registry_doc is None:
                    # No registry document was ever taken (a registry used for its
                    # catalog only): file and env are the configuration, nothing is lost.
                    return
                raise ConfigError(f"{self.bootstrap.registry.key}: the key is missing or empty")
            text = raw.decode("utf-8", errors="replace")
            doc = parse_document(text, f"{source} key {self.bootstrap.registry.key}")
            self.compose(doc)  # validate before taking it
        except ConfigError as exc:
            self._failed(source, exc)
            return
        self.registry_doc = doc
        self._write_cache(text)
        if self.state is not None and self.state.started:
            await self.reload(source)

    async def _on_catalog(self, service: str, instances: list[CatalogNode]) -> None:
        self.catalog[service] = instances
        if self.state is not None and self.state.started:
            await self.reload("catalog")

    # Reloads
    async def reload(self, source: str) -> Result:
        async with self._lock:
            try:
                # Whatever asked, the file is read again: SIGHUP and the API mean "look".
                self.file_doc = self._read_file()
                self._file_signature = self._signature()
                settings = self.compose()
            except ConfigError as exc:
                self._failed(source, exc)
                return "error"
            if settings == self.current and self.catalog == self._applied_catalog:
                # The sources are good again (a fix restoring the running document).
                self.last_error = None
                metrics.config_reloads.labels(source, "unchanged").inc()
                return "unchanged"
            try:
                await self._apply(settings)
            except Exception as exc:
                self._failed(source, exc)
                return "error"
            self.last_error = None
            self.last_applied = time.time()
            metrics.config_reloads.labels(source, "success").inc()
            metrics.config_last_success.set(self.last_applied)
            log.info("configuration applied", extra={"source": source})
            return "applied"

    def _failed(self, source: str, exc: BaseException) -> None:
        # ConfigErrors never quote values; an apply error (asyncpg, OS) could, and this
        # message reaches the unauthenticated ops port.
        message = logs.redact(str(exc))
        self.last_error = {"source": source, "message": message, "at": time.time()}
        metrics.config_reloads.labels(source, "error").inc()
        log.error("configuration refused, the last good one stays", extra={
            "source": source, "error": message,
        })  # fmt: skip

    async def _apply(self, settings: Settings) -> None:
        state = self.state
        assert state is not None
        for key in _RESTART_ONLY:
            if getattr(settings, key) != getattr(self.current, key):
                log.warning("%s changed; it takes effect at the next restart", key)
        _register_secrets(settings)
        old = state.topology
        topology = build(settings, self.catalog, previous=old)
        await open_pools(topology)
        await state.prober.watch(topology.nodes)
        self._swap(settings, topology)
        self._applied_catalog = dict(self.catalog)
        if self.registry is not None:
            self.registry.watch_services(_services(settings))
        self.patroni_rest.watch(_rest_clusters(settings))
        kept = set(topology.nodes)
        removed = [n for n in old.nodes if n not in kept]
        if removed:
            self._background(self._retire(old, removed))

    def _swap(self, settings: Settings, topology: Topology) -> None:
        state = self.state
        assert state is not None
        self.current = settings
        state.runtime = state.runtime.renewed(settings, topology)

    async def _retire(self, old: Topology, removed: list[Node]) -> None:
        assert self.state is not None
        await self.state.prober.forget(removed)
        await old.released()
        await close_pools(removed)
        log.info("retired %d nodes", len(removed))

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.bootstrap.registry.file_poll_interval)
            signature = self._signature()
            if signature != self._file_signature:
                self._file_signature = signature
                await self.reload("file")

    def reload_soon(self, source: str) -> None:
        """Reload without waiting for it (from a signal handler)."""
        self._background(self._reload_quietly(source))

    async def _reload_quietly(self, source: str) -> None:
        await self.reload(source)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        # Kept until done (then dropped, so a hundred reloads leave nothing behind).
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.registry is not None:
            await self.registry.stop()
        await self.patroni_rest.stop()

    def document(self) -> dict[str, Any]:
        """For /healthz and /v1/topology."""
        return {
            "last_applied": self.last_applied,
            "last_error": self.last_error,
            "registry": None
            if self.registry is None
            else {"key": self.registry.key, "up": self.registry.up},
        }
