"""dbsidecar's ActiveRecord client: models become query plans posted to the sidecar.

The client never holds a database connection and depends only on aiohttp and
msgspec, so it is cheap to import in any service.
"""

from wire.values import Json

from . import ids
from .connection import ConnectionManager, DatabaseHandle
from .errors import (
    DatabaseError,
    DbSidecarError,
    ForeignKeyViolation,
    IntegrityError,
    PartialWrite,
    PlanError,
    RecordNotFound,
    ShardKeyRequired,
    SidecarUnreachable,
    SplitBrain,
    Timeout,
    TransactionAborted,
    Unauthorized,
    Unavailable,
    UniqueViolation,
    UnknownDatabase,
    ValidationError,
    WriteOutcomeUnknown,
    WrongExpectedVersion,
)
from .eventstore import AppendResult, Checkpoint, EventData, EventStore, Page, RecordedEvent
from .expressions import Avg, Count, Max, Min, Sum
from .fields import (
    BooleanField,
    BytesField,
    DateField,
    DecimalField,
    Field,
    FloatField,
    IntegerField,
    JSONField,
    PrimaryKeyField,
    StringField,
    TextField,
    TimeField,
    TimestampField,
    UUIDField,
)
from .migrations import MigrationFailed, migrate
from .model import ActiveRecord
from .query import Query
from .results import Rows
from .saga import LeaseLost, Orchestrator, Saga, SagaOutcome, Step
from .subscription import Subscription
from .transactions import Transaction

__all__ = [
    "ActiveRecord",
    "AppendResult",
    "Avg",
    "BooleanField",
    "BytesField",
    "Checkpoint",
    "ConnectionManager",
    "Count",
    "DatabaseError",
    "DatabaseHandle",
    "DateField",
    "DbSidecarError",
    "DecimalField",
    "EventData",
    "EventStore",
    "Field",
    "FloatField",
    "ForeignKeyViolation",
    "IntegerField",
    "IntegrityError",
    "JSONField",
    "Json",
    "LeaseLost",
    "Max",
    "MigrationFailed",
    "Min",
    "Orchestrator",
    "Page",
    "PartialWrite",
    "PlanError",
    "PrimaryKeyField",
    "Query",
    "RecordNotFound",
    "RecordedEvent",
    "Rows",
    "Saga",
    "SagaOutcome",
    "ShardKeyRequired",
    "SidecarUnreachable",
    "SplitBrain",
    "Step",
    "StringField",
    "Subscription",
    "Sum",
    "TextField",
    "TimeField",
    "Timeout",
    "TimestampField",
    "Transaction",
    "TransactionAborted",
    "UUIDField",
    "Unauthorized",
    "Unavailable",
    "UniqueViolation",
    "UnknownDatabase",
    "ValidationError",
    "WriteOutcomeUnknown",
    "WrongExpectedVersion",
    "ids",
    "migrate",
]
