-- dbsidecar: no-transaction
-- Built without blocking writes to shop_orders, so it cannot run inside a transaction.
CREATE INDEX CONCURRENTLY IF NOT EXISTS shop_orders_user_id ON shop_orders (user_id);
