"""The transport to the sidecar over loopback TCP or a Unix socket (aiohttp).

Plans go over the channel (one WebSocket, many plans in flight: :mod:`client.channel`)
in mode ``"channel"`` (the default), else as HTTP requests on keep-alive connections;
transactions and batches always use HTTP. A plan still goes over HTTP when the sidecar
serves no channel (an older one; remembered), when the channel did not run it (the
sidecar is draining: HTTP serves until its listener closes), or when it is too big for a
frame.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from wire.errors import ErrorCode
from wire.protocol import BundleResult, ChannelAnswer, ErrorEnvelope, Result

from . import tracing
from .channel import PATH, Dialer, Lost, NotRun, Refused
from .errors import DbSidecarError, SidecarUnreachable, WriteOutcomeUnknown, from_error_body

T = TypeVar("T")
# Set by a service (e.g. from its own incoming request) to correlate logs: sent as
# X-Request-ID, logged by the sidecar, echoed back, and kept on errors.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dbsidecar_request_id", default=None
)
_error_decoder = msgspec.json.Decoder(ErrorEnvelope)
_result = msgspec.json.Decoder(Result)
_bundle_result = msgspec.json.Decoder(BundleResult)
# Plans (or bundles) bigger than this go over HTTP: an oversized frame would close the
# channel (1009) under every plan in flight on it, an oversized body fails alone (413).
MAX_FRAME = 1024 * 1024
Outcome = Result | DbSidecarError


class Transport:
    """One sidecar: a channel and a keep-alive connection pool, per event loop."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        limit: int = 100,
        mode: Literal["channel", "http"] = "channel",
    ) -> None:
        if mode not in ("channel", "http"):
            raise ValueError(f"transport mode is 'channel' or 'http', not {mode!r}")
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
        self.mode = mode
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.limit = limit
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None
        self._lifetime: AsyncIterator[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dialer: Dialer | None = None
        # Set when the sidecar turned the channel upgrade down as unknown (older sidecars).
        self.http_only = False

    async def _client(self) -> aiohttp.ClientSession:
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
            self._lifetime = self._closed_with_loop(self._session)
            await anext(self._lifetime)
        return self._session

    async def _closed_with_loop(self, session: aiohttp.ClientSession) -> AsyncIterator[None]:
        """Suspended for as long as ``session`` lives. ``asyncio.run()`` finalizes the
        async generators of its loop when the loop ends, so a session the service never
        closed is closed then, instead of warning "Unclosed client session" at exit."""
        try:
            yield
        finally:
            if self._session is session:
                await self.close()
            else:
                await session.close()

    async def request(
        self, method: str, path: str, body: bytes | None, decoder: msgspec.json.Decoder[T],
        headers: dict[str, str] | None = None, answer_within: float | None = None,
    ) -> T:  # fmt: skip
        """One HTTP request; ``answer_within`` (seconds) replaces the transport's for requests
        that may rightly take longer (a migration waiting for another pod's lock)."""
        rid = request_id.get()
        if rid is not None:
            headers = {**(headers or {}), "X-Request-ID": rid}
        trace = tracing.context()
        if trace is not None:
            headers = {**(headers or {}), **trace}
        limit = self.timeout if answer_within is None else aiohttp.ClientTimeout(answer_within)
        try:
            session = await self._client()
            async with session.request(
                method, self.base + path, data=body, headers=headers, timeout=limit
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

    async def _channel(self, size: int) -> Dialer | None:
        """The channel to send ``size`` bytes of plans on, or None for HTTP."""
        if self.mode != "channel" or self.http_only or size > MAX_FRAME:
            return None
        session = await self._client()
        if self._dialer is None or self._dialer.session is not session:
            url = self.base + PATH
            self._dialer = Dialer(session, url, self.url, self.timeout.total or 60.0)
        return self._dialer

    async def _exchange(self, fields: bytes) -> ChannelAnswer | None:
        """One frame over the channel; None when it should go over HTTP instead."""
        dialer = await self._channel(len(fields))
        if dialer is None:
            return None
        rid = request_id.get()
        if rid is not None:
            fields += b',"request_id":' + msgspec.json.encode(rid)
        trace = tracing.context()
        if trace is not None:
            for key in ("traceparent", "tracestate"):
                if key in trace:
                    fields += b',"' + key.encode() + b'":' + msgspec.json.encode(trace[key])
        try:
            answer = await dialer.call(fields)
        except NotRun:
            return None
        except Refused:
            self.http_only = True
            return None
        if answer.error is not None and answer.error.code == ErrorCode.DRAINING:
            return None  # not run, and HTTP is served until the listener closes
        return answer

    async def query(self, body: bytes, writes: bool) -> Result:
        """Run one plan (JSON); ``writes`` says what a lost channel means for it."""
        try:
            answer = await self._exchange(b'"plan":' + body)
        except Lost as exc:
            raise self._lost(exc, writes) from None
        if answer is None:
            return await self.request("POST", "/v1/query", body, _result)
        if answer.error is not None:
            raise _answer_error(answer)
        return answer.result  # type: ignore[return-value]

    async def bundle(self, bodies: list[bytes], writes: list[bool]) -> list[Outcome]:
        """Run independent plans (JSON) in one frame or request: an outcome per plan."""
        fields = b'"plans":[' + b",".join(bodies) + b"]"
        try:
            answer = await self._exchange(fields)
        except Lost as exc:
            return [self._lost(exc, w) for w in writes]
        if answer is None:
            reply = await self.request("POST", "/v1/bundle", b"{" + fields + b"}", _bundle_result)
            items = reply.items
        elif answer.error is not None:
            raise _answer_error(answer)
        else:
            items = answer.items or []
        return [
            item.result if item.error is None else from_error_body(item.error, item.status)
            for item in items
        ]  # type: ignore[misc]

    def _lost(self, exc: Lost, writes: bool) -> DbSidecarError:
        message = f"no answer from the sidecar at {self.url} on its channel: {exc}"
        if writes:
            return WriteOutcomeUnknown(
                message + "; the write may or may not have committed",
                code="write_outcome_unknown",
                retryable=True,
            )
        return SidecarUnreachable(message, code="sidecar_unreachable", retryable=True)

    async def close(self) -> None:
        session, self._session = self._session, None
        try:
            if self._dialer is not None:
                dialer, self._dialer = self._dialer, None
                await dialer.close()
        finally:
            if session is not None and not session.closed:
                await session.close()


def _answer_error(answer: ChannelAnswer) -> DbSidecarError:
    error = from_error_body(answer.error, answer.status)  # type: ignore[arg-type]
    error.request_id = answer.request_id
    return error


def _error(payload: bytes, status: int) -> DbSidecarError:
    try:
        envelope = _error_decoder.decode(payload)
    except msgspec.DecodeError:
        text = payload[:200].decode(errors="replace")
        return DbSidecarError(f"sidecar answered HTTP {status}: {text}", status=status)
    return from_error_body(envelope.error, status)
