"""The sidecar's error model: a code, an HTTP status and whether a retry can help.

PostgreSQL errors are mapped by SQLSTATE class so the client can raise a
matching exception; anything unexpected becomes a 500 that names no secret.
"""

from __future__ import annotations

import asyncio

import asyncpg

from client.protocol import ErrorBody


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


# SQLSTATE -> (status, code, retryable); classes ("23") after exact states.
_BY_STATE: dict[str, tuple[int, str, bool]] = {
    "23505": (409, "unique_violation", False),
    "23503": (409, "foreign_key_violation", False),
    "23502": (422, "not_null_violation", False),
    "23514": (422, "check_violation", False),
    "40001": (409, "serialization_failure", True),
    "40P01": (409, "deadlock_detected", True),
    "57014": (504, "statement_timeout", True),
    "25006": (409, "read_only_transaction", False),
    "42P01": (404, "undefined_table", False),
    "42703": (400, "undefined_column", False),
    "42883": (400, "undefined_function", False),
    "42601": (400, "syntax_error", False),
    "42501": (403, "insufficient_privilege", False),
    "57P01": (503, "admin_shutdown", True),
    "57P03": (503, "cannot_connect_now", True),
}
_BY_CLASS: dict[str, tuple[int, str, bool]] = {
    "22": (422, "data_exception", False),
    "23": (409, "integrity_violation", False),
    "40": (409, "transaction_rollback", True),
    "42": (400, "invalid_statement", False),
    "53": (503, "insufficient_resources", True),
    "08": (503, "connection_failure", True),
}


def from_postgres(exc: asyncpg.PostgresError) -> SidecarError:
    state = getattr(exc, "sqlstate", None) or ""
    status, code, retryable = _BY_STATE.get(state) or _BY_CLASS.get(
        state[:2], (500, "database_error", False)
    )
    message = exc.args[0] if exc.args else type(exc).__name__
    detail = getattr(exc, "detail", None)
    if detail:
        message = f"{message} ({detail})"
    return SidecarError(status, code, message, retryable=retryable, sqlstate=state or None)


CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS) or (
        isinstance(exc, asyncpg.PostgresError)
        and (getattr(exc, "sqlstate", "") or "").startswith(("08", "57P"))
    )


def from_exception(exc: BaseException, *, writes: bool) -> SidecarError:
    """Any failure while running a plan, as the error the caller should see."""
    if isinstance(exc, SidecarError):
        return exc
    # asyncpg's client-side DataError is an InterfaceError and a ValueError: a bad
    # value, not a broken connection.
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return SidecarError(422, "bad_value", f"a value does not fit its column: {exc}")
    if is_connection_error(exc):
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
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return SidecarError(504, "timeout", "the database did not answer in time", retryable=True)
    return SidecarError(500, "internal", f"{type(exc).__name__}: {exc}")
