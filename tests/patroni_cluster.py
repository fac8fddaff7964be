"""A real Patroni cluster (Patroni from PyPI, the test extra) on PostgreSQL's Debian binaries,
keeping its state in a real etcd, for the Patroni failover test.

PostgreSQL refuses root, so as root the members run as the devstack's unprivileged user. That
user cannot reach this interpreter when it lives under /root (mode 0700, as pyenv installs
it), and Patroni starts every postmaster through a *spawned* Python (multiprocessing's spawn
context), so the members run on the system's Python of the same minor version, with copies
of the installed Patroni and its dependencies (its ``etcd3`` and ``psycopg3`` extras) in a
directory that user can read. Copies, not symlinks: a symlink into /root is no more
reachable than the file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

from devstack.ports import free_ports
from devstack.postgres import _alive, _run_as_user, _user_kwargs, find_pg_bin
from devstack.waiting import wait_until

PATRONI_EXTRAS = {"etcd3", "psycopg3"}
SUPERUSER = "postgres"


def _closure(root: str, extras: set[str]) -> list[importlib.metadata.Distribution]:
    """The installed distribution ``root`` with these extras, and everything it requires."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = importlib.metadata.distribution(name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


def _runtime(directory: Path, run_as: str | None) -> tuple[str, dict[str, str]]:
    """The interpreter and environment the members run with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PYTHON"))}
    if run_as is None:
        return sys.executable, env
    python = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    if python is None:
        raise RuntimeError(
            f"running as root, the Patroni members run as {run_as!r} on the system's Python "
            f"{sys.version_info.major}.{sys.version_info.minor} (/usr/bin), which is missing"
        )
    site = directory / "site"
    for dist in _closure("patroni", PATRONI_EXTRAS):
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or not source.is_file():
                continue  # console scripts live outside site-packages
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    env["PYTHONPATH"] = str(site)
    return python, env


class PatroniCluster:
    """``members`` Patroni members of scope ``scope`` on etcd at ``etcd``; ``start()``, then
    ``stop()`` (also when the test failed): every member and postmaster is stopped."""

    def __init__(self, etcd: str, scope: str = "pg", members: int = 2) -> None:
        self.etcd = etcd
        self.scope = scope
        self.run_as = _run_as_user()
        self.bin_dir = find_pg_bin()
        self.superuser_password = "su-" + os.urandom(9).hex()
        # On tmpfs when there: the clusters never wait on the disk.
        parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.base = Path(tempfile.mkdtemp(prefix="dbsidecar-patroni-", dir=parent))
        self.base.chmod(0o755)
        self.names = [f"m{i}" for i in range(members)]
        ports = free_ports(2 * members)
        self.pg_port = dict(zip(self.names, ports[:members], strict=True))
        self.api_port = dict(zip(self.names, ports[members:], strict=True))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.python, self.env = _runtime(self.base, self.run_as)

    def config_path(self, name: str) -> Path:
        return self.base / f"{name}.yml"

    def data_dir(self, name: str) -> Path:
        return self.base / name

    def _config(self, name: str) -> dict[str, Any]:
        password = self.superuser_password
        return {
            "scope": self.scope,
            "namespace": "/service/",
            "name": name,
            "log": {"level": "INFO", "dir": str(self.base / f"{name}-log")},
            "restapi": {
                "listen": f"127.0.0.1:{self.api_port[name]}",
                "connect_address": f"127.0.0.1:{self.api_port[name]}",
            },
            "etcd3": {"hosts": self.etcd},
            "bootstrap": {
                "dcs": {
                    # Tight timings, so a failover takes seconds: ttl 20 is Patroni 4's
                    # smallest (it raises a lower one); ttl >= loop_wait + 2 x retry_timeout.
                    "ttl": 20,
                    "loop_wait": 1,
                    "retry_timeout": 4,
                    # Fail over at once when the leader's postmaster dies instead of
                    # restarting it in place for up to 5 minutes.
                    "primary_start_timeout": 0,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {
                            "wal_log_hints": "on",
                            "max_connections": 100,
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "hot_standby": "on",
                            # A throwaway test cluster: no waiting on the disk.
                            "fsync": "off",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port[name]}",
                "connect_address": f"127.0.0.1:{self.pg_port[name]}",
                "data_dir": str(self.data_dir(name)),
                "bin_dir": str(self.bin_dir),
                "pgpass": str(self.base / f"{name}.pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": password},
                    "replication": {"username": "replicator", "password": password},
                    "rewind": {"username": SUPERUSER, "password": password},
                },
                "parameters": {"unix_socket_directories": str(self.base)},
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 scram-sha-256",
                    "host replication replicator 127.0.0.1/32 scram-sha-256",
                ],
            },
            "tags": {},
        }

    def start(self) -> None:
        try:
            for name in self.names:
                (self.base / f"{name}-log").mkdir()
                self.config_path(name).write_text(yaml.safe_dump(self._config(name)))
            if self.run_as is not None:
                subprocess.run(["chown", "-R", f"{self.run_as}:", str(self.base)], check=True)
            for name in self.names:
                self.start_member(name)
            wait_until(self.healthy, 90, "the Patroni cluster (a leader and streaming replicas)")
        except BaseException:
            self.stop()
            raise

    def start_member(self, name: str) -> None:
        argv = [self.python, "-m", "patroni", str(self.config_path(name))]
        with (self.base / f"{name}.out").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.base, env=self.env,
                start_new_session=True, **_user_kwargs(self.run_as),
            )  # fmt: skip

    def cluster(self) -> dict[str, Any]:
        """Patroni's ``GET /cluster`` from the first member that answers."""
        for name in self.names:
            url = f"http://127.0.0.1:{self.api_port[name]}/cluster"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(url, timeout=2) as resp,
            ):
                return json.loads(resp.read())
        return {"members": []}

    def roles(self) -> dict[str, tuple[str, str]]:
        """Member name -> (role, state), as Patroni reports them."""
        return {m["name"]: (m["role"], m["state"]) for m in self.cluster()["members"]}

    def leader(self) -> str | None:
        return next((n for n, (role, _) in self.roles().items() if role == "leader"), None)

    def healthy(self) -> bool:
        """One running leader, every other member a streaming replica."""
        roles = self.roles()
        if len(roles) != len(self.names):
            return False
        states = sorted(roles.values())
        return states == sorted(
            [("leader", "running")] + [("replica", "streaming")] * (len(self.names) - 1)
        )

    def dsn(self, name: str, database: str = "postgres") -> str:
        return (
            f"postgresql://{SUPERUSER}:{self.superuser_password}@127.0.0.1:"
            f"{self.pg_port[name]}/{database}"
        )

    def patronictl(self, *args: str) -> str:
        ctl = Path(sys.executable).parent / "patronictl"
        result = subprocess.run(
            [str(ctl), "-c", str(self.config_path(self.names[0])), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"patronictl {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def postmaster_pid(self, name: str) -> int | None:
        """The member's running postmaster (checked: a stale pid file's number may belong
        to another process by now)."""
        try:
            pid = int((self.data_dir(name) / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        ours = cmdline[0].endswith(b"postgres") and str(self.data_dir(name)).encode() in cmdline
        return pid if ours and _alive(pid) else None

    def kill_postmaster(self, name: str) -> int:
        pid = self.postmaster_pid(name)
        assert pid is not None, f"{name} has no running postmaster"
        os.kill(pid, signal.SIGKILL)
        return pid

    def log(self, name: str) -> str:
        parts = []
        for path in [self.base / f"{name}.out", *sorted((self.base / f"{name}-log").glob("*"))]:
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Patroni stops its postmaster first
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in self.names:
            # A postmaster left behind (its Patroni was killed) is no one's child.
            pid = self.postmaster_pid(name)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda pid=pid: not _alive(pid), 10, "the postmaster to exit")
        shutil.rmtree(self.base, ignore_errors=True)
