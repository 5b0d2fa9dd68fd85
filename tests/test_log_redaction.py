"""Issue 8 finding 6: aiohttp's server logger must not write request excerpts.

A request aiohttp cannot parse used to be logged at error level with the offending
bytes quoted: a bare-LF request logged its bearer JWT, an over-long header the device
token. A real `gatewayd run` process gets both; then its whole log is searched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from jsonlog import entries, wait_for_event

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]
DEVICE_TOKEN = "device-token-7f3a9c0e5b1d4e2f"  # a test secret to look for
JWT = (
    "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1cm46Z2F0ZXdheWQ6c2VydmVyIn0."
    "c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_unparseable_requests_leave_no_secret_in_the_log(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    port = _free_port()
    text = harness.gateway_toml(
        loopback_pki,
        api_root=sim.api_root,
        state_dir=tmp_path / "state",
        transports=harness.http_transport_bearer(env_var="REDACTION_TOKEN"),
    ).replace('listen = "127.0.0.1:0"\n[[transports', f'listen = "127.0.0.1:{port}"\n[[transports')
    assert f"127.0.0.1:{port}" in text
    config = tmp_path / "gw.toml"
    config.write_text(text)
    log_path = tmp_path / "gateway.log"
    env = {**os.environ, "REDACTION_TOKEN": DEVICE_TOKEN}
    with log_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *GATEWAYD, "run", "--config", str(config), env=env, stderr=stderr
        )
    try:
        await wait_for_event(log_path, "gateway.started")
        path = b"/v1/devices/sensor-1/messages"
        bare_lf = b"POST " + path + b" HTTP/1.1\nHost: x\nAuthorization: Bearer " + JWT.encode()
        answer = await _send_raw(port, bare_lf + b"\n\n")
        assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request")
        too_long = (
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + DEVICE_TOKEN.encode()
            + b"x" * 20000
            + b"\r\n\r\n"
        )
        answer = await _send_raw(port, too_long)
        assert b" 4" in answer.split(b"\r\n")[0]
        await wait_for_event(log_path, "http.bad_request", count=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    log = log_path.read_text()
    assert JWT not in log
    assert JWT[:40] not in log
    assert DEVICE_TOKEN not in log
    assert DEVICE_TOKEN[:12] not in log
    bad = [e for e in entries(log) if e.get("event") == "http.bad_request"]
    assert {e["error"] for e in bad} == {"BadStatusLine", "LineTooLong"}
    assert all(e["level"] == "warning" and e["remote"] == "127.0.0.1" for e in bad)
