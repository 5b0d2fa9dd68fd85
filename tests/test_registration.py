"""Registration lifecycle and the L3G role, against the reference server."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_device import Device
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway

TRANSPORT = harness.http_transport_bearer(extra='webhook = "WEBHOOK"\nwebhook_ca = "CA"\n')


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")


async def test_registration_is_refreshed_before_it_expires(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    # The server grants 3 s whatever we ask: the gateway must refresh at about 2 s.
    async with SimServer(harness.sim_settings(loopback_pki, max_ttl=3.0)) as sim:
        settings = harness.write_config(
            tmp_path / "gw.toml",
            harness.gateway_toml(
                loopback_pki,
                api_root=sim.api_root,
                state_dir=tmp_path / "s",
                transports=TRANSPORT.replace('webhook = "WEBHOOK"\nwebhook_ca = "CA"\n', ""),
            ),
        )
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            first = sim.registrations[0].expiry
            await sim.wait_for(
                lambda: bool(sim.registrations) and sim.registrations[0].expiry > first,
                timeout=6,
            )
            assert len(sim.registrations) == 1  # refreshed in place, not duplicated


async def test_l3g_role_serves_msgg_l3gdelivery(tmp_path: Path, loopback_pki: Pki) -> None:
    sim_settings = harness.sim_settings(loopback_pki, gateway_type="L3G")
    device = Device(loopback_pki, require_client_cert=False)
    async with SimServer(sim_settings, schema_check=True) as sim, device.serving():
        transports = TRANSPORT.replace("WEBHOOK", device.webhook).replace(
            "CA", str(loopback_pki["ca"])
        )
        settings = harness.write_config(
            tmp_path / "gw.toml",
            harness.gateway_toml(
                loopback_pki,
                api_root=sim.api_root,
                state_dir=tmp_path / "s",
                transports=transports,
                gateway_type="L3G",
            ),
        )
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            assert sim.registrations[0].gw_type == "L3G"
            assert "/msgg-l3gdelivery/v1" in sim.registrations[0].delivery_root
            push = await sim.send_downlink(DEMO_SERVICE_ID, "hello", msg_id="l3g-1")
            assert push.status == 204
            assert (await device.next())["msgId"] == "l3g-1"
