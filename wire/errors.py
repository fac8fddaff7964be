"""Error codes: what went wrong, as both sides name it, and whether a retry can help.

The sidecar answers every error as ``{"error": {"code", "message", "retryable", ...}}``
with one of these codes; the client raises a matching exception class. Codes named
after PostgreSQL's conditions come from the SQLSTATE of the error (``sqlstate`` says
which). The HTTP status of each code is the sidecar API's business (sidecar/statuses.py).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    ADMIN_SHUTDOWN = "admin_shutdown"
    BAD_IDENTIFIER = "bad_identifier"
    BAD_MIGRATION = "bad_migration"
    BAD_OPERATOR = "bad_operator"
    BAD_PLAN = "bad_plan"
    BAD_STATEMENT = "bad_statement"
    BAD_TOKEN = "bad_token"
    BAD_VALUE = "bad_value"
    BODY_TOO_LARGE = "body_too_large"
    CANNOT_CONNECT_NOW = "cannot_connect_now"
    CARDINALITY_VIOLATION = "cardinality_violation"
    CASE_NOT_FOUND = "case_not_found"
    CHECK_VIOLATION = "check_violation"
    CLIENT_DISCONNECTED = "client_disconnected"
    CONFIG_FILE_ERROR = "config_file_error"
    CONNECTION_FAILURE = "connection_failure"
    CRASH_SHUTDOWN = "crash_shutdown"
    CROSS_ORIGIN = "cross_origin"
    CROSS_SHARD_BATCH = "cross_shard_batch"
    CROSS_SHARD_TRANSACTION = "cross_shard_transaction"
    DATA_EXCEPTION = "data_exception"
    DATABASE_DROPPED = "database_dropped"
    DATABASE_ERROR = "database_error"
    DEADLOCK_DETECTED = "deadlock_detected"
    DEPENDENT_PRIVILEGE_DESCRIPTORS_EXIST = "dependent_privilege_descriptors_exist"
    DIAGNOSTICS_EXCEPTION = "diagnostics_exception"
    DRAINING = "draining"
    EXTERNAL_ROUTINE_EXCEPTION = "external_routine_exception"
    EXTERNAL_ROUTINE_INVOCATION_EXCEPTION = "external_routine_invocation_exception"
    FDW_ERROR = "fdw_error"
    FEATURE_NOT_SUPPORTED = "feature_not_supported"
    FOREIGN_KEY_VIOLATION = "foreign_key_violation"
    HEADERS_TOO_LARGE = "headers_too_large"
    INSUFFICIENT_PRIVILEGE = "insufficient_privilege"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    INTEGRITY_VIOLATION = "integrity_violation"
    INTERNAL = "internal"
    INTERNAL_DATABASE_ERROR = "internal_database_error"
    INVALID_AUTHORIZATION = "invalid_authorization"
    INVALID_CATALOG_NAME = "invalid_catalog_name"
    INVALID_CURSOR_NAME = "invalid_cursor_name"
    INVALID_CURSOR_STATE = "invalid_cursor_state"
    INVALID_GRANTOR = "invalid_grantor"
    INVALID_ROLE_SPECIFICATION = "invalid_role_specification"
    INVALID_SCHEMA_NAME = "invalid_schema_name"
    INVALID_SQL_STATEMENT_NAME = "invalid_sql_statement_name"
    INVALID_STATEMENT = "invalid_statement"
    INVALID_TRANSACTION_INITIATION = "invalid_transaction_initiation"
    INVALID_TRANSACTION_STATE = "invalid_transaction_state"
    INVALID_TRANSACTION_TERMINATION = "invalid_transaction_termination"
    LOCATOR_EXCEPTION = "locator_exception"
    LOCK_NOT_AVAILABLE = "lock_not_available"
    NO_PRIMARY = "no_primary"
    NO_REPLICA_AVAILABLE = "no_replica_available"
    NODE_UNAVAILABLE = "node_unavailable"
    NOT_NULL_VIOLATION = "not_null_violation"
    NOT_SHARDED = "not_sharded"
    OBJECT_NOT_IN_PREREQUISITE_STATE = "object_not_in_prerequisite_state"
    OPERATOR_INTERVENTION = "operator_intervention"
    PARTIAL_WRITE = "partial_write"
    PLAN_TOO_COMPLEX = "plan_too_complex"
    POOL_TIMEOUT = "pool_timeout"
    PROGRAM_LIMIT_EXCEEDED = "program_limit_exceeded"
    QUERY_CANCELED = "query_canceled"
    RAISED_EXCEPTION = "raised_exception"
    RAW_REFUSED = "raw_refused"
    RESULT_TOO_LARGE = "result_too_large"
    READ_ONLY_TRANSACTION = "read_only_transaction"
    REQUEST_TIMEOUT = "request_timeout"
    SAVEPOINT_EXCEPTION = "savepoint_exception"
    SERIALIZATION_FAILURE = "serialization_failure"
    SHARD_KEY_REQUIRED = "shard_key_required"
    SHARD_KEY_UNMAPPED = "shard_key_unmapped"
    SHARD_REQUIRED = "shard_required"
    SNAPSHOT_TOO_OLD = "snapshot_too_old"
    SPLIT_BRAIN = "split_brain"
    SQL_ROUTINE_EXCEPTION = "sql_routine_exception"
    SQL_STATEMENT_NOT_YET_COMPLETE = "sql_statement_not_yet_complete"
    STATEMENT_TIMEOUT = "statement_timeout"
    SYNTAX_ERROR = "syntax_error"
    SYSTEM_ERROR = "system_error"
    TOO_MANY_CHANNELS = "too_many_channels"
    TOO_MANY_TRANSACTIONS = "too_many_transactions"
    TRANSACTION_ABORTED = "transaction_aborted"
    TRANSACTION_LOST = "transaction_lost"
    TRANSACTION_ROLLBACK = "transaction_rollback"
    TRIGGERED_ACTION_EXCEPTION = "triggered_action_exception"
    TRIGGERED_DATA_CHANGE_VIOLATION = "triggered_data_change_violation"
    UNAUTHORIZED = "unauthorized"
    UNDEFINED_COLUMN = "undefined_column"
    UNDEFINED_FUNCTION = "undefined_function"
    UNDEFINED_TABLE = "undefined_table"
    UNIQUE_VIOLATION = "unique_violation"
    UNKNOWN_DATABASE = "unknown_database"
    UNKNOWN_SHARD = "unknown_shard"
    UNKNOWN_TRANSACTION = "unknown_transaction"
    UNSUPPORTED_MERGE = "unsupported_merge"
    WHERE_REQUIRED = "where_required"
    WITH_CHECK_OPTION_VIOLATION = "with_check_option_violation"
    WRITE_OUTCOME_UNKNOWN = "write_outcome_unknown"
    WRONG_EXPECTED_VERSION = "wrong_expected_version"
    WRONG_SHARD = "wrong_shard"
    XQUERY_ERROR = "xquery_error"


# Codes where trying again (a read, or a whole transaction) can succeed: nothing ran,
# or what ran was rolled back, or the outcome is unknown and the caller decides.
RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.ADMIN_SHUTDOWN,
        ErrorCode.CANNOT_CONNECT_NOW,
        ErrorCode.CONNECTION_FAILURE,
        ErrorCode.CRASH_SHUTDOWN,
        ErrorCode.DEADLOCK_DETECTED,
        ErrorCode.DRAINING,
        ErrorCode.TOO_MANY_CHANNELS,
        ErrorCode.INSUFFICIENT_RESOURCES,
        ErrorCode.LOCK_NOT_AVAILABLE,
        ErrorCode.NO_PRIMARY,
        ErrorCode.NO_REPLICA_AVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.OPERATOR_INTERVENTION,
        ErrorCode.POOL_TIMEOUT,
        ErrorCode.QUERY_CANCELED,
        ErrorCode.SERIALIZATION_FAILURE,
        ErrorCode.SNAPSHOT_TOO_OLD,
        ErrorCode.SPLIT_BRAIN,
        ErrorCode.STATEMENT_TIMEOUT,
        ErrorCode.SYSTEM_ERROR,
        ErrorCode.TOO_MANY_TRANSACTIONS,
        ErrorCode.TRANSACTION_LOST,
        ErrorCode.TRANSACTION_ROLLBACK,
        ErrorCode.WRITE_OUTCOME_UNKNOWN,
    }
)
