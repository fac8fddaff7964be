"""Attacks on secrecy through configuration errors: a careless edit breaks the YAML (or
JSON) on the `password:` or `auth_token:` line and the sidecar is reloaded. The reload
must be refused with a message naming the line, and neither the unauthenticated ops
port, the admin reload answer, the sidecar's log nor the CLI may echo the secret. Once
the file is fixed (changed or restored byte for byte) the error must be gone."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devstack.postgres import LocalTopology

from ..harness import SidecarProcess, eventually, free_port, http_get
from .attack import post

OPS_PATHS = ("/healthz", "/livez", "/readyz", "/startupz", "/metrics")
TOKEN = "tok" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(topo: LocalTopology) -> dict:
    # The password comes right after the name, so a JSON comma can go missing after it.
    primary = {"name": "p", "password": topo.password, "host": "127.0.0.1",
               "port": topo.primary.port, "database": "orders", "user": topo.user}  # fmt: skip
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "auth_token": TOKEN,
        "health": {"interval": 0.2, "timeout": 0.5},
        "databases": {"orders": {"primary": primary}},
    }


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the file watcher never reads half a document


def good_text(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def broken_line(doc: dict, key: str, template: str) -> tuple[str, int]:
    """The document as YAML with the `key:` line replaced by the template ({i}: the
    line's indent, {s}: the secret); the text and that line's number."""
    lines = good_text(doc).splitlines()
    index = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{key}:"))
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    node = doc["databases"]["orders"]["primary"]
    secret = doc["auth_token"] if key == "auth_token" else node[key]
    lines[index] = template.format(i=indent, s=secret)
    return "\n".join(lines) + "\n", index + 1


def spoiled(key: str, template: str) -> Callable[[dict], tuple[str, int]]:
    return lambda doc: broken_line(doc, key, template)


def json_missing_comma(doc: dict) -> tuple[str, int]:
    """JSON with the comma after the password gone: the parser stops on the next line."""
    lines = json.dumps(doc, indent=2).splitlines()
    index = next(i for i, line in enumerate(lines) if '"password"' in line)
    lines[index] = lines[index].rstrip(",")
    return "\n".join(lines) + "\n", index + 2


VARIANTS: dict[str, Callable[[dict], tuple[str, int]]] = {
    "password-unclosed-quote": spoiled("password", '{i}password: "{s}'),
    "password-tab-indent": spoiled("password", "\tpassword: {s}"),
    "password-bad-mapping": spoiled("password", "{i}password: {s}: x"),
    "password-as-tag": spoiled("password", "{i}password: !{s}"),
    "token-unclosed-quote": spoiled("auth_token", "auth_token: '{s}"),
    "token-bad-mapping": spoiled("auth_token", "auth_token: {s}: x"),
    "token-as-alias": spoiled("auth_token", "auth_token: *{s}"),
    "json-missing-comma": json_missing_comma,
}


@pytest.fixture(scope="module")
def proc(
    topology: LocalTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    process = SidecarProcess(config(topology), tmp_path_factory.mktemp("secrets"), "secrets")
    process.start()
    try:
        yield process
    finally:
        process.terminate()


def secrets_of(proc: SidecarProcess) -> list[str]:
    return [TOKEN, proc.config["databases"]["orders"]["primary"]["password"]]


def assert_no_secret(proc: SidecarProcess, text: str, where: str) -> None:
    # A boolean, so a failure never prints the secret into the test report.
    leaked = any(secret in text for secret in secrets_of(proc))
    assert not leaked, f"{where} holds a secret"


def assert_ops_port_clean(proc: SidecarProcess) -> None:
    for path in OPS_PATHS:
        assert_no_secret(proc, http_get(proc.ops + path)[1].decode(), path)
    assert_no_secret(proc, proc.log_path.read_text(errors="replace"), "the sidecar's log")


def last_error(proc: SidecarProcess) -> dict | None:
    return json.loads(http_get(proc.ops + "/healthz")[1])["config"]["last_error"]


async def admin_reload(proc: SidecarProcess) -> tuple[int, dict]:
    return await post(proc.url, "/v1/admin/reload", None, headers=AUTH)


async def still_serving(proc: SidecarProcess) -> bool:
    plan = {"op": "select", "database": "orders", "table": "orders", "limit": 1}
    status, _ = await post(proc.url, "/v1/query", plan, headers=AUTH)
    return status == 200


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_a_syntax_error_on_a_secret_line_names_the_line_never_the_secret(
    proc: SidecarProcess, variant: str
) -> None:
    text, line = VARIANTS[variant](proc.config)
    write_atomically(proc.config_path, text)
    status, answer = await admin_reload(proc)
    assert status == 422 and answer["result"] == "error"
    message = answer["error"]["message"]
    assert f"line {line}," in message, message
    assert_no_secret(proc, json.dumps(answer), "the admin reload answer")
    assert (error := last_error(proc)) is not None and f"line {line}," in error["message"]
    assert_ops_port_clean(proc)
    assert await still_serving(proc)  # the last good configuration keeps serving

    # Fixed by restoring the very same document: nothing to apply, and the error is gone.
    write_atomically(proc.config_path, good_text(proc.config))
    status, answer = await admin_reload(proc)
    assert (status, answer["result"]) == (200, "unchanged")
    assert last_error(proc) is None


async def test_sighup_with_a_broken_file_then_a_changed_fix(
    proc: SidecarProcess, topology: LocalTopology
) -> None:
    assert proc.proc is not None
    text, line = VARIANTS["password-bad-mapping"](proc.config)
    write_atomically(proc.config_path, text)
    proc.proc.send_signal(signal.SIGHUP)

    async def refused() -> bool:
        return last_error(proc) is not None

    await eventually(refused, 30, "the broken file to be refused")
    assert f"line {line}," in last_error(proc)["message"]  # type: ignore[index]
    assert_ops_port_clean(proc)

    fixed = {**proc.config, "health": {"interval": 0.25, "timeout": 0.5}}
    write_atomically(proc.config_path, good_text(fixed))
    proc.proc.send_signal(signal.SIGHUP)

    async def cleared() -> bool:
        return last_error(proc) is None

    await eventually(cleared, 30, "the fixed file to clear the error")
    write_atomically(proc.config_path, good_text(proc.config))
    status, answer = await admin_reload(proc)
    assert status == 200 and answer["result"] in ("applied", "unchanged")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_the_cli_refuses_a_broken_file_without_echoing_it(
    proc: SidecarProcess, tmp_path: Path, command: str
) -> None:
    text, line = VARIANTS["password-unclosed-quote"](proc.config)
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"line {line}," in done.stderr, done.stderr
    assert_no_secret(proc, done.stdout + done.stderr, f"dbsidecar {command}'s output")
