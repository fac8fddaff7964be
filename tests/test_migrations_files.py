"""Migration files and the per-shard plan, without a database: names, directives,
statement splitting, checksums, and which shard states are refused."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sidecar.migrate import Refused, failures, plan
from sidecar.migration_files import MigrationFilesError, checksum, migration, read_folder
from sidecar.migration_table import Row


def test_a_folder_is_read_in_version_order_and_other_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "0010_later.sql").write_text("SELECT 10")
    (tmp_path / "2_first.sql").write_text("SELECT 2")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "0003_sub.sql").mkdir()
    assert [(m.version, m.name) for m in read_folder(tmp_path)] == [(2, "first"), (10, "later")]


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({}, "no <version>_<name>.sql files"),
        ({"create_users.sql": "SELECT 1"}, "<version>_<name>.sql"),
        ({"1_up.down.sql": "SELECT 1"}, "<version>_<name>.sql"),
        ({"1_a.sql": "SELECT 1", "0001_b.sql": "SELECT 1"}, "version 1 twice"),
        ({"0_zero.sql": "SELECT 1"}, "versions start at 1"),
        ({"1_blank.sql": "-- only a comment\n"}, "holds no statement"),
        ({"1_tx.sql": "BEGIN;\nCREATE TABLE t (id int);\nCOMMIT;"}, "transaction control"),
        ({"1_typo.sql": "-- dbsidecar: no-transacton\nSELECT 1"}, "unknown directive"),
    ],
)
def test_bad_folders_are_refused_naming_the_file(
    tmp_path: Path, files: dict[str, str], words: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(MigrationFilesError, match=words.replace(".", r"\.")):
        read_folder(tmp_path)


def test_non_utf8_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_latin1.sql").write_bytes(b"SELECT '\xe9'")
    with pytest.raises(MigrationFilesError, match="not UTF-8"):
        read_folder(tmp_path)


def test_no_transaction_files_are_split_into_statements_by_the_parser() -> None:
    sql = (
        "-- dbsidecar: no-transaction\n"
        "CREATE INDEX CONCURRENTLY a ON t (x);\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\n"
        "SELECT ';';\n"
    )
    m = migration(3, "index", sql)
    assert not m.transactional
    assert m.statements == (
        "CREATE INDEX CONCURRENTLY a ON t (x)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        "SELECT ';'",
    )
    # A directive only counts in the leading comments.
    late = migration(4, "late", "SELECT 1;\n-- dbsidecar: no-transaction\n")
    assert late.transactional


def test_the_checksum_ignores_line_endings_only() -> None:
    assert checksum("SELECT 1;\r\nSELECT 2;\r\n") == checksum("SELECT 1;\nSELECT 2;\n")
    assert checksum("SELECT 1;\n") != checksum("SELECT  1;\n")


def _row(version: int, sql: str, state: str = "applied", transactional: bool = True) -> Row:
    now = dt.datetime.now(dt.UTC)
    return Row(version, f"v{version}", checksum(sql), state, transactional, None, now, None)  # type: ignore[arg-type]


FILES = [migration(v, f"v{v}", f"SELECT {v}") for v in (1, 2, 3)]


def test_the_plan_applies_what_is_missing_and_retries_a_rolled_back_failure() -> None:
    rows = {1: _row(1, "SELECT 1"), 2: _row(2, "SELECT 2", "dirty")}
    assert [m.version for m in plan(rows, FILES, "s0", "db", {}).todo] == [2, 3]


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ({1: _row(1, "SELECT 1 -- edited")}, "must not change"),
        ({2: _row(2, "SELECT 2")}, "version 1 .* is new on s0 but version 2 is already applied"),
        ({1: _row(1, "SELECT 1"), 2: _row(2, "SELECT 2", "dirty", False)}, "half applied"),
        ({1: _row(1, "SELECT 1"), 9: _row(9, "x", "dirty")}, "dirty on s0 and has no file"),
    ],
)
def test_the_plan_refuses_what_needs_a_person(rows: dict[int, Row], words: str) -> None:
    with pytest.raises(Refused, match=words):
        plan(rows, FILES, "s0", "db", failures([rows]))


def test_versions_beyond_the_files_are_a_newer_release_not_an_error() -> None:
    rows = {1: _row(1, "SELECT 1"), 4: _row(4, "SELECT 4")}
    with pytest.raises(Refused, match="is new on s0"):
        plan(rows, FILES, "s0", "db", {})  # 2 and 3 are pending below 4
    assert plan(rows, FILES[:1], "s0", "db", {}).todo == []
    with pytest.raises(Refused, match="has no file"):
        plan({1: _row(1, "SELECT 1"), 2: _row(2, "x")}, [FILES[0], FILES[2]], "s0", "db", {})


def test_a_file_may_change_only_to_fix_the_shard_where_it_failed() -> None:
    failed_here = {1: _row(1, "SELECT 1"), 2: _row(2, "CREATE bad", "dirty")}
    applied_there = {1: _row(1, "SELECT 1"), 2: _row(2, "CREATE bad")}
    seen = failures([failed_here, applied_there])
    fixed = [FILES[0], migration(2, "v2", "CREATE good")]
    assert [m.version for m in plan(applied_there, fixed, "s0", "db", seen).realign] == [2]
    assert [m.version for m in plan(failed_here, fixed, "s2", "db", seen).todo] == [2]
    # The content that failed is no fix: an old release's file cannot undo the fix.
    realigned = {1: _row(1, "SELECT 1"), 2: _row(2, "CREATE good")}
    with pytest.raises(Refused, match="must not change"):
        plan(realigned, [FILES[0], migration(2, "v2", "CREATE bad")], "s0", "db", seen)
    # Without a failure anywhere, no change is accepted.
    with pytest.raises(Refused, match="must not change"):
        plan(applied_there, fixed, "s0", "db", {})
