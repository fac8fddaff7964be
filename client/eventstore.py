"""The event store: streams of events with expected versions, read back in order.

``await EventStore.append_event('order-42', 'OrderPaid', {'amount': 10})`` appends one
event in one request and one transaction on the sidecar; ``get_events_for_aggregate``
reads a stream back ordered by version. A subclass names its database and category::

    class OrderEvents(EventStore):
        __database__ = 'orders'
        __category__ = 'order'      # aggregate 42 is the stream 'order-42'

Every event carries a UUID made here, before anything is sent, so an append whose
answer was lost (``WriteOutcomeUnknown``, a sidecar restart) is sent again with the
same ids, and the sidecar answers what the first one did instead of appending twice.
``expected_version`` makes an append conditional: ``'any'``, ``'no_stream'``,
``'stream_exists'`` or the version of the stream's last event (versions count from 0);
a mismatch raises :class:`~client.errors.WrongExpectedVersion` with the actual version.

``read_category`` reads one category (or every stream) in position order from a
:class:`Checkpoint`, one position per shard, with consumer-group partitioning by stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from wire.protocol import Append, NewEvent, OutboxMessage, ReadCategory, ReadStream

from .connection import ConnectionManager, Handle
from .errors import DbSidecarError
from .results import decode

ExpectedVersion = int | str
# A page of a stream when reading all of it.
PAGE = 1000
# Sends of one append when the outcome of the previous one is unknown.
APPEND_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class EventData:
    """An event to append; ``id`` is made now unless given (it is what makes a retry safe)."""

    type: str
    data: Any = None
    metadata: Any = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    stream: str
    version: int
    position: int
    id: uuid.UUID
    type: str
    data: Any
    metadata: Any
    recorded_at: dt.datetime
    # The shard it is stored on ("" on a database without shards).
    shard: str = ""


@dataclass(frozen=True, slots=True)
class AppendResult:
    stream: str
    # The version of the last event appended: the next append's expected_version.
    version: int
    # Per event, in order: its version, its position on its shard, when it was stored.
    versions: list[int]
    positions: list[int]
    recorded_at: list[dt.datetime]
    # The shard the stream lives on ("" on a database without shards).
    shard: str = ""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a category reader is: the last position read on each shard (a vector,
    since every shard numbers its own positions)."""

    positions: dict[str, int] = field(default_factory=dict)

    def after(self, events: Sequence[RecordedEvent]) -> Checkpoint:
        moved = dict(self.positions)
        for event in events:
            moved[event.shard] = max(moved.get(event.shard, 0), event.position)
        return Checkpoint(moved)


@dataclass(frozen=True, slots=True)
class Page:
    events: list[RecordedEvent]
    # Pass it to the next read_category call.
    checkpoint: Checkpoint


class EventStore:
    # A handle name or logical database (None: the 'default' handle).
    __database__: ClassVar[str | None] = None
    # When set, aggregate ids become the streams '<category>-<id>'.
    __category__: ClassVar[str | None] = None
    # When set, every appended event is also an outbox message to this subject, committed
    # with it (the seed's append_event + publish_event, atomic): the event's id is the
    # message id, its stream the aggregate the relay keeps the order of.
    __publish__: ClassVar[str | None] = None

    @classmethod
    def stream_of(cls, aggregate_id: Any) -> str:
        return f"{cls.__category__}-{aggregate_id}" if cls.__category__ else str(aggregate_id)

    @classmethod
    def _handle(cls, using: str | Handle | None) -> Handle:
        return ConnectionManager.resolve(using if using is not None else cls.__database__)

    @classmethod
    async def append_event(
        cls,
        aggregate_id: Any,
        event_type: str,
        data: Any = None,
        *,
        expected_version: ExpectedVersion = "any",
        metadata: Any = None,
        event_id: uuid.UUID | None = None,
        using: str | Handle | None = None,
    ) -> RecordedEvent:
        """Append one event to the aggregate's stream and return it as stored."""
        event = EventData(event_type, data, metadata, event_id or uuid.uuid4())
        stream = cls.stream_of(aggregate_id)
        result = await cls.append(stream, [event], expected_version=expected_version, using=using)
        return RecordedEvent(
            stream,
            result.version,
            result.positions[0],
            event.id,
            event_type,
            data,
            metadata,
            result.recorded_at[0],
            result.shard,
        )

    @classmethod
    async def append(
        cls,
        stream: str,
        events: Sequence[EventData],
        *,
        expected_version: ExpectedVersion = "any",
        outbox: Sequence[OutboxMessage] = (),
        using: str | Handle | None = None,
    ) -> AppendResult:
        """Append events to a stream, all or none, with ``outbox`` messages committed
        along. Sent again (same ids) while the outcome is unknown or the sidecar answers
        a retryable error."""
        db = cls._handle(using)
        messages = [*cls._published(stream, events), *outbox]
        plan = Append(
            database=db.database,
            stream=stream,
            events=[NewEvent(str(e.id), e.type, e.data, e.metadata) for e in events],
            expected_version=expected_version,
            outbox=messages,
        )
        attempt = 0
        while True:
            try:
                rows = decode(await db.run(plan))
                break
            except DbSidecarError as exc:
                attempt += 1
                if not exc.retryable or attempt >= APPEND_ATTEMPTS:
                    raise
                # Capped exponential backoff with full jitter, as the handle's reads.
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
        versions = [r["version"] for r in rows]
        return AppendResult(
            stream,
            versions[-1],
            versions,
            [r["position"] for r in rows],
            [r["recorded_at"] for r in rows],
            rows.served_by[0].shard or "",
        )

    @classmethod
    def _published(cls, stream: str, events: Sequence[EventData]) -> list[OutboxMessage]:
        if cls.__publish__ is None:
            return []
        messages = []
        for e in events:
            payload = {"id": str(e.id), "stream": stream, "type": e.type, "data": e.data}
            if e.metadata is not None:
                payload["metadata"] = e.metadata
            headers = {"event-type": e.type}
            messages.append(OutboxMessage(str(e.id), cls.__publish__, stream, payload, headers))
        return messages

    @classmethod
    async def read_stream(
        cls,
        stream: str,
        from_version: int = 0,
        limit: int = PAGE,
        *,
        using: str | Handle | None = None,
    ) -> list[RecordedEvent]:
        db = cls._handle(using)
        plan = ReadStream(database=db.database, stream=stream, from_version=from_version,
                          limit=limit)  # fmt: skip
        return _events(decode(await db.run(plan)))

    @classmethod
    async def get_events_for_aggregate(
        cls, aggregate_id: Any, *, from_version: int = 0, using: str | Handle | None = None
    ) -> list[RecordedEvent]:
        """Every event of the aggregate's stream, ordered by version."""
        stream = cls.stream_of(aggregate_id)
        events: list[RecordedEvent] = []
        while True:
            page = await cls.read_stream(stream, from_version, PAGE, using=using)
            events += page
            if len(page) < PAGE:
                return events
            from_version = page[-1].version + 1

    @classmethod
    async def read_category(
        cls,
        category: str | None = None,
        checkpoint: Checkpoint | None = None,
        limit: int = 100,
        *,
        member: int = 0,
        group_size: int = 1,
        using: str | Handle | None = None,
    ) -> Page:
        """The next events of a category (None: of every stream) after ``checkpoint``,
        in position order per shard; this reader's share when ``group_size`` > 1."""
        db = cls._handle(using)
        checkpoint = checkpoint or Checkpoint()
        plan = ReadCategory(
            database=db.database,
            category=category,
            after=checkpoint.positions,
            limit=limit,
            member=member,
            group_size=group_size,
        )
        events = _events(decode(await db.run(plan)))
        return Page(events, checkpoint.after(events))


def _events(rows: list[dict[str, Any]]) -> list[RecordedEvent]:
    return [
        RecordedEvent(
            r["stream"],
            r["version"],
            r["position"],
            r["event_id"],
            r["type"],
            r["data"],
            r["metadata"],
            r["recorded_at"],
            r["shard"],
        )
        for r in rows
    ]
