"""The running sidecar's shared state: what the endpoints and the lifecycle read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .health import Prober
from .migration_versions import SchemaVersions
from .reload import ConfigManager
from .runtime import Runtime
from .settings import Settings
from .topology import Topology
from .transactions import Transactions


@dataclass(eq=False)
class SidecarState:
    # Replaced as a whole by a reload; a request reads it once, when it starts.
    runtime: Runtime
    prober: Prober
    transactions: Transactions
    config: ConfigManager
    # Configuration loaded, pools created, data listener accepting.
    started: bool = False
    # SIGTERM or /quitquitquit: readiness is 503, in-flight work drains.
    draining: bool = False
    inflight: int = 0
    started_at: float = field(default_factory=time.time)
    # Set by the process: begins the same drain as SIGTERM.
    on_quit: Callable[[], None] | None = None
    # Each shard's schema version, read in the background (never on the request path).
    schema: SchemaVersions = field(default_factory=SchemaVersions)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload swaps them with the runtime)."""
        return self.runtime.settings

    @property
    def topology(self) -> Topology:
        """The routing table in force (a reload swaps it with the runtime)."""
        return self.runtime.topology

    def request_started(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self, within: float) -> bool:
        """Wait until no request is in flight; False if the deadline passed first."""
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True
