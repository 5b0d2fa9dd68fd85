"""Expiry into the dead-letter queue, replay with the real ``gatewayd queue retry``
command, failure reports for expired messages, and duplicates from a transport.

The gateway runs in this process with the HTTP transport (bearer-token devices whose
webhook is a real mutual-TLS server, ``e2e_device.Device``); ``gatewayd queue`` runs as
its own process next to it, on the same database, as an operator would run it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e_device import Device
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from loadgen import (
    export_tokens,
    http_bearer_transport,
    token_env,
)

from gatewayd import config
from gatewayd.store import Queue


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return export_tokens(monkeypatch, 2)


def _with_webhooks(tls: Pki, tokens: dict[str, str], webhook: str) -> str:
    """The HTTP transport, each device's webhook on ``webhook`` (mutual TLS both ways)."""
    devices = "".join(
        f"""
[[transports.web.devices]]
device = "{name}"
service_id = "ue-{name}@iot.example"
token = {{ env = "{token_env(name)}" }}
webhook = "{webhook}"
webhook_ca = "{tls["ca"]}"
"""
        for name in tokens
    )
    return f"""
[credentials.devices]
plugin = "x509"
cert = "{tls["gateway"]}"
key = "{tls["gateway_key"]}"
ca = "{tls["ca"]}"

[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
webhook_identity = "devices"
{devices}"""


async def _post(gw: Any, tokens: dict[str, str], device: str, body: dict[str, Any]) -> Any:
    host, port = gw.transports["web"].address
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{host}:{port}/v1/devices/{device}/messages",
            json=body,
            headers={"Authorization": f"Bearer {tokens[device]}"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def _queue_cli(*args: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", "queue", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )


async def test_expired_uplink_reports_failure_goes_to_dlq_and_replays_with_its_msg_id(
    loopback_pki: Pki,
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
) -> None:
    device = Device(loopback_pki)
    async with device.serving():
        settings = gateway_config(_with_webhooks(loopback_pki, tokens, device.webhook))
        async with running_gateway(settings) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            sim.fail(503, retry_after=1, seconds=600)  # the server is down for now
            soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
            status, answer = await _post(
                gw,
                tokens,
                "dev0",
                {"payload": "p1", "msgId": "exp-1", "expiry": soon, "deliveryReport": True},
            )
            assert (status, answer["msgId"]) == (202, "exp-1")
            status, _ = await _post(gw, tokens, "dev1", {"payload": "p2", "msgId": "keep-1"})
            assert status == 202

            # The exprTime passes while the server is down: a failure report reaches the
            # device (it asked for one), and the message waits in the DLQ.
            report = await device.next(timeout=30)
            assert (report["msgId"], report["delivered"]) == ("exp-1", False)
            assert report["cause"] == "EXPIRED"
            dead = await gw.store.list_items(queue=Queue.UPLINK, state="dead", limit=10)
            assert [item.msg_id for item in dead] == ["exp-1"]

            listed = _queue_cli("list", "--state", "dead", config_path=settings.source)
            assert listed.returncode == 0, listed.stderr
            assert "exp-1" in listed.stdout
            replayed = _queue_cli("retry", "--all", config_path=settings.source)
            assert replayed.returncode == 0, replayed.stderr
            assert "replayed 1 message(s)" in replayed.stdout

            sim.faults.clear()
            await sim.wait_for(lambda: len(sim.uplinks) == 2, timeout=60)
            arrived = {u.message.msg_id: u.message for u in sim.uplinks}
            assert set(arrived) == {"exp-1", "keep-1"}
            assert arrived["exp-1"].payload == "p1"
            assert sum(sim.duplicates.values()) == 0


async def test_device_resends_are_stored_and_sent_once(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        body = {"payload": "once", "msgId": "dup-1"}
        # Two copies at the same moment (they may share one group commit), ...
        answers = await asyncio.gather(*(_post(gw, tokens, "dev0", body) for _ in range(2)))
        assert sorted(a["duplicate"] for _, a in answers) == [False, True]
        await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=20)
        # ... and a third after the message was delivered (its tombstone remembers it).
        status, answer = await _post(gw, tokens, "dev0", body)
        assert (status, answer["duplicate"]) == (202, True)
        await asyncio.sleep(1.0)  # room for a wrong second send to show up
        stats = await gw.store.stats()
    assert [u.message.msg_id for u in sim.uplinks] == ["dup-1"]
    assert sum(sim.duplicates.values()) == 0  # not even a resend the server caught
    assert stats["queues"]["uplink"]["pending"] == 0


async def test_expiry_on_a_full_disk_keeps_the_gateway_up_and_reports_later(
    loopback_pki: Pki,
    sim: SimServer,
    tokens: dict[str, str],
    gateway_config: Callable[..., config.Settings],
) -> None:
    """A message expires while the disk is full: its failure report cannot be stored yet.
    The gateway must keep running, and the report must reach the device once space
    returns."""
    device = Device(loopback_pki)
    async with device.serving():
        settings = gateway_config(_with_webhooks(loopback_pki, tokens, device.webhook))
        async with running_gateway(settings) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            sim.fail(503, retry_after=1, seconds=600)
            soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
            body = {"payload": "p", "msgId": "exp-2", "expiry": soon, "deliveryReport": True}
            assert (await _post(gw, tokens, "dev0", body))[0] == 202
            # Fill the disk with another device's messages until intake refuses.
            used = (await gw.store.stats())["db_bytes"]
            await gw.store.limit_size(used + 16 * 1024)
            # Big bodies first, then tiny ones, so not even a small report fits.
            seq = 0
            for size in (1500, 200, 1):
                for _ in range(300):
                    seq += 1
                    fill = {"payload": "f" * size, "msgId": f"fill-{seq}"}
                    if (await _post(gw, tokens, "dev1", fill))[0] == 503:
                        break
                else:
                    raise AssertionError("the disk never filled")
            # A sweep after the exprTime (no waiting for it: the sweep is told the time)
            # meets the full disk: it defers, and the gateway stays up.
            assert gw.expiry is not None
            assert await gw.expiry.sweep(now=time.time() + 60) == []
            assert gw.expiry.deferred
            assert not gw._stop.is_set(), "a full disk stopped the gateway"
            await gw.store.limit_size(None)
            await gw.expiry.sweep(now=time.time() + 60)  # space is back: it expires now
            report = await device.next(timeout=30)
            assert (report["msgId"], report["delivered"]) == ("exp-2", False)
