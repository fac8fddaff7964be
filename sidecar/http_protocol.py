"""The listeners' HTTP/1.1 protocol: uvicorn's httptools protocol with read bounds.

httptools takes header lines of any size and uvicorn only times out idle keep-alive
connections, so a hostile or broken client could hold memory with one endless header
or hold a connection forever by sending a request a byte at a time. This subclass adds:

- the request line and headers together are limited to ``limits.max_header_bytes``:
  beyond it the answer is 431 (JSON) and the connection closes;
- a request must arrive whole (headers and body) within ``READ_TIMEOUT`` of its first
  byte, or of the connection opening for the first request: else the connection closes
  (with a 408 when no answer has started).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wire.errors import ErrorCode
from wire.protocol import ErrorEnvelope

from .errors import SidecarError
from .settings import LimitsSettings
from .statuses import status_of

# Seconds for a whole request to arrive. Loopback clients send one in well under a
# millisecond; this only has to outlast a CPU-starved client. (A candidate setting.)
READ_TIMEOUT = 10.0
# Connections (or running requests) per listener beyond which uvicorn answers 503.
MAX_CONCURRENCY = 1024


def _answer(reason: bytes, code: ErrorCode, message: str) -> bytes:
    """A whole response in the data plane's error model, for answers given before the app."""
    status = status_of(code)
    body = msgspec.json.encode(ErrorEnvelope(SidecarError(code, message).body()))
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


class _HeadersTooLarge(Exception):
    """Raised inside a parser callback: stops the parser, which reports it as an error."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: Callable[[], LimitsSettings], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits  # read per request, so a reload applies to open connections
        self._header_limit = 0
        # Header bytes the parser reported for the request being read (URL, names, values).
        self._header_bytes = 0
        # Bytes of whole reads that ended inside the headers. The parser holds a header
        # line until it ends, so this is what bounds one endless line.
        self._pending_bytes = 0
        self._reading_headers = False
        self._began_in_this_read = False
        self._headers_too_large = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._began_in_this_read = False
        super().data_received(data)
        # A read in which the request began may also hold the previous request's end, so
        # only later reads count: the parser holds at most the limit plus one read.
        if self._reading_headers and not self._began_in_this_read:
            self._pending_bytes += len(data)
            if self._pending_bytes > self._header_limit and not self.transport.is_closing():
                self._refuse_headers()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here, including our callbacks' refusal.
        if self._headers_too_large:
            self._refuse_headers()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_limit = self._limits().max_header_bytes
        self._header_bytes = self._pending_bytes = 0
        self._reading_headers = self._began_in_this_read = True
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._header_limit:
            self._headers_too_large = True
            raise _HeadersTooLarge

    def _refuse_headers(self) -> None:
        self._headers_too_large = True
        message = f"request line and headers are limited to {self._header_limit} bytes"
        answer = _answer(b"Request Header Fields Too Large", ErrorCode.HEADERS_TOO_LARGE, message)
        self.transport.write(answer)
        self.transport.close()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(READ_TIMEOUT, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # Mid-body the application owns the answer (it sees a disconnect); before the
        # headers are complete nobody has answered yet.
        if self._reading_headers or self.cycle is None:
            message = f"the request did not arrive within {READ_TIMEOUT:g} s"
            self.transport.write(_answer(b"Request Timeout", ErrorCode.REQUEST_TIMEOUT, message))
        self.transport.close()
