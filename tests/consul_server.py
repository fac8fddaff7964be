"""An in-process stand-in for the Consul HTTP API subset the sidecar uses.

No Consul binary can be installed where the tests run, so this speaks the real wire format
(paths, query parameters, headers, JSON shapes, status codes) closely enough that py-consul
talks plain HTTP to it, with true blocking-query semantics:

* one raft-like index grows on every write; KV entries carry Create/ModifyIndex, health
  queries use the index of the last change to that service name, as Consul's state store does;
* a GET with ``index=N`` waits until the resource's index differs from N (see
  ``lower_index_blocks``) or ``wait`` elapses (default 5m, max 10m, Go duration syntax);
* ACLs: a wrong token gets 403 "ACL not found"; a missing token is Consul's anonymous token,
  which gets 403 "Permission denied" on KV and writes but *filtered* (empty) health/catalog
  lists, exactly like a default-deny cluster.

The server runs in a background thread with its own event loop so sync tests and async tests
(whose loop must stay free to drive the client) can both use it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from aiohttp import web

T = TypeVar("T")

DATACENTER = "dc1"
AGENT_NODE = "node1"
AGENT_ADDRESS = "127.0.0.1"
LEADER = "127.0.0.1:8300"
DEFAULT_WAIT = 300.0  # Consul's default blocking wait (5m) ...
MAX_WAIT = 600.0  # ... and its cap (10m)
MAX_VALUE_SIZE = 512 * 1024  # Consul's default kv_max_value_size
STATUSES = ("passing", "warning", "critical")

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("10s", "500ms", "1m30s"); ValueError if malformed, like Go."""
    if text in ("0", "+0"):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match[1]) * _UNITS[match[2]]
        pos = match.end()
    if pos == 0:
        raise ValueError("empty duration")
    return total


class ConsulRequest(NamedTuple):
    """One request as received, so tests can assert how the client called Consul."""

    method: str
    path: str
    query: dict[str, str]
    token: str | None  # the X-Consul-Token header; a ?token= shows up in ``query``


# --------------------------------------------------------------------------------------
# State: plain synchronous data, only touched on the server loop once it runs.


@dataclass
class _KV:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        # Consul reports an empty value as null, not "".
        value = base64.b64encode(self.value).decode("ascii") if self.value else None
        return {
            "LockIndex": 0,
            "Key": self.key,
            "Flags": self.flags,
            "Value": value,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _Check:
    node: str
    check_id: str
    name: str
    status: str
    service_id: str = ""
    service_name: str = ""
    check_type: str = ""
    notes: str = ""
    output: str = ""
    create_index: int = 0
    modify_index: int = 0

    def to_json(self, service_tags: list[str]) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(service_tags),
            "Type": self.check_type,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _Node:
    name: str
    address: str
    meta: dict[str, str]
    create_index: int
    modify_index: int
    checks: dict[str, _Check] = field(default_factory=dict)  # node-level checks only

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
            "Node": self.name,
            "Address": self.address,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {
                "lan": self.address,
                "lan_ipv4": self.address,
                "wan": self.address,
                "wan_ipv4": self.address,
            },
            "Meta": dict(self.meta),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _Service:
    node: str
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    create_index: int
    modify_index: int
    checks: dict[str, _Check] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.service_id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": dict(self.weights),
            "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _CheckSpec:
    check_id: str
    name: str
    status: str
    check_type: str = ""
    notes: str = ""
    service_id: str = ""


def _serf_check(node: str, index: int) -> _Check:
    return _Check(
        node=node,
        check_id="serfHealth",
        name="Serf Health Status",
        status="passing",
        output="Agent alive and reachable",
        create_index=index,
        modify_index=index,
    )


class _Store:
    """KV and catalog with Consul's index bookkeeping (tables + per-key/per-service)."""

    def __init__(self) -> None:
        self.index = 1  # a fresh Consul never answers index 0
        self.kv: dict[str, _KV] = {}
        self.tombstones: dict[str, int] = {}
        self.kv_index = 1
        self.nodes: dict[str, _Node] = {}
        self.services: dict[tuple[str, str], _Service] = {}
        self.service_index: dict[str, int] = {}
        self.catalog_index = 1

    def _next(self) -> int:
        self.index += 1
        return self.index

    # -- KV ------------------------------------------------------------------------------

    def kv_set(self, key: str, value: bytes, flags: int = 0, cas: int | None = None) -> bool:
        current = self.kv.get(key)
        if cas is not None and (
            (cas == 0 and current is not None)
            or (cas != 0 and (current is None or current.modify_index != cas))
        ):
            return False
        index = self._next()
        if current is None:
            self.kv[key] = _KV(key, value, flags, index, index)
        else:
            current.value, current.flags, current.modify_index = value, flags, index
        self.tombstones.pop(key, None)
        self.kv_index = index
        return True

    def kv_delete(self, key: str, recurse: bool = False, cas: int | None = None) -> bool:
        if recurse:
            doomed = [k for k in self.kv if k.startswith(key)]
        else:
            current = self.kv.get(key)
            if current is None:
                return True  # Consul answers true for a missing key, CAS or not
            if cas is not None and current.modify_index != cas:
                return False
            doomed = [key]
        if not doomed:
            return True
        index = self._next()
        for k in doomed:
            del self.kv[k]
            self.tombstones[k] = index  # so prefix watches see deletions
        self.kv_index = index
        return True

    def kv_key_index(self, key: str) -> int:
        # A missing key reports the KV table index, so (as in Consul) any KV write wakes
        # a blocking query on a missing key.
        entry = self.kv.get(key)
        return entry.modify_index if entry is not None else self.kv_index

    def kv_list_index(self, prefix: str) -> int:
        if not prefix:
            return self.kv_index
        indexes = [e.modify_index for k, e in self.kv.items() if k.startswith(prefix)]
        indexes += [i for k, i in self.tombstones.items() if k.startswith(prefix)]
        return max(indexes, default=0) or self.kv_index

    def kv_list(self, prefix: str) -> list[_KV]:
        return [self.kv[k] for k in sorted(self.kv) if k.startswith(prefix)]

    # -- catalog ---------------------------------------------------------------------------

    def _commit(self, index: int, names: Iterable[str]) -> int:
        for name in names:
            self.service_index[name] = index
        self.catalog_index = index
        return index

    def _node_service_names(self, node: str) -> set[str]:
        return {s.name for s in self.services.values() if s.node == node}

    def _ensure_node(
        self, name: str, address: str | None, meta: dict[str, str] | None, serf: bool, index: int
    ) -> tuple[_Node, bool]:
        node = self.nodes.get(name)
        if node is None:
            node = _Node(name, address or AGENT_ADDRESS, dict(meta or {}), index, index)
            if serf:
                node.checks["serfHealth"] = _serf_check(name, index)
            self.nodes[name] = node
            return node, True
        changed = False
        if address and address != node.address:
            node.address, changed = address, True
        if meta is not None and meta != node.meta:
            node.meta, changed = dict(meta), True
        if changed:
            node.modify_index = index
        return node, changed

    def find_service(self, service_id: str, node: str | None = None) -> _Service:
        found = [
            s
            for s in self.services.values()
            if s.service_id == service_id and (node is None or s.node == node)
        ]
        if not found:
            raise KeyError(f"unknown service ID {service_id!r}")
        if len(found) > 1:
            raise ValueError(f"service ID {service_id!r} is on several nodes; name the node")
        return found[0]

    def register(
        self,
        *,
        node: str,
        node_address: str | None,
        node_meta: dict[str, str] | None = None,
        serf: bool,
        service: dict[str, Any] | None,
        checks: list[_CheckSpec] | None,
        replace_service_checks: bool,
    ) -> int:
        """Upsert a node, optionally a service on it, and checks; one index for all of it."""
        index = self._next()
        node_obj, node_changed = self._ensure_node(node, node_address, node_meta, serf, index)
        touched = self._node_service_names(node) if node_changed else set()
        svc: _Service | None = None
        if service is not None:
            key = (node, service["id"])
            svc = self.services.get(key)
            if svc is not None and svc.name != service["name"]:
                touched.add(svc.name)  # renamed: watchers of the old name must see it go
            old_checks = {} if svc is None or replace_service_checks else svc.checks
            svc = _Service(
                node=node,
                service_id=service["id"],
                name=service["name"],
                tags=list(service.get("tags") or []),
                address=service.get("address") or "",
                port=int(service.get("port") or 0),
                meta=dict(service.get("meta") or {}),
                weights=dict(service.get("weights") or {"Passing": 1, "Warning": 1}),
                create_index=svc.create_index if svc is not None else index,
                modify_index=index,
                checks=dict(old_checks),
            )
            self.services[key] = svc
            touched.add(svc.name)
        for spec in checks or []:
            # A check without ServiceID is a node check (it gates every instance on the node).
            target = self.services[(node, spec.service_id)] if spec.service_id else None
            check = _Check(
                node=node,
                check_id=spec.check_id,
                name=spec.name,
                status=spec.status,
                service_id=target.service_id if target else "",
                service_name=target.name if target else "",
                check_type=spec.check_type,
                notes=spec.notes,
                create_index=index,
                modify_index=index,
            )
            if target is None:
                node_obj.checks[spec.check_id] = check
                touched |= self._node_service_names(node)
            else:
                target.checks[spec.check_id] = check
                touched.add(target.name)
        return self._commit(index, touched)

    def deregister_service(self, node: str, service_id: str) -> int | None:
        svc = self.services.pop((node, service_id), None)
        if svc is None:
            return None
        return self._commit(self._next(), [svc.name])

    def deregister_node(self, node: str) -> int | None:
        if node not in self.nodes:
            return None
        names = self._node_service_names(node)
        for key in [k for k in self.services if k[0] == node]:
            del self.services[key]
        del self.nodes[node]
        return self._commit(self._next(), names)

    def deregister_check(self, node: str, check_id: str) -> int | None:
        node_obj = self.nodes.get(node)
        if node_obj is None:
            return None
        if node_obj.checks.pop(check_id, None) is not None:
            return self._commit(self._next(), self._node_service_names(node))
        for svc in self.services.values():
            if svc.node == node and svc.checks.pop(check_id, None) is not None:
                return self._commit(self._next(), [svc.name])
        return None

    def set_status(self, checks: list[_Check], status: str, output: str | None = None) -> int:
        """Set check statuses; like Consul, an unchanged status does not bump any index."""
        changed = [c for c in checks if c.status != status or (output and c.output != output)]
        if not changed:
            return self.index
        index = self._next()
        names: set[str] = set()
        for check in changed:
            check.status, check.modify_index = status, index
            if output is not None:
                check.output = output
            names |= (
                {check.service_name} if check.service_id else self._node_service_names(check.node)
            )
        return self._commit(index, names)

    def find_check(self, node: str, check_id: str) -> _Check | None:
        node_obj = self.nodes.get(node)
        if node_obj is not None and check_id in node_obj.checks:
            return node_obj.checks[check_id]
        for svc in self.services.values():
            if svc.node == node and check_id in svc.checks:
                return svc.checks[check_id]
        return None

    def health_index(self, name: str) -> int:
        # As Consul: a known service answers its own index, an unknown one the table index.
        if any(s.name == name for s in self.services.values()):
            return self.service_index.get(name, self.catalog_index)
        return self.catalog_index

    def instances(self, name: str) -> Iterator[tuple[_Node, _Service, list[_Check]]]:
        for key in sorted(k for k, s in self.services.items() if s.name == name):
            svc = self.services[key]
            node = self.nodes[svc.node]
            yield node, svc, [*node.checks.values(), *svc.checks.values()]

    def reset(self, to: int) -> None:
        """Index goes backwards (a restarted/restored Consul): data stays, indexes shrink."""
        self.index = to
        self.kv_index = min(self.kv_index, to)
        self.catalog_index = min(self.catalog_index, to)
        self.tombstones.clear()
        self.service_index = {k: min(v, to) for k, v in self.service_index.items()}
        objects: list[_KV | _Node | _Service | _Check] = [*self.kv.values()]
        for node in self.nodes.values():
            objects += [node, *node.checks.values()]
        for svc in self.services.values():
            objects += [svc, *svc.checks.values()]
        for obj in objects:
            obj.create_index = min(obj.create_index, to)
            obj.modify_index = min(obj.modify_index, to)


# --------------------------------------------------------------------------------------
# HTTP helpers


class _HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def _norm(data: Any) -> dict[str, Any]:
    # Consul decodes JSON bodies case-insensitively and accepts snake_case aliases;
    # py-consul sends lowercase keys ("name", "id", "serviceid").
    if not isinstance(data, dict):
        raise _HTTPError(400, "Request decode failed: expected a JSON object")
    return {str(k).lower().replace("_", ""): v for k, v in data.items()}


def _uint(query: Any, name: str, error: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _HTTPError(400, error) from None
    if value < 0:
        raise _HTTPError(400, error)
    return value


def _check_type(check: dict[str, Any]) -> str:
    for key, kind in (
        ("ttl", "ttl"),
        ("http", "http"),
        ("tcp", "tcp"),
        ("grpc", "grpc"),
        ("args", "script"),
        ("script", "script"),
        ("dockercontainerid", "docker"),
    ):
        if check.get(key):
            return kind
    return ""


def _status(raw: Any, default: str = "critical") -> str:
    status = raw or default
    if status not in STATUSES:
        raise _HTTPError(400, f"Invalid check status: {status!r}")
    return str(status)


def _json(
    data: Any, *, index: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return _response(200, json.dumps(data), index=index, headers=headers)


def _response(
    status: int,
    text: str | None = None,
    *,
    body: bytes | None = None,
    index: int | None = None,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    all_headers = dict(headers or {})
    if index is not None:
        # Every read Consul answers carries these; py-consul needs X-Consul-Index.
        all_headers.update(
            {
                "X-Consul-Index": str(index),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            }
        )
    if body is not None:
        return web.Response(
            status=status, body=body, headers=all_headers, content_type=content_type
        )
    return web.Response(
        status=status, text=text or "", headers=all_headers, content_type=content_type
    )


def _request_token(request: web.Request) -> str:
    # Consul's precedence: ?token=, then X-Consul-Token, then an Authorization Bearer.
    bearer = request.headers.get("Authorization", "")
    return (
        request.query.get("token")
        or request.headers.get("X-Consul-Token")
        or (bearer[7:].strip() if bearer.lower().startswith("bearer ") else "")
    )


def _denied(permission: str, resource: str) -> _HTTPError:
    return _HTTPError(
        403,
        f"Permission denied: anonymous token lacks permission '{permission}' on "
        f'"{resource}". The anonymous token is used implicitly when a request does not '
        "specify a token.",
    )


# --------------------------------------------------------------------------------------


class ConsulTestServer:
    """A Consul HTTP API subset on 127.0.0.1:<free port>, served by aiohttp.web in a
    background thread with its own event loop, so sync and async tests can both use it.

    ``lower_index_blocks=False`` (default) answers at once when the client's ``index`` is
    ahead of the server's (a reset); ``True`` is what Consul's blockingQuery really does:
    it keeps waiting until the index rises above the client's or ``wait`` elapses, then
    returns the lower index. A watcher must reset on a lower index either way.
    """

    def __init__(self, *, acl_token: str | None = None, lower_index_blocks: bool = False) -> None:
        self.acl_token = acl_token
        self.lower_index_blocks = lower_index_blocks
        self.requests: list[ConsulRequest] = []
        self._store = _Store()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._paused = False
        self._stopped = False
        # Server-loop only: futures of blocked queries, woken on every change.
        self._waiters: set[asyncio.Future[None]] = set()
        self._epoch = 0  # bumped by pause/stop so blocked queries give up
        # Cross-thread observation (blocked queries, requests) for tests' wait_until*.
        self._observe = threading.Condition(threading.RLock())
        self._blocked: Counter[str] = Counter()
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind a free loopback port; returns once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("ConsulTestServer can only be started once")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="consul-test-server", daemon=True
        )
        self._thread.start()
        self._loop = loop
        try:
            self._run(self._astart())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Drop connections (releasing blocked queries), close the port. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._stopped:
            return
        self._stopped = True
        try:
            self._run(self._adown(final=True))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = None

    def pause(self) -> None:
        """Simulate an unreachable Consul: close the listener and drop every connection
        (in-flight blocking queries included) so clients see connection errors."""
        if self._paused or self._stopped or self._loop is None:
            return
        self._paused = True
        self._run(self._adown(final=False))

    def resume(self) -> None:
        """Listen again on the same port."""
        if not self._paused or self._stopped:
            return
        self._run(self._bind(self._port))
        self._paused = False

    def __enter__(self) -> ConsulTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ConsulTestServer is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def index(self) -> int:
        """The current global (raft) index."""
        return self._store.index

    # -- direct manipulation (thread-safe, wakes blocked queries) -----------------------------

    def kv_put(self, key: str, value: bytes | str, *, flags: int = 0) -> int:
        data = value.encode() if isinstance(value, str) else bytes(value)

        def op() -> int:
            self._store.kv_set(key, data, flags)
            return self._store.index

        return self._mutate(op)

    def kv_get(self, key: str) -> bytes | None:
        return self._on_loop(lambda: e.value if (e := self._store.kv.get(key)) else None)

    def kv_delete(self, key: str, *, recurse: bool = False) -> int:
        def op() -> int:
            self._store.kv_delete(key, recurse=recurse)
            return self._store.index

        return self._mutate(op)

    def register_service(
        self,
        service_id: str,
        name: str,
        address: str,
        port: int,
        tags: list[str],
        *,
        status: str = "passing",
        node: str = AGENT_NODE,
        node_address: str = AGENT_ADDRESS,
        meta: dict[str, str] | None = None,
    ) -> int:
        """Register (or update) an instance with one service check "service:<id>"."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        check = _CheckSpec(f"service:{service_id}", f"Service '{name}' check", status)
        check.service_id = service_id
        service = {"id": service_id, "name": name, "address": address, "port": port}
        service |= {"tags": tags, "meta": meta or {}}
        return self._mutate(
            lambda: self._store.register(
                node=node,
                node_address=node_address,
                serf=True,
                service=service,
                checks=[check],
                replace_service_checks=True,
            )
        )

    def deregister_service(self, service_id: str, *, node: str | None = None) -> int:
        def op() -> int:
            svc = self._store.find_service(service_id, node)
            index = self._store.deregister_service(svc.node, service_id)
            assert index is not None
            return index

        return self._mutate(op)

    def set_check_status(self, service_id: str, status: str, *, node: str | None = None) -> int:
        """Set every check of the instance (creating "service:<id>" if it has none)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")

        def op() -> int:
            svc = self._store.find_service(service_id, node)
            if svc.checks:
                return self._store.set_status(list(svc.checks.values()), status)
            spec = _CheckSpec(f"service:{service_id}", f"Service '{svc.name}' check", status)
            spec.service_id = service_id
            return self._store.register(
                node=svc.node,
                node_address=None,
                serf=False,
                service=None,
                checks=[spec],
                replace_service_checks=False,
            )

        return self._mutate(op)

    def set_node_status(self, node: str, status: str) -> int:
        """Set the node's serfHealth check: affects every instance on that node."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")

        def op() -> int:
            check = self._store.find_check(node, "serfHealth")
            if check is None:
                raise KeyError(f"node {node!r} has no serfHealth check")
            return self._store.set_status([check], status)

        return self._mutate(op)

    def reset_index(self, to: int = 1) -> None:
        """Simulate a Consul restart whose index went backwards (data kept)."""
        if to < 1:
            raise ValueError("Consul indexes start at 1")
        self._mutate(lambda: self._store.reset(to))

    # -- observation for tests ----------------------------------------------------------------

    @property
    def blocked(self) -> int:
        """Number of blocking queries currently parked on the server."""
        with self._observe:
            return sum(self._blocked.values())

    def blocked_paths(self) -> list[str]:
        with self._observe:
            return sorted(self._blocked.elements())

    async def wait_until(
        self, predicate: Callable[[ConsulTestServer], bool], within: float = 2.0
    ) -> None:
        """Await (on the caller's loop) until predicate(server) holds; re-checked on every
        request, blocked-query change and state change. TimeoutError after ``within`` s."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._observe:
            self._watchers.add(entry)
        try:
            async with asyncio.timeout(within):
                while True:
                    entry[1].clear()  # before the check, so no notification can be lost
                    if predicate(self):
                        return
                    await entry[1].wait()
        except TimeoutError:
            raise TimeoutError(f"condition not met within {within}s") from None
        finally:
            with self._observe:
                self._watchers.discard(entry)

    def wait_until_sync(
        self, predicate: Callable[[ConsulTestServer], bool], within: float = 2.0
    ) -> None:
        """Blocking twin of wait_until for sync tests (never call it on a loop you need)."""
        with self._observe:
            if not self._observe.wait_for(lambda: predicate(self), within):
                raise TimeoutError(f"condition not met within {within}s")

    async def wait_blocked(
        self, count: int = 1, *, path: str | None = None, within: float = 2.0
    ) -> None:
        """Wait until ``count`` queries (optionally on paths starting with ``path``) block."""

        def enough(server: ConsulTestServer) -> bool:
            paths = server.blocked_paths()
            return sum(1 for p in paths if path is None or p.startswith(path)) >= count

        await self.wait_until(enough, within)

    # -- threading plumbing -------------------------------------------------------------------

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _on_server_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _run(self, coro: Awaitable[T]) -> T:
        assert self._loop is not None and not self._on_server_thread()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=10)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        # State belongs to the server loop once it runs; before start/after stop it is ours.
        loop = self._loop
        if loop is None or self._on_server_thread():
            return fn()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return result.result(timeout=10)

    def _mutate(self, op: Callable[[], T]) -> T:
        def apply() -> T:
            try:
                return op()
            finally:
                self._wake()

        try:
            return self._on_loop(apply)
        finally:
            self._fire()

    def _wake(self) -> None:
        """Server loop: let every blocked query re-check its index."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _fire(self) -> None:
        """Any thread: tell wait_until*/wait_blocked callers something changed."""
        with self._observe:
            self._observe.notify_all()
            watchers = list(self._watchers)
        for loop, event in watchers:
            # A closed watcher loop has nobody left to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # -- server loop ----------------------------------------------------------------------------

    async def _astart(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self._routes(app.router)
        # handler_cancellation: a client that hangs up stops its blocking query, as in Consul.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await self._bind(0)

    async def _bind(self, port: int | None) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", port or 0, reuse_address=True)
        await site.start()
        self._site = site
        self._port = self._runner.addresses[0][1]

    async def _adown(self, *, final: bool) -> None:
        assert self._runner is not None
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner.server is not None:
            # Abort (RST) rather than close: an unreachable Consul does not say goodbye,
            # and aborting leaves no TIME_WAIT in the way of re-binding the port.
            for conn in self._runner.server.connections:
                if conn.transport is not None:
                    conn.transport.abort()
        self._epoch += 1
        self._wake()
        if final:
            await self._runner.cleanup()

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/kv/{key:.*}", self._kv_get, allow_head=False)
        router.add_put("/v1/kv/{key:.*}", self._kv_put)
        router.add_delete("/v1/kv/{key:.*}", self._kv_delete)
        router.add_get("/v1/health/service/{name}", self._health_service, allow_head=False)
        router.add_get("/v1/catalog/service/{name}", self._catalog_service, allow_head=False)
        router.add_get("/v1/catalog/services", self._catalog_services, allow_head=False)
        router.add_put("/v1/catalog/register", self._catalog_register)
        router.add_put("/v1/catalog/deregister", self._catalog_deregister)
        router.add_put("/v1/agent/service/register", self._agent_register)
        router.add_put("/v1/agent/service/deregister/{id}", self._agent_deregister)
        router.add_get("/v1/agent/services", self._agent_services, allow_head=False)
        router.add_get("/v1/agent/service/{id}", self._agent_service, allow_head=False)
        router.add_get("/v1/agent/checks", self._agent_checks, allow_head=False)
        router.add_put("/v1/agent/check/{action:pass|warn|fail}/{id}", self._agent_ttl)
        router.add_put("/v1/agent/check/update/{id}", self._agent_check_update)
        router.add_get("/v1/agent/self", self._agent_self, allow_head=False)
        router.add_get("/v1/status/leader", self._status_leader, allow_head=False)
        router.add_get("/v1/status/peers", self._status_peers, allow_head=False)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        header_token = request.headers.get("X-Consul-Token")
        self.requests.append(
            ConsulRequest(request.method, request.path, dict(request.query), header_token)
        )
        self._fire()
        try:
            dc = request.query.get("dc")
            if dc and dc != DATACENTER:
                raise _HTTPError(500, "No path to datacenter")
            if self._acl_applies(request):
                token = _request_token(request)
                if token and token != self.acl_token:
                    raise _HTTPError(403, "ACL not found")
            return await handler(request)
        except _HTTPError as exc:
            return _response(exc.status, exc.text, content_type="text/plain")

    def _acl_applies(self, request: web.Request) -> bool:
        # Status endpoints need no ACL in Consul (and py-consul sends no token there).
        return self.acl_token is not None and not request.path.startswith("/v1/status/")

    def _anonymous(self, request: web.Request) -> bool:
        """No token at all: Consul's anonymous token (wrong tokens never get this far)."""
        return self._acl_applies(request) and not _request_token(request)

    async def _block(self, request: web.Request, index_of: Callable[[], int]) -> None:
        """Consul's blocking query: park until index_of() moves past ?index= or ?wait ends."""
        min_index = _uint(request.query, "index", "Invalid index") or 0
        wait = DEFAULT_WAIT
        if "wait" in request.query:
            try:
                wait = parse_duration(request.query["wait"])
            except ValueError:
                raise _HTTPError(400, "Invalid wait time") from None
            if wait <= 0:
                wait = DEFAULT_WAIT
            wait = min(wait, MAX_WAIT)
        if min_index == 0:
            return
        epoch = self._epoch

        def ready() -> bool:
            index = index_of()
            lower = index < min_index and not self.lower_index_blocks
            return index > min_index or lower or self._epoch != epoch

        if ready():
            return
        loop = asyncio.get_running_loop()
        with self._observe:
            self._blocked[request.path] += 1
        self._fire()
        try:
            async with asyncio.timeout(wait):
                while not ready():
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.discard(waiter)
        except TimeoutError:
            pass  # Consul answers with the unchanged index when wait elapses
        finally:
            with self._observe:
                self._blocked[request.path] -= 1
                if self._blocked[request.path] <= 0:
                    del self._blocked[request.path]
            self._fire()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        text = await request.text()
        try:
            return _norm(json.loads(text) if text.strip() else {})
        except json.JSONDecodeError as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from None

    def _require_write(self, request: web.Request, permission: str, resource: str) -> None:
        if self._anonymous(request):
            raise _denied(permission, resource)

    # -- KV ---------------------------------------------------------------------------------

    async def _kv_get(self, request: web.Request) -> web.StreamResponse:
        store, key, query = self._store, request.match_info["key"], request.query
        listing = "recurse" in query or "keys" in query
        if not listing:
            if self._anonymous(request):
                raise _denied("key:read", key)
            await self._block(request, lambda: store.kv_key_index(key))
            index = store.kv_key_index(key)
            entry = store.kv.get(key)
            if entry is None:
                return _response(404, index=index)
            if "raw" in query:
                return _response(
                    200, body=entry.value, index=index, content_type="application/octet-stream"
                )
            return _json([entry.to_json()], index=index)
        await self._block(request, lambda: store.kv_list_index(key))
        index = store.kv_list_index(key)
        entries = store.kv_list(key)
        headers = {}
        if self._anonymous(request) and entries:
            entries, headers = [], {"X-Consul-Results-Filtered-By-ACLs": "true"}
        if not entries:
            return _response(404, index=index, headers=headers)
        if "keys" in query:
            separator = query.get("separator", "")
            keys: list[str] = []
            for entry in entries:
                name = entry.key
                if separator:
                    cut = name.find(separator, len(key))
                    name = name if cut < 0 else name[: cut + len(separator)]
                if not keys or keys[-1] != name:
                    keys.append(name)
            return _json(keys, index=index, headers=headers)
        return _json([e.to_json() for e in entries], index=index, headers=headers)

    async def _kv_put(self, request: web.Request) -> web.StreamResponse:
        key, query = request.match_info["key"], request.query
        self._require_write(request, "key:write", key)
        if not key:
            raise _HTTPError(400, "Missing key name")
        if "acquire" in query or "release" in query:
            raise _HTTPError(400, "ConsulTestServer does not implement sessions")
        flags = _uint(query, "flags", "Invalid flags") or 0
        cas = _uint(query, "cas", "Invalid cas")
        value = await request.read()
        if len(value) > MAX_VALUE_SIZE:
            raise _HTTPError(
                413,
                f"Request body({len(value)} bytes) too large, max size: {MAX_VALUE_SIZE} bytes.",
            )
        ok = self._mutate(lambda: self._store.kv_set(key, value, flags, cas))
        return _json(ok)

    async def _kv_delete(self, request: web.Request) -> web.StreamResponse:
        key, query = request.match_info["key"], request.query
        self._require_write(request, "key:write", key)
        cas = _uint(query, "cas", "Invalid cas")
        recurse = "recurse" in query
        return _json(self._mutate(lambda: self._store.kv_delete(key, recurse, cas)))

    # -- health / catalog reads -------------------------------------------------------------

    def _instances(
        self, request: web.Request, name: str, *, passing: bool
    ) -> tuple[list[tuple[_Node, _Service, list[_Check]]], dict[str, str]]:
        query = request.query
        if "filter" in query:
            raise _HTTPError(400, "ConsulTestServer does not implement ?filter expressions")
        tags = query.getall("tag", [])
        node_meta = [m.split(":", 1) for m in query.getall("node-meta", []) if ":" in m]
        found = [
            (node, svc, checks)
            for node, svc, checks in self._store.instances(name)
            if all(t in svc.tags for t in tags)
            and all(node.meta.get(k) == v for k, v in node_meta)
            and not (passing and any(c.status != "passing" for c in checks))
        ]
        if self._anonymous(request) and found:
            # Consul filters unreadable results instead of failing the whole read.
            return [], {"X-Consul-Results-Filtered-By-ACLs": "true"}
        return found, {}

    async def _health_service(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        await self._block(request, lambda: self._store.health_index(name))
        index = self._store.health_index(name)
        found, headers = self._instances(request, name, passing="passing" in request.query)
        body = [
            {
                "Node": node.to_json(),
                "Service": svc.to_json(),
                "Checks": [c.to_json(svc.tags if c.service_id else []) for c in checks],
            }
            for node, svc, checks in found
        ]
        return _json(body, index=index, headers=headers)

    async def _catalog_service(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        await self._block(request, lambda: self._store.health_index(name))
        index = self._store.health_index(name)
        found, headers = self._instances(request, name, passing=False)
        body = []
        for node, svc, _checks in found:
            node_json = node.to_json()
            body.append(
                {
                    "ID": node_json["ID"],
                    "Node": node.name,
                    "Address": node.address,
                    "Datacenter": DATACENTER,
                    "TaggedAddresses": node_json["TaggedAddresses"],
                    "NodeMeta": dict(node.meta),
                    "ServiceKind": "",
                    "ServiceID": svc.service_id,
                    "ServiceName": svc.name,
                    "ServiceTags": list(svc.tags),
                    "ServiceAddress": svc.address,
                    "ServiceWeights": dict(svc.weights),
                    "ServiceMeta": dict(svc.meta),
                    "ServicePort": svc.port,
                    "ServiceEnableTagOverride": False,
                    "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "ServiceConnect": {},
                    "CreateIndex": svc.create_index,
                    "ModifyIndex": svc.modify_index,
                }
            )
        return _json(body, index=index, headers=headers)

    async def _catalog_services(self, request: web.Request) -> web.StreamResponse:
        await self._block(request, lambda: self._store.catalog_index)
        services: dict[str, list[str]] = {}
        for svc in sorted(self._store.services.values(), key=lambda s: (s.name, s.node)):
            tags = services.setdefault(svc.name, [])
            tags.extend(t for t in svc.tags if t not in tags)
        headers = {}
        if self._anonymous(request) and services:
            services, headers = {}, {"X-Consul-Results-Filtered-By-ACLs": "true"}
        return _json(services, index=self._store.catalog_index, headers=headers)

    # -- catalog writes ---------------------------------------------------------------------

    async def _catalog_register(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        node = body.get("node")
        if not node:
            raise _HTTPError(400, "Must provide node")
        self._require_write(request, "node:write", node)
        address = body.get("address")
        if not address and not body.get("skipnodeupdate"):
            raise _HTTPError(400, "Must provide address")
        service = None
        if body.get("service"):
            raw = _norm(body["service"])
            if not raw.get("service"):
                raise _HTTPError(400, "Must provide service name")
            service = {
                "id": raw.get("id") or raw["service"],
                "name": raw["service"],
                "tags": raw.get("tags"),
                "address": raw.get("address"),
                "port": raw.get("port"),
                "meta": raw.get("meta"),
                "weights": raw.get("weights"),
            }
        raw_checks = ([body["check"]] if body.get("check") else []) + list(body.get("checks") or [])
        specs = []
        for raw_check in raw_checks:
            check = _norm(raw_check)
            check_id = check.get("checkid") or check.get("name")
            if not check_id:
                raise _HTTPError(400, "Must provide a check ID or name")
            service_id = check.get("serviceid") or ""
            known = service is not None and service["id"] == service_id
            if service_id and not known and (node, service_id) not in self._store.services:
                raise _HTTPError(500, f"Unknown service ID {service_id!r} for check")
            specs.append(
                _CheckSpec(
                    check_id=str(check_id),
                    name=str(check.get("name") or check_id),
                    status=_status(check.get("status")),
                    check_type=_check_type(check),
                    notes=str(check.get("notes") or ""),
                    service_id=str(service_id),
                )
            )
        node_meta = body.get("nodemeta")
        self._mutate(
            lambda: self._store.register(
                node=node,
                node_address=address,
                node_meta=node_meta,
                serf=False,
                service=service,
                checks=specs,
                replace_service_checks=False,
            )
        )
        return _json(True)

    async def _catalog_deregister(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        node = body.get("node")
        if not node:
            raise _HTTPError(400, "Must provide node")
        self._require_write(request, "node:write", node)
        store = self._store
        if body.get("serviceid"):
            self._mutate(lambda: store.deregister_service(node, body["serviceid"]))
        elif body.get("checkid"):
            self._mutate(lambda: store.deregister_check(node, body["checkid"]))
        else:
            self._mutate(lambda: store.deregister_node(node))
        return _json(True)

    # -- agent ------------------------------------------------------------------------------

    async def _agent_register(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        name = body.get("name")
        if not name:
            raise _HTTPError(400, "Missing service name")
        self._require_write(request, "service:write", name)
        service_id = body.get("id") or name
        raw_checks = ([body["check"]] if body.get("check") else []) + list(body.get("checks") or [])
        specs = []
        for number, raw_check in enumerate(raw_checks, start=1):
            check = _norm(raw_check)
            default_id = f"service:{service_id}"
            if len(raw_checks) > 1:
                default_id += f":{number}"
            specs.append(
                _CheckSpec(
                    check_id=str(check.get("checkid") or check.get("id") or default_id),
                    name=str(check.get("name") or f"Service '{name}' check"),
                    # Consul starts agent checks critical unless the definition says otherwise.
                    status=_status(check.get("status")),
                    check_type=_check_type(check),
                    notes=str(check.get("notes") or ""),
                    service_id=service_id,
                )
            )
        service = {
            "id": service_id,
            "name": name,
            "tags": body.get("tags"),
            "address": body.get("address"),
            "port": body.get("port"),
            "meta": body.get("meta"),
            "weights": body.get("weights"),
        }
        self._mutate(
            lambda: self._store.register(
                node=AGENT_NODE,
                node_address=AGENT_ADDRESS,
                serf=True,
                service=service,
                checks=specs,
                replace_service_checks=True,
            )
        )
        return _response(200, "")

    async def _agent_deregister(self, request: web.Request) -> web.StreamResponse:
        service_id = request.match_info["id"]
        self._require_write(request, "service:write", service_id)
        if self._mutate(lambda: self._store.deregister_service(AGENT_NODE, service_id)) is None:
            raise _HTTPError(404, f"Unknown service ID {service_id!r}")
        return _response(200, "")

    def _agent_service_json(self, svc: _Service) -> dict[str, Any]:
        data = svc.to_json()
        for key in ("CreateIndex", "ModifyIndex", "PeerName", "Proxy", "Connect"):
            data.pop(key)
        data["Datacenter"] = DATACENTER
        return data

    async def _agent_services(self, request: web.Request) -> web.StreamResponse:
        if self._anonymous(request):
            return _json({})
        local = [s for s in self._store.services.values() if s.node == AGENT_NODE]
        return _json({s.service_id: self._agent_service_json(s) for s in local})

    async def _agent_service(self, request: web.Request) -> web.StreamResponse:
        service_id = request.match_info["id"]
        if self._anonymous(request):
            raise _denied("service:read", service_id)
        svc = self._store.services.get((AGENT_NODE, service_id))
        if svc is None:
            raise _HTTPError(404, f"unknown service ID: {service_id}")
        return _json(self._agent_service_json(svc))

    async def _agent_checks(self, request: web.Request) -> web.StreamResponse:
        if self._anonymous(request):
            return _json({})
        checks: dict[str, Any] = {}
        for svc in self._store.services.values():
            if svc.node == AGENT_NODE:
                checks |= {c.check_id: c.to_json(svc.tags) for c in svc.checks.values()}
        return _json(checks)

    async def _set_agent_check(
        self, request: web.Request, status: str, output: str | None
    ) -> web.StreamResponse:
        check_id = request.match_info["id"]
        self._require_write(request, "service:write", check_id)
        check = self._store.find_check(AGENT_NODE, check_id)
        if check is None:
            raise _HTTPError(404, f"Unknown check ID {check_id!r}")
        self._mutate(lambda: self._store.set_status([check], status, output))
        return _response(200, "")

    async def _agent_ttl(self, request: web.Request) -> web.StreamResponse:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}
        note = request.query.get("note")
        return await self._set_agent_check(request, status[request.match_info["action"]], note)

    async def _agent_check_update(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._set_agent_check(request, _status(body.get("status")), body.get("output"))

    async def _agent_self(self, request: web.Request) -> web.StreamResponse:
        if self._anonymous(request):
            raise _denied("agent:read", AGENT_NODE)
        node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, AGENT_NODE))
        return _json(
            {
                "Config": {
                    "Datacenter": DATACENTER,
                    "NodeName": AGENT_NODE,
                    "NodeID": node_id,
                    "Server": True,
                    "Version": "1.17.0",
                },
                "Member": {"Name": AGENT_NODE, "Addr": AGENT_ADDRESS, "Port": 8301, "Status": 1},
                "Meta": {},
            }
        )

    # -- status -----------------------------------------------------------------------------

    async def _status_leader(self, request: web.Request) -> web.StreamResponse:
        return _json(LEADER)

    async def _status_peers(self, request: web.Request) -> web.StreamResponse:
        return _json([LEADER])
