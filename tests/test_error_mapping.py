"""Errors (sidecar.errors): every PostgreSQL and asyncpg error mapped to a status and a code.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import inspect

import asyncpg
import pytest

from sidecar.errors import from_exception, from_postgres
from sidecar.statuses import status_of

# Classes where the server (or the network to it) failed, not the caller.
_SERVER_SIDE = ("08", "40", "53", "57", "58", "72", "XX")


def _postgres_errors() -> list[type[asyncpg.PostgresError]]:
    return [
        cls
        for _, cls in inspect.getmembers(asyncpg.exceptions, inspect.isclass)
        if issubclass(cls, asyncpg.PostgresError) and isinstance(cls.sqlstate, str)
    ]


@pytest.mark.parametrize("cls", _postgres_errors(), ids=lambda c: c.sqlstate)
def test_every_sqlstate_a_caller_causes_is_a_4xx(cls: type[asyncpg.PostgresError]) -> None:
    error = from_postgres(cls("message"))
    assert status_of(error.code) != 500 and error.sqlstate == cls.sqlstate
    if not cls.sqlstate.startswith(_SERVER_SIDE):
        assert 400 <= status_of(error.code) < 500, (cls.sqlstate, status_of(error.code), error.code)


def test_a_canceled_statement_is_not_a_timeout() -> None:
    timeout = from_postgres(
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")
    )
    assert (status_of(timeout.code), timeout.code) == (504, "statement_timeout")
    canceled = from_postgres(
        asyncpg.exceptions.QueryCanceledError("canceling statement due to user request")
    )
    assert (status_of(canceled.code), canceled.code, canceled.retryable) == (
        409,
        "query_canceled",
        True,
    )


def test_asyncpg_client_errors_are_the_callers_and_lost_connections_are_not() -> None:
    wrong_args = asyncpg.exceptions.InterfaceError("the server expects 1 argument, 0 were passed")
    assert status_of(from_exception(wrong_args, writes=True).code) == 400
    gone = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    assert from_exception(gone, writes=True).code == "write_outcome_unknown"
    assert from_exception(gone, writes=False).code == "node_unavailable"
    # Leaving a transaction block after the connection broke hides the real cause.
    try:
        try:
            raise gone
        except Exception:
            raise asyncpg.exceptions.InterfaceError("the underlying connection is closed")  # noqa: B904 - as asyncpg does
    except Exception as hidden:
        assert from_exception(hidden, writes=False).code == "node_unavailable"


def test_every_error_code_has_a_status() -> None:
    from sidecar.statuses import STATUS
    from wire.errors import ErrorCode

    assert set(STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in STATUS.values())
