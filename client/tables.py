"""Creating a pattern's own table (saga log and ledgers, subscription checkpoints) from
pods that start together.

``CREATE TABLE IF NOT EXISTS`` checks before it creates, so a slower creator collides in
the catalog: as a unique violation (pg_type's index, waited on until the other
committed), as 42P07 "relation already exists" (the other committed between the check and
the insert) or 42710 "type already exists" (between the check and the table's row type);
on every shard of a sharded database, a collision on some shards arrives inside a
PartialWrite (the others created it or had it). Once the other has committed, the next
try finds the table.
"""

from __future__ import annotations

from wire.protocol import Raw, Route

from .connection import DatabaseHandle
from .errors import DbSidecarError, PartialWrite, UniqueViolation

ATTEMPTS = 3


async def create(db: DatabaseHandle, sql: str, shard: str | None = None) -> None:
    """Run ``sql`` (a ``CREATE ... IF NOT EXISTS``) on the primary of ``shard`` (or every
    shard with ``'*'``), trying again when it collided with another creator."""
    plan = Raw(database=db.database, sql=sql, writes=True, route=Route(shard=shard))
    for attempt in range(ATTEMPTS):
        try:
            await db.run(plan)
            return
        except DbSidecarError as exc:
            collided = isinstance(exc, UniqueViolation | PartialWrite) or exc.sqlstate in (
                "42P07", "42710"
            )  # fmt: skip
            if not collided or attempt == ATTEMPTS - 1:
                raise
