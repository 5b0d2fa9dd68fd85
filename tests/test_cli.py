"""The ``gatewayd`` command as an operator runs it: a real process, real exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer

from gatewayd.errors import ExitCode
from gatewayd.systemd import Notifier

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]

TRANSPORT = harness.http_transport_bearer()
JSON_LOGS = '[log]\nformat = "json"\n'


def gatewayd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAYD, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def _start_run(
    path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *GATEWAYD,
        "run",
        "--config",
        str(path),
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["check-config"],
        ["plugins"],
        ["pki"],
        ["pki", "init"],
        ["demo"],
        ["sim"],
        ["queue"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = gatewayd(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: gatewayd" in result.stdout


def test_plugins_lists_first_party_plugins_with_versions() -> None:
    result = gatewayd("plugins")
    assert result.returncode == 0, result.stderr
    for name in ("http", "mqtt", "x509"):
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith(f"{name} "))
        assert f"gatewayd-{name} 0.1.0" in line
    assert "gatewayd_register_transports" in result.stdout


def test_autoload_switch_blocks_entry_points() -> None:
    env = {**os.environ, "GATEWAYD_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = gatewayd("plugins", env=env)
    assert result.returncode == 0
    assert "transports:          none" in result.stdout


def _config(
    folder: Path,
    tls: Pki,
    *,
    api_root: str = "https://127.0.0.1:9",
    extra: str = "",
    transports: str = TRANSPORT,
) -> Path:
    """``folder``/gw.toml, its state next to it; by default no server answers."""
    path = folder / "gw.toml"
    path.write_text(
        harness.gateway_toml(
            tls,
            api_root=api_root,
            state_dir=folder / "state",
            transports=transports,
            extra=extra,
        )
    )
    return path


def test_valid_config_checks_ok(tmp_path: Path, loopback_pki: Pki) -> None:
    # check-config resolves every secret reference, as run would when it is used.
    env = {**os.environ, "GATEWAYD_TEST_TOKEN": "t0ken-1"}
    result = gatewayd("check-config", str(_config(tmp_path, loopback_pki)), env=env)
    assert result.returncode == 0, result.stderr
    assert "OK (N3G gateway urn:gatewayd:gateway:demo-n3g" in result.stdout


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (
            lambda t: t.replace('id = "urn:gatewayd:gateway:demo-n3g"\n', ""),
            "gateway.id",
            "is required",
        ),
        (
            lambda t: t.replace("\ntimeout = 5.0", '\ntimeout = "soon"'),
            "northbound.timeout",
            "expected a number, got a string",
        ),
        (
            lambda t: t.replace('token = { env = "GATEWAYD_TEST_TOKEN" }', 'token = "hunter2"'),
            "transports.web.devices[0].token",
            "inline secrets are not allowed",
        ),
        (lambda t: t.replace("[retry]", "[retry]\ninitail = 1.0"), "retry.initail", "unknown key"),
        (
            lambda t: t.replace('plugin = "http"', 'plugin = "lorawan"'),
            "transports.web.plugin",
            "no transport 'lorawan' is installed (installed: coap, http, mqtt, smpp)",
        ),
        (
            lambda t: t.replace("drain_timeout = 5.0", "drain_timeout = 5.0\nprocesses = 3"),
            "gateway.processes",
            "must be at most 2, got 3",
        ),
        (
            lambda t: (
                t.replace("drain_timeout = 5.0", "drain_timeout = 5.0\nprocesses = 2")
                + '[store]\nbackend = "postgresql"\n'
            ),
            "gateway.processes",
            "splits one gateway over one SQLite file; with the PostgreSQL store, run several"
            " instances instead",
        ),
    ],
    ids=[
        "missing key",
        "wrong type",
        "inline secret",
        "misspelt key",
        "plugin not installed",
        "three processes",
        "two processes on postgresql",
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, loopback_pki: Pki, edit: object, key: str, problem: str
) -> None:
    path = _config(tmp_path, loopback_pki)
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = gatewayd(*command)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert f"{path}: {key}: {problem}" in result.stderr
        assert "hunter2" not in result.stderr  # a secret is never echoed back


# Two OSCORE devices of the coap transport, their master secrets in files next to the
# config; each case fills in the gateway's ID in d2's context (a1 is d1's).
COAP_OSCORE = """
[transports.co]
plugin = "coap"
listen = "127.0.0.1:0"
[[transports.co.devices]]
device = "d1"
service_id = "ue-d1@iot.example"
[transports.co.devices.oscore]
master_secret = { file = "d1.key" }
sender_id = "a1"
recipient_id = "01"
[[transports.co.devices]]
device = "d2"
service_id = "ue-d2@iot.example"
[transports.co.devices.oscore]
master_secret = { file = "d2.key" }
sender_id = "D2_SENDER"
recipient_id = "02"
"""
SECRET = "0102030405060708090a0b0c0d0e0f10"


@pytest.mark.parametrize(
    ("d1_secret", "d2_sender", "error"),
    [
        (SECRET, "a2", None),
        ("00ff", "a2", "devices[0].oscore.master_secret: the secret is 2 bytes; at least 16"),
        ("hunter2", "a2", "devices[0].oscore.master_secret: the secret is not hex digits"),
        # d2's secret is d1's, and so is the gateway's ID: both derive one sender key.
        (SECRET, "a1", "devices[1].oscore.master_secret: derives the same key as device 'd1'"),
    ],
    ids=["valid", "short secret", "not hex", "one key twice"],
)
def test_check_config_refuses_an_oscore_secret_that_start_refuses(
    tmp_path: Path,
    loopback_pki: Pki,
    d1_secret: str,
    d2_sender: str,
    error: str | None,
) -> None:
    """check-config constructs the coap transport but never starts it: the secret's
    format and a key derived twice are checked there, with start's verdict and code."""
    (tmp_path / "d1.key").write_text(d1_secret + "\n")
    (tmp_path / "d2.key").write_text(SECRET + "\n")
    path = _config(tmp_path, loopback_pki, transports=COAP_OSCORE.replace("D2_SENDER", d2_sender))
    if error is None:
        result = gatewayd("check-config", str(path))
        assert result.returncode == ExitCode.OK, result.stderr
        return
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = gatewayd(*command)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert f"{path}: transports.co.{error}" in result.stderr, result.stderr
        assert d1_secret not in result.stderr  # a secret is never echoed back


def test_pki_init_writes_private_keys_0600(tmp_path: Path) -> None:
    result = gatewayd("pki", "init", str(tmp_path / "pki"))
    assert result.returncode == 0, result.stderr
    for key in ("ca.key", "server.key", "gateway.key", "device.key"):
        assert (tmp_path / "pki" / key).stat().st_mode & 0o777 == 0o600


async def test_run_under_a_notify_socket_ready_then_stopping(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """systemd's view: STATUS= while starting, READY=1 once registered, STOPPING=1 on
    SIGTERM, then exit 0."""
    path = _config(tmp_path, loopback_pki, api_root=sim.api_root, extra=JSON_LOGS)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "GATEWAYD_TEST_TOKEN": "t0ken-1"}
    proc = await _start_run(path, env=env)
    loop = asyncio.get_running_loop()
    try:
        before = []
        while "READY=1" not in (
            ready := (await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode()
        ):
            before.append(ready)
        assert before
        assert all(m.startswith("STATUS=") for m in before)
        assert f"MAINPID={proc.pid}" in ready
        assert sim.registrations  # READY=1 means registered
        proc.send_signal(signal.SIGTERM)
        stopping = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode()
        assert "STOPPING=1" in stopping
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    assert proc.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert '"event": "gateway.started"' in log
    assert '"event": "gateway.stopped"' in log
    assert "t0ken-1" not in log
    assert sim.registrations == []  # deregistered on the way out


async def test_check_config_and_run_read_a_relative_secret_file_from_the_configs_folder(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """A relative ``{ file = ... }`` is taken from the config file's folder by both
    commands, whatever the working directory: run read it from the working directory
    (its transport failed to start) while check-config said OK."""
    folder, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    (folder / "secrets").mkdir(parents=True)
    elsewhere.mkdir()
    (folder / "secrets" / "token").write_text("t0ken-from-file\n")
    transport = TRANSPORT.replace('{ env = "GATEWAYD_TEST_TOKEN" }', '{ file = "secrets/token" }')
    assert 'file = "secrets/token"' in transport
    path = _config(
        folder, loopback_pki, api_root=sim.api_root, extra=JSON_LOGS, transports=transport
    )
    checked = await asyncio.create_subprocess_exec(
        *GATEWAYD, "check-config", str(path), cwd=elsewhere, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(checked.communicate(), 60)
    assert checked.returncode == 0, stderr.decode()
    proc = await _start_run(path, cwd=elsewhere)
    try:
        # Transports start before the registration: registered means the token was read.
        registered = asyncio.ensure_future(sim.wait_for(lambda: bool(sim.registrations), 30))
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait({registered, exited}, return_when=asyncio.FIRST_COMPLETED)
        for waiting in (registered, exited):
            waiting.cancel()
        started = bool(sim.registrations)
        if started:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert started, stderr.decode()
    assert proc.returncode == 0, stderr.decode()


# Runs `gatewayd run` in a fresh interpreter, counting what gatewayd.log builds.
_COUNT_LOGGING_SETUP = """
import sys
import structlog
from gatewayd import cli

built = {"chain": 0, "formatter": 0}
configure = structlog.configure

def counting_configure(*args, **kwargs):
    built["chain"] += 1
    configure(*args, **kwargs)

class CountingFormatter(structlog.stdlib.ProcessorFormatter):
    def __init__(self, *args, **kwargs):
        built["formatter"] += 1
        super().__init__(*args, **kwargs)

structlog.configure = counting_configure
structlog.stdlib.ProcessorFormatter = CountingFormatter
code = cli.main(sys.argv[1:])
print(built["chain"], built["formatter"], code)
"""


def test_run_configures_logging_once(tmp_path: Path, loopback_pki: Pki) -> None:
    """``main`` sets a default before the config is read, ``run`` then the config's
    level: structlog's processor chain and the JSON formatter are built once, and the
    start's failure is logged once (one handler)."""
    path = _config(tmp_path, loopback_pki)
    missing = tmp_path / "gone.pem"
    path.write_text(path.read_text().replace(str(loopback_pki["gateway"]), str(missing)))
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_LOGGING_SETUP, "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GATEWAYD_TEST_TOKEN": "t0ken-1"},
        check=False,
    )
    chains, formatters, code = result.stdout.split()
    assert int(code) == ExitCode.CREDENTIALS, result.stderr
    assert (chains, formatters) == ("1", "1"), result.stderr
    assert result.stderr.count('"event": "gateway.failed"') == 1, result.stderr


def test_a_manager_that_does_not_read_never_blocks_a_notification(
    tmp_path: Path, gateway_logs: list[MutableMapping[str, Any]]
) -> None:
    """An AF_UNIX datagram socket queues 10 datagrams by default; past that a blocking
    send would wait for the reader, and the event loop with it. The notifier drops the
    notification instead, and says so once."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        notifier = Notifier(str(path))
        began = time.monotonic()
        for n in range(50):
            notifier.status(f"step {n}")
        assert time.monotonic() - began < 5
        failed = [e for e in gateway_logs if e["event"] == "systemd.notify_failed"]
        assert len(failed) == 1
        manager.setblocking(False)
        assert manager.recv(4096) == b"STATUS=step 0"  # what fitted was sent
