"""The sidecar's error model: a code, an HTTP status and whether a retry can help.

PostgreSQL errors are mapped by SQLSTATE class so the client can raise a
matching exception; anything unexpected becomes a 500 that names no secret.
"""

from __future__ import annotations

import asyncpg

from wire.protocol import ErrorBody


class SidecarError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        sqlstate: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.sqlstate = sqlstate
        self.index = index

    def body(self) -> ErrorBody:
        return ErrorBody(
            code=self.code,
            message=self.message,
            retryable=self.retryable,
            sqlstate=self.sqlstate,
            index=self.index,
        )


def bad_plan(message: str, code: str = "bad_plan") -> SidecarError:
    return SidecarError(400, code, message)


# SQLSTATE -> (status, code, retryable); classes ("23") after exact states. Every class
# PostgreSQL defines is here: a caller's mistake is a 4xx, and only a failing server
# (classes 58 and XX) is a 5xx.
_BY_STATE: dict[str, tuple[int, str, bool]] = {
    "23505": (409, "unique_violation", False),
    "23503": (409, "foreign_key_violation", False),
    "23502": (422, "not_null_violation", False),
    "23514": (422, "check_violation", False),
    "25006": (409, "read_only_transaction", False),
    "25P02": (409, "transaction_aborted", False),
    "40001": (409, "serialization_failure", True),
    "40P01": (409, "deadlock_detected", True),
    "42P01": (404, "undefined_table", False),
    "42703": (400, "undefined_column", False),
    "42883": (400, "undefined_function", False),
    "42601": (400, "syntax_error", False),
    "42501": (403, "insufficient_privilege", False),
    "55P03": (409, "lock_not_available", True),
    "57P01": (503, "admin_shutdown", True),
    "57P02": (503, "crash_shutdown", True),
    "57P03": (503, "cannot_connect_now", True),
    "57P04": (503, "database_dropped", False),
}
_BY_CLASS: dict[str, tuple[int, str, bool]] = {
    "03": (400, "sql_statement_not_yet_complete", False),
    "09": (422, "triggered_action_exception", False),
    "0A": (400, "feature_not_supported", False),
    "0B": (409, "invalid_transaction_initiation", False),
    "0F": (400, "locator_exception", False),
    "0L": (400, "invalid_grantor", False),
    "0P": (400, "invalid_role_specification", False),
    "0Z": (400, "diagnostics_exception", False),
    "10": (400, "xquery_error", False),
    "20": (422, "case_not_found", False),
    "21": (422, "cardinality_violation", False),
    "22": (422, "data_exception", False),
    "23": (409, "integrity_violation", False),
    "24": (409, "invalid_cursor_state", False),
    "25": (409, "invalid_transaction_state", False),
    "26": (400, "invalid_sql_statement_name", False),
    "27": (409, "triggered_data_change_violation", False),
    "28": (403, "invalid_authorization", False),
    "2B": (409, "dependent_privilege_descriptors_exist", False),
    "2D": (409, "invalid_transaction_termination", False),
    "2F": (400, "sql_routine_exception", False),
    "34": (400, "invalid_cursor_name", False),
    "38": (400, "external_routine_exception", False),
    "39": (400, "external_routine_invocation_exception", False),
    "3B": (409, "savepoint_exception", False),
    "3D": (404, "invalid_catalog_name", False),
    "3F": (400, "invalid_schema_name", False),
    "40": (409, "transaction_rollback", True),
    "42": (400, "invalid_statement", False),
    "44": (422, "with_check_option_violation", False),
    "53": (503, "insufficient_resources", True),
    "54": (400, "program_limit_exceeded", False),
    "55": (409, "object_not_in_prerequisite_state", False),
    "57": (503, "operator_intervention", True),
    "58": (502, "system_error", True),
    "72": (409, "snapshot_too_old", True),
    "F0": (400, "config_file_error", False),
    "HV": (400, "fdw_error", False),
    "P0": (422, "raised_exception", False),
    "XX": (502, "internal_database_error", False),
    "08": (503, "connection_failure", True),
}


def from_postgres(exc: asyncpg.PostgresError) -> SidecarError:
    state = getattr(exc, "sqlstate", None) or ""
    message = exc.args[0] if exc.args else type(exc).__name__
    if state == "57014":
        # One SQLSTATE for both: PostgreSQL's statement_timeout, or someone's
        # pg_cancel_backend(). Only the first is a timeout.
        if "statement timeout" in message:
            status, code, retryable = 504, "statement_timeout", True
        else:
            status, code, retryable = 409, "query_canceled", True
    else:
        status, code, retryable = _BY_STATE.get(state) or _BY_CLASS.get(
            state[:2], (502, "database_error", False)
        )
    detail = getattr(exc, "detail", None)
    if detail:
        message = f"{message} ({detail})"
    return SidecarError(status, code, message, retryable=retryable, sqlstate=state or None)


# Errors that say the connection (or the server behind it) is gone. asyncpg's other
# InterfaceErrors (a wrong number of bind parameters, ...) are the caller's mistakes.
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS) or (
        isinstance(exc, asyncpg.PostgresError)
        and (getattr(exc, "sqlstate", "") or "").startswith(("08", "57P"))
    )


def caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception it was raised while handling is a ``kind``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__context__
    return False


def connection_lost(exc: BaseException, conn: asyncpg.Connection | None = None) -> bool:
    """Whether a failure means the connection (or its server) is gone.

    asyncpg can hide the cause: a statement after the connection broke raises a plain
    InterfaceError while handling the real error, and work on a connection that closed
    while idle in the pool fails with a plain InterfaceError too.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if is_connection_error(seen):
            return True
        seen = seen.__context__
    return conn is not None and is_closed(conn)


def is_closed(conn: asyncpg.Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True  # the pool took the proxy back: its connection closed


def from_exception(
    exc: BaseException, *, writes: bool, conn: asyncpg.Connection | None = None
) -> SidecarError:
    """Any failure while running a plan (on ``conn``), as the error the caller should see."""
    if isinstance(exc, SidecarError):
        return exc
    # asyncpg's client-side DataError is an InterfaceError and a ValueError: a bad
    # value, not a broken connection.
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return SidecarError(422, "bad_value", f"a value does not fit its column: {exc}")
    if connection_lost(exc, conn):
        if writes:
            return SidecarError(
                503,
                "write_outcome_unknown",
                f"the connection failed during a write; it may or may not have committed: {exc}",
                retryable=True,
            )
        return SidecarError(
            503, "node_unavailable", f"database node unavailable: {exc}", retryable=True
        )
    if isinstance(exc, asyncpg.PostgresError):
        return from_postgres(exc)
    if isinstance(exc, asyncpg.InterfaceError):
        # Refused by asyncpg before the server saw it: a wrong number of parameters, ...
        return SidecarError(400, "bad_statement", str(exc))
    return SidecarError(500, "internal", f"{type(exc).__name__}: {exc}")
