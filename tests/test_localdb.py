"""The local server launcher: binary discovery, and one real primary + replica round trip.

The shared session topology exercises the servers in depth; this file checks what it cannot:
that start() yields a streaming replica and that stop() leaves no process or file behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from devstack.postgres import LocalDbError, LocalTopology, PgServer, find_pg_bin


@pytest.fixture(scope="module")
def pg_bin() -> Path:
    try:
        return find_pg_bin()
    except LocalDbError as exc:
        pytest.skip(str(exc))


def test_find_pg_bin_honours_env(
    pg_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory the search would never find, so only the variable can name it.
    for binary in pg_bin.iterdir():
        (tmp_path / binary.name).symlink_to(binary)
    monkeypatch.setenv("DBSIDECAR_PG_BIN", str(tmp_path))
    assert find_pg_bin() == tmp_path


def test_find_pg_bin_rejects_bogus_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSIDECAR_PG_BIN", "/nonexistent")
    # The explicit argument wins over the environment, and a bad one is not silently skipped.
    with pytest.raises(LocalDbError) as raised:
        find_pg_bin(str(tmp_path))
    message = str(raised.value)
    assert str(tmp_path) in message
    assert "postgres" in message and "initdb" in message
    assert "PostgreSQL bin directory" in message


def _processes() -> dict[int, tuple[str, str, int]]:
    """pid -> (command, state, parent pid) for every live process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        table[int(stat.parent.name)] = (
            text[text.index("(") + 1 : text.rindex(")")],
            state,
            int(ppid),
        )
    return table


def _query(topology: LocalTopology, server: PgServer, sql: str) -> str:
    # Over TCP with the role's password, the way the sidecar connects.
    argv = [str(topology.bin_dir / "psql"), "-X", "-tA", "-h", "127.0.0.1", "-p", str(server.port)]
    result = subprocess.run(
        [*argv, "-U", topology.user, "-d", "orders", "-c", sql],
        env={**os.environ, "PGPASSWORD": topology.password},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.slow
def test_topology_starts_streaming_replica_and_leaves_nothing(pg_bin: Path) -> None:
    lines: list[str] = []
    topology = LocalTopology(
        replica=True, databases=("orders",), pg_bin=str(pg_bin), log=lines.append
    )
    topology.start()
    try:
        primary, replica = topology.primary, topology.replica
        assert replica is not None and primary.running and replica.running
        assert _query(topology, primary, "select pg_is_in_recovery()") == "f"
        # Also proves the role's pg_monitor grant: the status is hidden from unprivileged roles.
        status = "select pg_is_in_recovery(), status from pg_stat_wal_receiver"
        assert _query(topology, replica, status) == "t|streaming"
        postmasters = {primary.pid, replica.pid}
        assert None not in postmasters
        server_pids = postmasters | {
            pid for pid, (_, _, ppid) in _processes().items() if ppid in postmasters
        }
    finally:
        topology.stop()
    assert any("replica ready" in line for line in lines)
    assert not primary.running and not replica.running
    after = _processes()
    # Zombies are dead already; whoever adopted them may just not have reaped them yet.
    assert [pid for pid in server_pids if pid in after and after[pid][1] != "Z"] == []
    # None of this topology's postmasters is still our child (the session's may be).
    children = {pid for pid, (_, _, ppid) in after.items() if ppid == os.getpid()}
    assert not postmasters & children
    assert not topology.base_dir.exists()
    topology.stop()  # a second stop is harmless
