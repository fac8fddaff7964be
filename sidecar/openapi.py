"""The OpenAPI document of the data API, generated from the wire types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from client.protocol import Batch, BatchResult, ErrorEnvelope, Plan, Result

from . import __version__


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _post(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **_json(request)},
            "responses": {
                "200": {"description": "OK", **_json(response)},
                "default": {"description": "An error", **_json("ErrorEnvelope")},
            },
        }
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    (plan_ref, *_), components = msgspec.json.schema_components(
        [Plan, Batch, Result, BatchResult, ErrorEnvelope],
        ref_template="#/components/schemas/{name}",
    )
    components["Plan"] = plan_ref
    return {
        "openapi": "3.1.0",
        "info": {"title": "dbsidecar data API", "version": __version__},
        "paths": {
            "/v1/query": _post("Run one plan", "Plan", "Result"),
            "/v1/batch": _post("Run plans in one transaction", "Batch", "BatchResult"),
            "/v1/topology": {
                "get": {
                    "summary": "Databases, shards and nodes with their live state",
                    "responses": {"200": {"description": "OK"}},
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
