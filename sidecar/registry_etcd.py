"""etcd as a configuration source: a key holding the document, and the keys Patroni keeps
for the clusters databases follow, each read once and then watched (never polled).

Revisions: a read gives the store's revision, and the watch starts right after it, so no
change between the two is missed. After a lost connection the watch resumes after the
last revision it saw (changes made meanwhile arrive as events). A start revision that etcd
has compacted away cannot be resumed; the watch then starts over from a fresh read.

Every error closes the client and opens a new one, after a jittered exponential back-off,
on the next endpoint. A new client also authenticates anew: aetcd authenticates only when
it connects, and etcd refuses a token that expired while idle or that predates a change
to its users. The password comes from an environment variable or a file, travels only in
etcd's Authenticate call, and is masked in every log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import aetcd
import aetcd.rpc
import grpc

from . import logs, patroni
from .registry import OnCatalog, OnDocument, all_seen, cancel_all
from .settings import ConfigError, EtcdSettings
from .topology import CatalogNode

log = logging.getLogger("dbsidecar.registry")

_ERRORS = (aetcd.ClientError, grpc.RpcError, OSError, TimeoutError)
# A watch is one long gRPC stream: HTTP/2 pings find a dead connection (a vanished member,
# a dropped NAT entry) that would otherwise leave the watch waiting for ever. etcd refuses
# pings more often than every 5 s (--grpc-keepalive-min-time).
_CHANNEL_OPTIONS = {"grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000}

# The keys under watch, by key: their values, whenever one changes.
OnKeys = Callable[[dict[bytes, bytes]], Awaitable[None]]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"registry.etcd.{what}: cannot read it: {exc.strerror}") from None


def etcd_password(settings: EtcdSettings) -> str | None:
    """The password from its environment variable or file, registered as a secret."""
    password: str | None = None
    if settings.password_env is not None:
        password = os.environ.get(settings.password_env)
        if password is None:
            raise ConfigError(
                f"registry.etcd.password_env: environment variable {settings.password_env} "
                "is not set"
            )
    elif settings.password_file is not None:
        password = _read(settings.password_file, "password_file").decode().strip()
    logs.register_secret(password)
    return password


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA or a client certificate is configured."""
    if settings.ca_file is None and settings.cert_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=None if settings.ca_file is None else _read(settings.ca_file, "ca_file"),
        private_key=None if settings.key_file is None else _read(settings.key_file, "key_file"),
        certificate_chain=None
        if settings.cert_file is None
        else _read(settings.cert_file, "cert_file"),
    )


class _Client(aetcd.Client):
    """aetcd's client on a channel opened here: aetcd opens plaintext channels only (its
    issue #37, TLS support, is open), so connecting is done here for both kinds. Each
    client serves one watching task, so no two connects ever race."""

    def __init__(
        self, endpoint: str, credentials: grpc.ChannelCredentials | None, **kwargs: object
    ) -> None:
        host, _, port = endpoint.rpartition(":")
        super().__init__(host=host, port=int(port), **kwargs)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        options = list(self._options.items())
        if self._credentials is None:
            self.channel = aetcd.rpc.insecure_channel(target, options=options)
        else:
            self.channel = aetcd.rpc.secure_channel(target, self._credentials, options=options)
        if self._username is not None:
            self.auth_stub = aetcd.rpc.AuthStub(self.channel)
            request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
            response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", response.token),)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


class EtcdRegistry:
    source = "etcd"

    def __init__(
        self, settings: EtcdSettings, key: str, on_document: OnDocument, on_catalog: OnCatalog
    ) -> None:
        self.settings = settings
        self.key = key
        self.where = ",".join(settings.endpoints)
        self.on_document = on_document
        self.on_catalog = on_catalog
        # Read now, so a missing file or variable fails the start, not every reconnect.
        self._password = etcd_password(settings)
        self._credentials = _credentials(settings)
        self._endpoint = 0
        self.up: bool | None = None
        self.document_seen = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._clusters_seen: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        key = self.key.encode()
        self._tasks["document"] = asyncio.create_task(
            self._follow(key, key + b"\0", self._document), name="etcd document watch"
        )

    def watch_services(self, names: set[str]) -> None:
        """Follow exactly these Patroni clusters, named by key prefix (the settings refuse
        Consul services under ``registry.etcd``)."""
        for name in names - self._clusters_seen.keys():
            self._clusters_seen[name] = asyncio.Event()
            self._tasks[name] = asyncio.create_task(
                self._follow(name.encode(), _range_end(name.encode()), self._cluster(name)),
                name=f"etcd patroni {name}",
            )
        for name in list(self._clusters_seen.keys() - names):
            self._tasks.pop(name).cancel()
            del self._clusters_seen[name]

    async def services_seen(self, within: float) -> bool:
        return await all_seen(self._clusters_seen.values(), within)

    def _cluster(self, name: str) -> OnKeys:
        seen = self._clusters_seen[name]
        reported: list[CatalogNode] | None = None

        async def on_keys(keys: dict[bytes, bytes]) -> None:
            nonlocal reported
            found = patroni.members(name.encode(), keys)
            # Members rewrite their keys every loop_wait (positions); only a change of
            # members, addresses or leader is news.
            if found != reported:
                reported = found
                await self.on_catalog(name, found)
            seen.set()

        return on_keys

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    async def _document(self, keys: dict[bytes, bytes]) -> None:
        await self.on_document(keys.get(self.key.encode()))
        self.document_seen.set()

    def _client(self) -> _Client:
        return _Client(
            self.settings.endpoints[self._endpoint % len(self.settings.endpoints)],
            self._credentials,
            username=self.settings.username,
            password=self._password,
            timeout=self.settings.timeout,
            options=_CHANNEL_OPTIONS,
        )

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if up != self.up:
            if up:
                log.warning("etcd at %s answers", self.where)
            else:
                log.warning("etcd at %s unreachable: %s", self.where, error)
        self.up = up

    async def _follow(self, start: bytes, end: bytes, on_keys: OnKeys) -> None:
        """Report the keys in [start, end) after a read and after every change to them."""
        keys: dict[bytes, bytes] = {}
        # The last revision reported; None: read afresh.
        revision: int | None = None
        backoff = 0.5
        while True:
            client = self._client()
            try:
                if revision is None:
                    got = await client.get_range(start, end)
                    keys = {kv.key: kv.value for kv in got.kvs}
                    revision = got.header.revision
                    await on_keys(dict(keys))
                watch = await client.watch(start, range_end=end, start_revision=revision + 1)
                self._mark(True)
                backoff = 0.5
                async for event in watch:
                    if event.kind == aetcd.EventKind.PUT:
                        keys[event.kv.key] = event.kv.value
                    else:
                        keys.pop(event.kv.key, None)
                    revision = event.kv.mod_revision
                    await on_keys(dict(keys))
                # The stream ended without an error (the member shut down): connect again.
            except asyncio.CancelledError:
                raise
            except aetcd.RevisionCompactedError as exc:
                log.warning(
                    "etcd compacted its history past revision %d (to %d); reading afresh",
                    (revision or 0) + 1,
                    exc.compacted_revision,
                )
                revision = None
            except _ERRORS as exc:
                self._mark(False, exc)
                self._endpoint += 1
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, 30.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
