"""`dbsidecar sagas`: the unfinished sagas of an orchestrator's log, for people.

It reads ``dbsidecar_sagas`` (written by the client's ``client.saga`` orchestrators) with a
read-only raw plan through a running sidecar's data API, like any service would: the
sidecar never imports the client, and needs no database credentials here. One line per
saga: id, name, state (``stuck`` once its compensation kept failing), the step it is at,
failed attempts at that step, age, the orchestrator holding it (``-`` when none does or
its lease expired: the next ``resume()`` anywhere takes it) and the last error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import msgspec

from wire.protocol import ErrorEnvelope, Raw, Result, Route
from wire.values import row_converters

DEFAULT_URL = "http://127.0.0.1:7432"
# Columns in the order they print; the SQL computes ages and lease expiry on the database's
# clock, so a pod's clock skew cannot make a held saga look free.
_SQL = """
SELECT id, name, state, step, jsonb_array_length(definition) AS steps,
       definition ->> greatest(step, 0) AS step_name, attempts,
       extract(epoch FROM now() - created_at)::float8 AS age,
       CASE WHEN lease_until > now() THEN owner END AS owner,
       stuck_since IS NOT NULL AS stuck, coalesce(last_error, error) AS error
FROM dbsidecar_sagas {where}
ORDER BY created_at LIMIT $1::int
"""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the sidecar's Unix socket (``unix:///path/to.sock``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def fetch(url: str, token: str | None, database: str, everything: bool, limit: int) -> Result:
    """The log's rows through the sidecar at ``url`` (raises RuntimeError with the
    sidecar's error message when it refuses)."""
    where = "" if everything else "WHERE state IN ('running', 'compensating')"
    plan = Raw(
        database=database,
        sql=_SQL.format(where=where),
        params=[limit],
        writes=False,
        route=Route(role="primary"),
    )
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "unix":
        conn = _UnixConnection(parts.path, timeout=10)
    else:
        conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", "/v1/query", msgspec.json.encode(plan), headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        try:
            error = msgspec.json.decode(body, type=ErrorEnvelope).error
        except msgspec.DecodeError:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}") from None
        if error.code == "undefined_table":
            raise RuntimeError(
                f"no saga log in {database!r} (an orchestrator's install() creates it)"
            )
        raise RuntimeError(f"{error.code}: {error.message}")
    return msgspec.json.decode(body, type=Result)


def rows(result: Result) -> list[dict[str, Any]]:
    converters = row_converters(result.types)
    return [
        {
            col: conv(v) if conv is not None else v
            for col, conv, v in zip(result.columns, converters, raw, strict=True)
        }
        for raw in result.rows
    ]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# Control characters (C0, DEL, C1) and bidirectional overrides: in a saga's id, name,
# step, owner or error (whatever the services wrote) they would move the cursor, clear or
# retitle the operator's terminal, or make one line look like another.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", text
    )


def render(sagas: list[dict[str, Any]]) -> str:
    if not sagas:
        return "no unfinished sagas"
    header = ("ID", "NAME", "STATE", "STEP", "ATTEMPTS", "AGE", "OWNER", "ERROR")
    lines = [header]
    for s in sagas:
        state = "stuck" if s["stuck"] and s["state"] == "compensating" else s["state"]
        if s["state"] in ("completed", "compensated"):
            step = "-"
        else:
            step = f"{s['step'] + 1}/{s['steps']} {s['step_name'] or ''}".rstrip()
        error = _printable((s["error"] or "").replace("\n", " "))
        cells = (s["id"], s["name"], state, step, str(s["attempts"]), _age(s["age"]),
                 s["owner"] or "-")  # fmt: skip
        lines.append((*(_printable(c) for c in cells), error[:80]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )


def cmd_sagas(args: argparse.Namespace) -> int:
    try:
        result = fetch(args.url, args.token, args.database, args.all, args.limit)
    except (OSError, http.client.HTTPException) as exc:
        print(f"dbsidecar sagas: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"dbsidecar sagas: {exc}", file=sys.stderr)
        return 1
    sagas = rows(result)
    if args.json:
        print(json.dumps(sagas, indent=2, default=str))
    else:
        print(render(sagas))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``dbsidecar sagas``: hook it into the command's subparsers."""
    p = subparsers.add_parser(
        "sagas",
        help="list the unfinished sagas of an orchestrator's log",
        description="Read dbsidecar_sagas through a running sidecar's data API and print "
        "the sagas still running or compensating.",
    )
    p.add_argument("--database", required=True, help="the logical database holding the log")
    p.add_argument("--url", default=os.environ.get("DBSIDECAR_URL", DEFAULT_URL),
                   help=f"the sidecar's data API, http://host:port or unix:///path "
                   f"(default $DBSIDECAR_URL or {DEFAULT_URL})")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("DBSIDECAR_TOKEN"),
                   help="bearer token (default $DBSIDECAR_TOKEN)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="finished sagas too")
    p.add_argument("--limit", type=int, default=100, help="at most this many (oldest first)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sagas)
    return p
