"""`dbsidecar relay`: the outbox relay as a process (see sidecar.relay)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from . import logs
from .settings import ConfigError, load_settings

DEFAULT_NATS = "nats://127.0.0.1:4222"


def add_parser(sub: Any) -> None:
    relay = sub.add_parser(
        "relay",
        help="deliver outbox messages to NATS JetStream",
        description="Deliver the outbox messages of databases in the sidecar's configuration "
        "to NATS JetStream, in order per aggregate, at least once (Nats-Msg-Id de-duplicates). "
        "Run one per pod: only the holder of each shard's advisory lock delivers.",
    )
    relay.add_argument("--config", metavar="FILE", help="the sidecar's YAML or JSON configuration")
    relay.add_argument("--database", action="append", required=True, metavar="NAME",
                       help="a logical database whose outbox to deliver (repeatable)")  # fmt: skip
    relay.add_argument("--nats", default=os.environ.get("DBSIDECAR_RELAY_NATS", DEFAULT_NATS),
                       metavar="URL", help=f"the broker (default $DBSIDECAR_RELAY_NATS or "
                       f"{DEFAULT_NATS})")  # fmt: skip
    relay.add_argument("--batch", type=int, default=200, help="messages per batch (default 200)")
    relay.add_argument("--max-backoff", type=float, default=2.0, metavar="SECONDS",
                       help="longest wait between retries while publishing fails "
                       "(default 2)")  # fmt: skip
    relay.add_argument("--metrics-host", default="0.0.0.0", help="metrics listener (default "
                       "all interfaces, for Prometheus)")  # fmt: skip
    relay.add_argument("--metrics-port", type=int, default=9433, help="default 9433")
    relay.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    relay.set_defaults(func=cmd_relay)


def cmd_relay(args: argparse.Namespace) -> int:
    try:
        # The NATS client is the `relay` extra: the sidecar itself never needs it.
        from prometheus_client import CollectorRegistry, start_http_server

        from . import relay
    except ImportError as exc:
        print(f"dbsidecar relay: {exc}; install it with pip install 'dbsidecar[relay]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dbsidecar relay: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level, settings.logging.format)
    options = relay.RelayOptions(args.nats, batch=args.batch, max_backoff=args.max_backoff)
    registry = CollectorRegistry()
    metrics = relay.RelayMetrics(registry)
    broker = relay.Broker(options)
    try:
        loops = [
            loop
            for name in args.database
            for loop in relay.shard_relays(settings, name, broker, options, metrics)
        ]
    except ValueError as exc:
        print(f"dbsidecar relay: {exc}", file=sys.stderr)
        return 2
    start_http_server(args.metrics_port, args.metrics_host, registry=registry)
    print(f"relay: metrics on http://{args.metrics_host}:{args.metrics_port}/metrics", flush=True)
    return asyncio.run(_serve(loops, broker))


async def _serve(loops: list[Any], broker: Any) -> int:
    """Run every shard's loop until SIGTERM or SIGINT; exit 0 (messages not yet deleted
    are delivered again by the next leader, and de-duplicated by the broker)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(r.run(), name=f"relay {r.database}/{r.shard}") for r in loops]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await broker.close()
    failed = [t for t in done if t is not stopped and t.exception() is not None]
    for task in failed:
        print(f"dbsidecar relay: {task.get_name()} failed: {task.exception()!r}", file=sys.stderr)
    return 1 if failed else 0
