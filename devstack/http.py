"""A plain HTTP GET that answers error statuses instead of raising them (probes, /metrics)."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
