CREATE TABLE shop_orders (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL,
    status text NOT NULL,
    total numeric(12, 2) NOT NULL,
    saga_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE shop_order_items (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES shop_orders (id),
    product_id bigint NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    price numeric(12, 2) NOT NULL
);
