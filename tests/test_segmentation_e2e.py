"""MSGin5G segmentation end to end: a real gateway, the reference server, an HTTP device.

Each case runs in both roles: the role changes the MSGG API the server pushes to
(``msgg-n3gdelivery`` or ``msgg-l3gdelivery``) and the schema its bodies are checked
against; the HTTP transport stands in for the SMSC side, which segmentation does not
touch. The server validates every body, segments included, against the 3GPP files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from e2e_device import Device
from gatewayd_sim import harness, schemas
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki, http_transport_mtls
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway

from gatewayd import config
from gatewayd.msgin5g.model import GatewayMessageDelivery
from gatewayd.security import tls
from gatewayd.store import Queue

RELAY = """
[relay]
max_payload = 64
max_segments = 8
reassembly_timeout = {timeout}
"""


@pytest.fixture(params=["N3G", "L3G"])
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def role_sim(loopback_pki: Pki, role: str) -> AsyncIterator[SimServer]:
    settings = harness.sim_settings(loopback_pki, gateway_type=role)
    async with SimServer(settings, schema_check=True) as server:
        yield server


@pytest_asyncio.fixture
async def device(loopback_pki: Pki) -> AsyncIterator[Device]:
    async with Device(loopback_pki).serving() as served:
        yield served


@pytest.fixture
def make_settings(
    tmp_path: Path, loopback_pki: Pki, role_sim: SimServer, role: str, device: Device
) -> Callable[..., config.Settings]:
    def make(*, timeout: float = 1.0) -> config.Settings:
        return harness.write_config(
            tmp_path / "gatewayd.toml",
            harness.gateway_toml(
                loopback_pki,
                api_root=role_sim.api_root,
                state_dir=tmp_path / "state",
                gateway_type=role,
                transports=http_transport_mtls(loopback_pki, device.webhook),
                extra=RELAY.format(timeout=timeout),
            ),
        )

    return make


@pytest.fixture
def settings(make_settings: Callable[..., config.Settings]) -> config.Settings:
    return make_settings()


async def _registered(sim: SimServer) -> None:
    await sim.wait_for(lambda: bool(sim.registrations), timeout=10)


async def _nothing_more(device: Device, wait: float = 0.5) -> None:
    await asyncio.sleep(wait)
    assert device.inbox.empty(), device.inbox.get_nowait()


def _segments(sim: SimServer, payload: str, msg_id: str) -> list[GatewayMessageDelivery]:
    message = sim.downlink_message(DEMO_SERVICE_ID, payload, msg_id=msg_id, deliv_st_req_ind=True)
    return sim.downlink_segments(message, size=10)


async def test_uplink_over_the_limit_leaves_as_segments_and_arrives_whole(
    role_sim: SimServer, settings: config.Settings, device: Device
) -> None:
    sim = role_sim
    async with running_gateway(settings) as gw:
        await _registered(sim)
        _, port = gw.transports["web"].address  # type: ignore[attr-defined]
        fits = "x" * 64
        status, _ = await device.send(port, "sensor-1", {"payload": fits, "msgId": "fits"})
        assert status == 202
        big = "é" * 100  # 200 UTF-8 bytes: 4 segments of at most 64 bytes
        status, answer = await device.send(
            port, "sensor-1", {"payload": big, "msgId": "big", "deliveryReport": True}
        )
        assert (status, answer["msgId"]) == (202, "big")
        await sim.wait_for(lambda: len(sim.uplinks) == 2, timeout=10)
        assert [(u.message.msg_id, u.message.payload) for u in sim.uplinks] == [
            ("fits", fits),
            ("big", big),
        ]
        # The message at the limit went unsegmented; the other as 4 numbered segments.
        assert [s.message.msg_id for s in sim.segments] == ["big.1", "big.2", "big.3", "big.4"]
        for record in sim.segments:
            params = record.message.seg_params
            assert params is not None
            assert params.seg_id == "big"
            assert len((record.message.payload or "").encode()) <= 64
        # The server's report about the whole message reaches the device under its msgId.
        report = await device.next()
        assert (report["type"], report["msgId"], report["delivered"]) == ("report", "big", True)

        # More than relay.max_segments: refused at intake, nothing stored or sent.
        status, problem = await device.send(
            port, "sensor-1", {"payload": "y" * 600, "msgId": "huge"}
        )
        assert (status, problem["cause"]) == (400, "INVALID_MESSAGE")
        assert "relay.max_segments (8)" in problem["detail"]
        await asyncio.sleep(0.3)
        assert len(sim.uplinks) == 2


async def test_downlink_segments_out_of_order_and_repeated_arrive_once_whole(
    role_sim: SimServer, settings: config.Settings, device: Device
) -> None:
    sim = role_sim
    payload = "segmented downlink, 4 parts"
    async with running_gateway(settings):
        await _registered(sim)
        parts = _segments(sim, payload, "down-1")
        assert len(parts) == 3
        for part in (parts[2], parts[0], parts[0], parts[1], parts[2]):
            push = await sim.push_message(part)
            assert push.status == 204, push
        got = await device.next()
        assert (got["msgId"], got["payload"], got.get("deliveryReport")) == (
            "down-1",
            payload,
            True,
        )
        await sim.wait_for(lambda: len(sim.reports) == 1, timeout=10)
        report = sim.reports[0].report
        assert (report.msg_id, report.deliv_st) == ("down-1", "REPT_DELY_SUCCESS")
        await _nothing_more(device)
        assert len(sim.reports) == 1


async def test_a_missing_segment_expires_with_a_failure_report(
    role_sim: SimServer, settings: config.Settings, device: Device
) -> None:
    sim = role_sim
    async with running_gateway(settings):
        await _registered(sim)
        first, _, last = _segments(sim, "abcdefghij" * 3, "down-gap")
        assert (await sim.push_message(last)).status == 204
        assert (await sim.push_message(first)).status == 204
        # relay.reassembly_timeout is 1 s; the expiry sweep runs every 2 s.
        await sim.wait_for(lambda: len(sim.reports) == 1, timeout=10)
        report = sim.reports[0].report
        assert (report.msg_id, report.deliv_st, report.failure_cause) == (
            "down-gap",
            "REPT_DELY_FAILED",
            "SEGMENTS_MISSING",
        )
        assert device.inbox.empty()
        await asyncio.sleep(2.5)  # another sweep: still one report for the set
        assert len(sim.reports) == 1


async def test_segments_accepted_before_a_restart_complete_after_it(
    role_sim: SimServer, make_settings: Callable[..., config.Settings], device: Device
) -> None:
    sim = role_sim
    # Reassembly must outlast the restart here: a longer timeout than the other cases.
    settings = make_settings(timeout=60.0)
    parts = _segments(sim, "0123456789abcdefghij-", "down-restart")
    assert len(parts) == 3
    async with running_gateway(settings):
        await _registered(sim)
        assert (await sim.push_message(parts[1])).status == 204
        assert (await sim.push_message(parts[0])).status == 204
    await sim.wait_for(lambda: not sim.registrations, timeout=10)
    async with running_gateway(settings):
        await _registered(sim)
        assert (await sim.push_message(parts[2])).status == 204
        got = await device.next()
        assert (got["msgId"], got["payload"]) == ("down-restart", "0123456789abcdefghij-")


@pytest.mark.parametrize(
    ("seg_params", "pointer"),
    [
        ({"segId": "s", "segNumb": 0}, "/segParams/segNumb"),
        ({"segId": "s", "segNumb": 9}, "/segParams/segNumb"),  # over relay.max_segments
        ({"segNumb": 1}, "/segParams/segId"),
    ],
)
async def test_a_malformed_segment_is_refused_with_the_offending_field(
    role_sim: SimServer,
    settings: config.Settings,
    loopback_pki: Pki,
    seg_params: dict[str, object],
    pointer: str,
) -> None:
    sim = role_sim
    async with running_gateway(settings):
        await _registered(sim)
        (registration,) = sim.registrations
        body = {
            **sim.downlink_message(DEMO_SERVICE_ID, "p", msg_id="bad").to_json(),
            "segInd": True,
            "segParams": seg_params,
        }
        # Posted as the server would, but reading the answer the sim's client drops.
        ctx = tls.client_context(
            loopback_pki.trust(), loopback_pki.identity("server_client"), check_hostname=False
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{registration.delivery_root}/deliver-message", json=body, ssl=ctx
            ) as resp,
        ):
            status, problem = resp.status, await resp.json(content_type=None)
        assert status == 400
        assert problem["cause"] == "INVALID_MSG_FORMAT"
        assert problem["invalidParams"][0]["param"] == pointer
        schemas.validate_problem(problem)


async def test_uplink_segments_stored_before_a_restart_leave_after_it(
    role_sim: SimServer, settings: config.Settings, device: Device
) -> None:
    sim = role_sim
    sim.fail(503, retry_after=1, seconds=60)  # no registration, so nothing leaves yet
    big = "z" * 200  # 4 segments of 64 bytes at most
    async with running_gateway(settings) as gw:
        _, port = gw.transports["web"].address  # type: ignore[attr-defined]
        body = {"payload": big, "msgId": "kept", "deliveryReport": True}
        status, _ = await device.send(port, "sensor-1", body)
        assert status == 202
        pending = await gw.store.list_items(queue=Queue.UPLINK, state="pending", limit=10)
        assert [i.msg_id for i in pending] == ["kept.1", "kept.2", "kept.3", "kept.4"]
    assert sim.uplinks == []
    sim.faults.clear()
    async with running_gateway(settings):
        await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=20)
        assert (sim.uplinks[0].message.msg_id, sim.uplinks[0].message.payload) == ("kept", big)
        report = await device.next(timeout=15)
        assert (report["msgId"], report["delivered"]) == ("kept", True)
