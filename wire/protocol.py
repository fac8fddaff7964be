"""The wire protocol (v1): plans, results and errors, shared by client and sidecar.

A plan states intent (operation, table, columns, a where-tree, routing hints),
never SQL text, except the ``raw`` escape hatch, which must declare whether it
writes. Values inside plans use the typed encoding of :mod:`wire.values`.

Where-trees are plain JSON objects, checked by the sidecar::

    {"and": [node, ...]}  {"or": [node, ...]}  {"not": node}
    {"col": "status", "op": "in", "value": ["new", "paid"]}

with ``op`` one of ``= != < <= > >= in not_in like ilike is_null between``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

COMPARISON_OPS = frozenset(
    {"=", "!=", "<", "<=", ">", ">=", "in", "not_in", "like", "ilike", "is_null", "between"}
)
ALL_SHARDS = "*"


class Route(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Routing hints; the sidecar decides, these only state what the caller needs."""

    role: Literal["primary", "replica"] | None = None
    # A shard name or index, or "*" for every shard.
    shard: str | int | None = None
    # A consistency token (primary WAL LSN) the read must observe.
    after: str | None = None


class OrderBy(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    col: str
    desc: bool = False


class Aggregate(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    fn: Literal["count", "sum", "avg", "min", "max"]
    # None only for count(*).
    col: str | None = None
    alias: str | None = None

    @property
    def name(self) -> str:
        if self.alias is not None:
            return self.alias
        return f"{self.fn}_{self.col}" if self.col else self.fn


class _Plan(
    msgspec.Struct, tag_field="op", omit_defaults=True, forbid_unknown_fields=True, kw_only=True
):
    database: str
    route: Route = msgspec.field(default_factory=Route)


class OutboxMessage(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A message a write commits together with its rows (the transactional outbox), for
    the relay (``dbsidecar relay``) to deliver to the broker afterwards: at least once,
    in order per ``aggregate``, with ``id`` as the broker's de-duplication id."""

    id: str  # a UUID
    subject: str
    aggregate: str
    payload: Any = None  # plain JSON
    headers: dict[str, str] = {}


class _Write(_Plan, kw_only=True):
    # Committed in the write's transaction, on its shard (a write on one shard only).
    outbox: list[OutboxMessage] = []


class Select(_Plan, tag="select"):
    table: str
    columns: list[str] | None = None
    where: dict[str, Any] | None = None
    order_by: list[OrderBy] = []
    limit: int | None = None
    offset: int | None = None


class Count(_Plan, tag="count"):
    table: str
    where: dict[str, Any] | None = None


class AggregateQuery(_Plan, tag="aggregate"):
    table: str
    aggregates: list[Aggregate]
    group_by: list[str] = []
    where: dict[str, Any] | None = None
    # Columns of group_by or aggregate aliases.
    order_by: list[OrderBy] = []
    limit: int | None = None
    offset: int | None = None


class Insert(_Write, tag="insert"):
    table: str
    rows: list[dict[str, Any]]
    returning: list[str] | None = None


class Update(_Write, tag="update"):
    table: str
    values: dict[str, Any] = msgspec.field(name="set")
    where: dict[str, Any] | None = None
    returning: list[str] | None = None
    # An update without a where clause is refused unless the caller says so.
    all_rows: bool = False


class Delete(_Write, tag="delete"):
    table: str
    where: dict[str, Any] | None = None
    returning: list[str] | None = None
    all_rows: bool = False


class Raw(_Write, tag="raw", kw_only=True):
    sql: str
    params: list[Any] = []
    # Required: it decides the route, and a read-only raw plan runs read-only.
    writes: bool


# The event store (sidecar/eventstore.py). A stream is named "<category>-<id>" (the
# category is the text before the first "-"); a database's streams are placed on its
# shards by a hash of the stream name, so a stream's versions live on one shard.
# Versions count from 0 per stream; positions count from 1 per shard, in commit order
# within a category and for every reader (see the module for how).
ExpectedVersion = int | Literal["any", "no_stream", "stream_exists"]


class NewEvent(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    # A UUID chosen by the caller: appending the same ids again answers what the first
    # append did and adds nothing (a retried append is idempotent).
    id: str
    type: str
    data: Any = None  # plain JSON
    metadata: Any = None


class Append(_Write, tag="append"):
    stream: str
    events: list[NewEvent]
    # "any", "no_stream" (no event yet), "stream_exists", or the version of the
    # stream's last event; a mismatch answers wrong_expected_version with the actual one.
    expected_version: ExpectedVersion = "any"


class ReadStream(_Plan, tag="read_stream"):
    stream: str
    from_version: int = 0
    limit: int = 100


class ReadCategory(_Plan, tag="read_category"):
    """Events of one category (or of every stream: category None) in position order."""

    category: str | None = None
    # The checkpoint: per shard name ("" on a database without shards), the last
    # position already read; events after it come back, each row naming its shard.
    after: dict[str, int] = {}
    limit: int = 100
    # Consumer groups: this reader gets the streams whose hash modulo group_size is
    # member (every event of a stream goes to the same member).
    member: int = 0
    group_size: int = 1


Plan = (
    Select | Count | AggregateQuery | Insert | Update | Delete | Raw | Append | ReadStream
    | ReadCategory
)  # fmt: skip
WRITE_PLANS = (Insert, Update, Delete, Append)
EVENT_PLANS = (Append, ReadStream, ReadCategory)


def plan_writes(plan: Plan) -> bool:
    return isinstance(plan, WRITE_PLANS) or (isinstance(plan, Raw) and plan.writes)


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    """Several plans on one database, run in one transaction: all or nothing."""

    plans: list[Plan]


class ServedBy(msgspec.Struct, omit_defaults=True):
    node: str
    role: Literal["primary", "replica"]
    shard: str | None = None


class Result(msgspec.Struct, omit_defaults=True):
    columns: list[str] = []
    # One kind per column (see wire.values.KIND_TYPES); None: plain JSON.
    types: list[str | None] = []
    rows: list[list[Any]] = []
    rowcount: int = 0
    # After a write: the primary's WAL LSN once it committed.
    lsn: str | None = None
    served_by: list[ServedBy] = []


class BatchResult(msgspec.Struct, omit_defaults=True):
    results: list[Result]
    lsn: str | None = None


class Bundle(msgspec.Struct, forbid_unknown_fields=True):
    """Independent plans in one HTTP request (client auto-batching): each runs on its
    own, concurrently, and succeeds or fails on its own. Not a transaction."""

    plans: list[Plan]


class BundleItem(msgspec.Struct, omit_defaults=True):
    # Exactly one of the two; status is the HTTP status the plan alone would have got.
    result: Result | None = None
    error: ErrorBody | None = None
    status: int = 200


class BundleResult(msgspec.Struct):
    items: list[BundleItem]


class TxBegin(msgspec.Struct, forbid_unknown_fields=True):
    database: str
    route: Route = msgspec.field(default_factory=Route)


class TxOpened(msgspec.Struct):
    id: str


class TxDone(msgspec.Struct, omit_defaults=True):
    # After a commit that wrote: the consistency token.
    lsn: str | None = None


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    retryable: bool = False
    sqlstate: str | None = None
    # In a batch: the index of the plan that failed.
    index: int | None = None
    # wrong_expected_version: the stream's version when the append was refused (-1: no
    # stream).
    actual_version: int | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


# The channel (GET /v1/channel, a WebSocket): many plans in flight on one connection.
# Each text frame holds one JSON object; answers come back in completion order and
# carry the id of the frame they answer.
class ChannelRequest(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Client to sidecar: one plan, or a bundle of independent plans (as /v1/bundle)."""

    # Chosen by the client, unique among its frames in flight; echoed in the answer.
    id: int
    plan: Plan | None = None
    plans: list[Plan] | None = None
    # Logged by the sidecar with the plan (as X-Request-ID on HTTP).
    request_id: str | None = None
    # The caller's W3C trace context (as the traceparent/tracestate headers on HTTP).
    traceparent: str | None = None
    tracestate: str | None = None


class ChannelAnswer(msgspec.Struct, omit_defaults=True):
    """Sidecar to client: ``result`` for a plan, ``items`` for a bundle (status 200, a
    status per plan inside), or ``error`` with the status HTTP would have answered."""

    id: int
    status: int
    result: Result | None = None
    items: list[BundleItem] | None = None
    error: ErrorBody | None = None
    # On errors: the request id the sidecar logged the failure under.
    request_id: str | None = None
