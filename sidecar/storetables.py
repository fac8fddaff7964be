"""The event store's and the outbox's tables: their DDL, and creating them on first use.

The sidecar creates a table in the transaction of the first write that needs it (an
append, a plan carrying outbox messages), on the shard that write runs on: no setup
step to forget, and a shard that never stores events never gets the tables. Creators
serialize on a transaction-level advisory lock, because two concurrent
``CREATE TABLE IF NOT EXISTS`` of one name can both pass the check and one then fails
on the catalog's unique index. A role without the privilege to create tables gets the
DDL below applied by a migration instead (``EVENTS_DDL``, ``OUTBOX_DDL``).
"""

from __future__ import annotations

import asyncpg

# Advisory lock namespaces (the first key of the two-key form, so they never meet an
# application's one-key locks): table creation, the event store's writers and
# readers, the outbox's writers per aggregate, the relay's leadership.
SCHEMA_LOCK = 1684173635
EVENTS_LOCK = 1684173637
BARRIER_LOCK = 1684173666
OUTBOX_LOCK = 1684173679
RELAY_LOCK = 1684173682

EVENTS = "dbsidecar_events"
OUTBOX = "dbsidecar_outbox"

EVENTS_DDL = f"""
CREATE TABLE IF NOT EXISTS {EVENTS} (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream text NOT NULL,
    category text NOT NULL,
    version bigint NOT NULL,
    event_id uuid NOT NULL UNIQUE,
    type text NOT NULL,
    data jsonb,
    metadata jsonb,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (stream, version)
);
CREATE INDEX IF NOT EXISTS {EVENTS}_category ON {EVENTS} (category, position);
"""

OUTBOX_DDL = f"""
CREATE TABLE IF NOT EXISTS {OUTBOX} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id uuid NOT NULL UNIQUE,
    aggregate text NOT NULL,
    subject text NOT NULL,
    payload jsonb,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

_DDL = {EVENTS: EVENTS_DDL, OUTBOX: OUTBOX_DDL}


async def create(conn: asyncpg.Connection, table: str, limit: float | None) -> None:
    """Create ``table`` inside the caller's open transaction (committed with its write)."""
    await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK}, 0)", timeout=limit)
    await conn.execute(_DDL[table], timeout=limit)
