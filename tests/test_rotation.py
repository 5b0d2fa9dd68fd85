"""Credential rotation without a restart, under traffic, as an operator does it.

A real ``gatewayd run`` process; devices post uplinks continuously over HTTP (bearer
tokens) while the reference server (in this process) pushes downlinks. The gateway's
certificate and key are replaced on disk, then picked up by SIGHUP or by the file
watch. Checked: new connections carry the new certificate (seen by the server on our
northbound calls, and by a fresh handshake with our API), the process never restarts,
and nothing is lost or failed across the switch. A CRL rotation refuses a newly revoked
peer, and a half-written file keeps the old material until the rotation completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from jsonlog import events, wait_for_event

from gatewayd import pki
from gatewayd.api import TlsIdentity
from gatewayd.security import tls

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]
DEVICES = ("dev-a", "dev-b", "dev-c")


def service_id(device: str) -> str:
    return f"ue-{device}@iot.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serial_of(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class RecordingSim(SimServer):
    """The reference server, also recording the serial of each caller's certificate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_serials: list[int] = []

    def _app(self) -> web.Application:
        app = super()._app()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            assert request.transport is not None
            ssl_object = request.transport.get_extra_info("ssl_object")
            self.client_serials.append(serial_of(ssl_object.getpeercert(binary_form=True)))
            return await handler(request)

        app.middlewares.append(record)
        return app


@pytest_asyncio.fixture
async def sim(loopback_pki: Pki) -> AsyncIterator[RecordingSim]:
    settings = harness.sim_settings(loopback_pki, service_ids=tuple(map(service_id, DEVICES)))
    async with RecordingSim(settings, schema_check=True) as server:
        yield server


@dataclass
class Webhooks:
    """The devices' webhooks (plain HTTP on loopback): what each device received."""

    received: list[str] = field(default_factory=list)
    port: int = 0

    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append((await request.json())["msgId"])
        self.changed.set()
        return web.Response(status=204)

    async def wait_for(self, msg_ids: set[str], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not msg_ids <= set(self.received):
                self.changed.clear()
                await self.changed.wait()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Webhooks]:
        app = web.Application()
        app.router.add_post("/inbox/{device}", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = int(runner.addresses[0][1])
        try:
            yield self
        finally:
            await runner.cleanup()


def gateway_config(
    tmp_path: Path, tls_files: Pki, sim: SimServer, *, device_port: int, hook_port: int, crl: bool
) -> Path:
    devices = "".join(
        f"""
[[transports.web.devices]]
device = "{d}"
service_id = "{service_id(d)}"
webhook = "http://127.0.0.1:{hook_port}/inbox/{d}"
token = {{ env = "TOKEN_{d.replace("-", "_").upper()}" }}
"""
        for d in DEVICES
    )
    text = harness.gateway_toml(
        tls_files,
        api_root=sim.api_root,
        state_dir=tmp_path / "state",
        transports=f'[transports.web]\nplugin = "http"\nlisten = "127.0.0.1:{device_port}"\n'
        + devices,
        extra='[log]\nformat = "json"\n',
    )
    if crl:
        ca_line = f'ca = "{tls_files["ca"]}"'
        text = text.replace(ca_line, f'{ca_line}\ncrl = ["{tls_files["crl"]}"]')
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def token(device: str) -> str:
    return f"token-for-{device}"


@dataclass
class Gateway:
    proc: asyncio.subprocess.Process
    log: Path
    device_port: int
    api_port: int


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, tls_files: Pki, sim: SimServer, hooks: Webhooks, *, crl: bool = False
) -> AsyncIterator[Gateway]:
    device_port = free_port()
    config = gateway_config(
        tmp_path, tls_files, sim, device_port=device_port, hook_port=hooks.port, crl=crl
    )
    log_path = tmp_path / "gateway.log"
    env = {**os.environ, **{f"TOKEN_{d.replace('-', '_').upper()}": token(d) for d in DEVICES}}
    with log_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *GATEWAYD, "run", "--config", str(config), env=env, stderr=stderr
        )
    try:
        await wait_for_event(log_path, "gateway.started")
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        api_port = urlsplit(sim.registrations[0].target_uri).port
        assert api_port is not None
        yield Gateway(proc, log_path, device_port, api_port)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@dataclass
class Traffic:
    """Uplinks from every device and downlinks to them, until stopped."""

    sim: SimServer
    device_port: int
    acked: list[str] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    push_failures: list[tuple[str, int, str | None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _uplinks(self, device: str) -> None:
        url = f"http://127.0.0.1:{self.device_port}/v1/devices/{device}/messages"
        headers = {"Authorization": f"Bearer {token(device)}"}
        async with aiohttp.ClientSession() as session:
            n = 0
            while not self._stop.is_set():
                msg_id = f"{device}-up-{n}"
                n += 1
                async with session.post(
                    url, json={"payload": f"n={n}", "msgId": msg_id}, headers=headers
                ) as resp:
                    if resp.status == 202:
                        self.acked.append(msg_id)
                    else:
                        self.refused.append((msg_id, resp.status))
                await asyncio.sleep(0.02)

    async def _downlinks(self) -> None:
        n = 0
        while not self._stop.is_set():
            device = DEVICES[n % len(DEVICES)]
            msg_id = f"{device}-down-{n}"
            n += 1
            result = await self.sim.send_downlink(service_id(device), "cmd", msg_id=msg_id)
            if result.status == 204:
                self.pushed.append(msg_id)
            else:
                self.push_failures.append((msg_id, result.status, result.error))
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Traffic]:
        async with asyncio.TaskGroup() as group:
            for device in DEVICES:
                group.create_task(self._uplinks(device), name=f"traffic:{device}")
            group.create_task(self._downlinks(), name="traffic:downlinks")
            try:
                yield self
            finally:
                self._stop.set()


def new_gateway_certificate(tls_files: Pki) -> pki.Issued:
    """A new certificate from the same CA for the same identity (a new serial and key)."""
    ca = pki.load_ca(tls_files["ca"], tls_files["ca_key"])
    return pki.issue(
        ca,
        "gatewayd",
        dns=("localhost",),
        uris=(pki.DEMO_GATEWAY_ID,),
        ips=("127.0.0.1", "::1"),
    )


def replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def api_serial(tls_files: Pki, port: int) -> int:
    """A fresh handshake with the gateway's API, as the server: which certificate it shows."""
    ctx = tls.client_context(tls_files.trust(), tls_files.identity("server_client"))
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        return serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def current_serial(tls_files: Pki) -> int:
    return x509.load_pem_x509_certificate(tls_files["gateway"].read_bytes()).serial_number


async def assert_nothing_lost(traffic: Traffic, sim: SimServer, hooks: Webhooks) -> None:
    assert traffic.refused == []
    assert traffic.push_failures == []
    acked = set(traffic.acked)
    await sim.wait_for(lambda: acked <= {u.message.msg_id for u in sim.uplinks}, timeout=30)
    await hooks.wait_for(set(traffic.pushed))


async def rotate_under_traffic(
    tmp_path: Path, tls_files: Pki, sim: RecordingSim, *, signal_hup: bool
) -> None:
    hooks = Webhooks()
    async with (
        hooks.serving(),
        gateway_process(tmp_path, tls_files, sim, hooks) as gw,
    ):
        old = current_serial(tls_files)
        assert await api_serial(tls_files, gw.api_port) == old
        traffic = Traffic(sim, gw.device_port)
        async with traffic.running():
            await asyncio.sleep(1.5)
            before = (len(traffic.acked), len(traffic.pushed))
            issued = new_gateway_certificate(tls_files)
            # Key first, then chain, each replaced atomically (as docs/operations.md says).
            replace_atomically(tls_files["gateway_key"], issued.key_pem)
            replace_atomically(tls_files["gateway"], issued.cert_pem)
            if signal_hup:
                gw.proc.send_signal(signal.SIGHUP)
            await wait_for_event(gw.log, "credentials.reloaded", timeout=20)
            mark = len(sim.client_serials)
            await asyncio.sleep(2.0)  # traffic keeps flowing on the new material
        new = issued.cert.serial_number
        assert new != old
        # Fresh connections carry the new certificate, both ways.
        assert await api_serial(tls_files, gw.api_port) == new
        assert old in sim.client_serials[:mark]
        assert new in sim.client_serials[mark:]
        # Traffic really flowed before and after the switch, and none of it was lost.
        assert before[0] > 10
        assert before[1] > 5
        assert len(traffic.acked) > before[0] + 10
        assert len(traffic.pushed) > before[1] + 5
        await assert_nothing_lost(traffic, sim, hooks)
        # The same process all along.
        assert gw.proc.returncode is None
        assert len(events(gw.log, "gateway.started")) == 1
        assert events(gw.log, "credentials.reload_failed") == []
        assert events(gw.log, "message.delivery_failed") == []
        assert events(gw.log, "message.rejected") == []


async def test_sighup_rotates_the_certificate_under_traffic(
    tmp_path: Path, loopback_pki: Pki, sim: RecordingSim
) -> None:
    await rotate_under_traffic(tmp_path, loopback_pki, sim, signal_hup=True)


async def test_file_change_rotates_the_certificate_under_traffic(
    tmp_path: Path, loopback_pki: Pki, sim: RecordingSim
) -> None:
    await rotate_under_traffic(tmp_path, loopback_pki, sim, signal_hup=False)


async def test_half_written_certificate_keeps_the_old_one_until_complete(
    tmp_path: Path, loopback_pki: Pki, sim: RecordingSim
) -> None:
    """A file caught half-written fails to load: the old material stays in service, the
    failure is logged, and the next change (the finished write) is picked up."""
    hooks = Webhooks()
    async with hooks.serving(), gateway_process(tmp_path, loopback_pki, sim, hooks) as gw:
        old = current_serial(loopback_pki)
        issued = new_gateway_certificate(loopback_pki)
        cert_pem = issued.cert_pem
        loopback_pki["gateway"].write_bytes(cert_pem[: len(cert_pem) // 2])  # half a chain
        await wait_for_event(gw.log, "credentials.reload_failed", timeout=20)
        (failed,) = events(gw.log, "credentials.reload_failed")
        assert failed["level"] == "error"
        assert "gateway.pem" in failed["error"]
        # Still serving, with the old certificate.
        assert await api_serial(loopback_pki, gw.api_port) == old
        traffic = Traffic(sim, gw.device_port)
        async with traffic.running():
            await asyncio.sleep(0.5)
            # The rest of the rotation: the matching key, then the whole chain.
            replace_atomically(loopback_pki["gateway_key"], issued.key_pem)
            replace_atomically(loopback_pki["gateway"], cert_pem)
            await wait_for_event(gw.log, "credentials.reloaded", timeout=20)
            await asyncio.sleep(0.5)
        assert await api_serial(loopback_pki, gw.api_port) == issued.cert.serial_number
        assert len(traffic.acked) > 10
        await assert_nothing_lost(traffic, sim, hooks)
        assert len(events(gw.log, "gateway.started")) == 1


def tls_probe(tls_files: Pki, port: int, identity: TlsIdentity) -> str:
    """Connect to the gateway's API with ``identity`` and send a request; "ok" once an
    HTTP answer comes back, else the TLS error."""
    ctx = tls.client_context(tls_files.trust(), identity)
    # TLS 1.3 tells a client its certificate was refused only after the handshake; with
    # TLS 1.2 the refusal is part of the handshake.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = conn.recv(64)
    except (ssl.SSLError, ConnectionResetError) as exc:
        return str(exc)
    return "ok" if answer.startswith(b"HTTP/1.1") else f"unexpected: {answer!r}"


async def test_new_crl_refuses_a_revoked_peer_after_reload(
    tmp_path: Path, loopback_pki: Pki, sim: RecordingSim
) -> None:
    ca = pki.load_ca(loopback_pki["ca"], loopback_pki["ca_key"])
    issued = pki.issue(ca, "another-server", dns=("localhost",), uris=("urn:test:peer",))
    peer = TlsIdentity(cert_chain_pem=issued.cert_pem, key_pem=issued.key_pem)
    hooks = Webhooks()
    async with hooks.serving(), gateway_process(tmp_path, loopback_pki, sim, hooks, crl=True) as gw:
        assert await asyncio.to_thread(tls_probe, loopback_pki, gw.api_port, peer) == "ok"
        # CRLs are told apart by lastUpdate, in whole seconds: make the new one newer.
        await asyncio.sleep(1.1)
        crl = pki.create_crl(ca, revoked=(issued.cert,))
        replace_atomically(loopback_pki["crl"], crl)
        await wait_for_event(gw.log, "credentials.reloaded", timeout=20)
        refused = await asyncio.to_thread(tls_probe, loopback_pki, gw.api_port, peer)
        # The asyncio server drops the handshake without an alert: the client sees EOF.
        assert refused != "ok"
        assert "EOF" in refused or "REVOKED" in refused.upper()
        # A new handshake with a certificate that is not revoked still succeeds: the
        # refusal is the revocation, not a broken context.
        server = loopback_pki.identity("server_client")
        assert await asyncio.to_thread(tls_probe, loopback_pki, gw.api_port, server) == "ok"
        # The server (not revoked) still gets through, both ways.
        result = await sim.send_downlink(service_id(DEVICES[0]), "after-crl", msg_id="crl-1")
        assert result.status == 204
        await hooks.wait_for({"crl-1"})
        assert gw.proc.returncode is None
