"""The shop's records. Each model lives in its own service's database; ``users`` is
sharded by id over user_shard_0..3, so a user is read and written on one shard."""

from __future__ import annotations

from client import (
    ActiveRecord,
    DecimalField,
    EventStore,
    IntegerField,
    PrimaryKeyField,
    StringField,
    TextField,
    TimestampField,
    ids,
)


class User(ActiveRecord):
    __tablename__ = "shop_users"
    __database__ = "users"
    # Time-ordered ids made by the client: the shard key is known before the insert.
    id = PrimaryKeyField(generator=ids.next_id)
    name = TextField()
    email = TextField()
    created_at = TimestampField(auto_now_add=True)


class Product(ActiveRecord):
    __tablename__ = "shop_products"
    __database__ = "inventory"
    id = PrimaryKeyField()
    sku = TextField()
    name = TextField()
    price = DecimalField(max_digits=12, decimal_places=2)
    stock = IntegerField()


class Order(ActiveRecord):
    __tablename__ = "shop_orders"
    __database__ = "orders"
    id = PrimaryKeyField()
    user_id = IntegerField()
    status = StringField()
    total = DecimalField(max_digits=12, decimal_places=2)
    saga_id = TextField(null=True)
    created_at = TimestampField(auto_now_add=True)


class OrderItem(ActiveRecord):
    __tablename__ = "shop_order_items"
    __database__ = "orders"
    id = PrimaryKeyField()
    order_id = IntegerField()
    product_id = IntegerField()
    quantity = IntegerField()
    price = DecimalField(max_digits=12, decimal_places=2)


class Payment(ActiveRecord):
    __tablename__ = "shop_payments"
    __database__ = "payments"
    id = PrimaryKeyField()
    order_id = IntegerField()
    user_id = IntegerField()
    amount = DecimalField(max_digits=12, decimal_places=2)
    status = StringField()
    created_at = TimestampField(auto_now_add=True)


class OrderEvents(EventStore):
    """The orders' event streams (``order-<id>``). Each event is also an outbox message
    on ``shop.orders``, committed with it; ``dbsidecar relay`` publishes it to NATS."""

    __database__ = "orders"
    __category__ = "order"
    __publish__ = "shop.orders"
