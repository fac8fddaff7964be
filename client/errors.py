"""Exceptions a service sees; each sidecar error code maps to one class."""

from __future__ import annotations

from wire.errors import ErrorCode
from wire.protocol import ErrorBody


class DbSidecarError(Exception):
    """Base class: ``code``, ``retryable`` and (for database errors) ``sqlstate``."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int | None = None,
        retryable: bool = False,
        sqlstate: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retryable = retryable
        self.sqlstate = sqlstate
        # In a batch: the plan that failed.
        self.index = index
        # The X-Request-ID the sidecar logged this failure under.
        self.request_id: str | None = None


class PlanError(DbSidecarError):
    """The sidecar refused the plan (400/422): fix the call, retrying will not help."""


class ShardKeyRequired(PlanError):
    """A write on a sharded database without its shard key (use all_shards() to mean it)."""


class ValidationError(PlanError):
    """A value that does not fit its field, caught before anything was sent."""


class RecordNotFound(DbSidecarError):
    """one() found no row."""


class Unauthorized(DbSidecarError):
    pass


class UnknownDatabase(DbSidecarError):
    pass


class IntegrityError(DbSidecarError):
    """A constraint refused the write."""


class UniqueViolation(IntegrityError):
    pass


class ForeignKeyViolation(IntegrityError):
    pass


class WrongExpectedVersion(IntegrityError):
    """An append expected another version of its stream; ``actual_version`` is the
    stream's version when it was refused (-1: no events yet)."""

    actual_version: int | None = None


class DatabaseError(DbSidecarError):
    """Any other error PostgreSQL raised (see ``sqlstate``)."""


class TransactionAborted(DbSidecarError):
    """A plan of the transaction failed, so PostgreSQL aborted it: nothing of it commits
    and only a rollback is possible (commit answers this error too)."""


class PartialWrite(DbSidecarError):
    """A write on several shards committed on some and failed on others (the message
    names them): each shard is its own transaction."""


class Unavailable(DbSidecarError):
    """No node could serve the plan right now (503); ``retryable`` says if trying again helps."""


class SidecarUnreachable(Unavailable):
    """The sidecar itself did not answer (not started, or gone)."""


class WriteOutcomeUnknown(Unavailable):
    """The connection failed during a write: it may or may not have committed."""


class SplitBrain(Unavailable):
    pass


class Timeout(DbSidecarError):
    """A statement or the sidecar took too long (504)."""


_BY_CODE: dict[str, type[DbSidecarError]] = {
    ErrorCode.UNIQUE_VIOLATION: UniqueViolation,
    ErrorCode.WRONG_EXPECTED_VERSION: WrongExpectedVersion,
    ErrorCode.FOREIGN_KEY_VIOLATION: ForeignKeyViolation,
    ErrorCode.SHARD_KEY_REQUIRED: ShardKeyRequired,
    ErrorCode.WRITE_OUTCOME_UNKNOWN: WriteOutcomeUnknown,
    ErrorCode.TRANSACTION_ABORTED: TransactionAborted,
    ErrorCode.PARTIAL_WRITE: PartialWrite,
    ErrorCode.SPLIT_BRAIN: SplitBrain,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.UNKNOWN_DATABASE: UnknownDatabase,
}
_BY_STATUS: dict[int, type[DbSidecarError]] = {
    400: PlanError,
    401: Unauthorized,
    404: PlanError,
    409: IntegrityError,
    413: PlanError,
    422: PlanError,
    503: Unavailable,
    504: Timeout,
}


def from_error_body(body: ErrorBody, status: int) -> DbSidecarError:
    cls = _BY_CODE.get(body.code) or _BY_STATUS.get(status, DatabaseError)
    if cls is IntegrityError and body.sqlstate and not body.sqlstate.startswith("23"):
        cls = DatabaseError
    if status == 404 and body.code == ErrorCode.UNDEFINED_TABLE:
        cls = DatabaseError
    error = cls(
        body.message,
        code=body.code,
        status=status,
        retryable=body.retryable,
        sqlstate=body.sqlstate,
        index=body.index,
    )
    if isinstance(error, WrongExpectedVersion):
        error.actual_version = body.actual_version
    return error
