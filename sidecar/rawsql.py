"""What a raw plan's SQL may do, decided by PostgreSQL's own parser (pglast, libpg_query).

A raw plan is one statement. It may not control transactions (the sidecar owns them:
``/v1/tx`` and ``/v1/batch``), prepare, execute or deallocate statements (asyncpg's own
prepared statements live on the same connection), load libraries, or listen (a plan
cannot receive notifications), change role, database or server defaults (``ALTER
ROLE``/``DATABASE ... SET``, ``ALTER SYSTEM``: every later session starts with them,
DISCARD ALL included), or run an anonymous ``DO`` block. Whatever session state it
leaves behind (``SET``, temporary tables, advisory locks) is discarded before its
connection serves anyone else (see :mod:`sidecar.pools`).

A read-only raw plan (``writes: false``) is a query: ``SELECT``, ``VALUES``, ``TABLE``,
``EXPLAIN`` or ``SHOW``, run in a READ ONLY transaction. READ ONLY does not stop every
side effect, so these functions are refused in it: large objects (``lo_*``,
``loread``, ``lowrite``), ``pg_notify``, advisory locks, statistics resets, replication
slots and origins, WAL control, ``dblink``. Functions that act on other sessions or on
the server (``pg_terminate_backend``, ``pg_cancel_backend``, ``pg_reload_conf``,
``pg_promote``, ...) are refused in every raw plan: the sidecar's own pooled
connections belong to the same role; so are functions that run SQL given as text
(``query_to_xml``, ``ts_stat``, ``dblink``). A function called through a view or a
function's body is out of the parser's sight: the database role's privileges stay the
real boundary (PostgreSQL lets a role end its own sessions), so give the sidecar a role
that owns no more than the services need and keep DDL for migrations.
"""

from __future__ import annotations

from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from wire.errors import ErrorCode

from .errors import SidecarError, bad_plan

_DEFAULTS = "role and database defaults reach every later session: an admin sets them"
_NEVER = {
    ast.TransactionStmt: "transaction control belongs to the sidecar: use /v1/tx or a batch",
    ast.PrepareStmt: "prepared statements belong to the sidecar: bind parameters instead",
    ast.ExecuteStmt: "prepared statements belong to the sidecar: bind parameters instead",
    ast.DeallocateStmt: "prepared statements belong to the sidecar",
    ast.DiscardStmt: "the sidecar discards session state itself",
    ast.ListenStmt: "a plan cannot receive notifications",
    ast.UnlistenStmt: "a plan cannot receive notifications",
    ast.LoadStmt: "loading libraries into a pooled session is not allowed",
    ast.CopyStmt: "COPY does not run through plans: insert rows instead",
    # Defaults every later session of the role or database starts with: DISCARD ALL
    # returns to them, so they would reach other callers and other sidecars.
    ast.AlterRoleSetStmt: _DEFAULTS,
    ast.AlterDatabaseSetStmt: _DEFAULTS,
    ast.AlterSystemStmt: "server settings are an admin's, not a plan's",
    ast.AlterRoleStmt: "roles (and the sidecar's own password) are an admin's, not a plan's",
    # Code the parser cannot see into.
    ast.DoStmt: "an anonymous code block hides what it runs: send its statements as plans",
}
_READS = (ast.SelectStmt, ast.ExplainStmt, ast.VariableShowStmt)

_ADMIN_FUNCTIONS = frozenset(
    {"pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
     "pg_promote", "pg_log_backend_memory_contexts", "pg_switch_wal", "pg_import_system_collations",
     "pg_create_restore_point", "pg_wal_replay_pause", "pg_wal_replay_resume"}
)  # fmt: skip
# Functions that run SQL given as text, out of the parser's sight.
_SQL_TEXT_FUNCTIONS = frozenset(
    {"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
     "cursor_to_xmlschema", "ts_stat", "dblink", "dblink_exec", "dblink_open",
     "dblink_send_query"}
)  # fmt: skip
_SIDE_EFFECT_FUNCTIONS = frozenset({"pg_notify", "loread", "lowrite"})
_SIDE_EFFECT_PREFIXES = (
    "lo_", "pg_advisory_", "pg_try_advisory_", "pg_stat_reset", "pg_replication_origin_",
    "pg_create_", "pg_drop_replication_slot", "pg_copy_", "dblink", "pg_file_",
)  # fmt: skip

# Raw SQL this long or shorter is cached after its check; longer text is checked each time.
_CACHED_LENGTH = 4096


class _Functions(Visitor):
    def __init__(self) -> None:
        self.names: list[str] = []

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        self.names.append(node.funcname[-1].sval.lower())


def check(sql: str, writes: bool) -> None:
    """Refuse (400) raw SQL that could outlive its request or act beyond it."""
    if len(sql) <= _CACHED_LENGTH:
        _cached_check(sql, writes)
    else:
        _check(sql, writes)


@lru_cache(maxsize=512)
def _cached_check(sql: str, writes: bool) -> None:
    _check(sql, writes)


def _check(sql: str, writes: bool) -> None:
    try:
        statements = parse_sql(sql)
    except ParseError as exc:
        raise SidecarError(ErrorCode.SYNTAX_ERROR, f"raw SQL does not parse: {exc}") from None
    except RecursionError:
        raise bad_plan("raw SQL nested too deeply", ErrorCode.PLAN_TOO_COMPLEX) from None
    if len(statements) != 1:
        raise bad_plan(
            f"a raw plan is one statement, got {len(statements)}: send several in a batch",
            ErrorCode.RAW_REFUSED,
        )
    stmt = statements[0].stmt
    refusal = _NEVER.get(type(stmt))
    if refusal is not None:
        raise bad_plan(
            f"{type(stmt).__name__} refused in a raw plan: {refusal}", ErrorCode.RAW_REFUSED
        )
    if not writes and not isinstance(stmt, _READS):
        raise bad_plan(
            f"{type(stmt).__name__} may write: a raw plan that writes declares writes: true",
            ErrorCode.RAW_REFUSED,
        )
    functions = _Functions()
    functions(statements[0])
    for name in functions.names:
        if name in _ADMIN_FUNCTIONS:
            raise bad_plan(f"{name}() acts on other sessions or the server", ErrorCode.RAW_REFUSED)
        if name in _SQL_TEXT_FUNCTIONS:
            raise bad_plan(
                f"{name}() runs SQL given as text, which the sidecar cannot check",
                ErrorCode.RAW_REFUSED,
            )
        side_effect = name in _SIDE_EFFECT_FUNCTIONS or name.startswith(_SIDE_EFFECT_PREFIXES)
        if side_effect and not writes:
            raise bad_plan(
                f"{name}() has side effects: a raw plan calling it declares writes: true",
                ErrorCode.RAW_REFUSED,
            )
