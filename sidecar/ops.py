"""The ops port: Kubernetes probes and node detail. Bodies are short JSON.

/livez never touches a database: a failover must not restart every pod.
/readyz depends on the databases only when readiness.require_primary is set, or a
database's migrations.require_consistent (its shards' schema versions must agree).
The port listens on all interfaces by default (kubelet and Prometheus reach the pod IP)
and has no authentication, so no body carries a secret: /healthz is masked like the logs.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import logs, metrics
from .state import SidecarState
from .topology_view import topology_document


def _state(request: Request) -> SidecarState:
    return request.app.state.sidecar


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def startupz(request: Request) -> JSONResponse:
    started = _state(request).started
    return JSONResponse({"status": "ok" if started else "starting"}, 200 if started else 503)


def _primaries_missing(state: SidecarState) -> list[str]:
    missing = []
    for db in state.topology.databases.values():
        for shard in db.shards:
            if not any(n.up and n.in_recovery is False for n in shard.nodes):
                missing.append(shard.name or db.name)
    return missing


async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    if not state.started:
        return JSONResponse({"status": "starting"}, 503)
    if state.draining:
        return JSONResponse({"status": "draining"}, 503)
    if state.settings.readiness.require_primary and (missing := _primaries_missing(state)):
        return JSONResponse({"status": "no_primary", "databases": missing}, 503)
    if refused := state.schema.refused(state.runtime):
        # migrations.require_consistent: the shards of these databases disagree.
        return JSONResponse({"status": "schema_mismatch", "databases": refused}, 503)
    return JSONResponse({"status": "ok"})


async def healthz(request: Request) -> JSONResponse:
    # Node errors come from asyncpg and configuration errors from parsers: mask any
    # configured secret they might quote.
    return JSONResponse(logs.redact_tree(topology_document(_state(request))))


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


def ops_app(state: SidecarState) -> Starlette:
    app = Starlette(
        routes=[
            Route("/livez", livez),
            Route("/startupz", startupz),
            Route("/readyz", readyz),
            Route("/healthz", healthz),
            Route("/metrics", metrics_endpoint),
        ]
    )
    app.state.sidecar = state
    return app
