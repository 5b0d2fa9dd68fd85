"""The coap transport on the kit's in-memory context: codes, evidence, config errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
from aiocoap import numbers
from coap_device import Device
from gatewayd_coap.transport import CoapTransport
from gatewayd_testing import MemoryTransportContext, transport_settings

from gatewayd.api import Address, ConfigError, Downlink, UplinkReport
from gatewayd.api import Device as MappedDevice


def settings(options: dict[str, Any], endpoint: str | None = None) -> Any:
    device: dict[str, object] = {"device": "d1"}
    if endpoint is not None:
        device["endpoint"] = endpoint
    return transport_settings("co", "coap", {"listen": "127.0.0.1:0", **options}, [device])


@pytest.fixture
async def started(device: Device) -> AsyncIterator[tuple[CoapTransport, MemoryTransportContext]]:
    s = settings({"max_body": 200, "delivery_timeout": 5.0}, device.endpoint)
    context = MemoryTransportContext(s.devices, transport="co")
    transport = CoapTransport(s, context)
    await transport.start()
    yield transport, context
    await transport.stop()


async def test_uplink_is_answered_created_only_once_stored(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, context = started
    body = json.dumps({"payload": "t=21", "msgId": "m1", "deliveryReport": True}).encode()
    response = await device.post(transport.address, "v1/devices/d1/messages", body)
    assert response.code == numbers.codes.CREATED
    assert json.loads(response.payload) == {"msgId": "m1", "duplicate": False}
    assert context.accepted[0].payload == "t=21"
    assert context.accepted[0].report_requested


async def test_a_device_report_is_taken(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, context = started
    body = json.dumps({"msgId": "down-1", "delivered": False, "cause": "busy"}).encode()
    response = await device.post(transport.address, "v1/devices/d1/reports", body)
    assert response.code == numbers.codes.CHANGED
    assert (context.reports[0].msg_id, context.reports[0].delivered) == ("down-1", False)


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("v1/devices/d1/nothing", b"{}", "4.04"),
        ("v1/devices/d1/messages", b"not json", "4.00"),
        ("v1/devices/d1/messages", b'{"payload": 1}', "4.00"),
        ("v1/devices/d1/messages", b'{"payload": "' + b"x" * 300 + b'"}', "4.13"),
    ],
)
async def test_refusals_are_precise_codes(
    started: tuple[CoapTransport, MemoryTransportContext],
    device: Device,
    path: str,
    body: bytes,
    code: str,
) -> None:
    transport, context = started
    response = await device.post(transport.address, path, body)
    assert response.code.dotted == code
    assert response.payload, "an error carries a diagnostic payload"
    assert context.accepted == []
    # A listed device's body that is no message is kept (the dead-letter queue).
    kept = [("d1", "invalid_body", None)] if code == "4.00" else []
    assert context.rejected == kept


async def test_an_unlisted_devices_junk_is_answered_not_stored(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, context = started
    response = await device.post(transport.address, "v1/devices/nobody/messages", b"junk")
    assert response.code.dotted == "4.00"
    assert context.rejected == []


async def test_wrong_method_and_content_format(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, _ = started
    host, port = transport.address
    uri = f"coap://{host}:{port}/v1/devices/d1/messages"
    get = await device.context.request(aiocoap.Message(code=numbers.codes.GET, uri=uri)).response
    assert get.code.dotted == "4.05"
    cbor = aiocoap.Message(code=numbers.codes.POST, uri=uri, payload=b"\xa0", content_format=60)
    assert (await device.context.request(cbor).response).code.dotted == "4.15"


async def test_backlog_full_is_503_with_max_age(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, context = started
    context.refusals, context.retry_after = 1, 2.5
    body = json.dumps({"payload": "x"}).encode()
    response = await device.post(transport.address, "v1/devices/d1/messages", body)
    assert response.code.dotted == "5.03"
    assert response.opt.max_age == 3  # rounded up: a device never comes back early


def downlink() -> Downlink:
    return Downlink(
        msg_id="dl-1",
        device=MappedDevice(name="d1", service_id="ue-d1@iot.example"),
        origin=Address("AS", "as-1@m5s.example"),
        payload="set=1",
    )


async def test_the_device_response_is_the_delivery_evidence(
    started: tuple[CoapTransport, MemoryTransportContext], device: Device
) -> None:
    transport, _ = started
    assert (await transport.deliver(downlink())).delivered
    assert (await device.inbox.messages.get())["payload"] == "set=1"
    device.inbox.code = numbers.codes.NOT_FOUND
    refused = await transport.deliver(downlink())
    assert (refused.delivered, refused.permanent, refused.cause) == (
        False,
        True,
        "device answered 4.04",
    )
    device.inbox.code = numbers.codes.SERVICE_UNAVAILABLE
    later = await transport.deliver(downlink())
    assert (later.delivered, later.permanent) == (False, False)
    report = UplinkReport(device=downlink().device, msg_id="up-1", delivered=True)
    device.inbox.code = numbers.codes.CHANGED
    assert await transport.deliver_report(report)
    assert (await device.inbox.reports.get())["msgId"] == "up-1"


async def test_a_device_without_endpoint_fails_permanently() -> None:
    s = settings({})
    transport = CoapTransport(s, MemoryTransportContext(s.devices))
    outcome = await transport.deliver(downlink())
    assert (outcome.permanent, outcome.cause) == (True, "no endpoint configured")


@pytest.mark.parametrize(
    ("options", "endpoint", "key"),
    [
        ({"listen": "0.0.0.0:5683"}, None, "transports.co.listen"),
        ({}, "http://127.0.0.1/inbox", "transports.co.devices[0].endpoint"),
        ({}, "coap://192.0.2.7/inbox", "transports.co.devices[0].endpoint"),
        ({"listen_on": "x"}, None, "transports.co.listen_on"),
    ],
)
def test_config_errors_name_the_key(
    options: dict[str, Any], endpoint: str | None, key: str
) -> None:
    s = settings(options, endpoint)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        CoapTransport(s, MemoryTransportContext(s.devices))
