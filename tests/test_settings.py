"""sidecar.settings: the configuration document, its sources and its errors (no database)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.settings import (
    ConfigError,
    NodeSettings,
    Settings,
    env_overrides,
    load_settings,
)

FULL = """
listen:
  host: 0.0.0.0
  port: 7000
  uds: /run/dbsidecar.sock
ops:
  port: 9000
auth_token: s3cret-token
logging:
  level: debug
health:
  interval: 0.5
  failure_threshold: 5
limits:
  max_where_depth: 8
transactions:
  idle_timeout: 10
databases:
  orders:
    primary: {host: pg-primary, port: 5433, database: orders, user: app, password_env: ORDERS_PW}
    replicas:
      - {name: replica-a, host: pg-replica-a, database: orders}
      - {dsn: "postgresql://app:pw@pg-replica-b:5434/orders"}
    read_default: replica
    replica_strategy: least_busy
    max_replica_lag_bytes: 1048576
    fallback_to_primary: false
    pool: {min_size: 2, max_size: 5, acquire_timeout: 1.5}
  users:
    sharding: {key: id, function: hash}
    shards:
      - name: user_shard_0
        primary: {host: pg-s0, database: users_0}
        replicas: [{host: pg-s0-r, database: users_0}]
      - name: user_shard_1
        primary: {host: pg-s1, database: users_1}
  accounts:
    sharding: {key: id, function: range, bounds: [1000, 2000]}
    shards:
      - {name: acc_0, primary: {host: a0}}
      - {name: acc_1, primary: {host: a1}}
      - {name: acc_2, primary: {host: a2}}
  regions:
    sharding: {key: region, function: map, map: {eu: reg_eu, us: reg_us}, default: reg_eu}
    shards:
      - {name: reg_eu, primary: {host: eu}}
      - {name: reg_us, primary: {host: us}}
"""

PRIMARY = {"host": "127.0.0.1", "database": "orders"}


def write(tmp_path: Path, content: str | dict[str, Any], name: str = "dbsidecar.yaml") -> Path:
    path = tmp_path / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text)
    return path


def load(tmp_path: Path, content: str | dict[str, Any], environ: dict[str, str] | None = None):
    return load_settings(write(tmp_path, content), environ={} if environ is None else environ)


def config_error(tmp_path: Path, content: str | dict[str, Any], **environ: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, content, environ)
    return str(raised.value)


def sharded(shards: list[str], **sharding: Any) -> dict[str, Any]:
    return {
        "sharding": {"key": "id", **sharding},
        "shards": [{"name": s, "primary": {"host": s}} for s in shards],
    }


# --- the document -------------------------------------------------------------------------


def test_full_document_loads_typed(tmp_path: Path) -> None:
    s = load(tmp_path, FULL)
    assert isinstance(s, Settings)
    assert (s.listen.host, s.listen.port, s.listen.uds) == ("0.0.0.0", 7000, "/run/dbsidecar.sock")
    assert (s.ops.host, s.ops.port) == ("0.0.0.0", 9000)
    assert s.auth_token == "s3cret-token"
    assert s.logging.level == "debug"
    assert s.health.interval == 0.5 and s.health.failure_threshold == 5
    assert s.health.timeout == 1.0  # untouched sections keep their defaults
    assert s.limits.max_where_depth == 8 and s.limits.max_batch_plans == 1000
    assert s.transactions.idle_timeout == 10.0
    assert isinstance(s.transactions.idle_timeout, float)
    assert list(s.databases) == ["orders", "users", "accounts", "regions"]

    orders = s.databases["orders"]
    assert orders.primary is not None
    assert (orders.primary.host, orders.primary.port) == ("pg-primary", 5433)
    assert (orders.primary.database, orders.primary.user) == ("orders", "app")
    assert orders.primary.password_env == "ORDERS_PW"
    assert [r.name for r in orders.replicas] == ["replica-a", None]
    assert orders.replicas[0].port == 5432
    assert orders.replicas[1].dsn == "postgresql://app:pw@pg-replica-b:5434/orders"
    assert orders.read_default == "replica"
    assert orders.replica_strategy == "least_busy"
    assert orders.max_replica_lag_bytes == 1048576
    assert orders.fallback_to_primary is False
    assert orders.ryw_wait_ms == 50
    assert (orders.pool.min_size, orders.pool.max_size) == (2, 5)
    assert orders.pool.acquire_timeout == 1.5 and orders.pool.statement_timeout == 30.0
    assert orders.sharding is None and orders.shards == []

    users = s.databases["users"]
    assert users.primary is None
    assert users.sharding is not None
    assert (users.sharding.key, users.sharding.function) == ("id", "hash")
    assert [sh.name for sh in users.shards] == ["user_shard_0", "user_shard_1"]
    assert users.shards[0].primary.host == "pg-s0"
    assert [r.host for r in users.shards[0].replicas] == ["pg-s0-r"]
    assert users.shards[1].replicas == []

    accounts = s.databases["accounts"].sharding
    assert accounts is not None and accounts.bounds == [1000, 2000]
    regions = s.databases["regions"].sharding
    assert regions is not None
    assert regions.map == {"eu": "reg_eu", "us": "reg_us"} and regions.default == "reg_eu"


def test_minimal_document_gets_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, {"databases": {"orders": {"primary": PRIMARY}}})
    assert (s.listen.host, s.listen.port, s.listen.uds) == ("127.0.0.1", 7432, None)
    assert s.ops.port == 9432 and s.auth_token is None and s.logging.level == "info"
    db = s.databases["orders"]
    assert db.read_default == "primary" and db.replicas == [] and db.fallback_to_primary
    assert (db.pool.min_size, db.pool.max_size) == (1, 10)


def test_json_file_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '{"databases": {"orders": {"primary": {"port": 6000}}}}', "c.json")
    s = load_settings(path, environ={})
    assert s.databases["orders"].primary is not None
    assert s.databases["orders"].primary.port == 6000


def test_no_file_only_environment() -> None:
    s = load_settings(None, environ={"DBSIDECAR_DATABASES__ORDERS__PRIMARY__PORT": "6001"})
    assert s.databases["orders"].primary is not None
    assert s.databases["orders"].primary.port == 6001


# --- the seed's shape ---------------------------------------------------------------------


def test_seed_shape_maps_to_primary_and_replicas(tmp_path: Path) -> None:
    doc = """
    databases:
      orders:
        driver: postgresql
        write: {host: w, database: orders}
        read:
          - {host: r1, database: orders}
          - {host: r2, database: orders}
        read_default: replica
    """
    db = load(tmp_path, textwrap.dedent(doc)).databases["orders"]
    assert db.primary is not None and db.primary.host == "w"
    assert [r.host for r in db.replicas] == ["r1", "r2"]
    assert db.read_default == "replica"


def test_seed_shape_single_read_mapping_and_postgres_alias(tmp_path: Path) -> None:
    doc = {
        "databases": {
            "orders": {"driver": "postgres", "write": {"host": "w"}, "read": {"host": "r"}}
        }
    }
    db = load(tmp_path, doc).databases["orders"]
    assert db.primary is not None and db.primary.host == "w"
    assert [r.host for r in db.replicas] == ["r"]


def test_seed_shape_refuses_mysql(tmp_path: Path) -> None:
    doc = {"databases": {"legacy": {"driver": "mysql", "write": {"host": "w"}}}}
    message = config_error(tmp_path, doc)
    assert "databases.legacy.driver" in message
    assert "mysql" in message


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"write": PRIMARY, "primary": PRIMARY}, "'write' or 'primary'"),
        ({"primary": PRIMARY, "read": [PRIMARY], "replicas": [PRIMARY]}, "'read' or 'replicas'"),
    ],
)
def test_seed_shape_and_ours_do_not_mix(tmp_path: Path, entry: dict, fragment: str) -> None:
    message = config_error(tmp_path, {"databases": {"orders": entry}})
    assert "databases.orders" in message
    assert fragment in message


# --- passwords ----------------------------------------------------------------------------


def test_password_env_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSIDECAR_TEST_ORDERS_PW", "hunter2")
    node = NodeSettings(password_env="DBSIDECAR_TEST_ORDERS_PW", password="ignored")
    assert node.resolved_password("databases.orders.primary") == "hunter2"


def test_plain_password_without_password_env() -> None:
    assert NodeSettings(password="pw").resolved_password("x") == "pw"
    assert NodeSettings().resolved_password("x") is None


def test_missing_password_env_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBSIDECAR_TEST_MISSING_PW", raising=False)
    node = NodeSettings(password_env="DBSIDECAR_TEST_MISSING_PW")
    with pytest.raises(ConfigError) as raised:
        node.resolved_password("databases.orders.primary")
    message = str(raised.value)
    assert "databases.orders.primary.password_env" in message
    assert "DBSIDECAR_TEST_MISSING_PW" in message


@pytest.mark.parametrize(
    ("node", "label"),
    [
        (NodeSettings(name="replica-a", password="topsecret"), "replica-a"),
        (NodeSettings(host="db1", port=6432, password="topsecret"), "db1:6432/orders"),
        (NodeSettings(host="db1", database="other", password="topsecret"), "db1:5432/other"),
        (NodeSettings(dsn="postgresql://app:topsecret@db2:6543/orders"), "db2:6543/orders"),
        (NodeSettings(dsn="postgresql://app:topsecret@db2"), "db2:5432/orders"),
    ],
)
def test_label_never_shows_the_password(node: NodeSettings, label: str) -> None:
    assert node.label("orders") == label
    assert "topsecret" not in node.label("orders")


# --- the environment ----------------------------------------------------------------------


def test_env_overrides_keep_text_for_typed_conversion_later() -> None:
    # Values stay text here (a token like "null" or "0x1F" must stay a token); the
    # typed conversion happens when settings are built.
    overrides = env_overrides(
        {
            "DBSIDECAR_LISTEN__PORT": "8000",
            "DBSIDECAR_DATABASES__ORDERS__POOL__MAX_SIZE": "20",
            "DBSIDECAR_READINESS__REQUIRE_PRIMARY": "true",
            "DBSIDECAR_AUTH_TOKEN": "abc",
        }
    )
    assert overrides == {
        "listen": {"port": "8000"},
        "databases": {"orders": {"pool": {"max_size": "20"}}},
        "readiness": {"require_primary": "true"},
        "auth_token": "abc",
    }


def test_env_ignores_unrelated_variables() -> None:
    environ = {
        "DBSIDECAR_URL": "http://127.0.0.1:7432",
        "DBSIDECAR_PG_BIN": "/usr/lib/postgresql/16/bin",
        "DBSIDECAR_WORKER_ID": "3",
        "LISTEN__PORT": "1",
        "PATH": "/usr/bin",
    }
    assert env_overrides(environ) == {}


def test_env_listen_port_is_an_int(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        {"databases": {"orders": {"primary": PRIMARY}}},
        {"DBSIDECAR_LISTEN__PORT": "8000"},
    )
    assert s.listen.port == 8000
    assert isinstance(s.listen.port, int)
    assert s.listen.host == "127.0.0.1"  # the rest of the section is untouched


def test_env_wins_over_file(tmp_path: Path) -> None:
    doc = {
        "listen": {"port": 7000},
        "databases": {"orders": {"primary": PRIMARY, "pool": {"min_size": 3, "max_size": 5}}},
    }
    environ = {
        "DBSIDECAR_LISTEN__PORT": "8000",
        "DBSIDECAR_DATABASES__ORDERS__POOL__MAX_SIZE": "20",
        "DBSIDECAR_LOGGING__LEVEL": "warning",
    }
    s = load(tmp_path, doc, environ)
    assert s.listen.port == 8000
    pool = s.databases["orders"].pool
    assert pool.max_size == 20
    assert pool.min_size == 3  # a sibling key from the file survives the override
    assert s.databases["orders"].primary == NodeSettings(**PRIMARY)
    assert s.logging.level == "warning"


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
def test_env_booleans_parse(tmp_path: Path, raw: str, expected: bool) -> None:
    environ = {
        "DBSIDECAR_DATABASES__ORDERS__FALLBACK_TO_PRIMARY": raw,
        "DBSIDECAR_READINESS__REQUIRE_PRIMARY": raw,
    }
    s = load(tmp_path, {"databases": {"orders": {"primary": PRIMARY}}}, environ)
    assert s.databases["orders"].fallback_to_primary is expected
    assert s.readiness.require_primary is expected


def test_env_bad_value_names_the_key(tmp_path: Path) -> None:
    message = config_error(
        tmp_path,
        {"databases": {"orders": {"primary": PRIMARY}}},
        DBSIDECAR_DATABASES__ORDERS__POOL__MAX_SIZE="many",
    )
    assert "`databases.orders.pool.max_size`" in message


# --- errors name the key ------------------------------------------------------------------


def orders(**entry: Any) -> dict[str, Any]:
    return {"databases": {"orders": {"primary": PRIMARY, **entry}}}


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        pytest.param(
            orders(pool={"max_sise": 20}),
            ["`max_sise`", "`databases.orders.pool`"],
            id="unknown-key",
        ),
        pytest.param({"lisen": {"port": 1}}, ["`lisen`"], id="unknown-top-level-key"),
        pytest.param(
            orders(pool={"max_size": "twenty"}),
            ["Expected `int`", "`databases.orders.pool.max_size`"],
            id="wrong-type",
        ),
        pytest.param(
            {"databases": {"orders": {"primary": {"port": "x"}}}},
            ["`databases.orders.primary.port`"],
            id="wrong-type-in-node",
        ),
        pytest.param({"listen": {"port": "x"}}, ["`listen.port`"], id="wrong-type-top-level"),
        pytest.param(
            orders(read_default="sometimes"), ["`databases.orders.read_default`"], id="bad-enum"
        ),
        pytest.param(
            orders(pool={"min_size": 5, "max_size": 2}),
            ["databases.orders.pool"],
            id="pool-min>max",
        ),
        pytest.param(
            orders(pool={"max_size": 0, "min_size": 0}), ["databases.orders.pool"], id="pool-0"
        ),
        pytest.param(
            orders(pool={"acquire_timeout": 0}), ["databases.orders.pool", "timeouts"], id="timeout"
        ),
        pytest.param(
            {"databases": {"orders": {"replicas": [PRIMARY]}}},
            ["databases.orders.primary"],
            id="no-primary",
        ),
        pytest.param(
            {"databases": {"users": {"sharding": {"key": "id", "function": "hash"}}}},
            ["databases.users.shards"],
            id="sharded-without-shards",
        ),
        pytest.param(
            {"databases": {"users": {**sharded(["a"], function="hash"), "primary": PRIMARY}}},
            ["databases.users", "shards"],
            id="sharded-with-primary",
        ),
        pytest.param(
            {"databases": {"users": {"shards": [{"name": "a", "primary": PRIMARY}]}}},
            ["databases.users.shards", "sharding"],
            id="shards-without-sharding",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b", "c"], function="range", bounds=[10])}},
            ["databases.users.sharding.bounds", "2 ascending bounds"],
            id="range-too-few-bounds",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b"], function="range")}},
            ["databases.users.sharding.bounds"],
            id="range-no-bounds",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b", "c"], function="range", bounds=[20, 10])}},
            ["databases.users.sharding.bounds", "ascending"],
            id="range-descending",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b", "c"], function="range", bounds=[10, 10])}},
            ["databases.users.sharding.bounds", "ascending"],
            id="range-equal-bounds",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b"], function="map", map={"eu": "zz"})}},
            ["databases.users.sharding.map.eu", "'zz'"],
            id="map-unknown-shard",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a"], function="map", map={"eu": "a"}, default="zz")}},
            ["databases.users.sharding.default", "'zz'"],
            id="map-unknown-default",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a"], function="map")}},
            ["databases.users.sharding.map"],
            id="map-without-map",
        ),
        pytest.param(
            {"databases": {"users": sharded(["a", "b"], function="hash", bounds=[1])}},
            ["databases.users.sharding", "no bounds or map"],
            id="hash-with-bounds",
        ),
        pytest.param(
            {
                "databases": {
                    "users": sharded(["s0", "s1"], function="hash"),
                    "people": sharded(["s1", "s2"], function="hash"),
                }
            },
            ["databases.people.shards", "duplicate name 's1'"],
            id="duplicate-shard-across-databases",
        ),
        pytest.param(
            {
                "databases": {
                    "orders": {"primary": PRIMARY},
                    "users": sharded(["orders"], function="hash"),
                }
            },
            ["databases.users.shards", "duplicate name 'orders'"],
            id="shard-named-like-a-database",
        ),
        pytest.param({"listen": {"port": None}}, ["listen"], id="listen-nowhere"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, doc: dict[str, Any], fragments: list[str]) -> None:
    message = config_error(tmp_path, doc)
    for fragment in fragments:
        assert fragment in message
    assert "$" not in message  # msgspec's "$.x.y" paths are rewritten to plain key paths


def test_unknown_key_directly_under_a_database_names_it(tmp_path: Path) -> None:
    message = config_error(tmp_path, orders(replica=[PRIMARY]))
    assert "`replica`" in message
    assert "databases.orders" in message


def test_mixed_type_range_bounds_are_a_config_error(tmp_path: Path) -> None:
    doc = {"databases": {"users": sharded(["a", "b", "c"], function="range", bounds=[10, "m"])}}
    message = config_error(tmp_path, doc)
    assert "databases.users.sharding.bounds" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- a\n- b\n", "mapping"),
        ("just a string\n", "mapping"),
        ("listen: {port: 1\n", "not valid YAML"),
        ("listen:\n  port: 1\n bad: indent\n", "not valid YAML"),
    ],
)
def test_unusable_documents(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert fragment in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert "cannot read configuration file" in str(raised.value)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("token", ["null", "~", "123456", "yes", "0x1F"])
def test_env_tokens_stay_text_and_never_switch_auth_off(tmp_path: Path, token: str) -> None:
    doc = {"databases": {"orders": {"primary": PRIMARY}}}
    settings = load(tmp_path, doc, {"DBSIDECAR_AUTH_TOKEN": token})
    assert settings.auth_token == token


def test_empty_auth_token_is_refused(tmp_path: Path) -> None:
    doc = {"databases": {"orders": {"primary": PRIMARY}}}
    assert "auth_token" in config_error(tmp_path, doc, DBSIDECAR_AUTH_TOKEN="")


# Secrets in configuration errors (issue 10): a message names the line or the key and
# never quotes the document, whose broken line may be the password's.
SECRET = "Pa55Zq9x"
NODE_LINES = "databases:\n  orders:\n    primary:\n      host: db\n"


def assert_no_secret(message: str) -> None:
    for fragment in (SECRET, SECRET[:4], SECRET[4:]):
        assert fragment not in message, message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(NODE_LINES + f'      password: "{SECRET}\n', 5, id="unclosed-quote"),
        pytest.param(f"auth_token: '{SECRET}\nlisten: {{port: 1}}\n", 1, id="unclosed-single"),
        pytest.param(NODE_LINES + f"\tpassword: {SECRET}\n", 5, id="tab"),
        pytest.param(NODE_LINES + f"      password: {SECRET}: x\n", 5, id="bad-mapping"),
        pytest.param(f"auth_token: *{SECRET}\n", 1, id="alias"),
        pytest.param(NODE_LINES + f"      password: !{SECRET}\n", 5, id="tag"),
        pytest.param(f'auth_token: "{SECRET[:4]}\\q{SECRET[4:]}"\n', 1, id="unknown-escape"),
        pytest.param(f"listen: {{}}\nauth_token: {SECRET}\x07\n", 2, id="control-character"),
        pytest.param(
            f'{{"auth_token": "{SECRET}"\n "listen": {{"port": 1}}}}\n', 2, id="json-missing-comma"
        ),
    ],
)
def test_syntax_errors_name_the_line_never_the_text(tmp_path: Path, text: str, line: int) -> None:
    message = config_error(tmp_path, text)
    assert "not valid YAML or JSON" in message
    assert f"line {line}," in message
    assert_no_secret(message)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("auth_token: 2024-02-30\n", "cannot be read", id="impossible-date"),
        pytest.param("auth_token: " + "[" * 5000 + "]" * 5000 + "\n", "deep", id="deep-nesting"),
    ],
)
def test_unbuildable_values_are_config_errors(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in config_error(tmp_path, text)


def test_validation_errors_never_quote_the_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, orders(primary={**PRIMARY, "driver": SECRET}))
    assert "databases.orders.primary.driver" in message
    assert_no_secret(message)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{SECRET[:4]}/{SECRET[4:]}@db/orders",  # '/' ends the host part
        f"postgresql://app:{SECRET}@db:{SECRET}/orders",
        f"mysql://app:{SECRET}@db/orders",
    ],
)
def test_unreadable_dsns_name_the_node_never_the_dsn(tmp_path: Path, dsn: str) -> None:
    message = config_error(tmp_path, orders(primary={"dsn": dsn}))
    assert "databases.orders.primary" in message and "dsn" in message
    assert_no_secret(message)


def test_env_secrets_stay_text_whatever_they_start_with(tmp_path: Path) -> None:
    doc = {"databases": {"orders": {"primary": PRIMARY}}}
    settings = load(tmp_path, doc, {"DBSIDECAR_AUTH_TOKEN": "{" + SECRET})
    assert settings.auth_token == "{" + SECRET


def test_env_document_errors_name_the_variable_and_position_never_the_text() -> None:
    raw = f'{{"orders": {{"primary": {{"password": "{SECRET}" "host": "db"}}}}}}'
    with pytest.raises(ConfigError) as raised:
        env_overrides({"DBSIDECAR_DATABASES": raw})
    message = str(raised.value)
    assert message.startswith("DBSIDECAR_DATABASES: not valid YAML: line 1, column")
    assert_no_secret(message)


def test_secrets_are_every_password_token_and_header_wherever_they_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the sidecar, `dbsidecar migrate` and `dbsidecar relay` mask in their logs."""
    monkeypatch.setenv("ORDERS_PW", "from-the-environment")
    settings = load(tmp_path, {
        "auth_token": "the-data-token",
        "tracing": {"otlp_endpoint": "http://c:4318/v1/traces", "headers": {"k": "export-key"}},
        "databases": {
            "orders": {"primary": {"password_env": "ORDERS_PW"},
                       "replicas": [{"dsn": "postgresql://u:in-a-dsn@h:5432/orders"}]},
            "billing": {"patroni": {"scope": "b", "rest": ["http://p:8008"],
                                    "node": {"password": "patroni-template"}}},
        },
    })  # fmt: skip
    assert settings.secrets() == {
        "the-data-token", "export-key", "from-the-environment", "in-a-dsn", "patroni-template"
    }  # fmt: skip
