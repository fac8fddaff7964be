"""What an attacker needs: raw HTTP against the data plane and the sidecar's memory.

Every attack talks plain HTTP (never the client library, which would refuse or fix
up hostile input) and reads the truth straight from PostgreSQL afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp


async def post(url: str, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
    """POST a JSON body (or raw bytes/a generator via ``data=``); the status and the
    decoded JSON answer (None when the answer is not JSON)."""
    async with aiohttp.ClientSession() as http:
        if body is not None:
            kwargs["json"] = body
        async with http.post(url + path, **kwargs) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, None


async def query(url: str, plan: dict[str, Any]) -> tuple[int, Any]:
    return await post(url, "/v1/query", plan)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
