"""What the benchmark runs against: the dev topology, its data, a sidecar and a pgbouncer.

Every process here is our child and is stopped by :meth:`Stack.stop`, which is safe to call
at any point of a failed start. The sidecar and pgbouncer get their own process groups, so
a Ctrl-C reaches only us and they are stopped in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import asyncpg

from devstack.ports import HOST, free_port
from devstack.postgres import LocalTopology
from devstack.sidecar_process import SidecarProcess
from devstack.topology import USER_SHARDS, sidecar_config
from devstack.waiting import wait_until

ORDERS_ROWS = 10_000
USERS_ROWS = 10_000  # 2,500 per shard
POOL_SIZE = 10

Log = Callable[[str], None]


def _stop_child(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def load_data(topo: LocalTopology) -> None:
    """orders (10k rows) in ``orders``; users (2.5k rows each, id % 4 == i) in each shard."""

    async def connect(db: str) -> asyncpg.Connection:
        return await asyncpg.connect(topo.primary.dsn(db, topo.user, topo.password))

    conn = await connect("orders")
    try:
        await conn.execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int, status text, "
            "amount numeric)"
        )
        await conn.execute(
            "INSERT INTO orders (user_id, status, amount) SELECT g % 1000, "
            "(ARRAY['new','paid','shipped'])[1 + g % 3], (g % 500) + 0.25 "
            "FROM generate_series(1, $1) g",
            ORDERS_ROWS,
        )
        await conn.execute("ANALYZE orders")
    finally:
        await conn.close()

    async def shard(i: int, name: str) -> None:
        conn = await connect(name)
        try:
            await conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text, score int)")
            await conn.execute(
                "INSERT INTO users SELECT g, 'user-' || g, (g * 7919) % 100000 "
                "FROM generate_series(0, $1 - 1) g WHERE g % 4 = $2",
                USERS_ROWS,
                i,
            )
            await conn.execute("CREATE INDEX users_score ON users (score DESC, id)")
            await conn.execute("ANALYZE users")
        finally:
            await conn.close()

    await asyncio.gather(*(shard(i, name) for i, name in enumerate(USER_SHARDS)))


def bench_sidecar(topo: LocalTopology, workdir: Path) -> SidecarProcess:
    """A sidecar (not started yet) on the dev configuration with the benchmark's pool sizes,
    serving TCP and a Unix socket."""
    config = sidecar_config(topo, workdir)
    for db in config["databases"].values():
        db["pool"] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
    return SidecarProcess(config, workdir, log_level="warning")


class PgBouncer:
    """pgbouncer in transaction mode in front of the primary (orders and the user shards)."""

    def __init__(self, binary: str, topo: LocalTopology, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.run_as = topo.run_as
        self.dir = workdir / "pgbouncer"
        self.dir.mkdir()
        dbs = ["orders", *USER_SHARDS]
        lines = [
            "[databases]",
            *(f"{db} = host={HOST} port={topo.primary.port} dbname={db}" for db in dbs),
            "[pgbouncer]",
            f"listen_addr = {HOST}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.dir / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {POOL_SIZE}",
            "min_pool_size = 0",
            "max_client_conn = 500",
            "server_reset_query =",
            "ignore_startup_parameters = extra_float_digits",
            "log_connections = 0",
            "log_disconnections = 0",
        ]
        (self.dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.dir / "userlist.txt").write_text(f'"{topo.user}" "{topo.password}"\n')
        for path in (self.dir / "pgbouncer.ini", self.dir / "userlist.txt"):
            path.chmod(0o600)
        self.log_path = workdir / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def version(self) -> str:
        """'1.18.0' (its --version says 'PgBouncer 1.18.0' and more lines)."""
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        if out.returncode != 0:
            return "?"
        first = (out.stdout or out.stderr).strip().splitlines()[0]
        return first.removeprefix("PgBouncer").strip() or first

    def start(self, timeout: float = 15.0) -> None:
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            # pgbouncer refuses to run as root: the servers' unprivileged user runs it.
            entry = pwd.getpwnam(self.run_as)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(self.dir.parent, 0o711)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, str(self.dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            process_group=0,
            **kwargs,
        )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                text = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{text}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout, "pgbouncer to listen", interval=0.05)

    def dsn(self, db: str, user: str, password: str) -> str:
        return f"postgresql://{user}:{password}@{HOST}:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT waits for clients; SIGTERM is pgbouncer's immediate shutdown.
            _stop_child(self.proc, signal.SIGTERM, 10.0)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class Stack:
    """The topology, its data, the sidecar and (when installed) pgbouncer."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="dbsidecar-bench-"))
        self.topo: LocalTopology | None = None
        self.sidecar: SidecarProcess | None = None
        self.pgbouncer: PgBouncer | None = None
        self.pgbouncer_binary = shutil.which("pgbouncer")

    def start(self) -> None:
        began = time.monotonic()
        # The dev setup: the replica streams, as in `dbsidecar dev` (the sidecar probes it).
        self.topo = LocalTopology(replica=True, log=self.log)
        self.topo.start()
        asyncio.run(load_data(self.topo))
        self.log(f"bench: data loaded ({time.monotonic() - began:.1f} s)")
        self.sidecar = bench_sidecar(self.topo, self.workdir)
        self.sidecar.start(timeout=60.0)
        self.log(f"bench: sidecar ready on {self.sidecar.url} and {self.sidecar.uds_url}")
        if self.pgbouncer_binary:
            self.pgbouncer = PgBouncer(self.pgbouncer_binary, self.topo, self.workdir)
            self.pgbouncer.start()
            self.log(f"bench: pgbouncer ready on {HOST}:{self.pgbouncer.port}")
        else:
            self.log("bench: pgbouncer not installed (apt-get install pgbouncer); skipping it")

    def stop(self) -> None:
        """Stop whatever was started, in reverse order; never raises for a missing piece."""
        try:
            if self.pgbouncer is not None:
                self.pgbouncer.stop()
        finally:
            try:
                if self.sidecar is not None:
                    code = self.sidecar.terminate()
                    if code != 0:
                        self.log(f"bench: sidecar exited with {code}; log: {self.sidecar.log()}")
            finally:
                try:
                    if self.topo is not None:
                        self.topo.stop()
                finally:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def dsn(self, db: str) -> str:
        assert self.topo is not None
        return self.topo.primary.dsn(db, self.topo.user, self.topo.password)

    def postmaster_pids(self) -> list[int | None]:
        assert self.topo is not None
        return [server.pid for server in self.topo.servers]
