CREATE TABLE shop_payments (
    id bigserial PRIMARY KEY,
    -- One charge per order, whatever retries or crashes happen around it.
    order_id bigint NOT NULL UNIQUE,
    user_id bigint NOT NULL,
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
