"""Schemathesis against the session sidecar, driven by its own /openapi.json.

Every documented data-plane operation is fuzzed with valid and invalid requests
(positive and negative generation); no answer may be a 5xx, and every answer must
match the documented status codes and schemas. The run is derandomized with a fixed
seed, so a failure reproduces.

The plans are pointed at a dedicated ``fuzz`` table (on ``orders`` and on every shard of
``users``): the document served by the sidecar names no tables, so the test narrows the
``database`` and ``table`` fields of its copy to these, which keeps fuzzed writes away
from the tables other tests count rows in while still reaching the compiler and
PostgreSQL with real columns of many types. Negative generation still sends other names.
Plans for ``/v1/tx/{tx_id}`` run in a real transaction that is committed afterwards;
transactions the fuzzer opens are rolled back, so none holds a pool connection.
``/quitquitquit`` is documented but not fuzzed: it stops the shared sidecar.
``/v1/admin/reload`` is fuzzed: it re-reads the unchanged configuration file.
``/v1/migrate`` is fuzzed: the session sidecar enables migrations for no database, so
every request is refused before a shard is touched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from devstack.postgres import LocalTopology
from devstack.topology import USER_SHARDS

from ..conftest import server_dsn, shard_server
from ..harness import SidecarProcess, http_get, wait_until

FUZZ_TABLE = """
CREATE TABLE fuzz (
    id bigint, n integer, f double precision, t text, ts timestamptz, d date,
    dec numeric, j jsonb, b bytea, u uuid, flag boolean, ints integer[]
)
"""
COLUMNS = ["id", "n", "f", "t", "ts", "d", "dec", "j", "b", "u", "flag", "ints"]
DATABASES = ["orders", "users"]
# Examples per operation in the fuzzing phase (the coverage phase is a fixed set): the
# whole run takes well under a minute.
MAX_EXAMPLES = 40


@schemathesis.check
def no_bundled_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A bundle answers 200 with a status per plan: a 5xx there is a server error too."""
    if case.path == "/v1/bundle" and response.status_code == 200:
        failed = [item for item in response.json()["items"] if item.get("status", 200) >= 500]
        if failed:
            raise AssertionError(f"bundled plans answered 5xx: {failed}")


CHECKS = [
    not_a_server_error,
    no_bundled_server_error,
    response_schema_conformance,
    status_code_conformance,
]


def _fuzz_targets(topo: LocalTopology) -> list[str]:
    return [server_dsn(topo, topo.primary, "orders")] + [
        server_dsn(topo, shard_server(topo, i), name) for i, name in enumerate(USER_SHARDS)
    ]


async def _on_each(dsns: list[str], sql: str) -> None:
    for dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def fuzz_tables(topology: LocalTopology) -> Iterator[None]:
    dsns = _fuzz_targets(topology)
    asyncio.run(_on_each(dsns, FUZZ_TABLE))
    yield
    asyncio.run(_on_each(dsns, "DROP TABLE fuzz"))


def _narrow(document: dict[str, Any]) -> None:
    """Point the plans of the document at the fuzz tables and their columns."""
    column = {"enum": COLUMNS}
    schemas = document["components"]["schemas"]
    for schema in schemas.values():
        props = schema.get("properties", {})
        if "database" in props:
            props["database"] = {"enum": DATABASES}
        if "table" not in props:
            continue
        props["table"] = {"enum": ["fuzz"]}
        for name in ("columns", "returning"):
            if name in props:
                props[name]["anyOf"][0]["items"] = column
        if "group_by" in props:
            props["group_by"]["items"] = column
        if "rows" in props:
            props["rows"]["items"]["propertyNames"] = column
        if "set" in props:
            props["set"]["propertyNames"] = column
    schemas["OrderBy"]["properties"]["col"] = column
    schemas["Aggregate"]["properties"]["col"]["anyOf"][0] = column
    comparison = schemas["Where"]["anyOf"][-1]
    comparison["properties"]["col"] = column


@pytest.fixture
def api(sidecar: SidecarProcess, fuzz_tables: None) -> schemathesis.BaseSchema:
    status, body = http_get(sidecar.url + "/openapi.json")
    assert status == 200
    document = json.loads(body)
    # Every data-plane route is documented (DataPlane.__init__ in sidecar/api.py).
    assert set(document["paths"]) == {
        "/v1/query",
        "/v1/batch",
        "/v1/bundle",
        "/v1/tx",
        "/v1/tx/{tx_id}",
        "/v1/tx/{tx_id}/commit",
        "/v1/tx/{tx_id}/rollback",
        "/v1/migrate",
        "/v1/topology",
        "/openapi.json",
        "/quitquitquit",
        "/v1/admin/reload",
    }
    _narrow(document)
    config = schemathesis.Config.from_dict(
        {
            "seed": 20240510,
            "base-url": sidecar.url,
            # No shrinking: a failure's example is already small enough to read, and
            # shrinking one would take minutes of requests against the per-test timeout.
            "generation": {
                "mode": "all",
                "deterministic": True,
                "max-examples": MAX_EXAMPLES,
                "no-shrink": True,
            },
        }
    )
    return schemathesis.openapi.from_dict(document, config=config)


def _up_nodes(sidecar: SidecarProcess) -> set[str]:
    topology = json.loads(http_get(sidecar.url + "/v1/topology")[1])
    return {n["name"] for db in topology["databases"].values() for n in db["nodes"] if n["up"]}


@pytest.fixture
def nodes_up(sidecar: SidecarProcess) -> Iterator[None]:
    """After the run every node that was up before is up again: no fuzzed request may
    leave later tests a sidecar that has marked a node down."""
    before = _up_nodes(sidecar)
    yield
    wait_until(lambda: before <= _up_nodes(sidecar), 30, "the nodes to be up after fuzzing")


schema = schemathesis.pytest.from_fixture("api").exclude(path="/quitquitquit")


def _begin(base_url: str, database: Any) -> str:
    # The plan's own database when it is one, so the plan meets a transaction it may use.
    name = database if database in DATABASES else "orders"
    resp = requests.post(f"{base_url}/v1/tx", json={"database": name}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _finish(base_url: str, tx_id: str, how: str) -> requests.Response:
    resp = requests.post(f"{base_url}/v1/tx/{tx_id}/{how}", timeout=30)
    assert resp.status_code < 500, f"{how} answered {resp.status_code}: {resp.text}"
    return resp


@schema.parametrize()
def test_schema_conformance(
    case: schemathesis.Case, sidecar: SidecarProcess, nodes_up: None
) -> None:
    base_url = sidecar.url
    if case.path != "/v1/tx/{tx_id}" or case.method.upper() != "POST":
        response = case.call_and_validate(checks=CHECKS)
        if case.path == "/v1/tx" and response.status_code == 200:
            # Transactions the fuzzer opens must not hold pool connections afterwards.
            _finish(base_url, response.json()["id"], "rollback")
        return
    # A random id only meets 404: run the fuzzed plan inside a real transaction, then commit.
    database = case.body.get("database") if isinstance(case.body, dict) else None
    tx_id = _begin(base_url, database)
    case.path_parameters = {"tx_id": tx_id}
    try:
        response = case.call_and_validate(checks=CHECKS)
    finally:
        done = _finish(base_url, tx_id, "commit")
        if done.status_code != 200:
            _finish(base_url, tx_id, "rollback")
    error = response.json().get("error") if response.status_code != 200 else None
    if error and error.get("sqlstate"):
        # PostgreSQL aborted the transaction: its commit is a rollback, never a 200.
        assert done.status_code != 200, f"commit after a failed plan ({error}): {done.text}"
