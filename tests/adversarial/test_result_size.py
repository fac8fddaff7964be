"""Attack: a read that answers with more rows than memory should hold.

Before: `SELECT ... FROM generate_series(1, 3000000)` as a raw read answered 200 with
every row (the sidecar's peak memory went from 61 MiB to over 1 GiB, its event loop
blocked for seconds), and a select without a limit on a big table did the same. Now a
read answers at most limits.max_result_rows rows: compiled reads carry a LIMIT one past
it, raw SQL is read through a cursor that stops one past it, and anything more is a
400 result_too_large, with the sidecar's memory bounded.
"""

from __future__ import annotations

from pathlib import Path

from ..conftest import sidecar_config
from ..harness import SidecarProcess
from .attack import post, query, rss_bytes

CAP = 1000


def _peak_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


async def test_reads_answer_at_most_the_cap(topology, tmp_path, primary) -> None:
    config = sidecar_config(topology, tmp_path, "capped")
    config["limits"] = {"max_result_rows": CAP}
    proc = SidecarProcess(config, tmp_path, "capped")
    proc.start()
    assert proc.proc is not None
    pid = proc.proc.pid
    try:
        await primary.execute(
            "CREATE TABLE big_probe AS SELECT g AS id FROM generate_series(1, 5000) g"
        )
        huge = "SELECT g, repeat('x', 100) FROM generate_series(1, 3000000) g"
        before = rss_bytes(pid)
        _peak_reset(pid)
        for plan in (
            {"op": "raw", "database": "orders", "writes": False, "sql": huge},
            {"op": "raw", "database": "orders", "writes": True, "sql": huge},
            {"op": "select", "database": "orders", "table": "big_probe"},
            {"op": "aggregate", "database": "orders", "table": "big_probe", "group_by": ["id"],
             "aggregates": [{"fn": "count"}]},
            {"op": "select", "database": "orders", "table": "big_probe", "limit": CAP + 1},
            # Every users shard under the cap, all of them together over it.
            {"op": "raw", "database": "users", "writes": False, "route": {"shard": "*"},
             "sql": f"SELECT g FROM generate_series(1, {CAP // 2}) g"},
        ):  # fmt: skip
            status, body = await query(proc.url, plan)
            assert status == 400 and body["error"]["code"] == "result_too_large", (plan, body)
        assert _peak(pid) - before < 64 * 2**20
        # At the cap, or paged, reads answer.
        for plan in (
            {"op": "raw", "database": "orders", "writes": False,
             "sql": f"SELECT g FROM generate_series(1, {CAP}) g"},
            {"op": "select", "database": "orders", "table": "big_probe", "limit": CAP},
            {"op": "select", "database": "orders", "table": "big_probe",
             "where": {"col": "id", "op": "<=", "value": CAP}},
            {"op": "raw", "database": "orders", "writes": False, "sql": "SHOW search_path"},
        ):  # fmt: skip
            status, body = await query(proc.url, plan)
            assert status == 200 and len(body["rows"]) in (1, CAP), (plan, body)
        # A raw write whose answer is too large wrote nothing.
        status, body = await post(proc.url, "/v1/query", {
            "op": "raw", "database": "orders", "writes": True,
            "sql": "INSERT INTO big_probe SELECT g FROM generate_series(10001, 12000) g"
                   " RETURNING id",
        })  # fmt: skip
        assert status == 400 and body["error"]["code"] == "result_too_large"
        assert await primary.fetchval("SELECT count(*) FROM big_probe") == 5000
    finally:
        await primary.execute("DROP TABLE IF EXISTS big_probe")
        proc.terminate()
