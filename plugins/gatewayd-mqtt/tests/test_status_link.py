"""End to end: a running gateway's ``gatewayd status`` shows its MQTT link as the
session really is, connected, not while the broker is down, and connected again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from gatewayd_testing import running_gateway, until
from mosquitto import Mosquitto, free_port

from gatewayd import config


def status_json(admin: int) -> dict[str, Any]:
    """What an operator runs: ``gatewayd status --url ... --json``, in its own process."""
    url = f"http://127.0.0.1:{admin}"
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", "status", "--url", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout, out.stderr  # exit 69 while not ready still prints the view
    view: dict[str, Any] = json.loads(out.stdout)
    return view


async def test_status_shows_the_mqtt_link(
    broker: Mosquitto, gateway_config: Callable[..., config.Settings]
) -> None:
    admin = free_port()
    settings = gateway_config(
        f"""
[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {broker.port}
client_id = "gw-status"
service_id_template = "ue-{{device}}@iot.example"
connect_timeout = 3.0
reconnect_initial = 0.05
reconnect_max = 0.5
""",
        extra=f'[metrics]\nlisten = "127.0.0.1:{admin}"\n',
    )
    async with running_gateway(settings) as gw:
        transport = gw.transports["field"]
        await until(lambda: transport.link_state()["state"] == "connected", timeout=15)
        link = (await asyncio.to_thread(status_json, admin))["transports"]["field"]
        assert link == {"plugin": "mqtt", "state": "connected", "reconnects": 0, "unacked": 0}

        await asyncio.to_thread(broker.stop)
        await until(lambda: transport.link_state()["state"] != "connected", timeout=15)
        link = (await asyncio.to_thread(status_json, admin))["transports"]["field"]
        assert link["state"] in ("disconnected", "connecting")

        await asyncio.to_thread(broker.start)
        await until(lambda: transport.link_state()["state"] == "connected", timeout=15)
        link = (await asyncio.to_thread(status_json, admin))["transports"]["field"]
        assert (link["state"], link["reconnects"]) == ("connected", 1)
