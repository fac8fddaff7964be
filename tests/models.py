"""Models the tests share (their tables are in tests/schema.py)."""

from client import (
    ActiveRecord,
    BooleanField,
    BytesField,
    DateField,
    DecimalField,
    FloatField,
    IntegerField,
    JSONField,
    PrimaryKeyField,
    StringField,
    TextField,
    TimeField,
    TimestampField,
    UUIDField,
    ids,
)


class Order(ActiveRecord):
    __tablename__ = "orders"
    id = PrimaryKeyField()
    user_id = IntegerField()
    status = StringField(max_length=20)
    data = JSONField(null=True)
    amount = DecimalField(null=True)
    created_at = TimestampField(auto_now_add=True)


class Typed(ActiveRecord):
    __tablename__ = "typed"
    id = PrimaryKeyField()
    ts = TimestampField(null=True)
    d = DateField(null=True)
    t = TimeField(null=True)
    dec = DecimalField(null=True)
    u = UUIDField(null=True)
    b = BytesField(null=True)
    j = JSONField(null=True)
    flag = BooleanField(null=True)
    i = IntegerField(null=True)
    f = FloatField(null=True)
    txt = TextField(null=True)


class User(ActiveRecord):
    __tablename__ = "users"
    __database__ = "users"
    id = PrimaryKeyField(generator=ids.next_id)
    name = TextField()
    country = TextField(null=True)
    score = IntegerField(null=True)
    balance = DecimalField(null=True)
    created_at = TimestampField(auto_now_add=True)
