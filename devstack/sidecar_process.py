"""`dbsidecar run` in a child process with a given configuration document.

The tests and the benchmark start their sidecars here. The child gets its own process group,
so a Ctrl-C reaches only its parent, which stops it in order (before the databases it uses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import yaml

from .http import http_get
from .ports import HOST
from .waiting import wait_until

# The checkout this package belongs to: the child runs its `sidecar`, not another install's.
REPO = Path(__file__).resolve().parent.parent


class SidecarProcess:
    """One sidecar child: its configuration file and log live in ``workdir`` under ``name``."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        name: str = "sidecar",
        log_level: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.port = config["listen"].get("port")
        self.ops_port = config["ops"]["port"]
        self.uds = config["listen"].get("uds")
        self.log_level = log_level
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # It holds the databases' passwords.
        self.config_path.chmod(0o600)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def uds_url(self) -> str:
        return f"unix://{self.uds}"

    @property
    def ops(self) -> str:
        return f"http://{HOST}:{self.ops_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the child and wait until its /startupz answers 200 (TimeoutError if not)."""
        self._log = self.log_path.open("ab")
        argv = [sys.executable, "-m", "sidecar.cli", "run", "--config", str(self.config_path)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            process_group=0,
        )

        def started() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(self.ops + "/startupz", 0.5)[0] == 200
            except OSError:
                return False

        wait_until(started, timeout, "the sidecar to start")

    def log(self) -> str:
        """The end of the child's log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the sidecar drains, then exits 0), SIGKILL after ``timeout``; the exit code."""
        code = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
