"""The data-plane HTTP API (loopback or Unix socket): plans in, results out."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from client.protocol import (
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

from . import logs, metrics
from .errors import SidecarError
from .openapi import openapi_document
from .state import SidecarState
from .topology_view import topology_document

JSON = "application/json"
log = logging.getLogger("dbsidecar.api")
access = logging.getLogger("dbsidecar.access")
_encoder = msgspec.json.Encoder(enc_hook=str)
_plan_decoder = msgspec.json.Decoder(Plan)
_batch_decoder = msgspec.json.Decoder(Batch)
_begin_decoder = msgspec.json.Decoder(TxBegin)
_bundle_decoder = msgspec.json.Decoder(Bundle)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type=JSON)


def error_response(exc: SidecarError) -> Response:
    return json_response(ErrorEnvelope(exc.body()), exc.status)


Handler = Callable[[Request, SidecarState], Awaitable[Response]]
_REQUEST_ID = re.compile(r"[\w.:/+=-]{1,128}")


def _endpoint(handler: Handler, name: str) -> Callable[[Request], Awaitable[Response]]:
    """Auth, request ids, metrics, the access log and the JSON error model around a handler."""

    async def endpoint(request: Request) -> Response:
        state: SidecarState = request.app.state.sidecar
        given_id = request.headers.get("x-request-id", "")
        rid = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        began = time.perf_counter()
        state.request_started()
        try:
            response = await _guarded(handler, request, state)
        finally:
            state.request_finished()
            logs.request_id.reset(token)
        elapsed = time.perf_counter() - began
        metrics.requests_total.labels(name, str(response.status_code)).inc()
        metrics.request_duration.labels(name).observe(elapsed)
        response.headers["x-request-id"] = rid
        if state.settings.logging.access_log:
            access.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": request.method,
                    "endpoint": name,
                    "status": response.status_code,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
        return response

    return endpoint


async def _guarded(handler: Handler, request: Request, state: SidecarState) -> Response:
    token = state.settings.auth_token
    if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            refused = SidecarError(401, "unauthorized", "missing or wrong bearer token")
            return error_response(refused)
    try:
        return await handler(request, state)
    except SidecarError as exc:
        return error_response(exc)
    except Exception:
        log.exception("unexpected error serving %s", request.url.path)
        return error_response(
            SidecarError(500, "internal", "internal error in the sidecar; see its log")
        )


async def _body(request: Request, state: SidecarState) -> bytes:
    limit = state.settings.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise SidecarError(413, "body_too_large", f"request bodies are limited to {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise SidecarError(413, "body_too_large", f"request bodies are limited to {limit} bytes")
    return body


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SidecarError(400, "bad_plan", f"invalid plan: {exc}") from None


async def query(request: Request, state: SidecarState) -> Response:
    plan = _decode(_plan_decoder, await _body(request, state))
    return json_response(await state.dispatcher.run(plan))


async def batch(request: Request, state: SidecarState) -> Response:
    body = _decode(_batch_decoder, await _body(request, state))
    return json_response(await state.dispatcher.run_batch(body.plans))


async def bundle(request: Request, state: SidecarState) -> Response:
    body = _decode(_bundle_decoder, await _body(request, state))
    limit = state.settings.limits.max_batch_plans
    if len(body.plans) > limit:
        raise SidecarError(400, "bad_plan", f"a bundle holds at most {limit} plans")

    async def one(plan: Plan) -> BundleItem:
        try:
            return BundleItem(result=await state.dispatcher.run(plan))
        except SidecarError as exc:
            return BundleItem(error=exc.body(), status=exc.status)
        except Exception:
            log.exception("unexpected error in a bundled plan")
            error = SidecarError(500, "internal", "internal error in the sidecar; see its log")
            return BundleItem(error=error.body(), status=500)

    metrics.bundle_size.observe(len(body.plans))
    items = await asyncio.gather(*(one(p) for p in body.plans))
    return json_response(BundleResult(items=list(items)))


async def tx_begin(request: Request, state: SidecarState) -> Response:
    body = _decode(_begin_decoder, await _body(request, state))
    tx_id = await state.transactions.begin(body.database, body.route.shard)
    return json_response(TxOpened(tx_id))


async def tx_run(request: Request, state: SidecarState) -> Response:
    plan = _decode(_plan_decoder, await _body(request, state))
    return json_response(await state.transactions.run(request.path_params["tx_id"], plan))


async def tx_commit(request: Request, state: SidecarState) -> Response:
    return json_response(TxDone(await state.transactions.commit(request.path_params["tx_id"])))


async def tx_rollback(request: Request, state: SidecarState) -> Response:
    await state.transactions.rollback(request.path_params["tx_id"])
    return json_response(TxDone())


async def topology(request: Request, state: SidecarState) -> Response:
    return json_response(topology_document(state))


async def openapi(request: Request, state: SidecarState) -> Response:
    return json_response(openapi_document())


async def quit(request: Request, state: SidecarState) -> Response:
    """Drain and exit, as on SIGTERM (for Jobs and clusters without native sidecars)."""
    if state.on_quit is not None:
        state.on_quit()
    return json_response({"status": "draining"})


async def admin_reload(request: Request, state: SidecarState) -> Response:
    result = await state.config.reload("api")
    error = state.config.last_error if result == "error" else None
    return json_response({"result": result, "error": error}, 422 if error else 200)


def _route(path: str, handler: Handler, method: str = "POST") -> Route:
    return Route(path, _endpoint(handler, path), methods=[method])


def data_app(state: SidecarState) -> Starlette:
    app = Starlette(
        routes=[
            _route("/v1/query", query),
            _route("/v1/batch", batch),
            _route("/v1/bundle", bundle),
            _route("/v1/tx", tx_begin),
            _route("/v1/tx/{tx_id}", tx_run),
            _route("/v1/tx/{tx_id}/commit", tx_commit),
            _route("/v1/tx/{tx_id}/rollback", tx_rollback),
            _route("/v1/topology", topology, "GET"),
            _route("/openapi.json", openapi, "GET"),
            _route("/quitquitquit", quit),
            _route("/v1/admin/reload", admin_reload),
        ]
    )
    app.state.sidecar = state
    return app
