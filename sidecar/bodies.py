"""Request bodies read within a byte limit, whatever their framing.

The limit holds while the body arrives, not after: a declared Content-Length above it
is refused before a byte is read, and a chunked body is refused as soon as the bytes
received pass the limit, so no request makes the sidecar hold more than the limit.
Both the raw-ASGI hot path and the Starlette routes read through here. What the client
still sends after a refusal is dropped by the HTTP protocol as it arrives (never kept),
so a client that sent too much still reads its 413 on a connection it can reuse.
"""

from __future__ import annotations

from starlette.types import Receive

from wire.errors import ErrorCode

from .errors import SidecarError


async def read_body(receive: Receive, declared: str, limit: int) -> bytes:
    """The body from ASGI ``receive``; ``declared`` is the Content-Length ("" if none)."""
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # Nobody is left to answer; 499 (nginx's "client closed request") keeps
            # this out of the 500s in the metrics.
            raise SidecarError(ErrorCode.CLIENT_DISCONNECTED, "the client went away mid-body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> SidecarError:
    return SidecarError(ErrorCode.BODY_TOO_LARGE, f"request bodies are limited to {limit} bytes")
