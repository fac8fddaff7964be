"""The data-plane HTTP API (loopback or Unix socket): plans in, results out.

Every endpoint is a handler from a :class:`Call` (the body, path parameters) to a
status and a payload, wrapped once by :func:`serve` for auth, request ids, metrics,
the access log and the JSON error model. The hot endpoints (``/v1/query``,
``/v1/bundle``) are served straight from ASGI messages; the rest go through
Starlette's router, whose per-request cost the hot path does not need. WebSocket
upgrades go to the channel endpoint (:mod:`sidecar.channel`), which runs each plan
of its frames through the same :func:`serve`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wire.errors import ErrorCode
from wire.protocol import (
    Batch,
    Bundle,
    BundleItem,
    BundleResult,
    ErrorEnvelope,
    Plan,
    TxBegin,
    TxDone,
    TxOpened,
)

from . import dispatch, logs, metrics, migration_api, tracing
from .bodies import read_body
from .errors import SidecarError
from .openapi import openapi_document
from .runtime import Runtime
from .state import SidecarState
from .statuses import status_of
from .topology_view import topology_document

log = logging.getLogger("dbsidecar.api")
access = logging.getLogger("dbsidecar.access")
encoder = msgspec.json.Encoder(enc_hook=str)
_plan_decoder = msgspec.json.Decoder(Plan)
_batch_decoder = msgspec.json.Decoder(Batch)
_begin_decoder = msgspec.json.Decoder(TxBegin)
_bundle_decoder = msgspec.json.Decoder(Bundle)
_REQUEST_ID = re.compile(r"[\w.:/+=-]{1,128}")
# Request ids made here: a per-process prefix and a counter (uuid4 per request costs
# more than the rest of the bookkeeping).
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(slots=True)
class Call:
    state: SidecarState
    # The runtime snapshot the request captured when it started: all of it runs on this.
    runtime: Runtime
    body: bytes
    params: Mapping[str, str]


Handler = Callable[[Call], Awaitable[tuple[int, Any]]]


def decode(decoder: msgspec.json.Decoder[Any], body: bytes | str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SidecarError(ErrorCode.BAD_PLAN, f"invalid plan: {exc}") from None
    except RecursionError:
        # msgspec stops at the interpreter's recursion limit (~1000 levels of nesting).
        raise SidecarError(ErrorCode.PLAN_TOO_COMPLEX, "the plan is nested too deeply") from None


def authorized(given: str, token: str) -> bool:
    """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, credentials = given.partition(" ")
    # Compare the token even for a wrong scheme, so timing tells nothing about either.
    same = hmac.compare_digest(credentials.lstrip(" ").encode(), token.encode())
    return same and scheme.lower() == "bearer"


async def serve(
    state: SidecarState,
    name: str,
    headers: Mapping[str, str],
    read: Callable[[], Awaitable[bytes]],
    params: Mapping[str, str],
    handler: Handler,
) -> tuple[int, Any, str]:
    """Run one request; returns the status, the payload (to encode) and the request id."""
    given = headers.get("x-request-id", "")
    rid = given if _REQUEST_ID.fullmatch(given) else f"{_ID_PREFIX}-{next(_ids)}"
    token = logs.request_id.set(rid)
    began = time.perf_counter()
    state.request_started()
    try:
        with tracing.request(name, headers) if tracing.ENABLED else tracing.NO_SPAN as span:
            status, payload = await _guarded(state, headers, read, params, handler)
            if span is not None:
                tracing.answered(span, status)
    finally:
        state.request_finished()
        logs.request_id.reset(token)
    elapsed = time.perf_counter() - began
    metrics.request_count(name, status).inc()
    metrics.request_seconds(name).observe(elapsed)
    if state.settings.logging.access_log:
        access.info(
            "request",
            extra={
                "request_id": rid,
                "endpoint": name,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
    return status, payload, rid


async def _guarded(
    state: SidecarState,
    headers: Mapping[str, str],
    read: Callable[[], Awaitable[bytes]],
    params: Mapping[str, str],
    handler: Handler,
) -> tuple[int, Any]:
    rt = state.runtime
    try:
        token = rt.settings.auth_token
        if token is not None and not authorized(headers.get("authorization", ""), token):
            raise SidecarError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        return await handler(Call(state, rt, await read(), params))
    except SidecarError as exc:
        return status_of(exc.code), ErrorEnvelope(exc.body())
    except Exception:
        log.exception("unexpected error")
        error = SidecarError(ErrorCode.INTERNAL, "internal error in the sidecar; see its log")
        return status_of(error.code), ErrorEnvelope(error.body())


# The headers the hot endpoints read (the trace context only matters when tracing is on,
# but picking two more names out costs nothing measurable).
_HOT_HEADERS = frozenset(
    (b"authorization", b"x-request-id", b"content-length", b"traceparent", b"tracestate")
)


# Handlers
async def query(call: Call) -> tuple[int, Any]:
    return await run_plan(decode(_plan_decoder, call.body), call)


async def run_plan(plan: Plan, call: Call) -> tuple[int, Any]:
    """A decoded plan (the channel decodes its frames whole)."""
    return 200, await dispatch.run(call.runtime, plan)


async def batch(call: Call) -> tuple[int, Any]:
    body = decode(_batch_decoder, call.body)
    return 200, await dispatch.run_batch(call.runtime, body.plans)


async def bundle(call: Call) -> tuple[int, Any]:
    return await run_bundle(decode(_bundle_decoder, call.body).plans, call)


async def run_bundle(plans: list[Plan], call: Call) -> tuple[int, Any]:
    """Decoded plans, each on its own (the channel decodes its frames whole)."""
    rt = call.runtime
    limit = rt.settings.limits.max_batch_plans
    if len(plans) > limit:
        raise SidecarError(ErrorCode.BAD_PLAN, f"a bundle holds at most {limit} plans")

    async def one(plan: Plan) -> BundleItem:
        try:
            return BundleItem(result=await dispatch.run(rt, plan))
        except SidecarError as exc:
            return BundleItem(error=exc.body(), status=status_of(exc.code))
        except Exception:
            log.exception("unexpected error in a bundled plan")
            error = SidecarError(ErrorCode.INTERNAL, "internal error in the sidecar; see its log")
            return BundleItem(error=error.body(), status=status_of(error.code))

    metrics.bundle_size.observe(len(plans))
    items = await asyncio.gather(*(one(p) for p in plans))
    return 200, BundleResult(items=list(items))


async def tx_begin(call: Call) -> tuple[int, Any]:
    body = decode(_begin_decoder, call.body)
    tx_id = await call.state.transactions.begin(call.runtime, body.database, body.route.shard)
    return 200, TxOpened(tx_id)


async def tx_run(call: Call) -> tuple[int, Any]:
    plan = decode(_plan_decoder, call.body)
    return 200, await call.state.transactions.run(call.runtime, call.params["tx_id"], plan)


async def tx_commit(call: Call) -> tuple[int, Any]:
    return 200, TxDone(await call.state.transactions.commit(call.params["tx_id"]))


async def tx_rollback(call: Call) -> tuple[int, Any]:
    await call.state.transactions.rollback(call.params["tx_id"])
    return 200, TxDone()


async def migrate(call: Call) -> tuple[int, Any]:
    return 200, await migration_api.run(call.runtime, call.state.schema, call.body)


async def topology(call: Call) -> tuple[int, Any]:
    return 200, topology_document(call.state)


async def openapi(call: Call) -> tuple[int, Any]:
    return 200, openapi_document()


async def quit(call: Call) -> tuple[int, Any]:
    """Drain and exit, as on SIGTERM (for Jobs and clusters without native sidecars)."""
    if call.state.on_quit is not None:
        call.state.on_quit()
    return 200, {"status": "draining"}


async def admin_reload(call: Call) -> tuple[int, Any]:
    result = await call.state.config.reload("api")
    error = call.state.config.last_error if result == "error" else None
    return (422 if error else 200), {"result": result, "error": error}


# Transports: Starlette for the routed endpoints, raw ASGI for the hot ones
def _route(path: str, handler: Handler, method: str = "POST") -> Route:
    async def endpoint(request: Request) -> Response:
        state: SidecarState = request.app.state.sidecar
        declared = request.headers.get("content-length", "")
        limit = state.settings.limits.max_body_bytes
        read = functools.partial(read_body, request.receive, declared, limit)
        status, payload, rid = await serve(
            state, path, request.headers, read, request.path_params, handler
        )
        body = encoder.encode(payload)
        return Response(body, status, headers={"x-request-id": rid}, media_type="application/json")

    return Route(path, endpoint, methods=[method])


class DataPlane:
    """The data API's ASGI app. ``channel`` serves WebSocket upgrades (the process
    assembly gives it: the channel builds on this module, so it cannot be imported here)."""

    HOT: dict[str, Handler] = {"/v1/query": query, "/v1/bundle": bundle}

    def __init__(self, state: SidecarState, channel: ASGIApp) -> None:
        self.state = state
        self.channel = channel
        self.router = Starlette(
            routes=[
                _route("/v1/query", query),
                _route("/v1/batch", batch),
                _route("/v1/bundle", bundle),
                _route("/v1/tx", tx_begin),
                _route("/v1/tx/{tx_id}", tx_run),
                _route("/v1/tx/{tx_id}/commit", tx_commit),
                _route("/v1/tx/{tx_id}/rollback", tx_rollback),
                _route("/v1/migrate", migrate),
                _route("/v1/topology", topology, "GET"),
                _route("/openapi.json", openapi, "GET"),
                _route("/quitquitquit", quit),
                _route("/v1/admin/reload", admin_reload),
            ]
        )
        self.router.state.sidecar = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.channel(scope, receive, send)
            return
        handler = self.HOT.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.router(scope, receive, send)
            return
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in _HOT_HEADERS
        }
        limit = self.state.settings.limits.max_body_bytes
        read = functools.partial(read_body, receive, headers.get("content-length", ""), limit)
        status, payload, rid = await serve(self.state, scope["path"], headers, read, {}, handler)
        body = encoder.encode(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *_JSON_HEADERS,
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def data_app(state: SidecarState, channel: ASGIApp) -> DataPlane:
    return DataPlane(state, channel)
