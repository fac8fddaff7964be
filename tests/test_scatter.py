"""Scatter-gather equals the oracle: the same plan on one unsharded table holding all rows.

Hypothesis generates rows and queries (filters, order, limit/offset, count, aggregates,
group_by); the sharded answer through the sidecar must equal what PostgreSQL says for
the same SQL on the `users` table of the `users` database, which holds every row.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.connection import DatabaseHandle
from client.results import decode
from client.transport import Transport
from devstack.topology import USER_SHARDS
from sidecar.compiler import Compiler
from wire.protocol import Aggregate, AggregateQuery, Count, Insert, OrderBy, Select

from .conftest import server_dsn, shard_server

COLUMNS = ["id", "name", "country", "score", "balance"]

rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["ann", "bob", "cid", "dee", "Eve", "åsa"]),
            "country": st.none() | st.sampled_from(["se", "no", "fi"]),
            "score": st.none() | st.integers(-50, 50),
            "balance": st.none()
            | st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False),
        }
    ),
    max_size=40,
)

where_strategy = st.one_of(
    st.none(),
    st.builds(lambda v: {"col": "score", "op": ">", "value": v}, st.integers(-50, 50)),
    st.builds(lambda c: {"col": "country", "op": "=", "value": c}, st.sampled_from(["se", "no"])),
    st.builds(lambda: {"col": "country", "op": "is_null", "value": True}),
    st.builds(
        lambda names: {"col": "name", "op": "in", "value": names},
        st.lists(st.sampled_from(["ann", "bob", "Eve", "åsa"]), min_size=1, max_size=3),
    ),
    st.builds(
        lambda v: {
            "or": [
                {"col": "score", "op": "<", "value": v},
                {"col": "balance", "op": "is_null", "value": True},
            ]
        },
        st.integers(-50, 50),
    ),
)

order_strategy = st.lists(
    st.builds(OrderBy, st.sampled_from(["score", "name", "country", "balance"]), st.booleans()),
    max_size=2,
    unique_by=lambda o: o.col,
)

select_strategy = st.builds(
    lambda where, order, limit, offset, columns: Select(
        database="users",
        table="users",
        columns=columns,
        where=where,
        # id last makes the order total, so the oracle's order is the only right one.
        order_by=[*order, OrderBy("id")],
        limit=limit,
        offset=offset,
    ),
    where_strategy,
    order_strategy,
    st.none() | st.integers(0, 15),
    st.none() | st.integers(0, 10),
    st.none() | st.just(["name", "score"]),
)

aggregate_strategy = st.builds(
    lambda where, group, aggs, limit: AggregateQuery(
        database="users",
        table="users",
        aggregates=aggs,
        group_by=group,
        where=where,
        order_by=[OrderBy(c) for c in group],
        limit=limit if group else None,
    ),
    where_strategy,
    st.sampled_from([[], ["country"], ["country", "name"]]),
    st.lists(
        st.builds(
            lambda fn, col, i: Aggregate(
                fn,
                None if fn == "count" and col == "*" else (col if col != "*" else "score"),
                f"a{i}",
            ),
            st.sampled_from(["count", "sum", "avg", "min", "max"]),
            st.sampled_from(["*", "score", "balance"]),
            st.integers(0, 10**6),
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda a: a.alias,
    ),
    st.none() | st.integers(0, 5),
)

count_strategy = st.builds(
    lambda where: Count(database="users", table="users", where=where), where_strategy
)

queries_strategy = st.lists(
    st.one_of(select_strategy, aggregate_strategy, count_strategy), min_size=1, max_size=6
)


def _normal(value: Any) -> Any:
    # avg is numeric in PostgreSQL; the merge computes it exactly but at another scale.
    if isinstance(value, Decimal):
        return value.normalize() if value == value.to_integral() else round(value, 10)
    return value


async def _check(topology, sidecar, rows: list[dict], queries: list) -> None:
    oracle = await asyncpg.connect(server_dsn(topology, topology.primary, "users"))
    shards = [
        await asyncpg.connect(server_dsn(topology, shard_server(topology, i), name))
        for i, name in enumerate(USER_SHARDS)
    ]
    transport = Transport(f"unix://{sidecar.uds}")
    db = DatabaseHandle("scatter", transport=transport, database="users", consistency="session")
    compiler = Compiler()
    try:
        for conn in [oracle, *shards]:
            await conn.execute("TRUNCATE users")
        if rows:
            numbered = [{"id": i + 1, **r} for i, r in enumerate(rows)]
            wire = [{k: _wire(v) for k, v in r.items()} for r in numbered]
            await db.run(Insert(database="users", table="users", rows=wire))
            await oracle.executemany(
                "INSERT INTO users (id, name, country, score, balance) VALUES ($1, $2, $3, $4, $5)",
                [tuple(r[c] for c in COLUMNS) for r in numbered],
            )
        for query in queries:
            got = decode(await db.run(msgspec.structs.replace(query)))
            compiled = compiler.compile(query)
            want = await oracle.fetch(compiled.statement.sql, *compiled.params)
            got_rows = [[_normal(v) for k, v in r.items() if k != "created_at"] for r in got]
            want_rows = [[_normal(v) for k, v in r.items() if k != "created_at"] for r in want]
            assert got_rows == want_rows, (query, compiled.statement.sql)
            if len(got.served_by) != 4:
                # A key-less read must have asked every shard.
                raise AssertionError(f"served by {got.served_by} for {query}")
    finally:
        await transport.close()
        for conn in [oracle, *shards]:
            await conn.close()


def _wire(value: Any) -> Any:
    return {"$decimal": str(value)} if isinstance(value, Decimal) else value


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=rows_strategy, queries=queries_strategy)
def test_scatter_gather_equals_the_unsharded_oracle(topology, sidecar, rows, queries) -> None:
    asyncio.run(_check(topology, sidecar, rows, queries))


ICU_NAMES = ["b", "B", "a", "A", "é", "e", "_x", "Z", "z10", "z9", "ß", "ss", None]


def test_exact_merge_follows_an_icu_collation(topology) -> None:
    """merge_select/merge_aggregate with a real PostgreSQL to ask, on shard runs
    sorted by PostgreSQL: the same answer as one table holding every row."""
    from sidecar.executor import Outcome
    from sidecar.merge import merge_aggregate, merge_select, shard_select

    async def check() -> None:
        oracle = await asyncpg.connect(server_dsn(topology, topology.primary, "users"))
        ddl = 'CREATE TABLE icu_t (id bigint PRIMARY KEY, name text COLLATE "en-x-icu")'
        rows = [(i, n) for i, n in enumerate(ICU_NAMES)]
        try:
            await oracle.execute(ddl)
            await oracle.executemany("INSERT INTO icu_t VALUES ($1, $2)", rows)

            async def ask(sql: str, params: list) -> list:
                return [tuple(r) for r in await oracle.fetch(sql, *params)]

            for desc in (False, True):
                plan = Select(
                    database="users",
                    table="icu_t",
                    columns=["id", "name"],
                    order_by=[OrderBy("name", desc), OrderBy("id")],
                    limit=6,
                    offset=3,
                )
                _, extra = shard_select(plan)
                runs = []
                for k in range(3):  # three "shards": id % 3, each sorted by PostgreSQL
                    part = await oracle.fetch(
                        f"SELECT id, name FROM icu_t WHERE id % 3 = {k} ORDER BY name"
                        f"{' DESC' if desc else ''}, id LIMIT 9"
                    )
                    runs.append(
                        Outcome(
                            ["id", "name"],
                            [None, None],
                            [tuple(r) for r in part],
                            len(part),
                            None,
                            "primary",
                            None,
                        )
                    )  # type: ignore[arg-type]
                _, got = await merge_select(plan, runs, extra, ask)
                want = await oracle.fetch(
                    f"SELECT id, name FROM icu_t ORDER BY name{' DESC' if desc else ''}, id"
                    " LIMIT 6 OFFSET 3"
                )
                assert got == [tuple(r) for r in want], desc
            agg = AggregateQuery(
                database="users",
                table="icu_t",
                aggregates=[Aggregate("min", "name", "lo"), Aggregate("max", "name", "hi")],
            )
            parts = []
            for k in range(3):
                r = await oracle.fetchrow(
                    f"SELECT min(name), max(name) FROM icu_t WHERE id % 3 = {k}"
                )
                parts.append(
                    Outcome(["_a0", "_a1"], [None, None], [tuple(r)], 1, None, "primary", None)
                )  # type: ignore[arg-type]
            _, _, got_agg = await merge_aggregate(agg, parts, ask)
            want_agg = await oracle.fetchrow("SELECT min(name), max(name) FROM icu_t")
            assert got_agg == [tuple(want_agg)]
        finally:
            await oracle.execute("DROP TABLE IF EXISTS icu_t")
            await oracle.close()

    asyncio.run(check())
