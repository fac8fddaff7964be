"""Outbox messages: what a write commits for the relay to publish after it.

Any write plan can carry messages (``outbox=[...]``); they commit in the write's
transaction, on its shard, so a message exists exactly when the write committed. The
relay (``dbsidecar relay``) publishes them to the broker at least once, in order per
``aggregate``, with the message id as the broker's de-duplication id::

    plan = with_outbox(plan, [message('orders.paid', f'order-{order.id}', {'id': order.id})])
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from wire.protocol import OutboxMessage

P = TypeVar("P", bound=msgspec.Struct)


def message(
    subject: str,
    aggregate: str,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    id: uuid.UUID | None = None,
) -> OutboxMessage:
    """A message for ``subject``, ordered with the other messages of ``aggregate``; its
    id (made now unless given) is what the broker drops a redelivery by."""
    return OutboxMessage(str(id or uuid.uuid4()), subject, aggregate, payload, headers or {})


def with_outbox(plan: P, messages: Sequence[OutboxMessage]) -> P:
    """A copy of a write plan (insert, update, delete, raw with writes, append) that
    commits ``messages`` with it."""
    return msgspec.structs.replace(plan, outbox=[*plan.outbox, *messages])  # type: ignore[attr-defined]
