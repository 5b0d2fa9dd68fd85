"""MSGin5G segmentation in the L3G role with the real smpp transport and an SMSC.

SMSC (npm ``smpp``) <-> gateway (L3G) <-> reference server: an MO SMS longer than
``relay.max_payload`` reaches the server as segments and is reassembled there; a
segmented downlink reaches the SMSC as one whole short message, with its report.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway

# The SMSC driver and the transport table live with the smpp plugin's tests (which
# import them the same way); reused, not copied.
sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "gatewayd-smpp" / "tests"))
from smsc_peer import Smsc
from test_e2e import SERVICE_ID, transport_toml

DEVICE = "447700900001"  # the device transport_toml maps


@pytest.fixture(autouse=True)
def _password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMPP_TEST_PASSWORD", "s3cret")


@pytest_asyncio.fixture
async def smsc() -> AsyncIterator[Smsc]:
    server = Smsc()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_segments_both_ways_through_an_smsc(
    tmp_path: Path, loopback_pki: Pki, smsc: Smsc
) -> None:
    sim_settings = harness.sim_settings(loopback_pki, gateway_type="L3G")
    async with SimServer(sim_settings, schema_check=True) as sim:
        settings = harness.write_config(
            tmp_path / "gw.toml",
            harness.gateway_toml(
                loopback_pki,
                api_root=sim.api_root,
                state_dir=tmp_path / "state",
                transports=transport_toml(smsc.port),
                gateway_type="L3G",
                extra="[relay]\nmax_payload = 40\n",
            ),
        )
        async with running_gateway(settings):
            await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
            await smsc.wait_for(lambda e: e["event"] == "bind")

            # MO of 100 GSM characters: three MSGin5G segments, one message at the server.
            text = "".join(chr(ord("a") + i % 26) for i in range(100))
            await smsc.command("mo", id=1, source=DEVICE, text=text, data_coding=0)
            (resp,) = await smsc.wait_for(lambda e: e["event"] == "deliver_sm_resp")
            assert resp["status"] == 0
            await sim.wait_for(lambda: bool(sim.uplinks), timeout=10)
            (uplink,) = sim.uplinks
            assert uplink.message.payload == text
            assert [len(s.message.payload or "") for s in sim.segments] == [40, 40, 20]
            assert {s.message.seg_params.seg_id for s in sim.segments if s.message.seg_params} == {
                uplink.message.msg_id
            }

            # MT pushed as 4 segments, last first: the SMSC gets the whole text once.
            await smsc.command("auto_receipt", receipt={"state": 2, "stat": "DELIVRD"})
            mt = "Set the reporting interval to 60 s and the threshold to 21.5 C, please. Ok?"
            message = sim.downlink_message(SERVICE_ID, mt, msg_id="mt-seg", deliv_st_req_ind=True)
            parts = sim.downlink_segments(message, size=20)
            assert len(parts) == 4
            for part in reversed(parts):
                assert (await sim.push_message(part)).status == 204
            submit = await smsc.next("submit_sm")
            assert (submit["destination_addr"], submit["message"]) == (DEVICE, mt)
            await sim.wait_for(lambda: bool(sim.reports), timeout=10)
            report = sim.reports[0].report
            assert (report.msg_id, report.deliv_st) == ("mt-seg", "REPT_DELY_SUCCESS")
            assert len(smsc.of("submit_sm")) == 1
