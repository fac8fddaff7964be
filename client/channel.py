"""The channel to the sidecar: one WebSocket (``GET /v1/channel``) with many plans in flight.

A frame goes out as ``{"id": n, "plan": ...}`` or ``{"id": n, "plans": [...]}`` and
its answer comes back, in completion order, as ``{"id": n, "status", "result" |
"items" | "error"}`` (types in :mod:`wire.protocol`); a reader task hands each answer
to the caller waiting on its id. :class:`Dialer` keeps one channel open per transport
and event loop, opening it on first use and again after it drops, with capped,
jittered exponential backoff between failed attempts.

How a call can end besides an answer:

- :class:`NotRun`: the sidecar did not run the frame (it never went out, it was refused
  while the sidecar drains, or the sidecar closed the channel with 1001, which it does
  only after answering every frame it read): sending it again is safe, even a write.
- :class:`Lost`: the channel dropped (or no answer came in time) after the frame went
  out: it may have run.
- :class:`Refused`: the upgrade was refused by something that serves no channel (an
  older sidecar answers 403, 404 or 426): use HTTP. Any other refusal (a 5xx) is a
  failed dial, tried again after the backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import aiohttp
import msgspec

from wire.protocol import ChannelAnswer

from .errors import SidecarUnreachable, Unauthorized

PATH = "/v1/channel"
GOING_AWAY = 1001
# Seconds between dial attempts after failures: full jitter up to BASE * 2**failures.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
_answers = msgspec.json.Decoder(ChannelAnswer)
# Upgrade answers that mean "no channel here": Starlette's answer to an unknown WebSocket
# route (403), a plain 404, 426 Upgrade Required.
NO_CHANNEL = frozenset({403, 404, 426})


class NotRun(Exception):
    """The sidecar did not run the frame; it may be sent again (over HTTP)."""


class Lost(Exception):
    """The frame went out and no answer came back: it may or may not have run."""


class Refused(Exception):
    """No channel here (the upgrade answered ``status``): talk HTTP instead."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the channel upgrade was answered {status}")
        self.status = status


class Channel:
    """One open WebSocket: frames out, a reader task matching answers to their callers."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.pending: dict[int, asyncio.Future[ChannelAnswer]] = {}
        self.closed = False
        self._ids = itertools.count(1)
        self._reader = asyncio.ensure_future(self._read())

    async def call(self, fields: bytes) -> ChannelAnswer:
        """Send ``{"id": n, <fields>}`` and wait for its answer."""
        if self.closed or self.ws.closed:
            raise NotRun("the channel is closed")
        frame_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[frame_id] = future
        try:
            # Once the frame may have reached the socket, a failure is Lost, not NotRun.
            # The deadline covers the send too: a sidecar that stops reading blocks it.
            async with asyncio.timeout(self.timeout):
                frame = b'{"id":%d,%s}' % (frame_id, fields)
                await self.ws.send_frame(frame, aiohttp.WSMsgType.TEXT)
                return await future
        except TimeoutError:
            raise Lost(f"no answer within {self.timeout:g} s") from None
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise Lost(str(exc) or type(exc).__name__) from None
        finally:
            # Also when the caller is cancelled: no entry outlives its caller.
            del self.pending[frame_id]

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break  # closed, closing or failed
                answer = _answers.decode(msg.data)
                future = self.pending.get(answer.id)
                if future is not None and not future.done():
                    future.set_result(answer)
        except msgspec.DecodeError:
            await self.ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)
        finally:
            self._drop(self.ws.close_code)

    def _drop(self, code: int | None) -> None:
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                # 1001: the sidecar answered every frame it read before closing.
                if code == GOING_AWAY:
                    future.set_exception(NotRun("the sidecar closed the channel (going away)"))
                else:
                    future.set_exception(Lost(f"the channel closed ({code or 'no close code'})"))

    async def close(self) -> None:
        await self.ws.close()
        # The reader may have been cancelled already (asyncio.run cancels every task
        # before it finalizes the transport); that is not a failure of close().
        await asyncio.gather(self._reader, return_exceptions=True)


class Dialer:
    """Opens the channel of one transport on one event loop, and again when it drops."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, where: str, timeout: float
    ) -> None:
        self.session = session
        self.url = url
        self.where = where  # the sidecar URL, for messages
        self.timeout = timeout
        self._channel: Channel | None = None
        self._dialing: asyncio.Task[Channel] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._refused_until = 0.0

    async def call(self, fields: bytes) -> ChannelAnswer:
        channel = self._channel
        if channel is None or channel.closed:
            channel = await self._open()
        return await channel.call(fields)

    async def _open(self) -> Channel:
        # Callers arriving while a dial is under way share it.
        if self._dialing is None:
            self._dialing = asyncio.ensure_future(self._dial())
            self._dialing.add_done_callback(self._dialed)
        return await asyncio.shield(self._dialing)

    def _dialed(self, task: asyncio.Task[Channel]) -> None:
        self._dialing = None
        if not task.cancelled():
            task.exception()  # retrieved here, raised to the callers that share the dial

    async def _dial(self) -> Channel:
        loop = asyncio.get_running_loop()
        if loop.time() < self._refused_until:
            # Refused a moment ago (draining, a 5xx): HTTP now, the channel after the backoff.
            raise NotRun("the sidecar refused the channel a moment ago")
        await asyncio.sleep(max(0.0, self._retry_at - loop.time()))
        try:
            ws = await self.session.ws_connect(self.url, max_msg_size=0, decode_text=False)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise Unauthorized(
                    "the sidecar refused the channel: missing or wrong bearer token",
                    code="unauthorized",
                    status=401,
                ) from None
            if exc.status in NO_CHANNEL:
                raise Refused(exc.status) from None
            self._refused_until = self._back_off(loop)
            if exc.status == 503:  # draining: HTTP still serves until the listener closes
                raise NotRun("the sidecar is shutting down") from None
            raise NotRun(f"the sidecar refused the channel for now ({exc.status})") from None
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            self._back_off(loop)
            raise SidecarUnreachable(
                f"cannot reach the sidecar at {self.where}: {exc or type(exc).__name__}",
                code="sidecar_unreachable",
                retryable=True,
            ) from exc
        self._failures = 0
        self._channel = Channel(ws, self.timeout)
        return self._channel

    def _back_off(self, loop: asyncio.AbstractEventLoop) -> float:
        """The time before which no dial is tried again."""
        self._failures += 1
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2**self._failures)
        self._retry_at = loop.time() + random.uniform(0, backoff)
        return self._retry_at

    async def close(self) -> None:
        if self._dialing is not None:
            self._dialing.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
