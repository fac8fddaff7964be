"""The example shop's services as real processes (``python -m examples.shop NAME``) on
free loopback ports, talking to the session's sidecar; every one is stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import aiohttp

from devstack.http import http_get
from devstack.ports import HOST, free_port
from devstack.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess:
    def __init__(
        self, name: str, sidecar_url: str, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.env = env or {}
        self.sidecar_url = sidecar_url
        self.port = free_port()
        self.log_path = workdir / f"shop-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it answers (its start runs its migrations)."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.shop", self.name, "--port", str(self.port),
             "--sidecar", self.sidecar_url],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, process_group=0,
        )  # fmt: skip

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(self.url + "/livez", 0.5)[0] == 200
            except OSError:
                return False

        wait_until(up, timeout, f"the {self.name} service to start")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """kill -9: no cleanup, no lifespan shutdown, whatever it was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, await resp.json()
