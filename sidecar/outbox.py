"""The transactional outbox: messages a write commits in its own transaction.

A write plan (or a batch) may carry outbox messages; they are inserted into
``dbsidecar_outbox`` on the write's shard, inside the write's transaction, so a message
exists exactly when the write committed (no dual write: nothing is published for a
rolled-back write, nothing is lost after a committed one). The relay
(:mod:`sidecar.relay`) delivers them afterwards, in id order.

Order per aggregate: ids are taken at insert and become visible at commit, so two
transactions writing messages of one aggregate could commit in the other order than
their ids and a relay reading in id order would deliver them reversed. Writers take a
transaction-level advisory lock per aggregate before inserting (in one order, by the
aggregate's hash, so two writers of the same aggregates never deadlock), which makes
commit order and id order the same within an aggregate.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from wire.errors import ErrorCode
from wire.protocol import OutboxMessage

from . import storetables
from .errors import SidecarError, bad_plan
from .storetables import OUTBOX, OUTBOX_LOCK

Parts = tuple[list[str], list[str | None], list[tuple[Any, ...]], int]

MAX_SUBJECT = 255
MAX_AGGREGATE = 512
# A subject a broker accepts for publishing (NATS: dot-separated tokens, no whitespace,
# no wildcards), checked here: a message the relay could never deliver would hold up
# every message after it.
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
# Likewise a message the broker refuses for ever: NATS's default max_payload is 1 MiB,
# headers included (the JSON text PostgreSQL stores counts, which is never shorter than
# what the relay sends: a float like 1e300 is stored with all its digits); header names
# the client accepts (an HTTP token); and no "Nats-*" header, since those steer
# JetStream itself (Nats-Expected-Stream, Nats-Rollup, ...; the relay sets Nats-Msg-Id).
MAX_MESSAGE_BYTES = 1_000_000
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# The locks, taken in the order of the aggregates' hashes; each row also says whether the
# table exists yet.
_LOCKS_SQL = (
    f"SELECT pg_advisory_xact_lock({OUTBOX_LOCK}, k.h), to_regclass('{OUTBOX}') IS NOT NULL "
    "FROM (SELECT DISTINCT hashtext(a) AS h FROM unnest($1::text[]) AS a ORDER BY 1) AS k"
)
_INSERT_SQL = (
    f"INSERT INTO {OUTBOX} (message_id, aggregate, subject, payload, headers) "
    "SELECT m.id, m.aggregate, m.subject, m.payload::jsonb, m.headers::jsonb "
    # JSON as text: asyncpg would read a JSON array inside a jsonb[] parameter as more
    # array dimensions (a payload ["x"] was stored as "x").
    "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) "
    "WITH ORDINALITY AS m(id, aggregate, subject, payload, headers, n) ORDER BY m.n "
    # A message id is the message: a retried write (an idempotent append sent again)
    # does not queue it twice.
    "ON CONFLICT (message_id) DO NOTHING "
    "RETURNING coalesce(octet_length(payload::text), 0) + coalesce(octet_length(headers::text), 0)"
)

# A message id among these that is queued with other contents, if any.
_OTHER_SQL = (
    "SELECT m.id FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) "
    f"AS m(id, aggregate, subject, payload, headers) JOIN {OUTBOX} AS o ON o.message_id = m.id "
    "WHERE (o.aggregate, o.subject, o.payload, o.headers) IS DISTINCT FROM "
    "(m.aggregate, m.subject, m.payload::jsonb, m.headers::jsonb) LIMIT 1"
)


def _text(what: str, text: str, longest: int) -> None:
    if not text or len(text) > longest or "\x00" in text:
        raise bad_plan(f"an outbox message's {what} must be 1 to {longest} characters")


@dataclass(frozen=True, slots=True)
class OutboxWork:
    """Checked outbox messages, inserted on a connection inside the write's transaction."""

    ids: list[uuid.UUID]
    aggregates: list[str]
    subjects: list[str]
    payloads: list[str | None]  # JSON text
    headers: list[str | None]

    async def __call__(self, conn: asyncpg.Connection, limit: float | None) -> Parts:
        locked = await conn.fetch(_LOCKS_SQL, self.aggregates, timeout=limit)
        if not locked[0][1]:
            await storetables.create(conn, OUTBOX, limit)
        sizes = await conn.fetch(
            _INSERT_SQL,
            self.ids,
            self.aggregates,
            self.subjects,
            self.payloads,
            self.headers,
            timeout=limit,
        )
        if any(size > MAX_MESSAGE_BYTES for (size,) in sizes):
            raise _too_large()  # the write's transaction rolls back with it
        if len(sizes) < len(self.ids):
            # Ids queued already: the same message again (a retried write) adds nothing,
            # another one under a queued id is refused. Dropped, it left a committed write
            # without its message.
            other = await conn.fetchval(
                _OTHER_SQL, self.ids, self.aggregates, self.subjects, self.payloads,
                self.headers, timeout=limit,
            )  # fmt: skip
            if other is not None:
                raise SidecarError(
                    ErrorCode.UNIQUE_VIOLATION,
                    f"outbox message id {other} is queued already, with other contents: "
                    "an id is one message (sent again, it must be the same)",
                )
        return [], [], [], 0


def _too_large() -> SidecarError:
    return bad_plan(
        f"an outbox message's payload and headers are at most {MAX_MESSAGE_BYTES} bytes "
        "of JSON (NATS's default max_payload is 1 MiB): the relay could never publish it"
    )


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def prepare(messages: list[OutboxMessage]) -> OutboxWork | None:
    """Messages checked (ids are UUIDs, names bounded); None when there are none."""
    if not messages:
        return None
    ids: list[uuid.UUID] = []
    for m in messages:
        _text("subject", m.subject, MAX_SUBJECT)
        if not _SUBJECT.fullmatch(m.subject):
            raise bad_plan(
                f"outbox subject {m.subject[:60]!r} is not a publishable subject: "
                "dot-separated tokens without whitespace, '*' or '>'"
            )
        _text("aggregate", m.aggregate, MAX_AGGREGATE)
        try:
            ids.append(uuid.UUID(m.id))
        except ValueError:
            raise bad_plan(f"outbox message id {m.id[:60]!r} is not a UUID") from None
        for name, value in m.headers.items():
            if not _HEADER_NAME.fullmatch(name) or name.lower().startswith("nats-"):
                raise bad_plan(
                    f"outbox header {name[:60]!r}: a name is letters, digits and "
                    "!#$%&'*+-.^_`|~, and Nats-* headers are the broker's own"
                )
            if "\r" in value or "\n" in value:
                raise bad_plan(f"outbox header {name[:60]!r}: a value is one line")
    if len(set(ids)) != len(ids):
        raise bad_plan("outbox messages need distinct ids")
    payloads = [_json(m.payload) for m in messages]
    headers = [_json(m.headers) if m.headers else None for m in messages]
    sizes = (len(p or "") + len(h or "") for p, h in zip(payloads, headers, strict=True))
    if any(size > MAX_MESSAGE_BYTES for size in sizes):
        raise _too_large()  # before anything is sent (PostgreSQL's text is checked too)
    return OutboxWork(ids, [m.aggregate for m in messages], [m.subject for m in messages],
                      payloads, headers)  # fmt: skip
