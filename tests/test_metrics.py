"""The metrics endpoint and certificate expiry, seen as an operator sees them.

A real ``gatewayd run`` process, the reference server in this process, scrapes over
real HTTP, and the gateway's JSON log read from the file it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from jsonlog import events, tail, wait_for_event
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gatewayd import metrics, pki
from gatewayd.errors import ExitCode
from gatewayd.store import Item, Queue

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]
TOKEN = "metrics-test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def transport(port: int) -> str:
    return f"""
[transports.web]
plugin = "http"
listen = "127.0.0.1:{port}"
[[transports.web.devices]]
device = "sensor-1"
service_id = "{DEMO_SERVICE_ID}"
token = {{ env = "GATEWAYD_TEST_TOKEN" }}
"""


def write_config(
    tmp_path: Path, tls: Pki, api_root: str, *, device_port: int, extra: str = ""
) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        harness.gateway_toml(
            tls,
            api_root=api_root,
            state_dir=tmp_path / "state",
            transports=transport(device_port),
            extra='[log]\nformat = "json"\n' + extra,
        )
    )
    return path


@contextlib.asynccontextmanager
async def gateway_process(
    config: Path, log_path: Path, extra_env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``gatewayd run`` until it logged gateway.started; SIGTERM and exit 0 on the way out."""
    env = {**os.environ, "GATEWAYD_TEST_TOKEN": TOKEN, **(extra_env or {})}
    with log_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *GATEWAYD, "run", "--config", str(config), env=env, stderr=stderr
        )
    try:
        await wait_for_event(log_path, "gateway.started")
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, tail(log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def scrape(port: int) -> tuple[str, dict[str, dict[tuple[str, ...], float]]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
        return resp.headers["Content-Type"], metrics.parse(text)


def reissue_gateway(tls: Pki, **validity: Any) -> x509.Certificate:
    """A new gateway certificate from the same CA, written over the configured files."""
    ca = pki.load_ca(tls["ca"], tls["ca_key"])
    issued = pki.issue(
        ca,
        "gatewayd",
        dns=("localhost",),
        uris=(pki.DEMO_GATEWAY_ID,),
        ips=("127.0.0.1", "::1"),
        **validity,
    )
    pki.write_pair(tls["gateway"].parent, "gateway", issued)
    return issued.cert


def test_parse_reads_the_exposition_of_prometheus_client() -> None:
    registry = CollectorRegistry()
    counter = Counter("t", "a test\ncounter", ("kind",), registry=registry)
    gauge = Gauge("t_level", "a gauge", registry=registry)
    counter.labels(kind='odd "quoted", with\\comma\nand newline').inc()
    counter.labels(kind="plain").inc(2)
    gauge.set(-1.5)
    parsed = metrics.parse(generate_latest(registry).decode())
    assert parsed["t_total"] == {('odd "quoted", with\\comma\nand newline',): 1.0, ("plain",): 2.0}
    assert parsed["t_level"] == {(): -1.5}


async def test_scrape_counts_messages_backlog_and_certificate_expiry(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    device_port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        loopback_pki,
        sim.api_root,
        device_port=device_port,
        extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )
    log_path = tmp_path / "gateway.log"
    async with gateway_process(config, log_path):
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                async with session.post(
                    f"http://127.0.0.1:{device_port}/v1/devices/sensor-1/messages",
                    json={"payload": f"n={i}", "msgId": f"m-{i}"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp:
                    assert resp.status == 202
        await sim.wait_for(lambda: len(sim.uplinks) == 3, timeout=10)
        # message.forwarded is a debug event: the counter says when all three settled.
        for _ in range(100):
            content_type, values = await scrape(metrics_port)
            if values["gatewayd_messages_total"][("uplink", "forwarded", "web")] == 3:
                break
            await asyncio.sleep(0.1)

    assert content_type.startswith("text/plain; version=")
    messages = values["gatewayd_messages_total"]
    # (direction, outcome, transport); every series of the transport exists from the start.
    assert messages[("uplink", "received", "web")] == 3
    assert messages[("uplink", "forwarded", "web")] == 3
    assert messages[("downlink", "delivered", "web")] == 0
    assert values["gatewayd_relay_seconds_count"][("uplink", "web")] == 3
    assert (
        values["gatewayd_northbound_request_seconds_count"][
            ("POST /msgs-msgdelivery/v1/deliver-ue-message",)
        ]
        == 3
    )
    assert values["gatewayd_store_backlog"] == {
        ("uplink",): 0,
        ("downlink",): 0,
        ("report",): 0,
        ("segment",): 0,
        ("intake",): 0,
    }
    assert values["gatewayd_registered"] == {(): 1}
    assert values["gatewayd_circuit_state"][("northbound", "closed")] == 1
    assert values["gatewayd_build_info"][(platform.python_version(), metrics.__version__)] == 1
    assert values["process_resident_memory_bytes"][()] > 0
    cert = x509.load_pem_x509_certificate(loopback_pki["gateway"].read_bytes())
    expected = cert.not_valid_after_utc.timestamp()
    assert values["gatewayd_credential_not_after_seconds"] == {("northbound",): expected}
    days_left = values["gatewayd_credential_days_left"][("northbound",)]
    assert 364 < days_left < 366
    assert events(log_path, "metrics.listening")[0]["port"] == metrics_port
    assert events(log_path, "credentials.expiring") == []  # a year left: no warning


async def test_expiring_certificate_warns_at_start_and_on_reload(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    """The core warns for any backend (x509's own warning switched off here), by the
    threshold in gateway.cert_warning_days, and the gauge shows the days left."""
    cert = reissue_gateway(loopback_pki, days=10)
    metrics_port = free_port()
    config = write_config(
        tmp_path,
        loopback_pki,
        sim.api_root,
        device_port=free_port(),
        extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )
    text = config.read_text()
    text = text.replace("drain_timeout = 5.0", "drain_timeout = 5.0\ncert_warning_days = 14")
    config.write_text(text)
    log_path = tmp_path / "gateway.log"
    async with gateway_process(config, log_path) as proc:
        (warning,) = events(log_path, "credentials.expiring")
        assert warning["level"] == "warning"
        assert warning["credentials"] == "northbound"
        assert warning["warning_days"] == 14
        assert 9 < warning["days_left"] <= 10
        assert warning["not_after"] == cert.not_valid_after_utc.isoformat()
        _, values = await scrape(metrics_port)
        assert 9 < values["gatewayd_credential_days_left"][("northbound",)] <= 10

        proc.send_signal(signal.SIGHUP)
        await wait_for_event(log_path, "credentials.reloaded")
        await wait_for_event(log_path, "credentials.expiring", 2)
        _, values = await scrape(metrics_port)
        assert values["gatewayd_credential_reloads_total"] == {("ok",): 1, ("failed",): 0}


def test_expired_identity_is_refused_with_exit_77(tmp_path: Path, loopback_pki: Pki) -> None:
    now = dt.datetime.now(dt.UTC)
    reissue_gateway(
        loopback_pki, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    config = write_config(tmp_path, loopback_pki, "https://127.0.0.1:9", device_port=free_port())
    env = {**os.environ, "GATEWAYD_TEST_TOKEN": TOKEN}
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = subprocess.run(
            [*GATEWAYD, *command], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert result.returncode == ExitCode.CREDENTIALS, result.stderr
        assert "gateway.pem" in result.stderr
        assert "expired" in result.stderr
        assert '"event": "gateway.started"' not in result.stderr


def test_metrics_listener_must_be_loopback_unless_allowed(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    def check(extra: str) -> subprocess.CompletedProcess[str]:
        config = write_config(
            tmp_path, loopback_pki, "https://127.0.0.1:9", device_port=free_port(), extra=extra
        )
        return subprocess.run(
            [*GATEWAYD, "check-config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GATEWAYD_TEST_TOKEN": TOKEN},
            check=False,
        )

    refused = check('[metrics]\nlisten = "0.0.0.0:9464"\n')
    assert refused.returncode == ExitCode.CONFIG
    assert "metrics.listen: '0.0.0.0' is not a loopback address" in refused.stderr
    assert check('[metrics]\nlisten = "0.0.0.0:9464"\nallow_remote = true\n').returncode == 0
    assert check('[metrics]\nlisten = "[::1]:9464"\n').returncode == 0


def test_settled_and_expired_map_outcomes_to_series() -> None:
    """The worker's verdicts per queue, as the counters name them (in-process registry)."""
    metrics.use_transport_lookup(lambda lane: "t-" + lane)
    try:
        _settle_every_kind()
    finally:
        metrics.use_transport_lookup(lambda _lane: "unknown")


def _item(queue: Queue, body: dict[str, Any] | None = None, *, lane: str = "x") -> Item:
    """A pending store item for the counters to classify."""
    return Item(
        id=1,
        queue=queue,
        msg_id="m",
        lane=lane,
        body=body or {},
        created=0.0,
        attempts=0,
        not_before=0.0,
        expires_at=None,
        last_error=None,
        state="pending",
    )


def test_an_expired_segment_set_counts_once_whichever_segments_it_had() -> None:
    """A set waiting for reassembly expires because a segment is missing, maybe the
    first: segments 2 and 3 of one set are one expired message, two sets are two."""

    def segment(seg_id: str, numb: int) -> Item:
        wire = {"msgId": f"{seg_id}.{numb}", "segParams": {"segId": seg_id, "segNumb": numb}}
        return _item(Queue.SEGMENT, {"kind": "message", "wire": wire}, lane=f"x|as|{seg_id}")

    metrics.use_transport_lookup(lambda lane: "t-" + lane)
    try:
        labels = {"direction": "segment", "transport": "t-x", "outcome": "expired"}
        before = metrics.value("gatewayd_messages_total", **labels)
        metrics.expired([segment("s1", 2), segment("s1", 3), segment("s2", 1)])
        assert metrics.value("gatewayd_messages_total", **labels) - before == 2
    finally:
        metrics.use_transport_lookup(lambda _lane: "unknown")


def test_items_on_a_sub_lane_count_for_their_devices_transport() -> None:
    """A lane "service id|..." (a pipelined device's sub-lane, a segment set) counts for
    the transport of its service id."""
    from gatewayd.worker import Done

    metrics.use_transport_lookup(lambda service_id: "t-" + service_id)
    try:

        def count(direction: str, outcome: str) -> float:
            labels = {"direction": direction, "transport": "t-x", "outcome": outcome}
            return metrics.value("gatewayd_messages_total", **labels)

        before = count("uplink", "forwarded"), count("downlink", "expired")
        metrics.settled(_item(Queue.UPLINK, lane="x|3"), Done())
        metrics.expired([_item(Queue.DOWNLINK, {"kind": "message"}, lane="x|1")])
        after = count("uplink", "forwarded"), count("downlink", "expired")
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    finally:
        metrics.use_transport_lookup(lambda _lane: "unknown")


def _settle_every_kind() -> None:
    from gatewayd.worker import Dead, Done, Retry

    def count(direction: str, outcome: str) -> float:
        return metrics.value(
            "gatewayd_messages_total", direction=direction, transport="t-x", outcome=outcome
        )

    before = {
        (d, o): count(d, o)
        for d in ("uplink", "downlink")
        for o in ("forwarded", "rejected", "deferred", "delivered", "failed", "expired")
    }
    sent = metrics.value("gatewayd_reports_total", outcome="sent")
    metrics.settled(_item(Queue.UPLINK), Done())
    metrics.settled(_item(Queue.UPLINK), Dead("no"))
    metrics.settled(_item(Queue.UPLINK), Retry("later"))
    metrics.settled(_item(Queue.DOWNLINK, {"kind": "message"}), Done())
    metrics.settled(_item(Queue.DOWNLINK, {"kind": "message"}), Dead("no"))
    metrics.settled(_item(Queue.DOWNLINK, {"kind": "report"}), Done())  # counted elsewhere
    metrics.settled(_item(Queue.REPORT), Done())
    metrics.expired([_item(Queue.DOWNLINK, {"kind": "message"})])
    after = {key: count(*key) - value for key, value in before.items()}
    assert after == {
        ("uplink", "forwarded"): 1,
        ("uplink", "rejected"): 1,
        ("uplink", "deferred"): 1,
        ("uplink", "delivered"): 0,
        ("uplink", "failed"): 0,
        ("uplink", "expired"): 0,
        ("downlink", "forwarded"): 0,
        ("downlink", "rejected"): 0,
        ("downlink", "deferred"): 0,
        ("downlink", "delivered"): 1,
        ("downlink", "failed"): 1,
        ("downlink", "expired"): 1,
    }
    assert metrics.value("gatewayd_reports_total", outcome="sent") == sent + 1
    assert metrics.value("gatewayd_relay_seconds_count", direction="uplink", transport="t-x") >= 1
