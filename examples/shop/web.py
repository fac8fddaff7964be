"""What the three services share: handles to the sidecar, JSON in and out, errors as
HTTP statuses, and a lifespan that migrates the service's databases and closes the
client's connections."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from client import ConnectionManager, RecordNotFound, ValidationError, migrate

MIGRATIONS = Path(__file__).parent / "migrations"
DATABASES = ("users", "inventory", "orders", "payments")
# A route function, or a method taking (self, request).
Handler = Callable[..., Awaitable[Response]]


def json(body: Any, status: int = 200) -> Response:
    # msgspec writes Decimal as a string and datetimes as ISO 8601: nothing is rounded.
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def problem(status: int, message: str) -> Response:
    return json({"error": message}, status)


async def body(request: Request) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body is a JSON object")
    return value


class BadRequest(Exception):
    pass


def handles(sidecar: str | None = None) -> None:
    """One handle per database, all through this pod's sidecar (``DBSIDECAR_URL``)."""
    url = sidecar or os.environ.get("DBSIDECAR_URL", "http://127.0.0.1:7432")
    ConnectionManager.configure(
        {
            name: {"sidecar": url, "database": name}
            for name in ("users", "inventory", "orders", "payments")
        }
    )


def errors(handler: Handler) -> Handler:
    """Client errors become 4xx answers; anything else stays a 500 (a bug here)."""

    @functools.wraps(handler)
    async def wrapped(*args: Any) -> Response:
        try:
            return await handler(*args)
        except RecordNotFound as exc:
            return problem(404, str(exc))
        except (ValidationError, BadRequest, KeyError, TypeError, ValueError) as exc:
            return problem(400, str(exc))

    return wrapped


def service(
    routes: list[Any], databases: list[str], sidecar: str | None = None,
    started: Callable[[], Awaitable[None]] | None = None,
    stopping: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:  # fmt: skip
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        handles(sidecar)
        for database in databases:
            # Every pod runs this at start; the sidecar's migration lock makes N pods
            # apply each file once per shard.
            await migrate(ConnectionManager.get(database), MIGRATIONS / database)
        if started is not None:
            await started()
        try:
            yield
        finally:
            if stopping is not None:
                await stopping()
            await ConnectionManager.close_all()

    # Answers once the lifespan above finished: the service has migrated and started.
    livez = Route("/livez", lambda request: PlainTextResponse("ok\n"))
    return Starlette(routes=[*routes, livez], lifespan=lifespan)
