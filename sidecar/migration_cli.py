"""``dbsidecar migrate``: apply, show and resolve a database's migrations from a shell.

Runs without a sidecar, from the same configuration file: each shard's configured
primary is migrated over a connection of its own. Exit codes: 0 every shard is at the
latest version; 1 a migration failed, a shard refused (an edited file, a dirty version
that needs a decision) or could not be reached; 2 the configuration, the arguments or
the files are invalid; ``migrate status`` exits 3 when versions are only pending.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence

import msgspec

from wire.migrations import MigrationReport, ShardReport

from . import logs
from .migrate import Refused, Target, migrate, resolve, status
from .migration_files import Migration, MigrationFilesError, read_folder
from .migration_table import LockTimeout
from .migration_targets import from_settings
from .settings import ConfigError, Settings, load_settings

OK, FAILED, INVALID, PENDING = 0, 1, 2, 3
DEFAULT_LOCK_TIMEOUT = 900.0


class _Invalid(Exception):
    """A usage or configuration problem: exit 2 with the message."""


# Control characters but tab and newline (C0, DEL, C1) and bidirectional overrides. Errors
# quote the files (a RAISE, the token near a syntax error), which an app may have sent:
# printed raw they could clear, retitle or rewrite the operator's terminal. \uXXXX is
# readable and, inside --json's strings, still JSON.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _say(line: str) -> None:
    # Every configured password is masked in whatever reaches the terminal.
    print(_printable(logs.redact(line)), flush=True)


def _settings(path: str | None) -> Settings:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        raise _Invalid(f"invalid configuration: {exc}") from None
    for secret in settings.secrets():
        logs.register_secret(secret)
    return settings


def _files(settings: Settings, database: str, folder: str | None) -> list[Migration] | None:
    """The migrations of ``--dir`` or the configured folder; None if neither is set."""
    db = settings.databases.get(database)
    configured = db.migrations.dir if db is not None and db.migrations is not None else None
    where = folder or configured
    if where is None:
        return None
    try:
        return read_folder(where)
    except MigrationFilesError as exc:
        raise _Invalid(f"invalid migrations in {where}: {exc}") from None


def _targets(settings: Settings, database: str) -> list[Target]:
    try:
        return from_settings(settings, database)
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


def _lock_timeout(args: argparse.Namespace, settings: Settings, database: str) -> float:
    if args.lock_timeout is not None:
        return float(args.lock_timeout)
    migrations = settings.databases[database].migrations
    return migrations.lock_timeout if migrations is not None else DEFAULT_LOCK_TIMEOUT


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if args.database is None:
        raise _Invalid("say which database: --database NAME")
    targets = _targets(settings, args.database)
    files = _files(settings, args.database, args.dir)
    if files is None:
        raise _Invalid(
            f"no migrations folder: give --dir or set databases.{args.database}.migrations.dir"
        )
    quiet = args.json
    report = asyncio.run(
        migrate(
            args.database,
            targets,
            files,
            lock_timeout=_lock_timeout(args, settings, args.database),
            progress=(lambda line: None) if quiet else _say,
        )
    )
    if quiet:
        _say(msgspec.json.encode(report).decode())
    else:
        _say(_summary(report))
    return OK if report.ok else FAILED


def _summary(report: MigrationReport) -> str:
    if report.ok:
        versions = sorted({s.version or 0 for s in report.shards})
        at = f"version {versions[0]}" if len(versions) == 1 else f"versions {versions}"
        return f"{report.database}: all {len(report.shards)} shards up to date ({at})"
    bad = [s for s in report.shards if s.outcome in ("failed", "refused")]
    lines = [f"{report.database}: NOT migrated everywhere"]
    lines += [f"  {s.shard}: {s.outcome}: {s.message}" for s in bad]
    lines.append(f"  see: dbsidecar migrate status --database {report.database}")
    return "\n".join(lines)


def _shard_lines(report: MigrationReport, files: Sequence[Migration] | None) -> list[str]:
    lines = [f"{'SHARD':<16} {'NODE':<32} {'VERSION':>8} {'PENDING':<16} STATE"]
    for s in report.shards:
        lines.append(
            f"{s.shard:<16} {s.node[:32]:<32} {_text(s.version):>8} "
            f"{_versions(s.pending) if files is not None else '?':<16} {_state(s)}"
        )
        lines += [
            f"  dirty: version {d.version} ({d.name}), "
            f"{'rolled back' if d.transactional else 'outside a transaction'}: {d.error}"
            for d in s.dirty
        ]
        if s.message:
            lines.append(f"  note: {s.message}")
    return lines


def _state(s: ShardReport) -> str:
    if s.dirty:
        return "DIRTY"
    if s.message:
        return "ATTENTION"
    return "pending" if s.pending else "ok"


def _text(value: int | None) -> str:
    return "-" if value is None else str(value)


def _versions(values: list[int]) -> str:
    return ",".join(map(str, values)) or "-"


def _advice(report: MigrationReport, files: Sequence[Migration] | None) -> list[str]:
    dirty = [s for s in report.shards if s.dirty]
    if any(d.transactional for s in dirty for d in s.dirty):
        return [
            "what to do: a failed migration that ran in a transaction left nothing behind; "
            f"fix its file (or the data it tripped on) and run `dbsidecar migrate --database "
            f"{report.database}` again: it is retried, then the shards after it are migrated"
        ]
    if dirty:
        return ["what to do: see the notes above (the migration may be half applied)"]
    if any(s.message for s in report.shards):
        return ["what to do: see the notes above"]
    if files is None:
        return ["(no migrations folder given: --dir, or migrations.dir in the configuration)"]
    if any(s.pending for s in report.shards):
        return [f"what to do: dbsidecar migrate --database {report.database}"]
    return []


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    names = [args.database] if args.database else sorted(settings.databases)
    if args.dir and not args.database:
        raise _Invalid("--dir belongs to one database: give --database too")
    code = OK
    for name in names:
        targets = _targets(settings, name)
        files = _files(settings, name, args.dir)
        report = asyncio.run(status(name, targets, files))
        if args.json:
            _say(msgspec.json.encode(report).decode())
        else:
            latest = f"files up to version {report.latest}" if files else "no files given"
            _say(f"database {name} ({latest})")
            for line in _shard_lines(report, files) + _advice(report, files):
                _say(line)
        if any(s.dirty or s.message for s in report.shards):
            code = FAILED
        elif code == OK and any(s.pending for s in report.shards):
            code = PENDING
    return code


def _resolve(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if args.database is None:
        raise _Invalid("say which database: --database NAME")
    files = _files(settings, args.database, args.dir)
    if files is None:
        raise _Invalid("resolve needs the migration files: --dir or migrations.dir")
    migration = next((m for m in files if m.version == args.version), None)
    if migration is None:
        raise _Invalid(f"no file for version {args.version}")
    targets = [t for t in _targets(settings, args.database) if t.shard == args.shard]
    if not targets:
        raise _Invalid(f"database {args.database} has no shard {args.shard!r}")
    action = "retry" if args.retry else "applied"
    try:
        done = asyncio.run(
            resolve(
                args.database,
                targets[0],
                migration,
                action,
                lock_timeout=_lock_timeout(args, settings, args.database),
                progress=_say,
            )
        )
    except Refused as exc:
        _say(f"dbsidecar migrate resolve: {exc}")
        return FAILED
    _say(done)
    return OK


def command(args: argparse.Namespace) -> int:
    handler = {None: _run, "status": _status, "resolve": _resolve}[args.action]
    try:
        return handler(args)
    except _Invalid as exc:
        print(_printable(logs.redact(f"dbsidecar migrate: {exc}")), file=sys.stderr)
        return INVALID
    except (OSError, LockTimeout) as exc:
        print(_printable(logs.redact(f"dbsidecar migrate: {exc}")), file=sys.stderr)
        return FAILED


def _common(
    p: argparse.ArgumentParser, suppress: bool, locks: bool = True, report: bool = True
) -> None:
    # Sub-actions SUPPRESS their defaults, so `migrate --config F status` keeps F.
    default = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--config", metavar="FILE", help="YAML or JSON configuration file", **default)
    p.add_argument("--dir", metavar="DIR", help="the migrations folder (default: the "
                   "database's migrations.dir)", **default)  # fmt: skip
    if report:
        p.add_argument("--json", action="store_true", help="print the report as JSON", **default)
    if locks:
        p.add_argument("--lock-timeout", type=float, metavar="SECONDS", help="how long to wait "
                       "for another migrator's lock on a shard (default: "
                       "migrations.lock_timeout, 900)", **default)  # fmt: skip


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``migrate``, ``migrate status`` and ``migrate resolve`` on the command's parser."""
    p = sub.add_parser(
        "migrate",
        help="apply a database's schema migrations to every shard",
        description="Apply the <version>_<name>.sql files of a folder to the primary of "
        "every shard of a database, in version order, shard after shard, each shard "
        "recording its version in dbsidecar_schema_migrations. A file runs in a "
        "transaction unless it starts with '-- dbsidecar: no-transaction'. Concurrent "
        "migrators are safe (a lock per shard). Exit 0: every shard at the latest "
        "version; 1: a migration failed or a shard refused (see `migrate status`); "
        "2: invalid configuration, arguments or files.",
    )
    _common(p, suppress=False)
    p.add_argument("--database", metavar="NAME", help="the logical database to migrate")
    p.set_defaults(func=command, action=None)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser(
        "status",
        help="every shard's version, dirty versions and what to do",
        description="Show every shard's schema version, failed (dirty) migrations with "
        "their errors, pending files and what to do. Exit 0: up to date; 1: a shard needs "
        "attention; 3: versions pending.",
    )
    _common(show, suppress=True, locks=False)
    show.add_argument("--database", metavar="NAME", default=argparse.SUPPRESS,
                      help="one database (default: all)")  # fmt: skip
    fix = actions.add_parser(
        "resolve",
        help="decide on a dirty no-transaction migration after repairing a shard by hand",
        description="A no-transaction migration that failed may be half applied, so the "
        "same file is not run again by itself. After repairing the shard, say what to do: "
        "--retry runs it again on the next migrate, --applied records it as done.",
    )
    _common(fix, suppress=True, report=False)
    fix.add_argument("--database", metavar="NAME", default=argparse.SUPPRESS, required=True)
    fix.add_argument("--shard", metavar="NAME", required=True, help="the shard (database name "
                     "if not sharded)")  # fmt: skip
    fix.add_argument("--version", type=int, required=True, help="the dirty version")
    what = fix.add_mutually_exclusive_group(required=True)
    what.add_argument("--retry", action="store_true", help="run it again on the next migrate")
    what.add_argument("--applied", action="store_true", help="record it as applied")
