"""The front door: `dbsidecar --help`, `check-config`, and `dbsidecar dev` running the
README's client example unchanged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .harness import http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_command() -> None:
    out = run_cli("--help").stdout
    for command in ("run", "dev", "wait", "status", "check-config"):
        assert command in out
    assert "--uds" in run_cli("dev", "--help").stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("databases: {orders: {primary: {host: db, database: orders}}}\n")
    assert run_cli("check-config", "--config", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("databases: {orders: {primary: {host: db}, pool: {max_sise: 3}}}\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "max_sise" in result.stderr and "databases.orders.pool" in result.stderr


def test_run_refuses_invalid_configuration_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("databases: {orders: {replicas: []}}\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "databases.orders.primary" in result.stderr


def test_relay_names_a_password_variable_that_is_not_set(tmp_path: Path) -> None:
    # The password is resolved when the relay builds its connections, after the
    # configuration loaded: it ended in a traceback (exit 1), not a message (exit 2).
    config = tmp_path / "relay.yaml"
    config.write_text("databases: {orders: {primary: {host: db, database: orders, "
                      "password_env: DBSIDECAR_TEST_UNSET_PW}}}\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DBSIDECAR_TEST_UNSET_PW"}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "relay", "--config", str(config),
         "--database", "orders", "--webhook", "http://127.0.0.1:9/hook"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "DBSIDECAR_TEST_UNSET_PW is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_wait_times_out_when_nothing_listens() -> None:
    result = run_cli("wait", "--ops", "http://127.0.0.1:9", "--timeout", "300ms")
    assert result.returncode == 1 and "not up" in result.stderr


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its client example"
    return match.group(1)


def _postgres_children(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if line.split()[1] == str(pid)]


@pytest.mark.slow
def test_dev_serves_the_readme_example_and_cleans_up(tmp_path: Path) -> None:
    # The README promises the default ports; the example hard-codes 7432.
    for port in (7432, 9432):
        try:
            http_get(f"http://127.0.0.1:{port}/livez", 0.5)
            pytest.fail(f"port {port} is already in use; stop whatever listens there")
        except OSError:
            pass
    log = (tmp_path / "dev.log").open("w")
    dev = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "dev"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_until(
            lambda: _ok("http://127.0.0.1:9432/startupz") or dev.poll() is not None,
            30,
            "dbsidecar dev to start",
        )
        assert dev.poll() is None, (tmp_path / "dev.log").read_text()
        example = tmp_path / "example.py"
        example.write_text(textwrap.dedent(readme_example()))
        # -W default shows what a quiet run would hide (ResourceWarning, "never awaited").
        result = subprocess.run(
            [sys.executable, "-W", "default", str(example)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "'status': 'paid'" in result.stdout
        # Nothing on stderr: no "Unclosed client session" at exit, no warning of any kind.
        assert result.stderr == ""
        output = (tmp_path / "dev.log").read_text()
        data_dir = re.search(r"topology ready in .* \((.*)\)", output).group(1)
        assert Path(data_dir).exists()
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(30)
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert code == 0, output
    assert "dbsidecar ready" in output and "local PostgreSQL stopped" in output
    assert not Path(data_dir).exists()
    assert not _postgres_children(dev.pid)


def _ok(url: str) -> bool:
    try:
        return http_get(url, 0.5)[0] == 200
    except OSError:
        return False


BLOCKER = """
import importlib.abc, sys
HEAVY = {"asyncpg", "starlette", "uvicorn", "prometheus_client", "yaml", "consul", "uvloop"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"client imported {name}")
sys.meta_path.insert(0, Block())
"""


def test_client_imports_with_only_aiohttp_and_msgspec() -> None:
    code = BLOCKER + textwrap.dedent(
        """
        import client
        from client import ActiveRecord, ConnectionManager, PrimaryKeyField
        import wire.protocol, wire.values, client.ids
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        assert not heavy, heavy
        print("light")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "light"


def test_example_configuration_is_valid() -> None:
    result = run_cli("check-config", "--config", str(ROOT / "config" / "example.yaml"))
    assert result.returncode == 0, result.stderr


def test_helm_chart_default_config_is_a_valid_sidecar_configuration() -> None:
    import yaml

    from sidecar.settings import build_settings

    values = yaml.safe_load((ROOT / "helm" / "dbsidecar" / "values.yaml").read_text())
    config = dict(values["config"])
    config["databases"] = {"orders": {"primary": {"host": "db", "database": "orders"}}}
    settings = build_settings(config)
    assert settings.listen.uds and settings.ops.host == "0.0.0.0"
