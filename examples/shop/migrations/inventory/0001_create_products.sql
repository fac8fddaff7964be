CREATE TABLE shop_products (
    id bigserial PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    price numeric(12, 2) NOT NULL CHECK (price >= 0),
    -- Reserving stock never takes it below zero: the order saga relies on this check.
    stock integer NOT NULL CHECK (stock >= 0)
);
