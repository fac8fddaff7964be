"""The OpenAPI document of the data API, generated from the wire types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from wire.migrations import MigrateRequest, MigrationReport
from wire.protocol import (
    COMPARISON_OPS,
    Batch,
    BatchResult,
    Bundle,
    BundleResult,
    ChannelAnswer,
    ChannelRequest,
    ErrorEnvelope,
    Plan,
    Result,
    TxBegin,
    TxDone,
    TxOpened,
)

from . import __version__

_REF = "#/components/schemas/{name}"
_WHERE_REF = {"$ref": _REF.format(name="Where")}

# The wire types carry where-trees as plain objects (the sidecar checks them); the
# document states their real shape so readers and fuzzers see what is accepted.
_WHERE: dict[str, Any] = {
    "description": "A where-tree: {and|or: [...]}, {not: ...} or a comparison.",
    "anyOf": [
        *(
            {
                "type": "object",
                "properties": {key: {"type": "array", "items": _WHERE_REF}},
                "required": [key],
                "additionalProperties": False,
            }
            for key in ("and", "or")
        ),
        {
            "type": "object",
            "properties": {"not": _WHERE_REF},
            "required": ["not"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "col": {"type": "string"},
                "op": {"enum": sorted(COMPARISON_OPS)},
                # A typed wire value (wire.values): JSON, or {"$datetime": ...} and kin;
                # a list for in/not_in/between, a boolean for is_null.
                "value": {},
            },
            "required": ["col", "op"],
            "additionalProperties": False,
        },
    ],
}

_TOPOLOGY: dict[str, Any] = {
    "type": "object",
    "description": "Databases, shards and nodes with their live state (as /healthz).",
    "properties": {
        "started": {"type": "boolean"},
        "draining": {"type": "boolean"},
        "inflight": {"type": "integer"},
        "databases": {"type": "object", "additionalProperties": {"type": "object"}},
    },
    "required": ["started", "draining", "databases"],
}

_RELOAD: dict[str, Any] = {
    "type": "object",
    "properties": {"result": {"type": "string"}, "error": {"type": ["string", "null"]}},
    "required": ["result", "error"],
}

_QUIT: dict[str, Any] = {
    "type": "object",
    "properties": {"status": {"const": "draining"}},
    "required": ["status"],
}

# Plan first: its schema is an anyOf, which becomes a component of its own.
_WIRE_TYPES = (
    Plan,
    Batch,
    Bundle,
    TxBegin,
    TxOpened,
    TxDone,
    Result,
    BatchResult,
    BundleResult,
    ErrorEnvelope,
    ChannelRequest,
    ChannelAnswer,
    MigrateRequest,
    MigrationReport,
)

_CHANNEL = """\
A WebSocket on the data listeners (TCP and the Unix socket) carrying many plans at once.
Each text frame holds one JSON object. Client to sidecar (ChannelRequest):
`{"id": n, "plan": Plan}` or `{"id": n, "plans": [Plan, ...]}` (a bundle, as /v1/bundle),
optionally with `"request_id"`; the id is the client's, unique among its frames in flight.
Sidecar to client (ChannelAnswer), in completion order: `{"id", "status": 200, "result"}`,
`{"id", "status": 200, "items": [BundleItem, ...]}` or `{"id", "status", "error"}` with the
status HTTP would have answered. At most limits.max_channel_inflight plans per channel are
in flight; beyond it the sidecar stops reading until answers are read. A frame that is not
valid but names an integer id is answered 400; one without a readable id closes the
channel with 1007; one beyond limits.max_body_bytes closes it with 1009. On shutdown,
frames are answered 503 `draining` without running, and once every frame read has been
answered the channel closes with 1001: a frame without an answer then never ran.
"""

_TX_ID: list[dict[str, Any]] = [
    {"name": "tx_id", "in": "path", "required": True, "schema": {"type": "string"}}
]


def _json(schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(schema, str):
        schema = {"$ref": _REF.format(name=schema)}
    return {"content": {"application/json": {"schema": schema}}}


def _operation(
    summary: str,
    response: dict[str, Any] | str,
    request: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # Every failure answers the error envelope with a fitting 4xx/5xx status.
    error = {"description": "An error", **_json("ErrorEnvelope")}
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", **_json(response)},
            **(extra or {}),
            "4XX": error,
            "5XX": error,
        },
    }
    if request is not None:
        operation["requestBody"] = {"required": True, **_json(request)}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _channel_operation() -> dict[str, Any]:
    return {
        "summary": "Open a channel: a WebSocket for many plans in flight at once",
        "description": _CHANNEL,
        "parameters": [
            {"name": name, "in": "header", "required": True, "schema": {"const": value}}
            for name, value in (("connection", "Upgrade"), ("upgrade", "websocket"))
        ],
        "responses": {
            "101": {"description": "Switching protocols: ChannelRequest, ChannelAnswer frames"},
            "401": {"description": "Missing or wrong bearer token", **_json("ErrorEnvelope")},
            "503": {"description": "The sidecar is draining", **_json("ErrorEnvelope")},
        },
    }


def _with_where_trees(components: dict[str, Any]) -> None:
    for schema in components.values():
        where = schema.get("properties", {}).get("where")
        if where is not None:
            where["anyOf"] = [_WHERE_REF, {"type": "null"}]
    components["Where"] = _WHERE


@functools.cache
def openapi_document() -> dict[str, Any]:
    (plan_ref, *_), components = msgspec.json.schema_components(
        _WIRE_TYPES,
        ref_template=_REF,
    )
    components["Plan"] = plan_ref
    _with_where_trees(components)
    post, get = "post", "get"
    return {
        "openapi": "3.1.0",
        "info": {"title": "dbsidecar data API", "version": __version__},
        "paths": {
            "/v1/query": {post: _operation("Run one plan", "Result", "Plan")},
            "/v1/batch": {post: _operation("Run plans in one transaction", "BatchResult", "Batch")},
            "/v1/bundle": {
                post: _operation(
                    "Run independent plans, each on its own (errors per plan)",
                    "BundleResult",
                    "Bundle",
                )
            },
            "/v1/tx": {post: _operation("Open an interactive transaction", "TxOpened", "TxBegin")},
            "/v1/tx/{tx_id}": {
                post: _operation("Run a plan in a transaction", "Result", "Plan", _TX_ID)
            },
            "/v1/tx/{tx_id}/commit": {
                post: _operation("Commit a transaction", "TxDone", parameters=_TX_ID)
            },
            "/v1/tx/{tx_id}/rollback": {
                post: _operation("Roll a transaction back", "TxDone", parameters=_TX_ID)
            },
            "/v1/migrate": {
                post: _operation(
                    "Apply schema migrations to every shard of a database (the files sent, "
                    "or the configured folder when none); 200 whenever the migrator ran, "
                    "with ok and each shard's outcome",
                    "MigrationReport",
                    "MigrateRequest",
                )
            },
            "/v1/topology": {get: _operation("The live topology", _TOPOLOGY)},
            "/openapi.json": {get: _operation("This document", {"type": "object"})},
            "/quitquitquit": {
                post: _operation("Drain and exit, as on SIGTERM (stops the sidecar)", _QUIT)
            },
            "/v1/admin/reload": {
                post: _operation(
                    "Reload the configuration from its sources",
                    _RELOAD,
                    extra={"422": {"description": "Refused configuration", **_json(_RELOAD)}},
                )
            },
        },
        # A WebSocket is no HTTP operation a client or a fuzzer could call as one: the
        # channel is a path item under an extension key.
        "x-websocket": {"/v1/channel": {get: _channel_operation()}},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # The bearer token is needed only when the sidecar is configured with one.
        "security": [{}, {"bearer": []}],
    }
