"""Snowflake ids (client.ids): unique, increasing, worker bits, clock steps.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import itertools
import time
import types

import pytest

import client.ids as ids
from client.ids import EPOCH_MS, MAX_WORKER, SEQUENCE_BITS, IdGenerator, timestamp_ms


def test_ids_strictly_increase_and_are_unique() -> None:
    gen = IdGenerator(worker=5)
    made = [gen.next_id() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(made))
    assert len(set(made)) == len(made)
    assert all(0 < i < 2**63 for i in made)  # fits PostgreSQL's bigint


def test_worker_bits() -> None:
    for worker in (0, 1, 513, MAX_WORKER):
        id_ = IdGenerator(worker=worker).next_id()
        assert (id_ >> SEQUENCE_BITS) & MAX_WORKER == worker


def test_timestamp_is_close_to_now() -> None:
    before = time.time() * 1000
    id_ = IdGenerator(worker=1).next_id()
    after = time.time() * 1000
    assert before - 5000 <= timestamp_ms(id_) <= after + 5000


def test_two_workers_never_collide() -> None:
    a, b = IdGenerator(worker=1), IdGenerator(worker=2)
    ids_a = {a.next_id() for _ in range(10_000)}
    ids_b = {b.next_id() for _ in range(10_000)}
    assert len(ids_a) == len(ids_b) == 10_000
    assert not ids_a & ids_b


def frozen_clock(monkeypatch: pytest.MonkeyPatch, unix_ms: list[int]) -> None:
    """Make client.ids read the time from unix_ms[0], which the test can change."""
    fake = types.SimpleNamespace(time_ns=lambda: unix_ms[0] * 1_000_000)
    monkeypatch.setattr(ids, "time", fake)


def test_sequence_overflow_borrows_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [EPOCH_MS + 1_000_000]
    frozen_clock(monkeypatch, now)
    gen = IdGenerator(worker=3)
    made = [gen.next_id() for _ in range(10_000)]  # > 2 x 4096 in one frozen millisecond
    assert all(a < b for a, b in itertools.pairwise(made))
    assert timestamp_ms(made[0]) == now[0]
    assert timestamp_ms(made[-1]) == now[0] + 2


def test_clock_stepping_back_does_not_repeat_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [EPOCH_MS + 5_000_000]
    frozen_clock(monkeypatch, now)
    gen = IdGenerator(worker=3)
    first = gen.next_id()
    now[0] -= 60_000  # NTP steps the clock back a minute
    second = gen.next_id()
    assert second > first
    assert timestamp_ms(second) == timestamp_ms(first)


@pytest.mark.parametrize("raw", ["1024", "-1", "99999"])
def test_worker_id_from_env_out_of_range(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("DBSIDECAR_WORKER_ID", raw)
    with pytest.raises(ValueError):
        IdGenerator()


def test_worker_id_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSIDECAR_WORKER_ID", "1023")
    assert IdGenerator().worker == 1023
    monkeypatch.delenv("DBSIDECAR_WORKER_ID")
    assert 0 <= IdGenerator().worker <= MAX_WORKER


@pytest.mark.parametrize("worker", [-1, MAX_WORKER + 1])
def test_worker_argument_out_of_range(worker: int) -> None:
    with pytest.raises(ValueError):
        IdGenerator(worker=worker)
