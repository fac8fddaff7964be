"""Process assembly: pools, probes, the data and ops listeners, signals and draining.

One process, one event loop (uvloop), one uvicorn server per listener: the
data plane on loopback TCP and/or a Unix socket, the ops port on all interfaces.
SIGTERM or SIGINT (or POST /quitquitquit) turns readiness to 503 at once, lets
in-flight requests finish up to shutdown.drain_timeout, closes the channels (1001),
closes pools, exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from . import gauges, metrics, tracing
from .api import data_app
from .channel import Channels
from .health import Prober
from .http_protocol import MAX_CONCURRENCY, BoundedHttpToolsProtocol
from .ops import ops_app
from .reload import ConfigManager
from .runtime import Runtime
from .state import SidecarState
from .topology import Topology
from .transactions import Transactions

log = logging.getLogger("dbsidecar")
# Seconds channels get, once the drain is over, to send their last answers and close: the
# plans are done by then, so only a client that stopped reading takes longer (and is
# dropped).
CHANNEL_CLOSE_GRACE = 2.0


class _Server(uvicorn.Server):
    # Signals belong to the process, not to one of its listeners.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: Starlette, state: SidecarState, **where: object) -> _Server:
    # httptools with header-size and request-read bounds (uvicorn's own has neither).
    protocol = functools.partial(BoundedHttpToolsProtocol, limits=lambda: state.settings.limits)
    config = uvicorn.Config(
        app,
        http=protocol,  # type: ignore[arg-type]
        # The channel's WebSocket: a frame is bounded like a request body (at startup: a
        # reload that lowers the limit is enforced by the channel itself); no compression
        # on loopback (CPU for nothing, and inflation is a memory risk).
        ws="websockets-sansio",
        ws_max_size=state.settings.limits.max_body_bytes,
        ws_per_message_deflate=False,
        # No keepalive pings: a channel held at its in-flight bound stops reading, so it
        # would miss the client's pong and be closed under its plans (writes then end
        # unknown). A client that exits closes its socket, even on loopback; a hung one
        # holds at most limits.max_channel_inflight answers.
        ws_ping_interval=None,
        limit_concurrency=MAX_CONCURRENCY,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=int(state.settings.shutdown.drain_timeout) or None,
        **where,  # type: ignore[arg-type]
    )
    return _Server(config)


def _listeners(state: SidecarState, channels: Channels) -> tuple[list[_Server], _Server, list[str]]:
    settings = state.settings
    data = data_app(state, channels)
    servers, where = [], []
    if settings.listen.port is not None:
        host = settings.listen.host or "127.0.0.1"
        servers.append(_server(data, state, host=host, port=settings.listen.port))
        where.append(f"http://{host}:{settings.listen.port}")
    if settings.listen.uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(settings.listen.uds)  # a stale socket from a killed predecessor
        servers.append(_server(data, state, uds=settings.listen.uds))
        where.append(f"unix://{settings.listen.uds}")
    ops = _server(ops_app(state), state, host=settings.ops.host, port=settings.ops.port)
    return servers, ops, where


async def serve(config: ConfigManager, announce: Callable[[str], None] = print) -> int:
    """Run the sidecar until a signal asks it to stop; returns the exit code."""
    began = time.monotonic()
    settings = config.current
    # Read at start only: the exporter and its provider live as long as the process.
    tracing.setup(settings.tracing)
    prober = Prober(lambda: state.runtime.settings.health)
    transactions = Transactions(lambda: state.runtime.settings.transactions)
    state = SidecarState(Runtime.first(settings, Topology({}, {})), prober, transactions, config)
    collector = gauges.StateCollector(lambda: state)
    metrics.registry.register(collector)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, config.reload_soon, "signal")
    state.on_quit = stop.set
    channels = Channels(state)
    data, ops, where = _listeners(state, channels)
    tasks: list[asyncio.Task[None]] = []
    versions: asyncio.Task[None] | None = None
    try:
        # The ops port first, so /startupz answers 503 while the rest starts.
        tasks.append(asyncio.create_task(ops.serve()))
        await config.start(state)
        gauges.initialize(state)
        transactions.start()
        tasks += [asyncio.create_task(s.serve()) for s in data]
        while not all(s.started for s in [*data, ops]):
            if any(t.done() for t in tasks):
                # A listener failed to start (port in use, bad socket path).
                for t in tasks:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
                raise RuntimeError("a listener stopped during startup")
            await asyncio.sleep(0.01)
        # Each shard's schema version before the first request, then in the background.
        await state.schema.refresh(state.runtime)
        versions = asyncio.create_task(state.schema.watch(lambda: state.runtime))
        state.started = True
        # What startup built (modules, settings, pools) mostly lives as long as the
        # process: keep it out of every later collection, which otherwise walks all of it
        # (7% of the sidecar's time at concurrency 32). What a reload replaces stays
        # frozen: a one-time cost per startup, not a growing one.
        gc.collect()
        gc.freeze()
        topology = state.topology
        announce(
            f"dbsidecar ready in {time.monotonic() - began:.1f} s: data API "
            f"{' and '.join(where)}, ops http://{settings.ops.host}:{settings.ops.port} "
            f"({len(topology.databases)} databases, {len(topology.nodes)} nodes)"
        )
        await stop.wait()
        state.draining = True
        transactions.accepting = False
        announce(f"dbsidecar draining {state.inflight} in-flight requests")
        if not await state.drained(state.settings.shutdown.drain_timeout):
            log.warning("drain deadline passed with %d requests in flight", state.inflight)
        # Before the listeners stop: uvicorn would close open channels with 1012 and no
        # word on the frames they carried.
        await channels.close(CHANNEL_CLOSE_GRACE)
    finally:
        if versions is not None:
            versions.cancel()
        for server in [*data, ops]:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await config.stop()
        await transactions.close()
        await prober.stop()
        await state.topology.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        metrics.registry.unregister(collector)
        tracing.shutdown()  # the last spans, flushed
    announce("dbsidecar stopped")
    return 0
