"""A real etcd (Debian's etcd-server, installed by .ci/run) on free loopback ports, for the
registry and Patroni tests; and a TCP proxy in front of it that a test can cut.

The test talks to etcd through its JSON gateway (``/v3/...``) with urllib, not through the
client under test, so a fault in the sidecar's client cannot hide in the test's own setup.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from devstack.ports import free_ports
from devstack.waiting import wait_until

ETCD = "etcd"


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


class Certificates:
    """A throwaway CA and a server and client certificate signed by it (openssl)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"

    def create(self) -> Certificates:
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = self.dir / "ca.key"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                      "/CN=dbsidecar test CA", "-keyout", ca_key, "-out", self.ca)  # fmt: skip
        for name, cert, key, usage in (
            # etcd's JSON gateway dials its own gRPC port with the server certificate.
            ("127.0.0.1", self.server_cert, self.server_key, "serverAuth,clientAuth"),
            ("root", self.client_cert, self.client_key, "clientAuth"),
        ):
            request = self.dir / f"{name}.csr"
            extensions = self.dir / f"{name}.ext"
            extensions.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
            self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                          "-keyout", key, "-out", request)  # fmt: skip
            self._openssl("x509", "-req", "-in", request, "-CA", self.ca, "-CAkey", ca_key,
                          "-CAcreateserial", "-days", "1", "-extfile", extensions,
                          "-out", cert)  # fmt: skip
        return self

    @staticmethod
    def _openssl(*args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


class EtcdServer:
    """One etcd member; ``start()`` then ``stop()`` (also when the test failed)."""

    def __init__(self, workdir: Path, tls: Certificates | None = None) -> None:
        if shutil.which(ETCD) is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server (.ci/run does)")
        self.workdir = workdir
        self.tls = tls
        self.port, self.peer_port = free_ports(2)
        self.scheme = "https" if tls else "http"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"etcd-{self.port}.log"
        # The gateway's auth token once auth is enabled.
        self._token: str | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD, "--name", "test", "--data-dir", str(self.workdir / f"etcd-{self.port}"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.server_cert), "--key-file",
                     str(self.tls.server_key), "--trusted-ca-file", str(self.tls.ca),
                     "--client-cert-auth"]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._healthy, 30, f"etcd on {self.endpoint}", interval=0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited ({self.proc.returncode}): {self.log_path}")
        try:
            return json.loads(self._http("GET", "/health"))["health"] == "true"
        except OSError:
            return False

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return context

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = self._token
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10, context=self._context()) as resp:
            return resp.read()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gRPC-gateway call (``/v3/kv/put`` ...); etcd errors raise."""
        answer = json.loads(self._http("POST", path, body))
        if "error" in answer:
            raise RuntimeError(f"etcd {path}: {answer['error']}")
        return answer

    def put(self, key: str, value: str) -> int:
        """Write a key; the store's revision after it."""
        answer = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})

    def get(self, key: str) -> str | None:
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": revision, "physical": True})

    def enable_auth(self, password: str) -> None:
        """A root user with this password, and authentication on: from now on every
        request needs a token (the test's own too)."""
        self.call("/v3/auth/user/add", {"name": "root", "password": password})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})
        answer = self.call("/v3/auth/authenticate", {"name": "root", "password": password})
        self._token = answer["token"]


class CuttableProxy:
    """A TCP proxy: while cut, it drops every connection and refuses new ones."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listen_port = 0
        self.cut_off = False
        self._links: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_off = True
        for writer in self._links:
            writer.transport.abort()
        self._links = []

    def restore(self) -> None:
        self.cut_off = False

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.transport.abort()
            return
        self._links += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
