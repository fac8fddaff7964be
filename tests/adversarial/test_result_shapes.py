"""Attacks on what a result says about itself: the same table name in two databases, and
a table that changes under a cached plan shape.

Before: the compile cache was keyed without the database and learnt a shape's result
columns once, so the second database's answer carried the first one's column names
(a leak between databases), and a migration left every later answer with stale names.
"""

from __future__ import annotations

import asyncpg

from ..conftest import server_dsn
from .attack import query


def select_all(database: str) -> dict:
    return {"op": "select", "database": database, "table": "shape_probe"}


async def test_one_table_name_in_two_databases_keeps_its_own_columns(
    sidecar, topology, primary
) -> None:
    inventory = await asyncpg.connect(server_dsn(topology, topology.primary, "inventory"))
    try:
        await primary.execute("CREATE TABLE shape_probe (a int, secret text)")
        await primary.execute("INSERT INTO shape_probe VALUES (1, 'orders only')")
        await inventory.execute("CREATE TABLE shape_probe (x numeric)")
        await inventory.execute("INSERT INTO shape_probe VALUES (1.5)")
        status, body = await query(sidecar.url, select_all("orders"))
        assert status == 200 and body["columns"] == ["a", "secret"]
        status, body = await query(sidecar.url, select_all("inventory"))
        assert status == 200 and body["columns"] == ["x"], body
        assert body["types"] == ["decimal"] and body["rows"] == [["1.5"]]
    finally:
        await primary.execute("DROP TABLE IF EXISTS shape_probe")
        await inventory.execute("DROP TABLE IF EXISTS shape_probe")
        await inventory.close()


async def test_a_migration_under_a_cached_shape_shows_the_new_columns(sidecar, primary) -> None:
    try:
        await primary.execute("CREATE TABLE shape_probe (a int, b text)")
        await primary.execute("INSERT INTO shape_probe VALUES (1, 'one')")
        for _ in range(3):  # cached on every pooled connection the reads land on
            status, body = await query(sidecar.url, select_all("orders"))
            assert status == 200 and body["columns"] == ["a", "b"]
        await primary.execute("ALTER TABLE shape_probe RENAME COLUMN b TO label")
        await primary.execute("ALTER TABLE shape_probe ADD COLUMN at date DEFAULT '2026-12-01'")
        for _ in range(10):
            status, body = await query(sidecar.url, select_all("orders"))
            assert status == 200 and body["columns"] == ["a", "label", "at"], body
            assert body["types"] == [None, None, "date"]
    finally:
        await primary.execute("DROP TABLE IF EXISTS shape_probe")
