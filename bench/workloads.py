"""The workloads, and one bounded measurement of one workload on one variant.

A measurement runs ``concurrency`` workers, each issuing one operation after another until
the duration is over or the operation cap is reached; every successful operation's latency
is kept. Latency workloads (concurrency 1) report p50/p99 in µs, throughput workloads
(concurrency 32) report operations per second.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .stack import ORDERS_ROWS, USERS_ROWS
from .variants import (
    ORDER_COLUMNS,
    TOP_N,
    USER_COLUMNS,
    Variant,
    answer_inserted,
    answer_rows,
)

# Caps keep a measurement bounded whatever the duration asked for.
MAX_OPS = 1_000_000
MAX_ERRORS_PER_WORKER = 50

Op = Callable[[Variant, random.Random], Awaitable[Any]]


def _order_id(rng: random.Random) -> int:
    return rng.randint(1, ORDERS_ROWS)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    concurrency: int
    metric: Literal["latency", "throughput"]
    op: Op
    # The README table's row name.
    label: str = ""

    @property
    def unit(self) -> str:
        if self.metric == "latency":
            return "µs p50"
        return "tx/s" if self.key.startswith("tx") else "ops/s"

    @property
    def better(self) -> Literal["lower", "higher"]:
        return "lower" if self.metric == "latency" else "higher"


WORKLOADS: list[Workload] = [
    Workload(
        "point-c1",
        "point read by primary key, concurrency 1",
        1,
        "latency",
        lambda v, rng: v.point_read(_order_id(rng)),
        label="point read, c1, p50",
    ),
    Workload(
        "point-c32",
        "point read by primary key, concurrency 32",
        32,
        "throughput",
        lambda v, rng: v.point_read(_order_id(rng)),
        label="point read, c32",
    ),
    Workload(
        "insert-c32",
        "single-row insert, concurrency 32",
        32,
        "throughput",
        lambda v, rng: v.insert(rng.randint(1, 1000)),
        label="insert, c32",
    ),
    Workload(
        "tx-c32",
        "transaction: select + update + insert, concurrency 32",
        32,
        "throughput",
        lambda v, rng: v.transaction(_order_id(rng), rng.randint(1, 1000)),
        label="3-statement transaction, c32",
    ),
    Workload(
        "scatter-count-c1",
        "count(*) over the 4 user shards, concurrency 1",
        1,
        "latency",
        lambda v, rng: v.scatter_count(),
        label="scatter count over 4 shards, c1, p50",
    ),
    Workload(
        "scatter-top20-c1",
        f"ORDER BY score DESC LIMIT {TOP_N} over the 4 user shards, concurrency 1",
        1,
        "latency",
        lambda v, rng: v.scatter_top(),
        label="scatter ordered limit 20, c1, p50",
    ),
    Workload(
        "shard-read-c1",
        "single-shard read by id (users), concurrency 1",
        1,
        "latency",
        lambda v, rng: v.shard_read(rng.randrange(USERS_ROWS)),
        label="single-shard read, c1, p50",
    ),
]


@dataclass
class Sample:
    ops: int
    errors: int
    elapsed: float
    latencies_ns: list[int] = field(repr=False)
    first_error: str | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_us(self, q: float) -> float | None:
        if not self.latencies_ns:
            return None
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] / 1000


async def measure(
    workload: Workload, variant: Variant, duration: float, seed: int, max_ops: int = MAX_OPS
) -> Sample:
    """Run the workload for ``duration`` seconds (or ``max_ops`` operations)."""
    concurrency = workload.concurrency
    cap = max(1, max_ops // concurrency)
    errors: list[str] = []
    deadline = time.perf_counter() + duration
    op = workload.op

    async def worker(index: int) -> tuple[list[int], int]:
        rng = random.Random(seed * 1000 + index)
        latencies: list[int] = []
        failed = 0
        clock = time.perf_counter_ns
        while time.perf_counter() < deadline and len(latencies) < cap:
            began = clock()
            try:
                await op(variant, rng)
            except Exception as exc:  # counted and shown, not fatal: one measurement fails
                failed += 1
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                if failed >= MAX_ERRORS_PER_WORKER:
                    break
            else:
                latencies.append(clock() - began)
        return latencies, failed

    began = time.perf_counter()
    results = await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies = [x for lat, _ in results for x in lat]
    failed = sum(f for _, f in results)
    return Sample(len(latencies), failed, elapsed, latencies, errors[0] if errors else None)


async def verify(variant: Variant) -> dict[str, Any]:
    """Every operation once, its answer in one comparable form, so variants can be compared.

    Order 1 is 'paid' from the start, so the transaction (which marks it paid) leaves every
    later answer as it was. A variant that did not use its transport raises."""
    answers = {
        "point_read": answer_rows(await variant.point_read(1), ORDER_COLUMNS),
        "insert": answer_inserted(await variant.insert(7)),
        "transaction": answer_rows(await variant.transaction(1, 7), ORDER_COLUMNS),
        "count": await variant.scatter_count(),
        "top": answer_rows(await variant.scatter_top(), USER_COLUMNS),
        "shard_read": answer_rows(await variant.shard_read(5), USER_COLUMNS),
    }
    problem = transport_problem(variant)
    if problem:
        raise RuntimeError(problem)
    return answers


def transport_problem(variant: Variant) -> str | None:
    """A sidecar variant's reason its figures are not its transport's (None: they are)."""
    check = getattr(variant, "transport_problem", None)
    return check() if check is not None else None
