"""Time-ordered 64-bit ids for sharded inserts, generated without a round trip.

Layout (a positive signed 64-bit integer, so it fits PostgreSQL's bigint):
41 bits of milliseconds since 2024-01-01 UTC (good until 2093), 10 bits of
worker id, 12 bits of sequence (4096 ids per millisecond per worker).

Ids are unique as long as no two live processes share a worker id. Give each
process one with ``DBSIDECAR_WORKER_ID`` (0-1023), e.g. from a StatefulSet
ordinal; without it a random worker id is drawn per process, which makes a
collision possible only between two processes that drew the same id *and*
generate in the same millisecond with the same sequence number.
"""

from __future__ import annotations

import os
import secrets
import threading
import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
WORKER_BITS = 10
SEQUENCE_BITS = 12
MAX_WORKER = (1 << WORKER_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1


def _worker_from_env() -> int:
    raw = os.environ.get("DBSIDECAR_WORKER_ID")
    if raw is None:
        return secrets.randbelow(MAX_WORKER + 1)
    worker = int(raw)
    if not 0 <= worker <= MAX_WORKER:
        raise ValueError(f"DBSIDECAR_WORKER_ID must be 0..{MAX_WORKER}, got {worker}")
    return worker


class IdGenerator:
    def __init__(self, worker: int | None = None) -> None:
        self.worker = _worker_from_env() if worker is None else worker
        if not 0 <= self.worker <= MAX_WORKER:
            raise ValueError(f"worker must be 0..{MAX_WORKER}")
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        with self._lock:
            now = time.time_ns() // 1_000_000 - EPOCH_MS
            # A clock that steps back must not repeat ids: keep using the last millisecond.
            now = max(now, self._last_ms)
            if now == self._last_ms:
                self._sequence = (self._sequence + 1) & MAX_SEQUENCE
                if self._sequence == 0:
                    now += 1  # this millisecond is used up: borrow the next
            else:
                self._sequence = 0
            self._last_ms = now
            return (
                (now << (WORKER_BITS + SEQUENCE_BITS))
                | (self.worker << SEQUENCE_BITS)
                | self._sequence
            )


_default = IdGenerator()


def next_id() -> int:
    """The next id from this process's generator."""
    return _default.next_id()


def timestamp_ms(id_: int) -> int:
    """When an id was made (Unix milliseconds)."""
    return (id_ >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS
