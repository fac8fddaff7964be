"""`dbsidecar relay`: the outbox relay as a process (see sidecar.relay)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from . import logs
from .settings import ConfigError, load_settings

if TYPE_CHECKING:
    from .relay import RelayOptions, Sink

DEFAULT_NATS = "nats://127.0.0.1:4222"
# Seconds one send may take by default: JetStream acknowledges at once, a webhook's
# receiver may do some work before it answers.
NATS_TIMEOUT = 2.0
WEBHOOK_TIMEOUT = 10.0
HEADERS_ENV = "DBSIDECAR_RELAY_WEBHOOK_HEADERS"


def add_parser(sub: Any) -> None:
    relay = sub.add_parser(
        "relay",
        help="deliver outbox messages to NATS JetStream or an HTTP webhook",
        description="Deliver the outbox messages of databases in the sidecar's configuration "
        "to NATS JetStream or an HTTP webhook, in order per aggregate, at least once (the "
        "message id, as Nats-Msg-Id or Idempotency-Key, de-duplicates). Run one per pod: only "
        "the holder of each shard's advisory lock delivers.",
    )
    relay.add_argument("--config", metavar="FILE", help="the sidecar's YAML or JSON configuration")
    relay.add_argument("--database", action="append", required=True, metavar="NAME",
                       help="a logical database whose outbox to deliver (repeatable)")  # fmt: skip
    sink = relay.add_mutually_exclusive_group()
    sink.add_argument("--nats", metavar="URL", help="publish to this NATS server's JetStream "
                      f"(default $DBSIDECAR_RELAY_NATS, or {DEFAULT_NATS} when no webhook is "
                      "given)")  # fmt: skip
    sink.add_argument("--webhook", metavar="URL", help="POST each message to this http(s) URL "
                      "instead (default $DBSIDECAR_RELAY_WEBHOOK)")  # fmt: skip
    relay.add_argument("--webhook-header", action="append", default=[], type=_header,
                       metavar="'NAME: VALUE'", help="a header of every webhook request, e.g. "
                       "an Authorization (repeatable; its value is never logged). Secrets "
                       f"belong in ${HEADERS_ENV} instead (one 'NAME: VALUE' per line): a "
                       "command line is visible to every process")  # fmt: skip
    relay.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="how long one "
                       f"delivery may take (default {NATS_TIMEOUT:g} for NATS, "
                       f"{WEBHOOK_TIMEOUT:g} for a webhook)")  # fmt: skip
    relay.add_argument("--batch", type=int, default=200, help="messages per batch (default 200)")
    relay.add_argument("--max-backoff", type=float, default=2.0, metavar="SECONDS",
                       help="longest wait between retries while delivering fails "
                       "(default 2)")  # fmt: skip
    relay.add_argument("--metrics-host", default="0.0.0.0", help="metrics listener (default "
                       "all interfaces, for Prometheus)")  # fmt: skip
    relay.add_argument("--metrics-port", type=int, default=9433, help="default 9433")
    relay.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    relay.set_defaults(func=cmd_relay)


def _header(text: str) -> tuple[str, str]:
    from .relay_webhook import parse_header

    try:
        return parse_header(text)
    except ValueError as exc:
        # argparse quotes the value of a ValueError, but only the message of this one.
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_headers() -> list[tuple[str, str]]:
    """The webhook headers of ``$DBSIDECAR_RELAY_WEBHOOK_HEADERS``, one per line (from a
    Kubernetes Secret, say): unlike the command line, no other process can read them."""
    from .relay_webhook import parse_header

    lines = [line for line in os.environ.get(HEADERS_ENV, "").splitlines() if line.strip()]
    headers = []
    for number, line in enumerate(lines, 1):
        try:
            headers.append(parse_header(line))
        except ValueError as exc:
            # The message names the problem, never the value (it is a secret).
            raise ValueError(f"${HEADERS_ENV}, line {number}: {exc}") from None
    return headers


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # aiohttp takes 0 as no timeout at all
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(``nats`` or ``webhook``, URL): the command line's choice, else the environment's,
    else NATS on the default URL (as before there were webhooks)."""
    if args.webhook:
        return "webhook", args.webhook
    if args.nats:
        return "nats", args.nats
    nats_url = os.environ.get("DBSIDECAR_RELAY_NATS")
    webhook = os.environ.get("DBSIDECAR_RELAY_WEBHOOK")
    if nats_url and webhook:
        raise ValueError("both $DBSIDECAR_RELAY_NATS and $DBSIDECAR_RELAY_WEBHOOK are set: "
                         "choose with --nats or --webhook")  # fmt: skip
    return ("webhook", webhook) if webhook else ("nats", nats_url or DEFAULT_NATS)


def cmd_relay(args: argparse.Namespace) -> int:
    # Imported here: no other command needs the relay's modules.
    from prometheus_client import CollectorRegistry, start_http_server

    from . import relay

    try:
        kind, url = _target(args)
        headers = [*args.webhook_header, *_env_headers()]
        if kind == "nats" and headers:
            raise ValueError(f"--webhook-header and ${HEADERS_ENV} go with --webhook")
    except ValueError as exc:
        print(f"dbsidecar relay: {exc}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dbsidecar relay: invalid configuration: {exc}", file=sys.stderr)
        return 2
    for secret in settings.secrets():
        logs.register_secret(secret)
    logs.setup(args.log_level, settings.logging.format)
    timeout = args.timeout or (NATS_TIMEOUT if kind == "nats" else WEBHOOK_TIMEOUT)
    options = relay.RelayOptions(
        batch=args.batch, publish_timeout=timeout, max_backoff=args.max_backoff
    )
    registry = CollectorRegistry()
    metrics = relay.RelayMetrics(registry)
    try:
        sink = _sink(kind, url, headers, options)
        loops = [
            loop
            for name in args.database
            for loop in relay.shard_relays(settings, name, sink, options, metrics)
        ]
    except ImportError as exc:
        print(f"dbsidecar relay: {exc}; install it with pip install 'dbsidecar[relay]'",
              file=sys.stderr)  # fmt: skip
        return 2
    except (ValueError, ConfigError) as exc:
        # ConfigError: a node's password_env that is not set (read when connecting).
        print(f"dbsidecar relay: {exc}", file=sys.stderr)
        return 2
    start_http_server(args.metrics_port, args.metrics_host, registry=registry)
    print(f"relay: metrics on http://{args.metrics_host}:{args.metrics_port}/metrics", flush=True)
    return asyncio.run(_serve(loops, sink))


def _sink(kind: str, url: str, headers: list[tuple[str, str]], options: RelayOptions) -> Sink:
    """The sink; a ValueError for a URL it cannot use (which never quotes the URL: it may
    hold a token), an ImportError without the NATS client."""
    if kind == "nats":
        # The NATS client is the `relay` extra: the sidecar itself never needs it.
        from .relay_nats import NatsSink

        return NatsSink(url, options.publish_timeout, reconnect_wait=options.min_wait * 10)
    from .relay_webhook import WebhookSink

    return WebhookSink(url, headers, options.publish_timeout)


async def _serve(loops: list[Any], sink: Sink) -> int:
    """Run every shard's loop until SIGTERM or SIGINT; exit 0 (messages not yet deleted
    are delivered again by the next leader, and de-duplicated by the receiver)."""
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
    await sink.close()
    failed = [t for t in done if t is not stopped and t.exception() is not None]
    for task in failed:
        print(f"dbsidecar relay: {task.get_name()} failed: {task.exception()!r}", file=sys.stderr)
    return 1 if failed else 0
