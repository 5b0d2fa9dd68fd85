"""Uplink and downlink, each with its report, through a real gateway and reference server.

Every leg is a real TLS connection on loopback. The reference server validates every
body it receives from the gateway and sends to it against the 3GPP OpenAPI files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiohttp import web
from e2e_device import Device
from gatewayd_sim.harness import DEMO_AS, DEMO_SERVICE_ID, Pki, http_transport_mtls
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway, until
from gatewayd_testing.postgres import PASSWORD, PostgresServer
from shared_store import PASSWORD_ENV, store_toml

from gatewayd import config
from gatewayd.envelope import device_lane
from gatewayd.pki import DEMO_GATEWAY_ID
from gatewayd.store import Queue


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


class HoldingDevice(Device):
    """A device whose webhook holds every delivery until ``release`` is set, counting
    how many are in flight at once."""

    def __init__(self, pki: Pki) -> None:
        super().__init__(pki)
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def _hook(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
            return await super()._hook(request)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("pipeline", [1, 4])
async def test_a_pipelined_device_gets_several_downlinks_at_once(
    loopback_pki: Pki,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    pipeline: int,
) -> None:
    """``pipeline = 4``: four of one device's messages at its webhook at once. The
    default, 1: one at a time, in the order the server sent them."""
    device = HoldingDevice(loopback_pki)
    async with device.serving():
        table = http_transport_mtls(loopback_pki, device.webhook)
        assert table.count('plugin = "http"\n') == 1
        table = table.replace('plugin = "http"\n', f'plugin = "http"\npipeline = {pipeline}\n')
        async with running_gateway(gateway_config(table)) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            ids = [f"down-{n}" for n in range(8)]
            for msg_id in ids:
                assert (
                    await sim.send_downlink(DEMO_SERVICE_ID, msg_id, msg_id=msg_id)
                ).status == 204
            lanes = {device_lane(DEMO_SERVICE_ID, i, pipeline) for i in ids}
            assert len(lanes) == pipeline  # these ids take every sub-lane
            await until(lambda: device.in_flight == pipeline, timeout=10, what="deliveries")
            # Every lane with work is busy: the store hands out nothing more.
            assert await gw.store.take(Queue.DOWNLINK, limit=64) == []
            device.release.set()
            got = [(await device.next())["msgId"] for _ in ids]
    assert device.most == pipeline
    assert sorted(got) == sorted(ids)
    if pipeline == 1:
        assert got == ids


async def test_a_nul_in_a_msg_id_among_normal_traffic_on_postgresql(
    loopback_pki: Pki,
    sim: SimServer,
    gateway_config: Callable[..., config.Settings],
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """U+0000 in a msgId is valid JSON and valid to the 3GPP schema, and PostgreSQL text
    cannot hold it. On the PostgreSQL store such a message goes both ways, its id whole,
    and the normal messages around it are unaffected."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    postgres_server.create_database("nul")
    store = store_toml(postgres_server, "nul", lease=5)
    device = Device(loopback_pki)
    async with device.serving():
        settings = gateway_config(http_transport_mtls(loopback_pki, device.webhook), extra=store)
        async with running_gateway(settings) as gw:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            _, port = gw.transports["web"].address  # type: ignore[attr-defined]
            ups = ["up-1", "a\x00b", "up-3"]
            for msg_id in ups:
                status, answer = await device.send(
                    port, "sensor-1", {"payload": "p", "msgId": msg_id}
                )
                assert (status, answer["msgId"]) == (202, msg_id)
            await sim.wait_for(lambda: len(sim.uplinks) == 3, timeout=10)
            assert [u.message.msg_id for u in sim.uplinks] == ups
            downs = ["down-1", "d\x00x", "down-3"]
            for msg_id in downs:
                push = await sim.send_downlink(DEMO_SERVICE_ID, "p", msg_id=msg_id)
                assert push.status == 204
            assert [(await device.next())["msgId"] for _ in downs] == downs
