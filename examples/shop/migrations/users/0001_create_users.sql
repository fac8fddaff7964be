-- Applied to every shard of `users` (user_shard_0..3): a user lives on the shard of its id.
CREATE TABLE shop_users (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
