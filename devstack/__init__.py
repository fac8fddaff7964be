"""Dev tooling: local PostgreSQL topologies, free ports and sidecar processes.

Used by `dbsidecar dev`, the tests and the benchmark, never by the sidecar's request path
(an import-linter contract keeps it so: only `sidecar.cli` imports it, for `dbsidecar dev`).
"""
