"""Schema migrations from the app: ``await migrate(db, "migrations/")`` when it starts.

The folder's ``<version>_<name>.sql`` files go to the sidecar (``POST /v1/migrate``),
which applies what is pending to the primary of every shard of the handle's database,
in version order, once however many pods start at the same time (a lock per shard).
Without a folder the sidecar uses the one configured for the database. The sidecar
checks the files (names, duplicate versions, checksums of applied ones) and applies;
nothing here needs a database driver.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from wire.migrations import MigrateRequest, MigrationFile, MigrationReport, parse_file_name

from .connection import ConnectionManager, DatabaseHandle
from .errors import DbSidecarError, SidecarUnreachable

_report = msgspec.json.Decoder(MigrationReport)


class MigrationFailed(DbSidecarError):
    """A shard did not reach the latest version; ``report`` says which, why and what
    to do (``dbsidecar migrate status`` shows the same)."""

    def __init__(self, report: MigrationReport) -> None:
        problems = [
            f"{s.shard}: {s.outcome}: {s.message}"
            for s in report.shards
            if s.outcome in ("failed", "refused")
        ]
        super().__init__(
            f"migrations of {report.database} did not finish: " + "; ".join(problems),
            code="migration_failed",
        )
        self.report = report


def read_folder(folder: str | Path) -> list[MigrationFile]:
    """The ``.sql`` files of ``folder`` as the sidecar takes them (ValueError for a
    ``.sql`` file not named ``<version>_<name>.sql``)."""
    files = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix == ".sql":
            version, name = parse_file_name(path.name)
            files.append(MigrationFile(version, name, path.read_text(encoding="utf-8")))
    if not files:
        raise ValueError(f"{folder}: no <version>_<name>.sql files")
    return files


async def migrate(
    db: DatabaseHandle | str = "default",
    folder: str | Path | None = None,
    answer_within: float = 1800.0,
) -> MigrationReport:
    """Apply the migrations of ``folder`` (or the sidecar's configured folder) to the
    database behind ``db`` (a handle or its name); MigrationFailed unless every shard
    ends at the latest version. ``answer_within``: seconds to wait for the sidecar's answer
    (a run waits for other pods' runs and may build indexes), not the handle's timeout."""
    handle = ConnectionManager.get(db) if isinstance(db, str) else db
    files = [] if folder is None else await asyncio.to_thread(read_folder, folder)
    body = msgspec.json.encode(MigrateRequest(handle.database, files))
    try:
        report = await handle.transport.request(
            "POST", "/v1/migrate", body, _report, answer_within=answer_within
        )
    except SidecarUnreachable as exc:
        # The sidecar finishes a run whose caller left: "unreachable" alone would hide that.
        raise SidecarUnreachable(
            f"{exc}; a migration the sidecar started goes on without this caller: "
            f"`dbsidecar migrate status --database {handle.database}` shows where it is",
            code=exc.code,
            retryable=exc.retryable,
        ) from exc
    if not report.ok:
        raise MigrationFailed(report)
    return report
