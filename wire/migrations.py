"""Schema migrations on the wire: the files an app sends and the report it gets back.

A migration is a versioned SQL file, ``<version>_<name>.sql`` (``0003_add_email.sql``):
an integer version (the order of application; gaps allowed, so timestamps work too)
and a name of letters, digits, ``_`` and ``-``. ``POST /v1/migrate`` takes a
:class:`MigrateRequest` and answers a :class:`MigrationReport`, per shard.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

# Versions are PostgreSQL bigints; 18 digits always fit.
FILE_NAME = re.compile(r"(?P<version>\d{1,18})_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,127})\.sql")


def parse_file_name(file_name: str) -> tuple[int, str]:
    """``0003_add_email.sql`` -> ``(3, "add_email")``; ValueError for any other name."""
    match = FILE_NAME.fullmatch(file_name)
    if match is None:
        raise ValueError(
            f"{file_name}: a migration file is named <version>_<name>.sql "
            "(digits, '_', then letters, digits, '_' or '-'), e.g. 0003_add_email.sql"
        )
    return int(match["version"]), match["name"]


class MigrationFile(msgspec.Struct, forbid_unknown_fields=True):
    """One migration as the app read it: its version and name from the file name, and
    the file's text."""

    version: int
    name: str
    sql: str


class MigrateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Apply ``migrations`` to every shard of ``database``; an empty list means the
    folder configured for that database (``databases.<name>.migrations.dir``)."""

    database: str
    migrations: list[MigrationFile] = []


class DirtyMigration(msgspec.Struct, omit_defaults=True):
    """A version whose last attempt failed on a shard (or was interrupted)."""

    version: int
    name: str
    error: str
    # A failed transactional migration left nothing behind and is retried on the next
    # run; a no-transaction one may be half applied.
    transactional: bool


# What one run did on a shard:
#   applied   - it applied the pending versions (``applied`` lists them)
#   current   - nothing was pending
#   failed    - a migration failed here (``dirty`` says which); later shards were skipped
#   refused   - the shard's state and the files disagree (an edited file, a dirty version
#               that needs a decision, ...); ``message`` says what to do
#   skipped   - not touched, because another shard failed or was refused
#   status    - only read (``dbsidecar migrate status``)
ShardOutcome = Literal["applied", "current", "failed", "refused", "skipped", "status"]


class ShardReport(msgspec.Struct, omit_defaults=True):
    shard: str
    node: str
    outcome: ShardOutcome
    # The highest applied version (None: no migration ever applied); always sent.
    version: int | None
    applied: list[int] = []
    pending: list[int] = []
    # Versions applied here whose file was then changed to fix another shard where they
    # failed: the fixed file's checksum is recorded here, the file is not run again.
    realigned: list[int] = []
    dirty: list[DirtyMigration] = []
    # What went wrong and what to do about it (failed, refused, skipped).
    message: str | None = None


class MigrationReport(msgspec.Struct, omit_defaults=True):
    database: str
    # True when every shard ended at the latest version of the files.
    ok: bool
    # The highest version of the files (None: no files).
    latest: int | None = None
    shards: list[ShardReport] = []
