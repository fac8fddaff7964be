"""Attacks on the data plane's transport: bodies, headers, slow clients, nesting, auth.

- A 300 MB chunked body (on the hot path and on the Starlette routes) is refused with
  413 ``body_too_large`` while it arrives: the sidecar's peak RSS grows by far less than
  the body, the connection closes, and PostgreSQL shows nothing of it ran.
- A Content-Length that lies (a small one followed by 300 MB) frames the body by what
  it declared; the rest is refused, never buffered.
- A request line or header block beyond ``limits.max_header_bytes`` (one endless
  header line, an endless URL, thousands of small headers) is answered 431 and the
  connection closed; the sidecar then serves a normal query.
- Slowloris: connections that send nothing, dribble their headers a byte at a time or
  stall mid-body are closed within the request read deadline, while a normal request
  is served meanwhile; beyond the connection bound new requests get 503.
- JSON nested 5000 levels deep is a 400 ``plan_too_complex`` on every plan route, not
  a 500 (msgspec's decoder raises RecursionError).
- ``Authorization: bearer <token>`` (any case of the scheme, RFC 7235) is accepted;
  a wrong token or scheme is still a 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidecar.http_protocol import MAX_CONCURRENCY, READ_TIMEOUT

from ..conftest import sidecar_config
from ..harness import SidecarProcess, eventually
from .attack import post, query, rss_bytes

MiB = 1024 * 1024
HUGE = 300 * MiB
# Peak growth allowed while a huge body or header is refused: the 8 MiB body limit,
# its copy, one read buffer and the allocator's slack; far below the 300 MB sent.
PEAK_GROWTH = 64 * MiB
# A user_id no other test writes: refused requests must not have inserted anything.
MARK = 910_310
SELECT = {"op": "select", "database": "orders", "table": "orders", "limit": 1}
INSERT = {
    "op": "insert",
    "database": "orders",
    "table": "orders",
    "rows": [{"user_id": MARK, "status": "smuggled"}],
}


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """HTTP/1.1 on a plain socket, for framing aiohttp will not send. Sending and
    receiving are independent: a send that fails because the server hung up never
    loses what the server answered first (a stream transport would drop it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.received = b""

    @classmethod
    async def open(cls, sidecar: SidecarProcess) -> Raw:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sidecar.port))
        return cls(sock)

    async def send(self, pieces: Iterable[bytes]) -> None:
        """Send lazily, stopping quietly when the server hangs up."""
        with contextlib.suppress(OSError):
            for piece in pieces:
                await self.loop.sock_sendall(self.sock, piece)

    async def _recv(self) -> bytes:
        try:
            chunk = await self.loop.sock_recv(self.sock, 65536)
        except ConnectionError:
            return b""
        self.received += chunk
        return chunk

    async def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.received:
            assert await self._recv(), f"closed without an answer: {self.received[:200]!r}"
        head, _, rest = self.received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = await self._recv()
            assert chunk, "closed in the middle of the answer"
            rest += chunk
        return Answer(int(lines[0].split(" ")[1]), headers, rest[:length])

    async def eof(self) -> bytes:
        """Everything received until the server closes the connection."""
        while await self._recv():
            pass
        return self.received

    def close(self) -> None:
        self.sock.close()


async def _exchange(
    sidecar: SidecarProcess, pieces: Iterable[bytes], closes: bool = False
) -> Answer:
    """Send ``pieces`` while reading; stop sending once the server answers. ``closes``:
    also wait for the server to close the connection."""
    conn = await Raw.open(sidecar)
    sender = asyncio.create_task(conn.send(pieces))
    try:
        answer = await conn.answer()
        if closes:
            await conn.eof()
        return answer
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        conn.close()


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: sidecar", "content-type: application/json"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


def _chunked(prefix: bytes, padding: int, suffix: bytes) -> Iterator[bytes]:
    """A chunked body: ``prefix``, ``padding`` bytes of JSON whitespace, ``suffix``."""
    blank = b" " * MiB
    yield b"%x\r\n%s\r\n" % (len(prefix), prefix)
    for _ in range(padding // MiB):
        yield b"%x\r\n%s\r\n" % (len(blank), blank)
    yield b"%x\r\n%s\r\n0\r\n\r\n" % (len(suffix), suffix)


def _reset_peak(pid: int) -> int:
    """Reset the process's RSS high-water mark (VmHWM); returns the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_bytes(pid)


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@pytest.fixture
async def unmarked(primary: asyncpg.Connection) -> AsyncIterator[None]:
    await primary.execute("DELETE FROM orders WHERE user_id = $1", MARK)
    yield
    await primary.execute("DELETE FROM orders WHERE user_id = $1", MARK)


async def _healthy(sidecar: SidecarProcess) -> None:
    assert sidecar.proc is not None and sidecar.proc.poll() is None
    status, body = await query(sidecar.url, SELECT)
    assert status == 200, body


# Bodies
BODIES = {
    "/v1/query": (json.dumps(INSERT).encode()[:-1], b"}"),
    "/v1/bundle": (b'{"plans": [' + json.dumps(INSERT).encode(), b"]}"),
    "/v1/batch": (b'{"plans": [' + json.dumps(INSERT).encode(), b"]}"),
    "/v1/tx": (b'{"database": "orders"', b"}"),
    "/v1/admin/reload": (b"{", b"}"),
}


@pytest.mark.parametrize("path", list(BODIES))
async def test_huge_chunked_body_is_refused_while_it_arrives(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None, path: str
) -> None:
    assert sidecar.proc is not None
    before = _reset_peak(sidecar.proc.pid)
    prefix, suffix = BODIES[path]
    head = _head(path, "transfer-encoding: chunked")
    answer = await _exchange(sidecar, itertools.chain([head], _chunked(prefix, HUGE, suffix)))
    grown = _peak(sidecar.proc.pid) - before
    assert answer.status == 413, answer.body
    assert answer.json()["error"]["code"] == "body_too_large"
    assert grown < PEAK_GROWTH, f"peak RSS grew by {grown / MiB:.0f} MiB for a refused body"
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", MARK) == 0
    await _healthy(sidecar)


async def test_a_lying_content_length_frames_the_body_and_buffers_nothing_more(
    sidecar: SidecarProcess, primary: asyncpg.Connection, unmarked: None
) -> None:
    assert sidecar.proc is not None
    before = _reset_peak(sidecar.proc.pid)
    plan = json.dumps(INSERT).encode()
    # Claims a short body, then keeps sending: what follows the declared length is
    # read as the next request, which is garbage and refused, never a body.
    blank = b" " * MiB
    pieces = [_head("/v1/batch", "content-length: 16"), plan, *([blank] * (HUGE // MiB))]
    answer = await _exchange(sidecar, pieces)
    grown = _peak(sidecar.proc.pid) - before
    # The 16 bytes are a bad plan (JSON 400) unless the parser refuses what follows
    # them first (uvicorn's plain 400); either way nothing more is read as a body.
    assert answer.status == 400, answer.body
    assert grown < PEAK_GROWTH, f"peak RSS grew by {grown / MiB:.0f} MiB"
    assert await primary.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", MARK) == 0
    await _healthy(sidecar)


async def test_a_declared_length_beyond_the_limit_is_refused_before_reading(
    sidecar: SidecarProcess,
) -> None:
    answer = await _exchange(sidecar, [_head("/v1/tx", f"content-length: {HUGE}"), b"{"])
    assert answer.status == 413, answer.body
    assert answer.json()["error"]["code"] == "body_too_large"


# Headers
def _endless(prefix: bytes, size: int, suffix: bytes) -> Iterator[bytes]:
    yield prefix
    filler = b"a" * MiB
    for _ in range(size // MiB):
        yield filler
    yield suffix


HEADERS = {
    "one endless line": lambda: _endless(
        b"POST /v1/query HTTP/1.1\r\nhost: sidecar\r\nx-pad: ", 100 * MiB, b"\r\n\r\n"
    ),
    "an endless url": lambda: _endless(
        b"POST /v1/query?", 100 * MiB, b" HTTP/1.1\r\nhost: sidecar\r\n\r\n"
    ),
    "thousands of headers": lambda: [
        _head("/v1/query", *(f"x-pad-{i}: {'b' * 40}" for i in range(5000)))
    ],
}


@pytest.mark.parametrize("shape", list(HEADERS))
async def test_headers_beyond_the_limit_are_refused(sidecar: SidecarProcess, shape: str) -> None:
    assert sidecar.proc is not None
    before = _reset_peak(sidecar.proc.pid)
    answer = await _exchange(sidecar, HEADERS[shape](), closes=True)
    grown = _peak(sidecar.proc.pid) - before
    assert answer.status == 431, answer.body
    assert answer.json()["error"]["code"] == "headers_too_large"
    assert answer.headers.get("connection") == "close"
    assert grown < PEAK_GROWTH, f"peak RSS grew by {grown / MiB:.0f} MiB for refused headers"
    await _healthy(sidecar)


async def test_headers_within_the_limit_are_served(sidecar: SidecarProcess) -> None:
    limit = 64 * 1024  # limits.max_header_bytes of the session sidecar (the default)
    plan = json.dumps(SELECT).encode()
    pad = "c" * (limit - 1024)
    head = _head("/v1/query", f"x-pad: {pad}", f"content-length: {len(plan)}", "connection: close")
    answer = await _exchange(sidecar, [head + plan])
    assert answer.status == 200, answer.body


# Slow clients
async def test_slow_requests_are_closed_by_the_read_deadline(sidecar: SidecarProcess) -> None:
    async def dribble(conn: Raw, data: bytes) -> None:
        # The attack's own pace: a byte every 100 ms, so no idle timer ever fires.
        with contextlib.suppress(OSError):
            for byte in data:
                await conn.loop.sock_sendall(conn.sock, bytes([byte]))
                await asyncio.sleep(0.1)

    silent = [await Raw.open(sidecar) for _ in range(5)]
    dribblers = [await Raw.open(sidecar) for _ in range(5)]
    stalled = [await Raw.open(sidecar) for _ in range(5)]
    endless_head = _head("/v1/query", "x-pad: " + "d" * 10_000)
    tasks = [asyncio.create_task(dribble(conn, endless_head)) for conn in dribblers]
    for conn in stalled:  # whole headers, then a body that never completes
        await conn.send([_head("/v1/query", "content-length: 1000") + b'{"op"'])
    connections = silent + dribblers + stalled
    try:
        await _healthy(sidecar)  # served while 15 slow connections are held
        # Each deadline started when its connection opened, before this wait.
        seen = await asyncio.wait_for(
            asyncio.gather(*(conn.eof() for conn in connections)), READ_TIMEOUT + 5
        )
    finally:
        for task in tasks:
            task.cancel()
        for conn in connections:
            conn.close()
    # Closed before any answer started: a 408; mid-body the application saw the client
    # go and the connection just closes.
    for received in seen[:10]:
        assert received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert b'"request_timeout"' in received
    await _healthy(sidecar)


async def test_connections_beyond_the_bound_are_answered_503(sidecar: SidecarProcess) -> None:
    held = [await Raw.open(sidecar) for _ in range(MAX_CONCURRENCY)]
    try:

        async def refused() -> bool:
            return (await query(sidecar.url, SELECT))[0] == 503

        await eventually(refused, 30, "a request beyond the connection bound to get 503")
    finally:
        for conn in held:
            conn.close()

    async def served() -> bool:
        return (await query(sidecar.url, SELECT))[0] == 200

    await eventually(served, 30, "requests to be served once the held connections closed")


# Nesting
def _deep_plan(levels: int) -> bytes:
    leaf = b'{"col": "id", "op": "=", "value": 1}'
    where = b'{"and": [' * levels + leaf + b"]}" * levels
    return b'{"op": "select", "database": "orders", "table": "orders", "where": ' + where + b"}"


@pytest.mark.parametrize("path", ["/v1/query", "/v1/batch", "/v1/bundle", "/v1/tx/{id}"])
async def test_deep_nesting_is_a_client_error(sidecar: SidecarProcess, path: str) -> None:
    plan = _deep_plan(5000)
    body = plan if path in ("/v1/query", "/v1/tx/{id}") else b'{"plans": [' + plan + b"]}"
    tx = None
    if "{id}" in path:
        status, opened = await post(sidecar.url, "/v1/tx", {"database": "orders"})
        assert status == 200, opened
        tx = opened["id"]
        path = path.format(id=tx)
    try:
        headers = {"content-type": "application/json"}
        status, answer = await post(sidecar.url, path, None, data=body, headers=headers)
    finally:
        if tx is not None:
            await post(sidecar.url, f"/v1/tx/{tx}/rollback", None)
    assert status == 400, answer
    assert answer["error"]["code"] == "plan_too_complex"
    await _healthy(sidecar)


# Authorization
@pytest.fixture(scope="module")
def guarded_sidecar(topology: Any, workdir: Path) -> Iterator[SidecarProcess]:
    """A sidecar of its own behind a bearer token (the session sidecar has none)."""
    config = sidecar_config(topology, workdir, "guarded")
    config["auth_token"] = "tok-" + topology.password[::-1] + "-guarded"
    proc = SidecarProcess(config, workdir, "guarded")
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.mark.parametrize(
    ("scheme", "right_token", "expected"),
    [
        ("Bearer", True, 200),
        ("bearer", True, 200),
        ("BEARER", True, 200),
        ("bEaReR", True, 200),
        ("Bearer", False, 401),
        ("bearer", False, 401),
        ("Basic", True, 401),
        ("", True, 401),
    ],
)
@pytest.mark.parametrize("path", ["/v1/query", "/v1/batch"])
async def test_the_bearer_scheme_is_case_insensitive(
    guarded_sidecar: SidecarProcess, scheme: str, right_token: bool, expected: int, path: str
) -> None:
    token = guarded_sidecar.config["auth_token"] if right_token else "tok-wrong"
    authorization = f"{scheme} {token}".strip()
    body = SELECT if path == "/v1/query" else {"plans": [SELECT]}
    status, answer = await post(
        guarded_sidecar.url, path, body, headers={"authorization": authorization}
    )
    assert status == expected, answer
    if expected == 401:
        assert answer["error"]["code"] == "unauthorized"
