"""Migration files: reading a folder, checking its files, their checksums and directives.

A folder holds ``<version>_<name>.sql`` files (see :mod:`wire.migrations`); other files
are ignored, but a ``.sql`` file with another name is an error (a forgotten version
prefix would otherwise never run). Versions are unique and at least 1; gaps are allowed.

A file runs in one transaction with its bookkeeping row, unless a leading comment says
``-- dbsidecar: no-transaction``: then its statements (split by PostgreSQL's own
parser) run one by one outside any transaction, as ``CREATE INDEX CONCURRENTLY``
requires. The checksum is the sha256 of the text with line endings normalised, so a
checkout that turns LF into CRLF does not look like an edited file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pglast import ast, parse_sql, split
from pglast.parser import ParseError

from wire.migrations import MigrationFile, parse_file_name

_DIRECTIVE = re.compile(r"--\s*dbsidecar:\s*(?P<words>.*)", re.IGNORECASE)
_DIRECTIVES = frozenset({"no-transaction"})
# Bounds for what one request or folder may hold (a body is bounded by max_body_bytes).
MAX_FILES = 10_000


class MigrationFilesError(ValueError):
    """Files that cannot be applied; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str
    transactional: bool
    # For no-transaction files: the statements, run one by one.
    statements: tuple[str, ...]

    @property
    def label(self) -> str:
        """How messages name it: ``version 3 (add_email)``."""
        return f"version {self.version} ({self.name})"


def checksum(sql: str) -> str:
    normalised = sql.replace("\r\n", "\n").replace("\r", "\n")
    return hashlib.sha256(normalised.encode()).hexdigest()


def _directives(sql: str, file_name: str) -> set[str]:
    """The ``-- dbsidecar: ...`` words of the comment lines before the first statement."""
    found: set[str] = set()
    for line in sql.splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("--"):
            break
        match = _DIRECTIVE.fullmatch(text)
        if match is None:
            continue
        for word in match["words"].split():
            if word.lower() not in _DIRECTIVES:
                raise MigrationFilesError(
                    f"{file_name}: unknown directive {word!r} "
                    f"(known: {', '.join(sorted(_DIRECTIVES))})"
                )
            found.add(word.lower())
    return found


def _statements(sql: str) -> tuple[str, ...] | None:
    """The statements of ``sql``; None when PostgreSQL's parser (as pglast knows it)
    cannot read it, e.g. syntax newer than pglast's: the server decides then."""
    try:
        return tuple(split(sql))
    except ParseError:
        return None


# The first words of every transaction control statement. Only statements starting with
# one are parsed whole: parsing a whole file builds its syntax tree in Python, which for a
# body of a few MB takes seconds and hundreds of MB (split only finds the boundaries).
_TRANSACTION_WORDS = re.compile(
    r"(?:begin|start|commit|end|rollback|abort|savepoint|release|prepare)\b", re.IGNORECASE
)


def _check_transactional(statements: tuple[str, ...] | None, file_name: str) -> None:
    if statements is None:
        return  # unparsable: the server reports the syntax error, recorded on the shard
    for text in statements:
        # split() gives each statement from its first token (no comment, no blank).
        if not _TRANSACTION_WORDS.match(text):
            continue
        try:
            parsed = parse_sql(text)
        except ParseError:
            continue
        if any(isinstance(raw.stmt, ast.TransactionStmt) for raw in parsed):
            raise MigrationFilesError(
                f"{file_name}: transaction control (BEGIN, COMMIT, ...) in a migration: each "
                "file runs in its own transaction; a file that must run outside one starts "
                "with '-- dbsidecar: no-transaction'"
            )


def migration(version: int, name: str, sql: str) -> Migration:
    """One checked migration."""
    file_name = f"{version}_{name}.sql"
    if version < 1:
        raise MigrationFilesError(f"{file_name}: versions start at 1")
    try:
        parse_file_name(file_name)
    except ValueError as exc:
        raise MigrationFilesError(str(exc)) from None
    if "\x00" in sql:
        raise MigrationFilesError(f"{file_name}: holds a NUL character")
    transactional = "no-transaction" not in _directives(sql, file_name)
    parsed = _statements(sql)
    if parsed is not None and not parsed:
        raise MigrationFilesError(f"{file_name}: holds no statement")
    if transactional:
        _check_transactional(parsed, file_name)
        statements: tuple[str, ...] = ()
    else:
        # Unparsable text runs as one statement; the server's error is recorded.
        statements = parsed if parsed is not None else (sql,)
    return Migration(version, name, sql, checksum(sql), transactional, statements)


def checked(files: Sequence[MigrationFile]) -> list[Migration]:
    """Files as migrations in version order; MigrationFilesError on any problem."""
    if len(files) > MAX_FILES:
        raise MigrationFilesError(f"at most {MAX_FILES} migrations at once")
    seen: dict[int, str] = {}
    out = []
    for file in files:
        if file.version in seen:
            raise MigrationFilesError(
                f"version {file.version} twice: {seen[file.version]} and {file.name}"
            )
        seen[file.version] = file.name
        out.append(migration(file.version, file.name, file.sql))
    return sorted(out, key=lambda m: m.version)


def read_folder(folder: str | Path) -> list[Migration]:
    """The migrations of a folder (its ``.sql`` files, not its subfolders)."""
    path = Path(folder)
    if not path.is_dir():
        raise MigrationFilesError(f"{path}: not a folder")
    files = []
    for entry in sorted(path.iterdir()):
        if not entry.is_file() or entry.suffix != ".sql":
            continue
        try:
            version, name = parse_file_name(entry.name)
        except ValueError as exc:
            raise MigrationFilesError(str(exc)) from None
        try:
            sql = entry.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MigrationFilesError(f"{entry.name}: not UTF-8 text") from None
        except OSError as exc:
            raise MigrationFilesError(f"{entry.name}: cannot read it ({exc.strerror})") from None
        files.append(MigrationFile(version, name, sql))
    if not files:
        raise MigrationFilesError(f"{path}: no <version>_<name>.sql files")
    return checked(files)
