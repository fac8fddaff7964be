"""What an attacker needs: raw HTTP against the data plane and the sidecar's memory.

Every attack talks plain HTTP (never the client library, which would refuse or fix
up hostile input) and reads the truth straight from PostgreSQL afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class Proxy:
    """A TCP proxy in front of the sidecar whose connections the test cuts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.links: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.links += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every connection through the proxy (it keeps accepting new ones)."""
        for writer in self.links:
            writer.transport.abort()
        self.links = []
