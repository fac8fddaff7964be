"""``POST /v1/migrate``: an app migrates its database when it starts.

The app sends its files (``client.migrations.migrate``), or none to use the folder
configured for the database. Only databases with a ``migrations`` section accept it.
The answer is a MigrationReport, 200 whenever the migrator ran (``ok`` says whether
every shard reached the latest version; a failure is in the report, shard by shard);
invalid files or requests are 400 ``bad_migration`` before any shard is touched.
A migration runs to its end even if the caller goes away: stopping one halfway would
leave a dirty shard for nothing.
"""

from __future__ import annotations

import asyncio

import msgspec

from wire.errors import ErrorCode
from wire.migrations import MigrateRequest, MigrationReport

from . import logs
from .errors import SidecarError
from .migrate import migrate
from .migration_files import Migration, MigrationFilesError, checked, read_folder
from .migration_targets import from_runtime
from .migration_versions import SchemaVersions
from .runtime import Runtime

_decoder = msgspec.json.Decoder(MigrateRequest)
# Migrations running for callers that may have gone (kept so they are not collected).
_running: set[asyncio.Task[MigrationReport]] = set()
# One run at a time per database in this sidecar. A run holds a dedicated connection to
# every shard for as long as it waits for the migration lock (lock_timeout, 900 s by
# default), so callers running at once would hold one per shard each, without bound, and
# exhaust the servers' max_connections for everyone. Only one of them could hold the
# shards' lock anyway; the others, run after it, find the shards current.
_gates: dict[str, asyncio.Lock] = {}


def _bad(message: str) -> SidecarError:
    return SidecarError(ErrorCode.BAD_MIGRATION, message)


def decode(body: bytes) -> MigrateRequest:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad(f"invalid migrate request: {exc}") from None


async def _files(runtime: Runtime, request: MigrateRequest) -> list[Migration]:
    db = runtime.topology.databases.get(request.database)
    if db is None:
        raise SidecarError(ErrorCode.UNKNOWN_DATABASE, f"unknown database {request.database!r}")
    settings = db.settings.migrations
    if settings is None:
        raise _bad(
            f"migrations are not enabled for {request.database!r}: configure "
            f"databases.{request.database}.migrations"
        )
    try:
        if request.migrations:
            # Up to max_body_bytes of SQL to split and check: off the event loop, like
            # the folder's reading below, so other requests and the probes go on.
            return await asyncio.to_thread(checked, request.migrations)
        if settings.dir is None:
            raise _bad(
                f"no migrations sent and databases.{request.database}.migrations.dir is not set"
            )
        # The folder is small, but disk reads stay off the event loop.
        return await asyncio.to_thread(read_folder, settings.dir)
    except MigrationFilesError as exc:
        raise _bad(str(exc)) from None


async def run(runtime: Runtime, versions: SchemaVersions, body: bytes) -> MigrationReport:
    request = decode(body)
    files = await _files(runtime, request)
    targets = from_runtime(runtime, request.database)
    settings = runtime.topology.databases[request.database].settings.migrations
    assert settings is not None  # checked by _files
    gate = _gates.setdefault(request.database, asyncio.Lock())
    # A caller that goes away while waiting here has started nothing.
    await gate.acquire()
    try:
        task = asyncio.create_task(
            migrate(request.database, targets, files, lock_timeout=settings.lock_timeout)
        )
    except BaseException:
        gate.release()
        raise
    _running.add(task)
    task.add_done_callback(_running.discard)
    # Released when the run ends, even if its caller went away (the run goes on).
    task.add_done_callback(lambda _: gate.release())
    report = await asyncio.shield(task)
    await versions.refresh(runtime, [request.database])
    # Shard errors come from PostgreSQL; mask any configured secret they might quote.
    for shard in report.shards:
        if shard.message:
            shard.message = logs.redact(shard.message)
        # The same errors, as the bookkeeping table keeps them.
        for dirty in shard.dirty:
            dirty.error = logs.redact(dirty.error)
    return report
