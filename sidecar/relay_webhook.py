"""The relay's HTTP webhook sink: each message POSTed to one URL, a 2xx answer its
acknowledgement.

The body is JSON ``{"id", "subject", "aggregate", "payload", "headers"}`` (``id`` the
message id, ``headers`` the message's own, all of them). The request carries
``Content-Type: application/json``, ``Idempotency-Key: <message id>`` (a message sent
again after a relay died between the answer and the delete has the same key, so the
receiver de-duplicates by it, as JetStream does by ``Nats-Msg-Id``), the configured
headers (``--webhook-header``, e.g. an Authorization) and those of the message's own
headers that are valid HTTP headers and none of the above.

Anything but a 2xx within the timeout (a 3xx too: redirects are not followed, the
configured headers go to the configured URL only) fails the send, and the loop sends the
same message again after its backoff: the relay never drops a message. A 4xx other than
408 and 429 is a refusal only the receiver's side can end, so it is logged as an error.
What is logged names the webhook by its origin (scheme, host, port) and a failure by its
status or error class, never by the URL's path or query, a header value or an answer's
body: any of them can hold a secret (a token in the path, an echoed Authorization).
"""

from __future__ import annotations

import http
import logging
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
import msgspec

from . import logs
from .relay import DeliveryFailed, Message

# RFC 9110 field names (tokens) and the values sent as they are: visible ASCII, space
# and tab (a CR or LF would end the header; other bytes have no agreed encoding). A
# message header that is not both travels in the body only.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e]*")

# Set by the relay (a message's own would make a redelivery look new), and framing and
# hop-by-hop headers (a message's Content-Length would corrupt the request): never taken
# from a message's headers nor from the configured ones.
_OWN = frozenset({
    "content-type", "idempotency-key", "content-length", "content-encoding",
    "transfer-encoding", "host", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "expect",
})  # fmt: skip
# Credentials are configured or absent, never a message's: the relay's identity towards
# the webhook is its operator's, not a writer's.
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Statuses that ask to try again later; any other 4xx says the request is wrong.
_TRY_LATER = frozenset({408, 429})


def _is_header(name: str, value: str) -> bool:
    return bool(_TOKEN.fullmatch(name)) and bool(_VALUE.fullmatch(value))


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` as a configured header; a ValueError whose message never quotes
    the value (it is usually a secret)."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise ValueError("expects 'Name: value' with a header name before the colon")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"the value of {name} holds a control or non-ASCII character")
    if name.lower() in _OWN:
        raise ValueError(f"{name} is set by the relay")
    return name, value


class WebhookSink:
    """POSTs to one URL through one aiohttp session (kept-alive connections) for the
    process; each request bounded by ``timeout`` seconds, connecting included."""

    def __init__(self, url: str, headers: Sequence[tuple[str, str]], timeout: float) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            # Not quoted: the URL may hold a token.
            raise ValueError("--webhook expects an http:// or https:// URL with a host")
        self._url = url
        self._origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._headers = list(headers)
        self._timeout = timeout
        self._taken = {name.lower() for name, _ in headers} | _OWN | _CREDENTIALS
        self._session: aiohttp.ClientSession | None = None
        # Masked in every log line, whatever logs it (an aiohttp message may quote the URL).
        for secret in (url, parts.password, *(value for _, value in headers)):
            logs.register_secret(secret)

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": "dbsidecar-relay"},
            )
        return self._session

    async def send(self, message: Message) -> None:
        body = msgspec.json.encode({
            "id": message.id, "subject": message.subject, "aggregate": message.aggregate,
            "payload": message.payload, "headers": message.headers,
        })  # fmt: skip
        headers = [
            *((name, value) for name, value in message.headers.items()
              if name.lower() not in self._taken and _is_header(name, value)),
            *self._headers,
            ("Content-Type", "application/json"),
            ("Idempotency-Key", message.id),
        ]  # fmt: skip
        try:
            async with self._open().post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                # The body is not read: a short one has already arrived and the connection
                # is kept alive, a long one closes it (the relay holds no answer's body).
                status = answer.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise DeliveryFailed(f"POST to {self._origin} failed: {self._reason(exc)}") from exc
        if 200 <= status < 300:
            return
        level = logging.WARNING
        if 300 <= status < 500 and status not in _TRY_LATER:
            level = logging.ERROR
        raise DeliveryFailed(f"{self._origin} answered {_status(status)}", level)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):  # aiohttp's timeouts are these too
            return f"no answer within {self._timeout:g} s"
        if isinstance(exc, OSError) and exc.strerror:  # aiohttp's connection errors too
            return f"{type(exc).__name__}: {exc.strerror}"
        # The class only: aiohttp's messages may quote the URL.
        return type(exc).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _status(status: int) -> str:
    """The status and its standard phrase (not the receiver's reason text)."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)
