"""The benchmark harness: the sidecar against direct asyncpg (and pgbouncer when installed).

``python -m bench`` starts a local PostgreSQL topology, loads it, starts a sidecar (and a
pgbouncer) in front of it, runs every workload for every variant from one client process,
interleaved over repetitions, and writes a table, a paste-ready markdown block, a JSON file
and a chart. Sidecar variants come in two APIs: the client's DatabaseHandle with hand-made
plans (``sidecar-*``) and the ActiveRecord models services use (``ar-*``, bench/models.py).
``--soak SECONDS`` runs one workload for long, watching the sidecar's memory.
"""
