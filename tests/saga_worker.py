"""An orchestrator process for the kill -9 tests: it starts one OrderSaga and SIGKILLs itself
when its orchestrator reports a chosen event at a chosen step.

    python -m tests.saga_worker SIDECAR_URL SAGA_ID DATA_JSON EVENT STEP

It exits 0 if the saga ended without reaching the event; the test expects death by SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from client import ConnectionManager
from client.saga import Orchestrator

from .saga_order import order_saga

# Short enough for the test's own orchestrator to take over soon after the kill, long
# enough that a worker on a loaded machine keeps its saga until the kill point.
LEASE = 3.0


async def main(url: str, saga_id: str, data: dict, event: str, step: int) -> None:
    ConnectionManager.configure({"default": {"sidecar": url, "database": "orders"}})

    def hook(name: str, saga: str, at: int) -> None:
        if (name, at) == (event, step):
            os.kill(os.getpid(), signal.SIGKILL)

    saga = order_saga()
    orchestrator = Orchestrator([saga], lease=LEASE, backoff=0.01, max_backoff=0.05, on_event=hook)
    await orchestrator.start(saga, data, saga_id=saga_id)
    await ConnectionManager.close_all()


if __name__ == "__main__":
    url, saga_id, data, event, step = sys.argv[1:]
    asyncio.run(main(url, saga_id, json.loads(data), event, int(step)))
