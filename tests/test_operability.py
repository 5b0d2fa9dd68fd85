"""Operating a gateway: readiness (sd_notify and /readyz), the status view, stats lines,
a listen address in use, a transport that cannot start, and fatal errors as events.

Real ``gatewayd run`` processes, the reference server in this process, a real
``NOTIFY_SOCKET`` datagram socket, and real HTTP against the admin listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import until
from jsonlog import events, wait_for_event
from test_metrics import TOKEN, gateway_process

from gatewayd import metrics
from gatewayd.errors import ExitCode
from gatewayd.store import Queue

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]
ENV = {**os.environ, "GATEWAYD_TEST_TOKEN": TOKEN}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    tmp_path: Path,
    tls: Pki,
    api_root: str,
    *,
    device_port: int,
    admin_port: int,
    gateway_extra: str = "",
) -> Path:
    transports = f"""
[transports.web]
plugin = "http"
listen = "127.0.0.1:{device_port}"
[[transports.web.devices]]
device = "sensor-1"
service_id = "{DEMO_SERVICE_ID}"
token = {{ env = "GATEWAYD_TEST_TOKEN" }}
"""
    text = harness.gateway_toml(
        tls,
        api_root=api_root,
        state_dir=tmp_path / "state",
        transports=transports,
        extra=f'[log]\nformat = "json"\n[metrics]\nlisten = "127.0.0.1:{admin_port}"\n',
    )
    text = text.replace("drain_timeout = 5.0", "drain_timeout = 5.0\n" + gateway_extra)
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


class NotifySocket:
    """A systemd stand-in: the datagrams a service sends to ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        with contextlib.suppress(BlockingIOError):
            while True:
                raw = self.sock.recv(4096).decode()
                self.messages.append(dict(line.split("=", 1) for line in raw.splitlines()))
        return self.messages

    def ready(self) -> bool:
        return any(m.get("READY") == "1" for m in self.drain())


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def gatewayd(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAYD, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def test_ready_only_once_registered_and_readyz_follows_the_server(
    tmp_path: Path, loopback_pki: Pki, notify: NotifySocket
) -> None:
    """The server is down at start: alive, not ready, STATUS= says why, no READY=1.
    The server comes up: registered, READY=1, /readyz 200; a status view and stats."""
    server_port, admin = free_port(), free_port()
    settings = harness.sim_settings(loopback_pki, port=server_port)
    config = write_config(
        tmp_path,
        loopback_pki,
        f"https://127.0.0.1:{server_port}",
        device_port=free_port(),
        admin_port=admin,
        gateway_extra="stats_interval = 1.0",
    )
    log_path = tmp_path / "gateway.log"
    async with gateway_process(config, log_path, {"NOTIFY_SOCKET": str(notify.path)}):
        assert await get(admin, "/healthz") == (200, "ok\n")
        status, body = await get(admin, "/readyz")
        assert status == 503
        assert f"not registered with https://127.0.0.1:{server_port}" in body
        await until(lambda: any("STATUS" in m for m in notify.drain()))
        assert not notify.ready()
        assert any(
            m.get("STATUS", "").startswith("waiting for registration") for m in notify.messages
        )
        view = json.loads((await get(admin, "/status"))[1])
        assert view["gateway"]["ready"] is False
        assert view["registration"]["state"] == "unregistered"

        async with SimServer(settings, schema_check=True) as sim:
            await until(notify.ready)
            assert sim.registrations
            assert (await get(admin, "/readyz")) == (200, "ready\n")
            assert events(log_path, "gateway.ready")
            out = await asyncio.to_thread(gatewayd, "status", "--config", str(config), "--json")
            assert out.returncode == 0, out.stderr
            view = json.loads(out.stdout)  # stdout holds the JSON and nothing else
            assert view["registration"]["state"] == "registered"
            assert view["transports"]["web"]["plugin"] == "http"
            assert view["transports"]["web"]["state"] == "listening"
            assert set(view["queues"]) == {q.value for q in Queue}
            assert view["credentials_days_left"]["northbound"] > 300
            table = await asyncio.to_thread(
                gatewayd, "status", "--url", f"http://127.0.0.1:{admin}"
            )
            assert table.returncode == 0, table.stderr
            assert "state        READY" in table.stdout
            assert "registration registered" in table.stdout
            assert re.search(
                r"^web\s+http\s+listening address=127\.0\.0\.1:\d+$", table.stdout, re.M
            )
            await wait_for_event(log_path, "gateway.stats", 2)
            stats = events(log_path, "gateway.stats")[-1]
            assert stats["registration"] == "registered"
            assert stats["uplink_pending"] == 0
            assert "rate_uplink_received" in stats


async def test_a_manager_that_went_away_does_not_stop_the_gateway(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """NOTIFY_SOCKET names a socket nobody listens on any more: each notification fails
    (ECONNREFUSED); the gateway still registers, serves and becomes ready, and says so
    once, as sd_notify(3) callers do."""
    server_port, admin = free_port(), free_port()
    gone = NotifySocket(tmp_path / "notify.sock")
    gone.sock.close()  # the path stays, the listener is gone
    config = write_config(
        tmp_path,
        loopback_pki,
        f"https://127.0.0.1:{server_port}",
        device_port=free_port(),
        admin_port=admin,
    )
    log_path = tmp_path / "gateway.log"
    settings = harness.sim_settings(loopback_pki, port=server_port)
    async with (
        SimServer(settings, schema_check=True),
        gateway_process(config, log_path, {"NOTIFY_SOCKET": str(gone.path)}),
    ):
        await until(lambda: events(log_path, "gateway.ready"))
        assert (await get(admin, "/readyz")) == (200, "ready\n")
        (failed,) = events(log_path, "systemd.notify_failed")  # once, not per message
        assert failed["level"] == "warning"
        assert "Connection refused" in failed["error"]


def check_and_run_with_port_taken(
    tmp_path: Path, tls: Pki, which: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], int]:
    """check-config and run while another socket holds the metrics or the device port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"metrics": free_port(), "device": free_port(), which: taken}
        config = write_config(
            tmp_path,
            tls,
            "https://127.0.0.1:9",
            device_port=ports["device"],
            admin_port=ports["metrics"],
        )
        return (
            gatewayd("check-config", str(config)),
            gatewayd("run", "--config", str(config)),
            taken,
        )


def test_check_config_beside_a_running_gateway_skips_binding_with_no_bind(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """The gateway holds its ports: a plain check says how to check beside it; --no-bind
    checks everything else and says the addresses were not bound."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = write_config(
            tmp_path, loopback_pki, "https://127.0.0.1:9", device_port=taken, admin_port=taken
        )
        plain = gatewayd("check-config", str(config))
        beside = gatewayd("check-config", "--no-bind", str(config))
    assert plain.returncode == ExitCode.UNAVAILABLE
    assert "already in use by another process; beside a running gateway, check with --no-bind" in (
        plain.stderr
    )
    assert beside.returncode == ExitCode.OK, beside.stderr
    assert "listen addresses: not bound (--no-bind)" in beside.stdout


def test_port_in_use_is_one_line_naming_the_key_and_exit_69(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    checked, ran, taken = check_and_run_with_port_taken(tmp_path, loopback_pki, "metrics")
    assert checked.returncode == ExitCode.UNAVAILABLE, checked.stderr
    assert f"metrics.listen: cannot listen on 127.0.0.1:{taken}" in checked.stderr
    assert ran.returncode == ExitCode.UNAVAILABLE, ran.stderr
    assert "Traceback" not in ran.stderr
    (failed,) = [json.loads(line) for line in ran.stderr.splitlines() if '"gateway.failed"' in line]
    assert failed["exit_code"] == ExitCode.UNAVAILABLE
    assert failed["level"] == "error"
    assert f"metrics.listen: cannot listen on 127.0.0.1:{taken}" in failed["error"]
    assert "already in use" in failed["error"]


def test_transport_that_cannot_start_is_named_by_the_core(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """The http plugin's own listener finds its port taken: the core names the transport."""
    checked, ran, taken = check_and_run_with_port_taken(tmp_path, loopback_pki, "device")
    assert checked.returncode == ExitCode.UNAVAILABLE
    assert f"transports.web.listen: cannot listen on 127.0.0.1:{taken}" in checked.stderr
    (failed,) = [json.loads(line) for line in ran.stderr.splitlines() if '"gateway.failed"' in line]
    assert failed["error"].startswith("transports.web (plugin http): start failed:")
    assert failed["exit_code"] == ExitCode.UNAVAILABLE, ran.stderr


def test_check_config_resolves_every_secret_reference(tmp_path: Path, loopback_pki: Pki) -> None:
    config = write_config(
        tmp_path, loopback_pki, "https://127.0.0.1:9", device_port=free_port(), admin_port=0
    )
    env = {k: v for k, v in ENV.items() if k != "GATEWAYD_TEST_TOKEN"}
    for result in (
        gatewayd("check-config", str(config), env=env),
        gatewayd("run", "--config", str(config), env=env),  # agrees: refused at start
    ):
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "transports.web.devices[0].token: environment variable GATEWAYD_TEST_TOKEN" in (
            result.stderr
        )
    ok = gatewayd("check-config", str(config))
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("role", ["cert", "key", "ca"])
def test_missing_credential_file_names_the_key_and_the_file(
    tmp_path: Path, loopback_pki: Pki, role: str
) -> None:
    config = write_config(
        tmp_path, loopback_pki, "https://127.0.0.1:9", device_port=free_port(), admin_port=0
    )
    files = {"cert": "gateway", "key": "gateway_key", "ca": "ca"}
    missing = tmp_path / "gone" / loopback_pki[files[role]].name
    text = config.read_text().replace(str(loopback_pki[files[role]]), str(missing))
    assert str(missing) in text
    config.write_text(text)
    for result in (
        gatewayd("check-config", str(config)),
        gatewayd("run", "--config", str(config)),
    ):
        assert result.returncode == ExitCode.CREDENTIALS, result.stderr
        assert f"credentials.northbound.{role}: {missing}: cannot read" in result.stderr


async def test_sighup_applies_transport_changes_and_names_the_rest(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """SIGHUP: signal.received; a transport table added is started (its device served and
    registered) and removed again; another table changed is named, not applied; a broken
    file is reported and the gateway runs on."""
    config = write_config(
        tmp_path, loopback_pki, sim.api_root, device_port=free_port(), admin_port=free_port()
    )
    original = config.read_text()
    second = free_port()
    added = (
        original
        + f"""
[transports.web2]
plugin = "http"
listen = "127.0.0.1:{second}"
[[transports.web2.devices]]
device = "sensor-2"
service_id = "ue-sensor-2@iot.example"
token = {{ env = "GATEWAYD_TEST_TOKEN" }}
"""
    )
    log_path = tmp_path / "gateway.log"
    async with gateway_process(config, log_path) as proc:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "credentials.reloaded")
        (received,) = events(log_path, "signal.received")
        assert received["signal"] == "SIGHUP"
        assert events(log_path, "config.reloaded") == []  # nothing changed
        assert events(log_path, "config.restart_needed") == []

        config.write_text(added)
        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "config.reloaded")
        (reloaded,) = events(log_path, "config.reloaded")
        assert (reloaded["started"], reloaded["stopped"]) == (["web2"], [])
        assert reloaded["transports"] == ["web", "web2"]
        await sim.wait_for(
            lambda: any("ue-sensor-2@iot.example" in r.ue_svc_ids for r in sim.registrations),
            timeout=20,
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{second}/v1/devices/sensor-2/messages",
                json={"payload": "hello", "msgId": "from-2"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 202
        await sim.wait_for(lambda: any(u.message.msg_id == "from-2" for u in sim.uplinks), 20)

        config.write_text(added.replace("[retry]", "[retry]\nmultiplier = 3.0", 1))
        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "config.restart_needed")
        (needed,) = events(log_path, "config.restart_needed")
        assert needed["changed"] == ["retry"]
        assert needed["level"] == "warning"

        config.write_text("[gateway\nbroken")
        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "config.reload_failed")
        (failed,) = events(log_path, "config.reload_failed")
        assert "not valid TOML" in failed["error"]

        config.write_text(original)
        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "config.reloaded", 2)
        removed = events(log_path, "config.reloaded")[1]
        assert (removed["started"], removed["stopped"]) == ([], ["web2"])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", second)) != 0  # its listener is gone
        assert proc.returncode is None  # still running; SIGTERM and exit 0 follow


async def test_metrics_count_at_any_log_level(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """With log.level = "error" no message event is logged, and the counters still count:
    they are incremented where messages are stored and settled, not from log events."""
    admin, device = free_port(), free_port()
    config = write_config(
        tmp_path, loopback_pki, sim.api_root, device_port=device, admin_port=admin
    )
    config.write_text(
        config.read_text().replace('format = "json"', 'format = "json"\nlevel = "error"')
    )
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *GATEWAYD, "run", "--config", str(config), env=ENV, stderr=stderr
        )
    try:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                return (await get(admin, "/readyz"))[0] == 200
            return False

        await until(ready)
        async with aiohttp.ClientSession() as session:
            for i in range(2):
                async with session.post(
                    f"http://127.0.0.1:{device}/v1/devices/sensor-1/messages",
                    json={"payload": f"n={i}", "msgId": f"quiet-{i}"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp:
                    assert resp.status == 202

        async def forwarded() -> bool:
            text = (await get(admin, "/metrics"))[1]
            counts = metrics.parse(text)["gatewayd_messages_total"]
            return counts[("uplink", "forwarded", "web")] == 2

        await until(forwarded)
        values = metrics.parse((await get(admin, "/metrics"))[1])
        assert values["gatewayd_messages_total"][("uplink", "received", "web")] == 2
        assert events(log_path, "message.received") == []
        assert events(log_path, "message.forwarded") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_readyz_follows_the_circuit_to_the_server(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """Registered, then the server fails every call: the breaker opens and /readyz says
    so (503, with the reason); once the server answers again, ready again."""
    admin, device = free_port(), free_port()
    config = write_config(
        tmp_path, loopback_pki, sim.api_root, device_port=device, admin_port=admin
    )
    log_path = tmp_path / "gateway.log"
    async with gateway_process(config, log_path):

        async def readyz() -> tuple[int, str]:
            return await get(admin, "/readyz")

        await until(lambda: _is(readyz(), 200), timeout=30)
        sim.fail(503, retry_after=1, seconds=8)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{device}/v1/devices/sensor-1/messages",
                json={"payload": "during the outage", "msgId": "outage-1"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 202  # stored: intake goes on while the server is down

        async def circuit_open() -> bool:
            status, body = await readyz()
            return status == 503 and "circuit to the MSGin5G Server is open" in body

        await until(circuit_open, timeout=40)
        await until(lambda: _is(readyz(), 200), timeout=60)
        await sim.wait_for(lambda: any(u.message.msg_id == "outage-1" for u in sim.uplinks), 30)


async def _is(answer: Coroutine[Any, Any, tuple[int, str]], status: int) -> bool:
    return (await answer)[0] == status


def test_status_without_a_gateway_is_exit_69_and_says_where_it_asked() -> None:
    port = free_port()
    result = gatewayd("status", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == ExitCode.UNAVAILABLE
    assert f"no gateway answers at http://127.0.0.1:{port}/status" in result.stderr
    assert result.stdout == ""
