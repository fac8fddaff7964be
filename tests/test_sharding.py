"""Shard placement (checked on each shard database directly), key extraction, explicit
shards, refusal of key-less writes, all_shards(), and the README's ShardedUserService."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator

import asyncpg
import pytest

from client import ActiveRecord, ConnectionManager, PlanError, ShardKeyRequired, TextField
from devstack.topology import USER_SHARDS
from sidecar.sharding import stable_hash64
from wire.protocol import Insert, Select, Update

from .conftest import server_dsn, shard_server, sidecar_config
from .harness import SidecarProcess
from .models import User

pytestmark = pytest.mark.usefixtures("handles")


@pytest.fixture
async def shards(topology) -> AsyncIterator[list[asyncpg.Connection]]:
    """Direct connections to user_shard_0..3, and empty tables to start from."""
    conns = [
        await asyncpg.connect(server_dsn(topology, shard_server(topology, i), name))
        for i, name in enumerate(USER_SHARDS)
    ]
    for conn in conns:
        await conn.execute("TRUNCATE users, accounts")
    yield conns
    for conn in conns:
        await conn.close()


async def ids_on(conn: asyncpg.Connection, table: str = "users", col: str = "id") -> set:
    return {r[0] for r in await conn.fetch(f"SELECT {col} FROM {table}")}


async def test_modulo_places_each_row_on_its_shard(shards) -> None:
    for i in range(20):
        await User(id=i, name=f"u{i}").save()
    for index, conn in enumerate(shards):
        assert await ids_on(conn) == {i for i in range(20) if i % 4 == index}


async def test_generated_ids_and_multi_row_insert_split_per_shard(shards) -> None:
    users = [User(name=f"n{i}") for i in range(12)]
    saved = await User.insert_many(users)
    assert [u.name for u in saved] == [f"n{i}" for i in range(12)]  # order kept
    ids = [u.id for u in saved]
    assert len(set(ids)) == 12 and ids == sorted(ids)  # unique and time-ordered
    for index, conn in enumerate(shards):
        assert await ids_on(conn) == {i for i in ids if i % 4 == index}
    one = await User(name="solo").save()
    assert one.id % 4 == int(one.served_by[0].shard.rsplit("_", 1)[1])


async def test_key_reads_touch_only_their_shards(shards) -> None:
    for i in range(8):
        await User(id=i, name=f"k{i}").save()
    found = await User.find_by_id(5).one()
    assert found.name == "k5" and [s.shard for s in found.served_by] == ["user_shard_1"]
    rows = await User.find().where(User.id.in_([1, 2, 5])).order_by(User.id).rows()
    assert [r["id"] for r in rows] == [1, 2, 5]
    assert sorted(s.shard for s in rows.served_by) == ["user_shard_1", "user_shard_2"]
    everyone = await User.find().order_by(User.id).rows()
    assert len(everyone.served_by) == 4 and [r["id"] for r in everyone] == list(range(8))


async def test_explicit_shard_with_using(shards) -> None:
    for i in range(8):
        await User(id=i, name=f"e{i}").save()
    on_two = await User.find().using("user_shard_2").order_by(User.id).all()
    assert [u.id for u in on_two] == [2, 6]
    assert await User.find().shard("user_shard_3").count() == 2
    with pytest.raises(PlanError) as err:
        await User(id=5, name="wrong").save(using="user_shard_2")
    assert err.value.code == "wrong_shard"


async def test_writes_without_the_key_are_refused_unless_all_shards(shards) -> None:
    for i in range(8):
        await User(id=i, name="same" if i < 6 else "other").save()
    with pytest.raises(ShardKeyRequired):
        await User.find().where(User.name == "same").update(score=1)
    with pytest.raises(ShardKeyRequired):
        await User.find().where(User.name == "same").delete()
    with pytest.raises(ShardKeyRequired):
        await User.find().where((User.id == 1) | (User.name == "same")).delete()
    assert await User.find().all_shards().where(User.name == "same").update(score=7) == 6
    for conn in shards:
        assert await conn.fetchval("SELECT count(*) FROM users WHERE score = 7") == len(
            [1 for _ in await conn.fetch("SELECT 1 FROM users WHERE name = 'same'")]
        )
    assert await User.find().all_shards().where(User.name == "other").delete() == 2
    # A key-pinned write needs no all_shards().
    assert await User.find().where(User.id == 3).update(score=9) == 1


async def test_batches_stay_on_one_shard(shards) -> None:
    db = ConnectionManager.get("users")
    result = await db.batch(
        [
            Insert(database="users", table="users", rows=[{"id": 4, "name": "b4"}]),
            Update(database="users", table="users", values={"score": 1},
                   where={"col": "id", "op": "=", "value": 8}),
            Select(database="users", table="users", where={"col": "id", "op": "=", "value": 4}),
        ]
    )  # fmt: skip
    assert result.results[2].served_by[0].shard == "user_shard_0"
    with pytest.raises(PlanError) as err:
        await db.batch(
            [
                Insert(database="users", table="users", rows=[{"id": 1, "name": "x"}]),
                Insert(database="users", table="users", rows=[{"id": 2, "name": "y"}]),
            ]
        )
    assert err.value.code == "cross_shard_batch"
    assert await ids_on(shards[1]) == set()


async def test_readme_sharded_user_service(shards) -> None:
    class ShardedUserService:
        async def get(self, user_id):
            return await User.find_by_id(user_id).one()

        async def by_country(self, c):
            return await User.find().where(User.country == c).order_by(User.name).limit(20).all()

        async def rename_everywhere(self, old, new):
            return await User.find().all_shards().where(User.name == old).update(name=new)

    for i, (name, country) in enumerate([("bo", "se"), ("al", "se"), ("cy", "no"), ("al", "no")]):
        await User(id=i + 10, name=name, country=country).save()
    service = ShardedUserService()
    assert (await service.get(12)).name == "cy"
    assert [u.name for u in await service.by_country("se")] == ["al", "bo"]
    assert await service.rename_everywhere("al", "ali") == 2


@pytest.fixture(scope="module")
def functions_sidecar(topology, workdir) -> AsyncIterator[SidecarProcess]:
    """The same four shard databases under hash, range and map sharding of `accounts`."""
    config = sidecar_config(topology, workdir, "functions")
    users = config["databases"]["users"]

    def sharded(prefix: str, sharding: dict) -> dict:
        shards = copy.deepcopy(users["shards"])
        for i, shard in enumerate(shards):
            shard["name"] = f"{prefix}{i}"
        return {"sharding": sharding, "shards": shards}

    config["databases"].update(
        by_hash=sharded("h", {"key": "key", "function": "hash"}),
        by_range=sharded("r", {"key": "n", "function": "range", "bounds": [100, 200, 300]}),
        by_map=sharded("m", {"key": "key", "function": "map",
                             "map": {"eu": "m0", "us": "m1", "apac": "m2"}, "default": "m3"}),
    )  # fmt: skip
    proc = SidecarProcess(config, workdir, "functions")
    proc.start()
    yield proc
    proc.terminate()


class Account(ActiveRecord):
    __tablename__ = "accounts"
    key = TextField(primary_key=True)
    n = TextField(null=True)


async def test_hash_range_and_map_place_rows_as_documented(functions_sidecar, shards) -> None:
    ConnectionManager.configure(
        {name: {"sidecar": functions_sidecar.url, "database": name}
         for name in ("by_hash", "by_range", "by_map")}
    )  # fmt: skip
    keys = ["alice", "bob", "carol", "dave", "erin", "frank", "é", ""]
    db = ConnectionManager.get("by_hash")
    await db.run(Insert(database="by_hash", table="accounts", rows=[{"key": k} for k in keys]))
    for index, conn in enumerate(shards):
        assert await ids_on(conn, "accounts", "key") == {
            k for k in keys if stable_hash64(k) % 4 == index
        }
        await conn.execute("TRUNCATE accounts")

    db = ConnectionManager.get("by_range")
    rows = [{"key": f"r{n}", "n": n} for n in (0, 99, 100, 199, 200, 299, 300, 10**6)]
    await db.run(Insert(database="by_range", table="accounts", rows=rows))
    expected = [{"r0", "r99"}, {"r100", "r199"}, {"r200", "r299"}, {"r300", "r1000000"}]
    for conn, want in zip(shards, expected, strict=True):
        assert await ids_on(conn, "accounts", "key") == want
        await conn.execute("TRUNCATE accounts")

    db = ConnectionManager.get("by_map")
    await db.run(
        Insert(database="by_map", table="accounts",
               rows=[{"key": k} for k in ("eu", "us", "apac", "mars")])
    )  # fmt: skip
    for conn, want in zip(shards, [{"eu"}, {"us"}, {"apac"}, {"mars"}], strict=True):
        assert await ids_on(conn, "accounts", "key") == want
