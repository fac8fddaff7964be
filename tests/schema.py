"""The tables the tests use, created directly on the primaries before the sidecar starts."""

ORDERS = """
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    user_id integer NOT NULL,
    status varchar(20) NOT NULL,
    data jsonb,
    amount numeric(12, 2),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE typed (
    id bigserial PRIMARY KEY,
    ts timestamptz, ts_naive timestamp, d date, t time, tz timetz, iv interval,
    dec numeric, u uuid, b bytea, j jsonb, js json,
    flag boolean, i integer, bi bigint, f double precision, txt text, ints integer[]
);
CREATE TABLE "weird; name" (id integer);
CREATE TABLE kv (k text PRIMARY KEY, v text);
"""

USERS = """
CREATE TABLE users (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    country text,
    score integer,
    balance numeric(12, 2),
    rating double precision,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE accounts (key text PRIMARY KEY, n integer);
"""
