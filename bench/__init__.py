"""The benchmark harness: the sidecar against direct asyncpg (and pgbouncer when installed).

``python -m bench`` starts a local PostgreSQL topology, loads it, starts a sidecar (and a
pgbouncer) in front of it, runs every workload for every variant from one client process,
interleaved over repetitions, and writes a table, a JSON file and a chart.
"""
