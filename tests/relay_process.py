"""A `dbsidecar relay` child process on a free metrics port, for the tests that need
one (the relay's own tests, the example shop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from devstack.sidecar_process import REPO

from .harness import SIDECAR_LOGS, SidecarProcess, free_port, samples, wait_until


class Relay:
    """A `dbsidecar relay` child process; its log joins the session's secret scan.
    ``url`` is the NATS server's, or with ``sink="webhook"`` the webhook's; ``options``
    are more of the command's arguments."""

    def __init__(
        self,
        sidecar: SidecarProcess,
        url: str,
        workdir: Path,
        database: str,
        batch: int = 100,
        *,
        sink: Literal["nats", "webhook"] = "nats",
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.metrics_port = free_port()
        self.log_path = workdir / f"relay-{self.metrics_port}.log"
        SIDECAR_LOGS.append(self.log_path)
        argv = [sys.executable, "-m", "sidecar.cli", "relay", "--config",
                str(sidecar.config_path), "--database", database, f"--{sink}", url,
                "--batch", str(batch), "--max-backoff", "0.5", "--metrics-host", "127.0.0.1",
                "--metrics-port", str(self.metrics_port), *options]  # fmt: skip
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=environment,
            )  # fmt: skip
        wait_until(self._serving, 30, "the relay's metrics endpoint")

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited: {self.log_path.read_text()[-2000:]}")
        try:
            return bool(samples(self.ops, "dbsidecar_relay_leader"))
        except OSError:
            return False

    def metric(self, name: str) -> float:
        return sum(v for _, v in samples(self.ops, name))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)
