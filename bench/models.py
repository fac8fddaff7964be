"""The benchmark's own models, for the tables bench/stack.py creates.

``orders`` lives in the logical database ``orders`` (one primary); ``users`` is the
sharded database (4 shards, ``id % 4``). The ActiveRecord variants run every workload's
operation through these, as a service would.
"""

from __future__ import annotations

from client import ActiveRecord, DecimalField, IntegerField, PrimaryKeyField, TextField


class Order(ActiveRecord):
    __tablename__ = "orders"
    __database__ = "orders"
    id = PrimaryKeyField()
    user_id = IntegerField(null=True)
    status = TextField(null=True)
    amount = DecimalField(null=True)


class User(ActiveRecord):
    __tablename__ = "users"
    __database__ = "users"
    # bench/stack.py loads ids 0..9,999; the benchmark never inserts users.
    id = PrimaryKeyField()
    name = TextField(null=True)
    score = IntegerField(null=True)
