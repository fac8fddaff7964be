"""The relay's NATS JetStream sink: each message published to its subject, with the
message id as ``Nats-Msg-Id``, acknowledged by the stream before the next.

JetStream drops a message sent again (a relay that died between a publish and the
delete) by that id within the stream's duplicate window (2 minutes by default: keep it
longer than a relay may stay down). Needs the ``relay`` extra (nats-py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats
import nats.errors
import nats.js

from .relay import DeliveryFailed, Message

log = logging.getLogger("dbsidecar.relay")

# What a failed publish can raise: the client's errors (timeouts, a closed or
# reconnecting connection, no stream for the subject) and the socket's.
PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


class NatsSink:
    """One NATS connection for the process, reconnecting for ever in the background;
    connecting again from scratch when the first connect fails."""

    def __init__(self, url: str, timeout: float, reconnect_wait: float) -> None:
        self._url = url
        self._timeout = timeout
        self._reconnect_wait = reconnect_wait
        self._nc: nats.NATS | None = None
        self._js: nats.js.JetStreamContext | None = None

    async def _jetstream(self) -> nats.js.JetStreamContext:
        if self._js is None:
            self._nc = await nats.connect(
                servers=[self._url],
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=self._reconnect_wait,
                connect_timeout=self._timeout,
                error_cb=_nats_error,
                disconnected_cb=_nats_disconnected,
                reconnected_cb=_nats_reconnected,
            )
            self._js = self._nc.jetstream(timeout=self._timeout)
        return self._js

    async def send(self, message: Message) -> None:
        # The message id wins over a header of the message's own by that name.
        headers = {**message.headers, "Nats-Msg-Id": message.id}
        try:
            js = await self._jetstream()
            await js.publish(message.subject, msgspec.json.encode(message.payload),
                             headers=headers)  # fmt: skip
        except PUBLISH_ERRORS as exc:
            raise DeliveryFailed(f"publish failed: {exc!r}") from exc

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(*PUBLISH_ERRORS):
                await self._nc.close()


async def _nats_error(exc: Exception) -> None:
    # Every failed reconnect attempt lands here (several a second while the broker is
    # down); the disconnect itself and the failed publishes are the warnings.
    log.debug("broker connection: %s", exc)


async def _nats_disconnected() -> None:
    log.warning("broker disconnected")


async def _nats_reconnected() -> None:
    log.warning("broker reconnected")
