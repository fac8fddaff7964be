"""Typed configuration: the document's shape, its sources and its validation.

Sources, later winning: the file (YAML or JSON), then ``DBSIDECAR_*``
environment variables (``__`` separates nested keys; a value is text, converted
where the key wants a number or a boolean, and parsed as YAML when it starts
with ``[`` or ``{``: ``DBSIDECAR_DATABASES__ORDERS__POOL__MAX_SIZE=20``). A
database entry takes our shape (``primary``/``replicas``) or the seed's
(``write``/``read``).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

ENV_PREFIX = "DBSIDECAR_"
T = TypeVar("T")
# Keys whose values are secrets: an environment value for them is always plain text.
_SECRET_KEY = re.compile(r"password|token|secret|dsn|auth")


class ConfigError(Exception):
    """A configuration document that cannot be used; the message names the key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class NodeSettings(_Section):
    """One PostgreSQL server and database, given by parts or by a DSN."""

    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 5432
    database: str | None = None
    user: str | None = None
    password: str | None = None
    # The name of an environment variable holding the password (from a Secret).
    password_env: str | None = None
    dsn: str | None = None
    driver: Literal["postgresql", "postgres"] = "postgresql"

    def __post_init__(self) -> None:
        # A DSN urlsplit cannot read fails here, by key; its own error would quote the
        # DSN's text (an unencoded '/' or '@' in the password lands in the port).
        if self.dsn is None:
            return
        try:
            parts = urlsplit(self.dsn)
            parts.port  # noqa: B018 - reading it is the check
        except ValueError:
            raise ValueError(
                "dsn: not a URL with a valid host and port (percent-encode any /, ?, # or @ "
                "in the password)"
            ) from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("dsn: must start with postgresql:// or postgres://")

    def label(self, default_database: str) -> str:
        """A name for logs, metrics and served-by metadata; never holds a password."""
        if self.name:
            return self.name
        if self.dsn:
            parts = urlsplit(self.dsn)
            return f"{parts.hostname}:{parts.port or 5432}{parts.path or '/' + default_database}"
        return f"{self.host}:{self.port}/{self.database or default_database}"

    def resolved_password(self, where: str) -> str | None:
        if self.password_env is None:
            return self.password
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(
                f"{where}.password_env: environment variable {self.password_env} is not set"
            )
        return value


class PoolSettings(_Section):
    min_size: int = 1
    max_size: int = 10
    # Seconds to wait for a free connection before answering 503 pool_timeout.
    acquire_timeout: float = 5.0
    # Seconds a new connection may take (a node that accepts TCP and never answers).
    connect_timeout: float = 5.0
    # Seconds a statement may run before PostgreSQL cancels it (504).
    statement_timeout: float = 30.0
    max_inactive_connection_lifetime: float = 300.0


class ShardingSettings(_Section):
    key: str
    function: Literal["modulo", "hash", "range", "map"]
    # range: ascending upper bounds (exclusive); shard i takes keys below bounds[i],
    # the last shard takes the rest, so there is one bound fewer than shards.
    bounds: list[int | str] | None = None
    # map: key (as a string) -> shard name.
    map: dict[str, str] | None = None
    # map: the shard for keys the map does not name; without it they are refused.
    default: str | None = None


class ServiceSettings(_Section):
    """Nodes from Consul's health catalog instead of a fixed list."""

    # The Consul service whose passing instances are this database's (or shard's) nodes.
    name: str
    # What every discovered node connects to: database, user, password_env, ...
    # (host and port come from the catalog).
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    # Instance tags naming the primary, as Patroni registers it; every other passing
    # instance is a replica until its own probe says otherwise.
    primary_tags: list[str] = msgspec.field(default_factory=lambda: ["primary", "master"])


class PatroniSettings(_Section):
    """Nodes from a Patroni cluster: its members and leader, from the keys it keeps in
    the registry's etcd (Patroni's ``etcd3`` DCS), or from its REST API."""

    # Patroni's scope (the cluster's name) and namespace.
    scope: str
    namespace: str = "/service"
    # Members' REST API addresses (http://host:8008): when given, the cluster is polled
    # with GET /cluster instead of watched in etcd (any DCS; no registry needed).
    rest: list[str] = []
    # Seconds between two GET /cluster (REST only: Patroni has no blocking query).
    interval: float = 1.0
    # What every member connects to: database, user, password_env, ... (host and port
    # come from the member's conn_url).
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)

    @property
    def prefix(self) -> str:
        """The etcd key prefix of the cluster (the catalog's name for its members)."""
        return f"{self.namespace.rstrip('/')}/{self.scope}/"


class ShardSettings(_Section):
    name: str
    primary: NodeSettings | None = None
    replicas: list[NodeSettings] = []
    service: ServiceSettings | None = None
    patroni: PatroniSettings | None = None


class MigrationSettings(_Section):
    """Schema migrations of one database (``dbsidecar migrate``, ``POST /v1/migrate``).
    The section's presence lets the app migrate the database through the API."""

    # The folder of <version>_<name>.sql files; used by the CLI without --dir and by
    # POST /v1/migrate requests that send no files.
    dir: str | None = None
    # /readyz answers 503 while the database's shards are at different versions (or one
    # has a failed migration).
    require_consistent: bool = False
    # Seconds a migrator waits for another one's lock on a shard before giving up.
    lock_timeout: float = 900.0
    # Seconds between the running sidecar's readings of each shard's version (also read
    # at startup and after every migration through the API).
    version_interval: float = 60.0


class DatabaseSettings(_Section):
    primary: NodeSettings | None = None
    replicas: list[NodeSettings] = []
    service: ServiceSettings | None = None
    patroni: PatroniSettings | None = None
    read_default: Literal["primary", "replica"] = "primary"
    replica_strategy: Literal["round_robin", "random", "least_busy"] = "round_robin"
    max_replica_lag_bytes: int | None = None
    max_replica_lag_seconds: float | None = None
    fallback_to_primary: bool = True
    # How long a read-your-writes read may wait for a replica to catch up.
    ryw_wait_ms: int = 50
    pool: PoolSettings = msgspec.field(default_factory=PoolSettings)
    sharding: ShardingSettings | None = None
    shards: list[ShardSettings] = []
    migrations: MigrationSettings | None = None


class ListenSettings(_Section):
    host: str | None = "127.0.0.1"
    port: int | None = 7432
    uds: str | None = None


class OpsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = 9432


class HealthSettings(_Section):
    interval: float = 1.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    # Replica replay positions (read-your-writes, lag) are polled this often.
    position_interval: float = 0.1


class LimitsSettings(_Section):
    max_body_bytes: int = 8 * 1024 * 1024
    # Request header bytes (all lines together) the data plane reads before answering 431.
    max_header_bytes: int = 64 * 1024
    max_where_depth: int = 32
    max_batch_plans: int = 1000
    # Values in one IN / NOT IN list (a larger set belongs in a table or a raw plan).
    max_in_values: int = 10_000
    # Rows one read may answer with (a larger result is refused: page it with a limit).
    max_result_rows: int = 100_000
    # Bytes of SQL the compile cache may hold; least recently used shapes go first.
    compile_cache_bytes: int = 16 * 1024 * 1024
    # Plans one channel (WebSocket) may have in flight; past it the sidecar stops reading
    # that channel's frames until answers go out (backpressure, bounded memory).
    max_channel_inflight: int = 256
    # Channels open at once (a pod's processes need one per event loop); past it an
    # upgrade answers 503 and the client uses HTTP.
    max_channels: int = 64


class CoalescingSettings(_Section):
    """Concurrent reads of one shape on one node that differ only in one value run as
    one statement (``unnest(...) WITH ORDINALITY`` and a LATERAL subquery), and the rows
    are split back per plan. Never writes, never in a transaction."""

    enabled: bool = True
    # Plans one coalesced statement may carry; more make several statements.
    max_plans: int = 256


class TransactionSettings(_Section):
    # An open transaction idle this long is rolled back and its connection freed.
    idle_timeout: float = 60.0
    max_open: int = 1000
    # Share of a database's primary pool that open interactive transactions may hold,
    # so they never starve ordinary reads and writes (at least one connection stays free).
    max_pool_share: float = 0.5


class ShutdownSettings(_Section):
    drain_timeout: float = 20.0


class ReadinessSettings(_Section):
    require_primary: bool = False


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    # One line per data-plane request; off by default (metrics count requests).
    access_log: bool = False
    # Statements slower than this are logged with their plan's shape, never its values.
    slow_query_ms: float = 1000.0


class TracingSettings(_Section):
    """OpenTelemetry spans of the request path (:mod:`sidecar.tracing`); off unless an
    endpoint is set. Read at start only."""

    # An OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces.
    otlp_endpoint: str | None = None
    service_name: str = "dbsidecar"
    # Of the traces the sidecar starts itself (a caller's sampling decision wins).
    sample_ratio: float = 1.0
    # Sent with every export (an API key, say): secrets, masked like passwords.
    headers: dict[str, str] = {}
    # Seconds between exports of the buffered spans.
    export_interval: float = 5.0


class ConsulSettings(_Section):
    address: str = "127.0.0.1:8500"
    scheme: Literal["http", "https"] = "http"
    # The KV key holding the configuration document; default dbsidecar/<service>/config.
    key: str | None = None
    # The ACL token comes from CONSUL_HTTP_TOKEN or this file; it is sent as a header.
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Blocking-query wait in seconds; the HTTP timeout is set well above it.
    wait: float = 30.0


class EtcdSettings(_Section):
    """An etcd v3 cluster (gRPC API, etcd 3.4 or later)."""

    # host:port of the cluster's members; the client moves to the next one on an error.
    endpoints: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:2379"])
    # The key holding the configuration document; default dbsidecar/<service>/config.
    key: str | None = None
    # etcd authentication: the password comes from the environment variable named here
    # or from a file (a mounted Secret), never from the document itself.
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    # TLS: the CA that signed the members' certificates, and a client certificate.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Seconds a single request (a read, the watch's creation) may take.
    timeout: float = 5.0


class RegistrySettings(_Section):
    """Where the configuration and nodes come from besides the file (bootstrap only:
    taken from the file and environment, never from the registry itself)."""

    consul: ConsulSettings | None = None
    etcd: EtcdSettings | None = None
    # The service this sidecar belongs to, for the default KV key.
    service: str = "default"
    # Wait for the registry at startup instead of starting from the file or the cache.
    required: bool = False
    # The last good registry document, for a start while Consul is unreachable.
    cache_path: str | None = None
    # How often the configuration file is checked for changes (ConfigMap symlink swaps).
    file_poll_interval: float = 1.0

    @property
    def key(self) -> str:
        if self.consul is not None and self.consul.key:
            return self.consul.key
        if self.etcd is not None and self.etcd.key:
            return self.etcd.key
        return f"dbsidecar/{self.service}/config"


class Settings(_Section):
    listen: ListenSettings = msgspec.field(default_factory=ListenSettings)
    ops: OpsSettings = msgspec.field(default_factory=OpsSettings)
    auth_token: str | None = None
    databases: dict[str, DatabaseSettings] = {}
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    transactions: TransactionSettings = msgspec.field(default_factory=TransactionSettings)
    coalescing: CoalescingSettings = msgspec.field(default_factory=CoalescingSettings)
    shutdown: ShutdownSettings = msgspec.field(default_factory=ShutdownSettings)
    readiness: ReadinessSettings = msgspec.field(default_factory=ReadinessSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    registry: RegistrySettings = msgspec.field(default_factory=RegistrySettings)
    tracing: TracingSettings = msgspec.field(default_factory=TracingSettings)

    def secrets(self) -> set[str]:
        """Every secret these settings hold or point to, for masking in logs and answers:
        the token, exporters' headers, and each node's password (listed nodes, and the
        template nodes found in Consul or a Patroni cluster connect with), wherever it
        comes from: the document, an environment variable or a DSN."""
        found = {self.auth_token, os.environ.get("CONSUL_HTTP_TOKEN")}
        found |= set(self.tracing.headers.values())
        for db in self.databases.values():
            nodes = [db.primary, *db.replicas]
            nodes += [n for s in db.shards for n in (s.primary, *s.replicas)]
            nodes += [
                discovered.node
                for holder in (db, *db.shards)
                for discovered in (holder.service, holder.patroni)
                if discovered is not None
            ]
            for node in nodes:
                if node is None:
                    continue
                found.add(node.password)
                if node.password_env is not None:
                    found.add(os.environ.get(node.password_env))
                if node.dsn:
                    found.add(urlsplit(node.dsn).password)
        return {secret for secret in found if secret}


def _seed_shape(name: str, entry: Any) -> Any:
    """Accept the seed design's ``driver``/``write``/``read`` database entries."""
    if isinstance(entry, dict) and isinstance(entry.get("sharding"), dict):
        sharding = entry["sharding"]
        if isinstance(sharding.get("map"), dict):
            # Keys are looked up as text; YAML reads `1: shard_a` with an int key.
            entry = {
                **entry,
                "sharding": {**sharding, "map": {str(k): v for k, v in sharding["map"].items()}},
            }
    if not isinstance(entry, dict) or not ({"write", "read", "driver"} & entry.keys()):
        return entry
    entry = dict(entry)
    driver = entry.pop("driver", "postgresql")
    if driver not in ("postgresql", "postgres"):
        raise ConfigError(f"databases.{name}.driver: only postgresql is supported, not {driver!r}")
    if "write" in entry:
        if "primary" in entry:
            raise ConfigError(f"databases.{name}: give either 'write' or 'primary', not both")
        entry["primary"] = entry.pop("write")
    if "read" in entry:
        if "replicas" in entry:
            raise ConfigError(f"databases.{name}: give either 'read' or 'replicas', not both")
        read = entry.pop("read")
        entry["replicas"] = read if isinstance(read, list) else [read]
    return entry


def _check(settings: Settings) -> None:
    if settings.auth_token == "":
        raise ConfigError("auth_token: an empty token would let anyone in; leave it unset instead")
    if settings.listen.port is None and not settings.listen.uds:
        raise ConfigError("listen: give a port, a uds path or both")
    if not 0 < settings.transactions.max_pool_share <= 1:
        raise ConfigError("transactions.max_pool_share: a share of the pool, above 0 and at most 1")
    limits = settings.limits
    for key in ("max_body_bytes", "max_header_bytes", "max_where_depth", "max_batch_plans",
                "max_in_values", "compile_cache_bytes", "max_result_rows",
                "max_channel_inflight", "max_channels"):  # fmt: skip
        if getattr(limits, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    if settings.coalescing.max_plans < 2:
        raise ConfigError("coalescing.max_plans: must be at least 2 (or set enabled: false)")
    _check_registry(settings.registry)
    if not 0.0 <= settings.tracing.sample_ratio <= 1.0:
        raise ConfigError("tracing.sample_ratio: a share of the traces, from 0 to 1")
    if settings.tracing.export_interval <= 0:
        raise ConfigError("tracing.export_interval: seconds, above 0")
    seen_nodes: set[str] = set()
    for name, db in settings.databases.items():
        where = f"databases.{name}"
        pool = db.pool
        if not 0 <= pool.min_size <= pool.max_size or pool.max_size < 1:
            raise ConfigError(f"{where}.pool: need 0 <= min_size <= max_size and max_size >= 1")
        if pool.acquire_timeout <= 0 or pool.statement_timeout < 0:
            raise ConfigError(f"{where}.pool: timeouts must be positive")
        if db.migrations is not None and (
            db.migrations.lock_timeout <= 0 or db.migrations.version_interval <= 0
        ):
            raise ConfigError(f"{where}.migrations: lock_timeout and version_interval are seconds")
        if settings.registry.etcd is not None and (
            db.service is not None or any(s.service is not None for s in db.shards)
        ):
            raise ConfigError(f"{where}: nodes from a Consul service need registry.consul")
        if db.patroni is not None:
            _check_patroni(where, db.patroni, settings.registry)
        for i, shard in enumerate(db.shards):
            if shard.patroni is not None:
                _check_patroni(f"{where}.shards[{i}]", shard.patroni, settings.registry)
        if db.sharding is None:
            if db.shards:
                raise ConfigError(f"{where}.shards: shards need a 'sharding' section")
            _check_nodes(where, db.primary, db.replicas, db.service, db.patroni, "a database")
            continue
        if db.primary is not None or db.replicas or db.service is not None or db.patroni:
            raise ConfigError(f"{where}: a sharded database lists its nodes under 'shards'")
        for i, shard in enumerate(db.shards):
            _check_nodes(
                f"{where}.shards[{i}]",
                shard.primary,
                shard.replicas,
                shard.service,
                shard.patroni,
                "a shard",
            )
        if not db.shards:
            raise ConfigError(f"{where}.shards: a sharded database needs at least one shard")
        names = [s.name for s in db.shards]
        for shard_name in names:
            if shard_name in seen_nodes or shard_name in settings.databases:
                raise ConfigError(f"{where}.shards: duplicate name {shard_name!r}")
            seen_nodes.add(shard_name)
        _check_sharding(where, db.sharding, names)


def _check_registry(registry: RegistrySettings) -> None:
    if registry.consul is not None and registry.etcd is not None:
        raise ConfigError("registry: give either consul or etcd, not both")
    etcd = registry.etcd
    if etcd is None:
        return
    if not etcd.endpoints:
        raise ConfigError("registry.etcd.endpoints: give at least one host:port")
    for i, endpoint in enumerate(etcd.endpoints):
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"registry.etcd.endpoints[{i}]: not host:port")
    if etcd.password_env is not None and etcd.password_file is not None:
        raise ConfigError("registry.etcd: give password_env or password_file, not both")
    has_password = etcd.password_env is not None or etcd.password_file is not None
    if (etcd.username is None) == has_password:
        raise ConfigError("registry.etcd: username and a password (password_env or "
                          "password_file) go together")  # fmt: skip
    if (etcd.cert_file is None) != (etcd.key_file is None):
        raise ConfigError("registry.etcd: cert_file and key_file go together")
    if etcd.timeout <= 0:
        raise ConfigError("registry.etcd.timeout: seconds, above 0")


def _check_patroni(where: str, patroni: PatroniSettings, registry: RegistrySettings) -> None:
    if not patroni.rest and registry.etcd is None:
        raise ConfigError(
            f"{where}.patroni: give the members' rest addresses, or registry.etcd to read "
            "the cluster's keys from"
        )
    for i, url in enumerate(patroni.rest):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.patroni.rest[{i}]: not an http(s)://host:port address")
    if patroni.interval <= 0:
        raise ConfigError(f"{where}.patroni.interval: seconds, above 0")


def _check_nodes(
    where: str,
    primary: NodeSettings | None,
    replicas: list[NodeSettings],
    service: ServiceSettings | None,
    patroni: PatroniSettings | None,
    what: str,
) -> None:
    if service is not None and patroni is not None:
        raise ConfigError(f"{where}: give either a service or a patroni section, not both")
    discovery = service or patroni
    if discovery is not None and (primary is not None or replicas):
        raise ConfigError(
            f"{where}: give either a service or patroni section or primary/replicas, not both"
        )
    if discovery is None and primary is None:
        raise ConfigError(
            f"{where}.primary: {what} needs a primary (or a Consul service, or a Patroni cluster)"
        )
    names = [n.label(where) for n in ([primary] if primary else []) + replicas]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two nodes have the same name; give them distinct 'name's")


def _check_sharding(where: str, sharding: ShardingSettings, names: list[str]) -> None:
    fn = sharding.function
    if fn == "range":
        bounds = sharding.bounds
        if bounds is None or len(bounds) != len(names) - 1:
            raise ConfigError(
                f"{where}.sharding.bounds: range sharding over {len(names)} shards needs "
                f"{len(names) - 1} ascending bounds"
            )
        try:
            ascending = all(a < b for a, b in itertools.pairwise(bounds))  # type: ignore[operator]
        except TypeError:
            raise ConfigError(
                f"{where}.sharding.bounds: bounds must be all numbers or all text"
            ) from None
        if not ascending:
            raise ConfigError(f"{where}.sharding.bounds: bounds must be strictly ascending")
    elif fn == "map":
        if not sharding.map:
            raise ConfigError(f"{where}.sharding.map: map sharding needs a key -> shard map")
        known = set(names)
        for key, shard in sharding.map.items():
            if shard not in known:
                raise ConfigError(f"{where}.sharding.map.{key}: unknown shard {shard!r}")
        if sharding.default is not None and sharding.default not in known:
            raise ConfigError(f"{where}.sharding.default: unknown shard {sharding.default!r}")
    elif sharding.bounds is not None or sharding.map is not None:
        raise ConfigError(f"{where}.sharding: {fn} sharding takes no bounds or map")


# Quoted text PyYAML's problems may hold that is its own syntax, not the document's.
_YAML_SYNTAX = re.compile(r"'(<[a-z ]+>|[ !,\[\]{}>.:\-?]|\\t)'")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _without_values(problem: str) -> str:
    """A parser's message with every quoted piece of the document dropped: a tag, an
    alias or an escape it quotes may be part of a password."""

    def keep(match: re.Match[str]) -> str:
        return match.group() if _YAML_SYNTAX.fullmatch(match.group()) else ""

    return " ".join(_QUOTED.sub(keep, problem).split())


def _at(mark: yaml.Mark | None, what: str) -> str:
    return what if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def _yaml_problem(exc: Exception, text: str) -> str:
    """Where and what from the parser's position, never its snippet of the text."""
    if isinstance(exc, yaml.MarkedYAMLError):
        message = _at(exc.problem_mark, _without_values(exc.problem or "not parsable"))
        if exc.context:
            # "while scanning a quoted scalar" points at where an unclosed quote opened.
            message += f" ({_at(exc.context_mark, _without_values(exc.context))})"
        return message
    if isinstance(exc, yaml.reader.ReaderError):
        line_start = text.rfind("\n", 0, exc.position) + 1
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - line_start + 1
        return f"line {line}, column {column}: a control character YAML does not allow"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    # A ValueError from a constructor, such as an impossible date (2024-02-30).
    return "a value that cannot be read (an impossible date?)"


def _load_yaml(text: str, what: str) -> Any:
    """YAML text to a value, or a ConfigError "<what>: <position>: <problem>"."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{what}: {_yaml_problem(exc, text)}") from None


def parse_document(text: str, source: str) -> dict[str, Any]:
    """YAML (a superset of JSON) text to a mapping; empty or non-mapping is an error."""
    doc = _load_yaml(text, f"{source}: not valid YAML or JSON")
    if doc is None:
        raise ConfigError(f"{source}: the configuration document is empty")
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping at the top level")
    return doc


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``DBSIDECAR_A__B=v`` as ``{"a": {"b": v}}``, only for known top-level keys."""
    top = set(Settings.__struct_fields__)
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in top:
            continue
        value: Any = raw
        # A secret is text whatever it starts with ('{' or '[' too).
        if raw.lstrip().startswith(("[", "{")) and not _SECRET_KEY.search(path[-1]):
            value = _load_yaml(raw, f"{key}: not valid YAML")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another DBSIDECAR_ variable")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"{key}: conflicts with another DBSIDECAR_ variable")
        node[path[-1]] = value
    return out


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _convert(value: Any, typ: type[T], where: str) -> T:
    try:
        # strict=False: environment values are text; '8000' fills an int, 'true' a bool.
        return msgspec.convert(value, typ, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.pool.max_sise`"; name the key from the top. Values it
        # quotes ("Invalid enum value 'x'") are dropped: the key may hold a secret.
        message = _without_values(str(exc))
        if " - at `" not in message:
            message += " - at `$`"
        prefix = where + "." if where else ""
        message = message.replace("`$.", f"`{prefix}").replace(
            "`$`", f"`{where or 'the document'}`"
        )
        raise ConfigError(message) from None


def build_settings(document: Mapping[str, Any]) -> Settings:
    """Validate a merged document into Settings, or raise ConfigError naming the key."""
    doc = dict(document)
    raw_dbs = doc.pop("databases", None)
    raw_dbs = {} if raw_dbs is None else raw_dbs
    if not isinstance(raw_dbs, dict):
        raise ConfigError("`databases` must be a mapping of name -> database")
    # One database at a time, so an error names the database (msgspec cannot for dict keys).
    databases = {
        name: _convert(_seed_shape(name, entry), DatabaseSettings, f"databases.{name}")
        for name, entry in raw_dbs.items()
    }
    settings = msgspec.structs.replace(_convert(doc, Settings, ""), databases=databases)
    _check(settings)
    return settings


def load_settings(path: str | Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """The file (if any) overlaid with the environment."""
    doc = {} if path is None else read_document(path)
    return build_settings(merge(doc, env_overrides(environ)))


def read_document(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    return parse_document(text, str(path))
