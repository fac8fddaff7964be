"""The adversarial suite: attacks on the session sidecar, truth read from PostgreSQL.

Whatever the attacks send, the sidecar's memory must come back: after the last
test of this package its RSS is within 100 MB of what it was before the first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..harness import SidecarProcess
from .attack import rss_bytes

RSS_BUDGET = 100 * 1024 * 1024


@pytest.fixture(scope="package", autouse=True)
def bounded_memory(sidecar: SidecarProcess) -> Iterator[None]:
    assert sidecar.proc is not None
    before = rss_bytes(sidecar.proc.pid)
    yield
    if sidecar.proc.poll() is None:
        grown = rss_bytes(sidecar.proc.pid) - before
        assert grown < RSS_BUDGET, f"the sidecar grew by {grown / 2**20:.0f} MiB over the attacks"
