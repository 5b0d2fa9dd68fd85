"""End to end in the L3G role: SMSC (npm smpp) <-> gateway <-> reference MSGin5G Server."""

from __future__ import annotations

from pathlib import Path

from conftest import DEVICE, PASSWORD
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from smsc_peer import Smsc
from strict_smsc import StrictSmsc

from gatewayd.config import Settings

SERVICE_ID = "ue-sms-1@iot.example"


def transport_toml(port: int) -> str:
    return f"""
[transports.sms]
plugin = "smpp"
host = "127.0.0.1"
port = {port}
system_id = "gatewayd"
password = {{ env = "SMPP_TEST_PASSWORD" }}
source_addr = "4000"
reconnect_initial = 0.05
reconnect_max = 0.5
receipt_timeout = 10.0

[[transports.sms.devices]]
device = "{DEVICE}"
service_id = "{SERVICE_ID}"
"""


def l3g_sim(pki: Pki) -> SimServer:
    """The reference server, expecting an L3G gateway."""
    return SimServer(harness.sim_settings(pki, gateway_type="L3G"), schema_check=True)


def l3g_settings(tmp_path: Path, pki: Pki, sim: SimServer, port: int) -> Settings:
    """A gateway in the L3G role with the smpp transport toward ``port``."""
    return harness.write_config(
        tmp_path / "gw.toml",
        harness.gateway_toml(
            pki,
            api_root=sim.api_root,
            state_dir=tmp_path / "state",
            transports=transport_toml(port),
            gateway_type="L3G",
        ),
    )


async def test_sms_round_trip_through_the_gateway(
    tmp_path: Path, loopback_pki: Pki, smsc: Smsc
) -> None:
    async with l3g_sim(loopback_pki) as sim:
        settings = l3g_settings(tmp_path, loopback_pki, sim, smsc.port)
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            assert sim.registrations[0].gw_type == "L3G"
            assert SERVICE_ID in sim.registrations[0].ue_svc_ids
            (bind,) = await smsc.wait_for(lambda e: e["event"] == "bind")
            assert bind["password"] == PASSWORD

            # MO: an SMS from the device reaches the server as UEMessageDelivery.
            await smsc.command("mo", id=1, source=DEVICE, text="hello M5S ☺", data_coding=8)
            (resp,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp")
            assert resp["status"] == 0
            await sim.wait_for(lambda: bool(sim.uplinks), timeout=10)
            uplink = sim.uplinks[0].message
            assert uplink.ori_addr.addr == SERVICE_ID
            assert uplink.payload == "hello M5S ☺"
            assert uplink.msg_id.startswith("sms-")

            # MT: the server's downlink reaches the SMSC as submit_sm; the delivery
            # receipt becomes a DeliveryStatusReport at the server.
            await smsc.command("auto_receipt", receipt={"state": 2, "stat": "DELIVRD"})
            push = await sim.send_downlink(
                SERVICE_ID, "turn the heating on", msg_id="mt-1", deliv_st_req_ind=True
            )
            assert push.status == 204
            submit = await smsc.next("submit_sm")
            assert submit["destination_addr"] == DEVICE
            assert submit["message"] == "turn the heating on"
            assert submit["data_coding"] == 0
            assert submit["registered_delivery"] == 1
            await sim.wait_for(lambda: bool(sim.reports), timeout=10)
            report = sim.reports[0].report
            assert report.msg_id == "mt-1"
            assert report.ori_addr.addr == SERVICE_ID
            assert report.deliv_st == "REPT_DELY_SUCCESS"

            # A failed delivery comes back as a failure report with the receipt's cause.
            await smsc.command("auto_receipt", receipt={"state": 5, "stat": "UNDELIV"})
            await sim.send_downlink(
                SERVICE_ID, "are you there?", msg_id="mt-2", deliv_st_req_ind=True
            )
            await sim.wait_for(lambda: len(sim.reports) == 2, timeout=10)
            failed = sim.reports[1].report
            assert failed.msg_id == "mt-2"
            assert failed.deliv_st == "REPT_DELY_FAILED"
            assert "UNDELIV" in (failed.failure_cause or "")


async def test_a_receipt_after_a_gateway_restart_is_matched_and_nothing_resent(
    tmp_path: Path, loopback_pki: Pki, strict: StrictSmsc
) -> None:
    """The SMSC message id is in the store: the gateway stops while waiting for the
    receipt; after the restart the receipt arrives, is matched, and the handset got
    exactly one SMS."""
    async with l3g_sim(loopback_pki) as sim:
        settings = l3g_settings(tmp_path, loopback_pki, sim, strict.port)
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            push = await sim.send_downlink(
                SERVICE_ID, "one SMS only", msg_id="mt-r", deliv_st_req_ind=True
            )
            assert push.status == 204
            submit = await strict.next("submit_sm")
            assert submit["destination_addr"] == DEVICE
        # Stopped with the receipt outstanding. The SMSC delivers it after the restart.
        async with running_gateway(settings):
            await strict.next("bind", after=1)
            await strict.receipt(int(submit["message_id"]), "DELIVRD")
            await sim.wait_for(lambda: bool(sim.reports), timeout=15)
            report = sim.reports[0].report
            assert report.msg_id == "mt-r"
            assert report.deliv_st == "REPT_DELY_SUCCESS"
        assert len(strict.of("submit_sm")) == 1
        assert strict.of("corrupt") == []
