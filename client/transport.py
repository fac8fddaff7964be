"""HTTP to the sidecar over loopback TCP or a Unix socket (aiohttp, keep-alive)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from wire.protocol import ErrorEnvelope

from .errors import DbSidecarError, SidecarUnreachable, from_error_body

T = TypeVar("T")
# Set by a service (e.g. from its own incoming request) to correlate logs: sent as
# X-Request-ID, logged by the sidecar, echoed back, and kept on errors.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dbsidecar_request_id", default=None
)
_error_decoder = msgspec.json.Decoder(ErrorEnvelope)


class Transport:
    """One keep-alive connection pool to one sidecar, per event loop."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout: float = 60.0, limit: int = 100
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            self.socket_path: str | None = parts.path
            self.base = "http://localhost"
        elif parts.scheme in ("http", "https"):
            self.socket_path = None
            self.base = url.rstrip("/")
        else:
            raise ValueError(f"sidecar URL must be http://host:port or unix:///path, not {url!r}")
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.limit = limit
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # aiohttp sessions belong to one loop; a new loop (a new test, a new
            # asyncio.run) gets its own.
            connector: aiohttp.BaseConnector
            if self.socket_path:
                connector = aiohttp.UnixConnector(path=self.socket_path, limit=self.limit)
            else:
                connector = aiohttp.TCPConnector(limit=self.limit)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, headers=self._headers
            )
            self._loop = loop
        return self._session

    async def request(
        self, method: str, path: str, body: bytes | None, decoder: msgspec.json.Decoder[T],
        headers: dict[str, str] | None = None,
    ) -> T:  # fmt: skip
        rid = request_id.get()
        if rid is not None:
            headers = {**(headers or {}), "X-Request-ID": rid}
        try:
            async with self._client().request(
                method, self.base + path, data=body, headers=headers
            ) as resp:
                payload = await resp.read()
                status = resp.status
                echoed = resp.headers.get("X-Request-ID")
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise SidecarUnreachable(
                f"cannot reach the sidecar at {self.url}: {exc or type(exc).__name__}",
                code="sidecar_unreachable",
                retryable=True,
            ) from exc
        if status >= 400:
            error = _error(payload, status)
            error.request_id = echoed
            raise error
        return decoder.decode(payload)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _error(payload: bytes, status: int) -> DbSidecarError:
    try:
        envelope = _error_decoder.decode(payload)
    except msgspec.DecodeError:
        text = payload[:200].decode(errors="replace")
        return DbSidecarError(f"sidecar answered HTTP {status}: {text}", status=status)
    return from_error_body(envelope.error, status)
