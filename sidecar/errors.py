"""The sidecar's error model: an error code (wire.errors) and a message.

Whether a retry can help follows from the code; the HTTP status too, decided by the API
layer (sidecar/statuses.py). PostgreSQL errors are mapped by SQLSTATE so the client can
raise a matching exception; anything unexpected is ``internal`` and names no secret.
"""

from __future__ import annotations

import asyncpg

from wire.errors import RETRYABLE, ErrorCode
from wire.protocol import ErrorBody


class SidecarError(Exception):
    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        sqlstate: str | None = None,
        index: int | None = None,
        actual_version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sqlstate = sqlstate
        self.index = index
        self.actual_version = actual_version

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    def body(self) -> ErrorBody:
        return ErrorBody(
            code=self.code,
            message=self.message,
            retryable=self.retryable,
            sqlstate=self.sqlstate,
            index=self.index,
            actual_version=self.actual_version,
        )


def bad_plan(message: str, code: ErrorCode = ErrorCode.BAD_PLAN) -> SidecarError:
    return SidecarError(code, message)


# SQLSTATE -> code; classes ("23") after exact states. Every class PostgreSQL defines is
# here (their statuses: a caller's mistake is a 4xx, only a failing server a 5xx).
_BY_STATE: dict[str, ErrorCode] = {
    "23505": ErrorCode.UNIQUE_VIOLATION,
    "23503": ErrorCode.FOREIGN_KEY_VIOLATION,
    "23502": ErrorCode.NOT_NULL_VIOLATION,
    "23514": ErrorCode.CHECK_VIOLATION,
    "25006": ErrorCode.READ_ONLY_TRANSACTION,
    "25P02": ErrorCode.TRANSACTION_ABORTED,
    "40001": ErrorCode.SERIALIZATION_FAILURE,
    "40P01": ErrorCode.DEADLOCK_DETECTED,
    "42P01": ErrorCode.UNDEFINED_TABLE,
    "42703": ErrorCode.UNDEFINED_COLUMN,
    "42883": ErrorCode.UNDEFINED_FUNCTION,
    "42601": ErrorCode.SYNTAX_ERROR,
    "42501": ErrorCode.INSUFFICIENT_PRIVILEGE,
    "55P03": ErrorCode.LOCK_NOT_AVAILABLE,
    "57P01": ErrorCode.ADMIN_SHUTDOWN,
    "57P02": ErrorCode.CRASH_SHUTDOWN,
    "57P03": ErrorCode.CANNOT_CONNECT_NOW,
    "57P04": ErrorCode.DATABASE_DROPPED,
}
_BY_CLASS: dict[str, ErrorCode] = {
    "03": ErrorCode.SQL_STATEMENT_NOT_YET_COMPLETE,
    "09": ErrorCode.TRIGGERED_ACTION_EXCEPTION,
    "0A": ErrorCode.FEATURE_NOT_SUPPORTED,
    "0B": ErrorCode.INVALID_TRANSACTION_INITIATION,
    "0F": ErrorCode.LOCATOR_EXCEPTION,
    "0L": ErrorCode.INVALID_GRANTOR,
    "0P": ErrorCode.INVALID_ROLE_SPECIFICATION,
    "0Z": ErrorCode.DIAGNOSTICS_EXCEPTION,
    "10": ErrorCode.XQUERY_ERROR,
    "20": ErrorCode.CASE_NOT_FOUND,
    "21": ErrorCode.CARDINALITY_VIOLATION,
    "22": ErrorCode.DATA_EXCEPTION,
    "23": ErrorCode.INTEGRITY_VIOLATION,
    "24": ErrorCode.INVALID_CURSOR_STATE,
    "25": ErrorCode.INVALID_TRANSACTION_STATE,
    "26": ErrorCode.INVALID_SQL_STATEMENT_NAME,
    "27": ErrorCode.TRIGGERED_DATA_CHANGE_VIOLATION,
    "28": ErrorCode.INVALID_AUTHORIZATION,
    "2B": ErrorCode.DEPENDENT_PRIVILEGE_DESCRIPTORS_EXIST,
    "2D": ErrorCode.INVALID_TRANSACTION_TERMINATION,
    "2F": ErrorCode.SQL_ROUTINE_EXCEPTION,
    "34": ErrorCode.INVALID_CURSOR_NAME,
    "38": ErrorCode.EXTERNAL_ROUTINE_EXCEPTION,
    "39": ErrorCode.EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
    "3B": ErrorCode.SAVEPOINT_EXCEPTION,
    "3D": ErrorCode.INVALID_CATALOG_NAME,
    "3F": ErrorCode.INVALID_SCHEMA_NAME,
    "40": ErrorCode.TRANSACTION_ROLLBACK,
    "42": ErrorCode.INVALID_STATEMENT,
    "44": ErrorCode.WITH_CHECK_OPTION_VIOLATION,
    "53": ErrorCode.INSUFFICIENT_RESOURCES,
    "54": ErrorCode.PROGRAM_LIMIT_EXCEEDED,
    "55": ErrorCode.OBJECT_NOT_IN_PREREQUISITE_STATE,
    "57": ErrorCode.OPERATOR_INTERVENTION,
    "58": ErrorCode.SYSTEM_ERROR,
    "72": ErrorCode.SNAPSHOT_TOO_OLD,
    "F0": ErrorCode.CONFIG_FILE_ERROR,
    "HV": ErrorCode.FDW_ERROR,
    "P0": ErrorCode.RAISED_EXCEPTION,
    "XX": ErrorCode.INTERNAL_DATABASE_ERROR,
    "08": ErrorCode.CONNECTION_FAILURE,
}


def from_postgres(exc: asyncpg.PostgresError) -> SidecarError:
    state = getattr(exc, "sqlstate", None) or ""
    message = exc.args[0] if exc.args else type(exc).__name__
    if state == "57014":
        # One SQLSTATE for both: PostgreSQL's statement_timeout, or someone's
        # pg_cancel_backend(). Only the first is a timeout.
        timeout = "statement timeout" in message
        code = ErrorCode.STATEMENT_TIMEOUT if timeout else ErrorCode.QUERY_CANCELED
    else:
        code = _BY_STATE.get(state) or _BY_CLASS.get(state[:2], ErrorCode.DATABASE_ERROR)
    detail = getattr(exc, "detail", None)
    if detail:
        message = f"{message} ({detail})"
    return SidecarError(code, message, sqlstate=state or None)


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


def refused_by_driver(exc: BaseException) -> bool:
    """A value asyncpg would not encode. asyncpg 0.32 raises the SQLSTATE 22000 class
    (``asyncpg.exceptions.DataError``) for it, raised from the codec's own error, where
    an error the server sent has no cause; codecs may also raise plain ValueError,
    TypeError or OverflowError."""
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return True
    return isinstance(exc, asyncpg.exceptions.DataError) and exc.__cause__ is not None


def from_exception(
    exc: BaseException, *, writes: bool, conn: asyncpg.Connection | None = None
) -> SidecarError:
    """Any failure while running a plan (on ``conn``), as the error the caller should see."""
    if isinstance(exc, SidecarError):
        return exc
    # asyncpg's client-side DataError is an InterfaceError and a ValueError: a bad
    # value, not a broken connection.
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return SidecarError(ErrorCode.DATA_EXCEPTION, f"a value does not fit its column: {exc}")
    if connection_lost(exc, conn):
        if writes:
            return SidecarError(
                ErrorCode.WRITE_OUTCOME_UNKNOWN,
                f"the connection failed during a write; it may or may not have committed: {exc}",
            )
        return SidecarError(ErrorCode.NODE_UNAVAILABLE, f"database node unavailable: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return from_postgres(exc)
    if isinstance(exc, asyncpg.InterfaceError):
        # Refused by asyncpg before the server saw it: a wrong number of parameters, ...
        return SidecarError(ErrorCode.BAD_STATEMENT, str(exc))
    return SidecarError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
