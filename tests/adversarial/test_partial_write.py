"""Attack: a write on several shards that one shard refuses.

Each shard is its own transaction. Before, an insert whose rows spanned two shards, one
of them holding a duplicate key, answered a plain 409 unique_violation while the other
shard's row was committed, so a caller believed nothing was written. Now every shard's
outcome is awaited and the answer is 409 partial_write naming the shards that committed.
"""

from __future__ import annotations

import asyncpg

from devstack.topology import USER_SHARDS

from ..conftest import server_dsn, shard_server
from .attack import query


async def test_a_write_that_commits_on_some_shards_says_so(sidecar, topology) -> None:
    base = 7_770_000
    # modulo over 4 shards: base + 1 -> shard 1, base + 2 -> shard 2.
    first = {"op": "insert", "database": "users", "table": "users",
             "rows": [{"id": base + 1, "name": "already here"}]}  # fmt: skip
    assert (await query(sidecar.url, first))[0] == 200
    rows = [{"id": base + 1, "name": "duplicate"}, {"id": base + 2, "name": "new"}]
    both = {"op": "insert", "database": "users", "table": "users", "rows": rows}
    status, body = await query(sidecar.url, both)
    assert status == 409 and body["error"]["code"] == "partial_write", body
    assert "user_shard_2" in body["error"]["message"] and not body["error"].get("retryable")
    shard2 = await asyncpg.connect(server_dsn(topology, shard_server(topology, 2), USER_SHARDS[2]))
    try:
        assert await shard2.fetchval("SELECT name FROM users WHERE id = $1", base + 2) == "new"
        await shard2.execute("DELETE FROM users WHERE id = $1", base + 2)
    finally:
        await shard2.close()
    # When every shard refuses, the answer is that refusal itself.
    status, body = await query(sidecar.url, first)
    assert status == 409 and body["error"]["code"] == "unique_violation"
