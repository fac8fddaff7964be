"""The channel: one WebSocket (``GET /v1/channel``) carrying many plans at once.

A client keeps one channel open and sends each plan, or a bundle of plans, as a text
frame ``{"id", "plan" | "plans", "request_id"?, "traceparent"?, "tracestate"?}``; every
frame runs as its own task and its answer ``{"id", "status", "result" | "items" |
"error"}`` goes out when it is ready, so answers arrive in completion order (types in
:mod:`wire.protocol`). Each plan goes through the data plane's
:func:`~sidecar.api.serve` like an HTTP request (auth, request id, in-flight count for
draining, metrics under ``/v1/query`` or ``/v1/bundle``, access log, error model), on
the runtime snapshot of the moment it starts.

- The upgrade is refused with the error model's own answer: 401 ``unauthorized`` for a
  missing or wrong bearer token, 503 ``draining`` during shutdown.
- Bounded: at most ``limits.max_channel_inflight`` plans (a bundle counts its plans, any
  other frame counts one) are in flight per channel. Past it the channel stops
  receiving, so uvicorn stops reading the socket and the client's sends block; a
  frame's plans stay in flight until its answer is handed to the socket, and uvicorn's
  send waits while the socket's write buffer is full, so a client that does not read
  its answers holds at most that many answers in the sidecar.
- A frame beyond ``limits.max_body_bytes`` closes the channel with 1009 (the WebSocket
  parser refuses it by its declared length, before reading it). A frame whose id can
  be read but that is not a valid frame is answered with a 400 error (``bad_plan``, or
  ``plan_too_complex`` for deep nesting) and the channel stays open; one whose id
  cannot be read (not JSON, not an object, no integer id; nested too deeply for the
  decoder unless the id comes first) closes the channel with 1007, since no answer
  could name it.
- Every frame the sidecar read is answered before it closes a channel with 1001
  (shutdown) or 1007, so after those a frame without an answer never ran. A frame over
  the size limit is refused by uvicorn's WebSocket parser, which closes with 1009 at once:
  answers still in flight on that channel are lost (their plans may have run).
- An upgrade carrying an ``Origin`` header (a web page: browsers apply no same-origin
  rule to WebSockets) is refused with 403 ``cross_origin``; past ``limits.max_channels``
  open channels, with 503 ``too_many_channels`` (the client then uses HTTP).
- Shutdown: while draining, frames are answered 503 ``draining`` without running;
  once the in-flight plans have drained, :meth:`Channels.close` stops every channel's
  reading, sends the answers still pending and closes with 1001 (going away), all
  before uvicorn's own shutdown, which would close them with 1012 instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.types import Message, Receive, Scope, Send

from wire.errors import ErrorCode
from wire.protocol import BundleResult, ChannelAnswer, ChannelRequest, ErrorEnvelope

from . import api, metrics
from .errors import SidecarError
from .state import SidecarState
from .statuses import status_of

log = logging.getLogger("dbsidecar.channel")
PATH = "/v1/channel"
GOING_AWAY = 1001
INVALID_FRAME = 1007
TOO_BIG = 1009
# What uvicorn raises on a send once the connection is gone: ClientDisconnected (an
# OSError), or RuntimeError when its protocol closed the connection itself (an oversized
# frame, a ping timeout) and the transport has not reported the loss yet.
_GONE = (OSError, RuntimeError)
# The endpoint a frame's plans are counted under in dbsidecar_requests_total.
_ENDPOINTS = {"plan": "/v1/query", "bundle": "/v1/bundle", "invalid": PATH}
_frames = msgspec.json.Decoder(ChannelRequest)


class _FrameId(msgspec.Struct):
    id: int


_frame_ids = msgspec.json.Decoder(_FrameId)
_LEADING_ID = re.compile(r'\s*\{\s*"id"\s*:\s*(-?\d{1,18})\s*[,}]')


@functools.cache
def _counted(kind: str, code: int) -> Any:
    return metrics.channel_frames.labels(kind, str(code))


async def _no_body() -> bytes:
    return b""


async def _refuse(error: SidecarError, call: api.Call) -> tuple[int, Any]:
    raise error


def _draining() -> api.Handler:
    error = SidecarError(ErrorCode.DRAINING, "the sidecar is shutting down; the plan did not run")
    return functools.partial(_refuse, error)


def _frame_id(data: str | bytes) -> int | None:
    """The id of a frame that is not valid otherwise, if it has one."""
    try:
        return _frame_ids.decode(data).id
    except msgspec.DecodeError:
        return None
    except RecursionError:
        # Nested too deeply even to be skipped: an id written first still names it.
        head = data[:64] if isinstance(data, str) else data[:64].decode("latin-1")
        match = _LEADING_ID.match(head)
        return int(match[1]) if match else None


def _answer(frame_id: int, status: int, payload: Any, rid: str) -> str:
    if isinstance(payload, ErrorEnvelope):
        answer = ChannelAnswer(frame_id, status, error=payload.error, request_id=rid)
    elif isinstance(payload, BundleResult):
        answer = ChannelAnswer(frame_id, status, items=payload.items)
    else:
        answer = ChannelAnswer(frame_id, status, result=payload)
    return api.encoder.encode(answer).decode()


@dataclass(slots=True)
class _Work:
    """A frame read and understood, waiting for room to run."""

    frame_id: int
    kind: str
    plans: int
    handler: api.Handler
    # What HTTP would carry as headers: X-Request-ID, traceparent, tracestate.
    context: dict[str, str]


def _parse(data: str | bytes) -> _Work | None:
    """What to do with a frame; None when it cannot be answered (no id)."""
    try:
        frame: ChannelRequest = api.decode(_frames, data)
    except SidecarError as error:
        frame_id = _frame_id(data)
        if frame_id is None:
            return None
        return _Work(frame_id, "invalid", 1, functools.partial(_refuse, error), {})
    context = _context(frame)
    if frame.plan is not None and frame.plans is None:
        run = functools.partial(api.run_plan, frame.plan)
        return _Work(frame.id, "plan", 1, run, context)
    if frame.plans is not None and frame.plan is None:
        run = functools.partial(api.run_bundle, frame.plans)
        # An empty bundle counts too: every frame in flight holds an answer.
        return _Work(frame.id, "bundle", max(1, len(frame.plans)), run, context)
    error = SidecarError(ErrorCode.BAD_PLAN, "a frame holds either a plan or plans")
    return _Work(frame.id, "invalid", 1, functools.partial(_refuse, error), context)


def _context(frame: ChannelRequest) -> dict[str, str]:
    context = {}
    if frame.request_id is not None:
        context["x-request-id"] = frame.request_id
    if frame.traceparent is not None:
        context["traceparent"] = frame.traceparent
        if frame.tracestate is not None:
            context["tracestate"] = frame.tracestate
    return context


class Channel:
    """One open channel: a reader taking frames in, a task per frame answering it."""

    def __init__(
        self, state: SidecarState, receive: Receive, send: Send, authorization: str
    ) -> None:
        self.state = state
        self._receive = receive
        self._send = send
        # Checked again with every plan (as on a keep-alive HTTP connection), so a reload
        # that changes the token applies to open channels too.
        self._headers = {"authorization": authorization}
        self.inflight = 0  # plans admitted whose answer has not been handed to the socket
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[int | None] | None = None
        # The ASGI call serving this channel (uvicorn's task).
        self.task: asyncio.Task[Any] | None = None
        self._aborted = False

    async def run(self) -> None:
        """Serve the channel until the client leaves or the channel is closed."""
        self.task = asyncio.current_task()
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait([self._reader])
            code = GOING_AWAY if self._reader.cancelled() else self._reader.result()
            if self._tasks:
                await asyncio.wait(self._tasks)  # every frame read is answered first
            if code is not None:
                await self._send({"type": "websocket.close", "code": code})
        except _GONE:
            pass  # nobody is left to close for
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            # abort(): end the ASGI call quietly rather than as a failed one.
            self.task.uncancel()  # type: ignore[union-attr]
        finally:
            self._reader.cancel()
            for task in self._tasks:
                task.cancel()

    def stop(self) -> None:
        """Take no more frames: answer what was read, then close with 1001."""
        if self._reader is not None:
            self._reader.cancel()

    def abort(self) -> None:
        """Give up on a channel whose answers cannot go out (its client stopped reading)."""
        if self.task is not None:
            self._aborted = True
            self.task.cancel()

    async def _read(self) -> int | None:
        """Take frames until the client leaves (None) or a frame ends the channel (a code)."""
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                if message.get("code") == TOO_BIG:  # refused by the WebSocket parser
                    _counted("oversized", TOO_BIG).inc()
                return None
            text = message.get("text")
            data = text if text is not None else message["bytes"]
            # The parser's bound is the limit at startup; a reload may have lowered it.
            if len(data) > self.state.settings.limits.max_body_bytes:
                _counted("oversized", TOO_BIG).inc()
                return TOO_BIG
            work = _parse(data)
            if work is None:
                _counted("invalid", INVALID_FRAME).inc()
                return INVALID_FRAME
            try:
                await self._room_for(work.plans)
            except asyncio.CancelledError:
                # Stopped while full: this frame was read, so it is answered (not run).
                self._start(work, _draining())
                raise
            self._start(work, _draining() if self.state.draining else work.handler)

    async def _room_for(self, plans: int) -> None:
        limit = self.state.settings.limits.max_channel_inflight
        # A bundle larger than the limit runs alone rather than never.
        while self.inflight and self.inflight + plans > limit:
            self._room.clear()
            await self._room.wait()

    def _start(self, work: _Work, handler: api.Handler) -> None:
        self.inflight += work.plans
        task = asyncio.create_task(self._answer(work, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, work: _Work, handler: api.Handler) -> None:
        headers = {**self._headers, **work.context} if work.context else self._headers
        try:
            status, payload, rid = await api.serve(
                self.state, _ENDPOINTS[work.kind], headers, _no_body, {}, handler
            )
            _counted(work.kind, status).inc()
            text = _answer(work.frame_id, status, payload, rid)
            await self._send({"type": "websocket.send", "text": text})
        except _GONE:
            pass  # the plan ran; its answer has nowhere to go
        finally:
            self.inflight -= work.plans
            self._room.set()


class Channels:
    """The channel endpoint (the data plane's WebSocket app) and its open channels."""

    def __init__(self, state: SidecarState) -> None:
        self.state = state
        self._open: set[Channel] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != PATH:
            # As for any unknown WebSocket route: uvicorn answers the upgrade 403.
            await send({"type": "websocket.close"})
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        await receive()  # websocket.connect
        refusal = self._refusal(authorization, b"origin" in headers)
        if refusal is not None:
            await self._refuse(send, refusal)
            return
        await send({"type": "websocket.accept"})
        metrics.request_count(PATH, 101).inc()
        channel = Channel(self.state, receive, send, authorization)
        self._open.add(channel)
        metrics.channels_open.inc()
        try:
            await channel.run()
        finally:
            self._open.discard(channel)
            metrics.channels_open.dec()

    def _refusal(self, authorization: str, from_a_page: bool) -> SidecarError | None:
        if from_a_page:
            # Browsers send Origin and apply no same-origin rule to WebSockets: any web
            # page could otherwise read the databases through a sidecar on the
            # developer's loopback. The client and other programs send none.
            return SidecarError(
                ErrorCode.CROSS_ORIGIN, "a channel from a web page (Origin header) is refused"
            )
        token = self.state.settings.auth_token
        if token is not None and not api.authorized(authorization, token):
            return SidecarError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        if self.state.draining:
            return SidecarError(ErrorCode.DRAINING, "the sidecar is shutting down")
        limit = self.state.settings.limits.max_channels
        if len(self._open) >= limit:
            return SidecarError(
                ErrorCode.TOO_MANY_CHANNELS,
                f"{limit} channels are open (limits.max_channels); use HTTP or retry",
            )
        return None

    async def _refuse(self, send: Send, error: SidecarError) -> None:
        """Answer the upgrade with a plain HTTP error (ASGI's WebSocket response extension)."""
        status = status_of(error.code)
        metrics.request_count(PATH, status).inc()
        body = api.encoder.encode(ErrorEnvelope(error.body()))
        start: Message = {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})

    async def close(self, within: float) -> None:
        """Shutdown: every channel answers the frames it read, then closes with 1001.
        Channels not done ``within`` seconds (clients that stopped reading) are dropped."""
        channels = list(self._open)
        for channel in channels:
            channel.stop()
        tasks = [c.task for c in channels if c.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=within)
        if late:
            log.warning("%d channels did not take their last answers; dropping them", len(late))
            for channel in channels:
                if channel.task in late:
                    channel.abort()
            await asyncio.wait(late)
