"""Uplink and downlink, each with its report, through a real gateway and reference server.

Every leg is a real TLS connection on loopback. The reference server validates every
body it receives from the gateway and sends to it against the 3GPP OpenAPI files.
"""

from __future__ import annotations

from collections.abc import Callable

from e2e_device import Device
from gatewayd_sim.harness import DEMO_AS, DEMO_SERVICE_ID, Pki, http_transport_mtls
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway

from gatewayd import config
from gatewayd.pki import DEMO_GATEWAY_ID


async def test_uplink_with_report_and_downlink_with_report(
    loopback_pki: Pki, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    device = Device(loopback_pki)
    async with device.serving():
        settings = gateway_config(http_transport_mtls(loopback_pki, device.webhook))
        async with running_gateway(settings) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            (reg,) = sim.registrations
            assert reg.gw_id == DEMO_GATEWAY_ID
            assert reg.ue_svc_ids == (DEMO_SERVICE_ID,)
            _, port = gw.transports["web"].address  # type: ignore[attr-defined]

            # Uplink: device -> gateway -> server, and the server's report back.
            status, answer = await device.send(
                port, "sensor-1", {"payload": "t=21.5", "msgId": "up-1", "deliveryReport": True}
            )
            assert (status, answer["msgId"]) == (202, "up-1")
            await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=10)
            up = sim.uplinks[0].message
            assert (up.ori_addr.addr_type, up.ori_addr.addr) == ("UE", DEMO_SERVICE_ID)
            assert (up.dest_addr.addr_type, up.dest_addr.addr) == ("AS", DEMO_AS)
            assert (up.payload, up.deliv_st_req_ind, up.sto_and_fw_ind) == ("t=21.5", True, True)
            report = await device.next()
            assert report["msgId"] == "up-1"
            assert report["delivered"] is True

            # Downlink: server -> gateway -> device, and the device's report to the server.
            push = await sim.send_downlink(
                DEMO_SERVICE_ID, "set-interval=60", deliv_st_req_ind=True, msg_id="down-1"
            )
            assert push.status == 204
            got = await device.next()
            assert got["msgId"] == "down-1"
            assert got["payload"] == "set-interval=60"
            await sim.wait_for(lambda: len(sim.reports) == 1, timeout=10)
            rep = sim.reports[0].report
            assert rep.msg_id == "down-1"
            assert rep.deliv_st == "REPT_DELY_SUCCESS"
            assert rep.ori_addr.addr == DEMO_SERVICE_ID

            # A device's reply without a destination follows the reply route to the AS.
            await device.send(port, "sensor-1", {"payload": "ok", "msgId": "up-2"})
            await sim.wait_for(lambda: len(sim.uplinks) == 2, timeout=10)
            assert sim.uplinks[1].message.dest_addr.addr == sim.settings.as_address
        # A clean stop deregisters.
        assert sim.registrations == []


async def test_resent_downlink_is_delivered_once(
    loopback_pki: Pki, sim: SimServer, gateway_config: Callable[..., config.Settings]
) -> None:
    device = Device(loopback_pki)
    async with device.serving():
        settings = gateway_config(http_transport_mtls(loopback_pki, device.webhook))
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            first = await sim.send_downlink(DEMO_SERVICE_ID, "x", msg_id="same")
            again = await sim.send_downlink(DEMO_SERVICE_ID, "x", msg_id="same")
            assert (first.status, again.status) == (204, 204)
            assert (await device.next())["msgId"] == "same"
            third = await sim.send_downlink(DEMO_SERVICE_ID, "y", msg_id="other")
            assert third.status == 204
            # The next message to arrive is the new one: the resend was not delivered twice.
            assert (await device.next())["msgId"] == "other"
