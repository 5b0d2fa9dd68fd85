"""OSCORE (RFC 8613) on the coap transport, against aiocoap's own OSCORE on the device."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import numbers, oscore
from aiocoap.message import UndecidedRemote
from coap_device import SALT, SECRET, Device, oscore_folder
from gatewayd_coap.config import read_config
from gatewayd_coap.security import BLOCK, LOW_WATER, DeviceContext
from gatewayd_coap.transport import CoapTransport
from gatewayd_testing import MemoryKV, MemoryTransportContext, transport_settings
from structlog.testing import capture_logs

from gatewayd.api import Address, ConfigError, Downlink
from gatewayd.api import Device as MappedDevice

# The gateway's and each device's OSCORE IDs (hex); one master secret, distinct IDs.
IDS = {"d1": ("a1", "01"), "d2": ("a2", "02")}


def oscore_table(device: str, secret: dict[str, str]) -> dict[str, object]:
    gateway_id, device_id = IDS[device]
    return {
        "master_secret": secret,
        "master_salt": SALT,
        "sender_id": gateway_id,
        "recipient_id": device_id,
    }


def settings(devices: list[dict[str, object]], **options: object) -> Any:
    return transport_settings("co", "coap", {"listen": "127.0.0.1:0", **options}, devices)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("COAP_TEST_OSCORE", SECRET)
    return {"env": "COAP_TEST_OSCORE"}


@pytest.fixture
async def d1(tmp_path: Path) -> AsyncIterator[Device]:
    dev = Device(oscore_folder(tmp_path / "d1", device_id="01", gateway_id="a1"))
    await dev.start()
    yield dev
    await dev.close()


class Gateway:
    """The transport on the kit's context, restartable on one durable kv."""

    def __init__(self, devices: list[dict[str, object]]) -> None:
        self.settings = settings(devices)
        self.kv = MemoryKV()
        self.running: tuple[CoapTransport, MemoryTransportContext] | None = None

    @property
    def transport(self) -> CoapTransport:
        assert self.running is not None
        return self.running[0]

    @property
    def context(self) -> MemoryTransportContext:
        assert self.running is not None
        return self.running[1]

    async def start(self, kv: MemoryKV | None = None) -> CoapTransport:
        context = MemoryTransportContext(self.settings.devices, transport="co", kv=kv or self.kv)
        transport = CoapTransport(self.settings, context)
        await transport.start()
        self.running = (transport, context)
        return transport

    async def stop(self) -> None:
        if self.running is not None:
            await self.running[0].stop()
            self.running = None


@pytest.fixture
async def gateway(d1: Device, tmp_path: Path, secret_env: dict[str, str]) -> AsyncIterator[Gateway]:
    # d1's secret by environment variable, d2's by file: both reference forms.
    (tmp_path / "d2.key").write_text(SECRET + "\n")
    devices: list[dict[str, object]] = [
        {"device": "d1", "endpoint": d1.endpoint, "oscore": oscore_table("d1", secret_env)},
        {"device": "d2", "oscore": oscore_table("d2", {"file": str(tmp_path / "d2.key")})},
    ]
    gw = Gateway(devices)
    await gw.start()
    yield gw
    await gw.stop()


def uplink(msg_id: str) -> bytes:
    return json.dumps({"payload": "t=21", "msgId": msg_id}).encode()


async def test_a_protected_uplink_is_accepted_as_its_device(gateway: Gateway, d1: Device) -> None:
    address = gateway.transport.address
    # The first request after a start is answered 4.01 Echo (replay window recovery,
    # RFC 8613 B.1.2); aiocoap's client repeats it with the Echo on its own.
    response = await d1.post(address, "v1/devices/d1/messages", uplink("m1"))
    assert response.code == numbers.codes.CREATED, response
    assert response.remote.security_context is d1.security  # the answer is protected too
    response = await d1.post(address, "v1/devices/d1/reports", b'{"msgId":"x","delivered":true}')
    assert response.code == numbers.codes.CHANGED
    assert [(u.device, u.msg_id) for u in gateway.context.accepted] == [("d1", "m1")]
    assert [r.device for r in gateway.context.reports] == ["d1"]


async def test_unprotected_and_wrong_device_requests_are_401_and_not_stored(
    gateway: Gateway, d1: Device, device: Device
) -> None:
    address = gateway.transport.address
    with capture_logs() as logs:
        # Unprotected, in the name of an OSCORE device; even a body that is no message
        # is not kept (only an authenticated device's junk is).
        for body in (uplink("m1"), b"junk"):
            response = await device.post(address, "v1/devices/d1/messages", body)
            assert response.code == numbers.codes.UNAUTHORIZED
        # Every device has a context: an unprotected request is refused whatever name.
        response = await device.post(address, "v1/devices/nobody/messages", uplink("m2"))
        assert response.code == numbers.codes.UNAUTHORIZED
        # Protected as d1, in d2's name.
        response = await d1.post(address, "v1/devices/d2/messages", uplink("m3"))
        assert response.code == numbers.codes.UNAUTHORIZED
    assert gateway.context.accepted == []
    assert gateway.context.rejected == []
    refusals = [(e["reason"], e["device"]) for e in logs if e["event"] == "coap.auth.refused"]
    assert refusals == [
        ("unprotected", "d1"),
        ("unprotected", "d1"),
        ("unprotected", "nobody"),
        ("wrong_device", "d2"),
    ]


async def test_a_replayed_request_is_401_and_stored_once(
    gateway: Gateway, d1: Device, device: Device
) -> None:
    host, port = gateway.transport.address
    # A first exchange initialises the gateway's replay window for d1.
    assert (
        await d1.post((host, port), "v1/devices/d1/messages", uplink("m0"))
    ).code.is_successful()
    # An attacker's copy of a protected request, sent twice (new CoAP message ID and
    # token, which OSCORE does not protect: the same OSCORE sequence number).
    request = aiocoap.Message(
        code=numbers.codes.POST,
        uri=f"coap://{host}:{port}/v1/devices/d1/messages",
        payload=uplink("m1"),
        content_format=numbers.ContentFormat.JSON,
    )
    protected, _ = d1.security.protect(request)
    answers = []
    with capture_logs() as logs:
        for _ in range(2):
            copy = protected.copy(remote=UndecidedRemote("coap", f"{host}:{port}"))
            answers.append(await device.context.request(copy).response)
    assert answers[0].code == numbers.codes.CHANGED  # outer code of a protected 2.01
    assert answers[1].code == numbers.codes.UNAUTHORIZED
    assert [u.msg_id for u in gateway.context.accepted] == ["m0", "m1"]
    refused = [e for e in logs if e["event"] == "coap.auth.refused"]
    assert [(e["reason"], e["device"]) for e in refused] == [("replay", "d1")]


async def test_an_unknown_or_forged_context_is_refused(
    gateway: Gateway, d1: Device, device: Device, tmp_path: Path
) -> None:
    host, port = gateway.transport.address
    # A device ID the gateway has no context for: 4.01.
    stranger = Device(oscore_folder(tmp_path / "x", device_id="09", gateway_id="a9"))
    await stranger.start()
    try:
        with capture_logs() as logs:
            try:
                await stranger.post((host, port), "v1/devices/d1/messages", uplink("x"))
            except oscore.NotAProtectedMessage as exc:  # the 4.01 cannot be protected
                unknown = exc.plain_message
            # d1's ID with a tampered ciphertext: 4.00 (RFC 8613 8.2), as aiocoap answers.
            request = aiocoap.Message(
                code=numbers.codes.POST,
                uri=f"coap://{host}:{port}/v1/devices/d1/messages",
                payload=uplink("y"),
            )
            protected, _ = d1.security.protect(request)
            forged = protected.copy(
                remote=UndecidedRemote("coap", f"{host}:{port}"),
                payload=protected.payload[:-1] + bytes([protected.payload[-1] ^ 1]),
            )
            tampered = await device.context.request(forged).response
    finally:
        await stranger.close()
    assert (unknown.code.dotted, tampered.code.dotted) == ("4.01", "4.00")
    assert gateway.context.accepted == []
    refused = [e for e in logs if e["event"] == "coap.auth.refused"]
    assert [(e["reason"], e.get("kid"), e.get("device")) for e in refused] == [
        ("unknown_context", "09", None),
        ("not_decryptable", None, "d1"),
    ]


def downlink(msg_id: str) -> Downlink:
    return Downlink(
        msg_id=msg_id,
        device=MappedDevice(name="d1", service_id="ue-d1@iot.example"),
        origin=Address("AS", "as-1@m5s.example"),
        payload="set=1",
    )


async def test_a_protected_downlink_is_delivered_and_its_response_is_evidence(
    gateway: Gateway, d1: Device
) -> None:
    outcome = await gateway.transport.deliver(downlink("dl-1"))
    assert outcome.delivered, outcome
    assert (await d1.inbox.messages.get())["msgId"] == "dl-1"
    d1.inbox.code = numbers.codes.NOT_FOUND  # a protected 4.04: refused for good
    refused = await gateway.transport.deliver(downlink("dl-2"))
    assert (refused.delivered, refused.permanent, refused.cause) == (
        False,
        True,
        "device answered 4.04",
    )


async def test_a_restart_does_not_reuse_sequence_numbers(gateway: Gateway, d1: Device) -> None:
    assert (await gateway.transport.deliver(downlink("dl-1"))).delivered
    await gateway.stop()
    # Same durable kv: the sequence numbers continue after the reserved block, and the
    # device (whose replay window remembers dl-1's) takes the next downlink.
    await gateway.start()
    assert (await gateway.transport.deliver(downlink("dl-2"))).delivered
    assert [(await d1.inbox.messages.get())["msgId"] for _ in range(2)] == ["dl-1", "dl-2"]
    await gateway.stop()
    # Without the kv (a lost store), the gateway would start again at 0: the device
    # refuses that as a replay. This is what the kv rows prevent.
    await gateway.start(kv=MemoryKV())
    replayed = await gateway.transport.deliver(downlink("dl-3"))
    assert not replayed.delivered
    assert replayed.cause.startswith("the device answered 4.01 unprotected"), replayed
    assert d1.inbox.messages.empty()


async def test_mixed_devices_plain_one_on_loopback(
    d1: Device, device: Device, secret_env: dict[str, str]
) -> None:
    """A device without a context keeps today's plain CoAP (on loopback only); one
    with a context must use it."""
    gw = Gateway(
        [
            {"device": "d1", "endpoint": d1.endpoint, "oscore": oscore_table("d1", secret_env)},
            {"device": "p1"},
        ]
    )
    transport = await gw.start()
    address = transport.address
    try:
        answers = [
            await device.post(address, "v1/devices/p1/messages", uplink("a")),
            await device.post(address, "v1/devices/d1/messages", uplink("b")),
            # A protected request may not speak for the plain device either.
            await d1.post(address, "v1/devices/p1/messages", uplink("c")),
        ]
        assert [a.code.dotted for a in answers] == ["2.01", "4.01", "4.01"]
        assert [u.msg_id for u in gw.context.accepted] == ["a"]
    finally:
        await gw.stop()


def test_every_device_with_oscore_may_listen_beyond_loopback() -> None:
    secret = {"env": "UNUSED"}
    devices: list[dict[str, object]] = [
        {"device": "d1", "endpoint": "coap://192.0.2.7/inbox", "oscore": oscore_table("d1", secret)}
    ]
    s = settings(devices, listen="0.0.0.0:5683")
    transport = CoapTransport(s, MemoryTransportContext(s.devices))
    assert transport.config.oscore_only


@pytest.mark.parametrize(
    ("devices", "options", "key"),
    [
        # A plain device (or none, or unlisted ones) keeps the transport on loopback.
        ([{"device": "p1"}], {"listen": "0.0.0.0:5683"}, "transports.co.listen"),
        ([], {"listen": "0.0.0.0:5683"}, "transports.co.listen"),
        (
            [{"device": "d1", "oscore": oscore_table("d1", {"env": "X"})}, {"device": "p1"}],
            {"listen": "[::]:5683"},
            "transports.co.listen",
        ),
        # A plain device's endpoint stays on loopback.
        (
            [{"device": "p1", "endpoint": "coap://192.0.2.7/inbox"}],
            {},
            "transports.co.devices[0].endpoint",
        ),
        # The secret only by reference.
        (
            [{"device": "d1", "oscore": {**oscore_table("d1", {}), "master_secret": SECRET}}],
            {},
            "transports.co.devices[0].oscore.master_secret",
        ),
        (
            [
                {
                    "device": "d1",
                    "oscore": {
                        k: v
                        for k, v in oscore_table("d1", {"env": "X"}).items()
                        if k != "sender_id"
                    },
                }
            ],
            {},
            "transports.co.devices[0].oscore.sender_id",
        ),
        (
            [
                {
                    "device": "d1",
                    "oscore": {**oscore_table("d1", {"env": "X"}), "recipient_id": "zz"},
                }
            ],
            {},
            "transports.co.devices[0].oscore.recipient_id",
        ),
        (
            [{"device": "d1", "oscore": {**oscore_table("d1", {"env": "X"}), "sender_id": "01"}}],
            {},
            "transports.co.devices[0].oscore.recipient_id",
        ),
        (
            [{"device": "d1", "oscore": {**oscore_table("d1", {"env": "X"}), "algorithm": "DES"}}],
            {},
            "transports.co.devices[0].oscore.algorithm",
        ),
        (
            [{"device": "d1", "oscore": {**oscore_table("d1", {"env": "X"}), "kid": "01"}}],
            {},
            "transports.co.devices[0].oscore.kid",
        ),
        (
            [
                {"device": "d1", "oscore": oscore_table("d1", {"env": "X"})},
                {
                    "device": "d2",
                    "oscore": {**oscore_table("d2", {"env": "X"}), "recipient_id": "01"},
                },
            ],
            {},
            "transports.co.devices[1].oscore.recipient_id",
        ),
    ],
)
def test_config_errors_name_the_key(
    devices: list[dict[str, object]], options: dict[str, object], key: str
) -> None:
    s = settings(devices, **options)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        CoapTransport(s, MemoryTransportContext(s.devices))


def test_unlisted_devices_keep_the_transport_on_loopback() -> None:
    devices: list[dict[str, object]] = [
        {"device": "d1", "oscore": oscore_table("d1", {"env": "X"})}
    ]
    s = transport_settings(
        "co", "coap", {"listen": "0.0.0.0:0"}, devices, service_id_template="{device}@iot.example"
    )
    with pytest.raises(ConfigError, match=r"transports\.co\.listen.*service_id_template"):
        CoapTransport(s, MemoryTransportContext(s.devices))


@pytest.mark.parametrize(("value", "problem"), [("not hex", "not hex"), ("00ff", "at least 16")])
async def test_a_bad_secret_fails_the_start_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("COAP_TEST_OSCORE", value)
    s = settings([{"device": "d1", "oscore": oscore_table("d1", {"env": "COAP_TEST_OSCORE"})}])
    transport = CoapTransport(s, MemoryTransportContext(s.devices))
    with pytest.raises(
        ConfigError, match=rf"devices\[0\]\.oscore\.master_secret.*{problem}"
    ) as err:
        await transport.start()
    assert "00ff" not in str(err.value)  # the secret is never shown


async def test_sequence_numbers_are_durably_reserved_before_use() -> None:
    s = settings([{"device": "d1", "oscore": oscore_table("d1", {"env": "UNUSED"})}])
    config = read_config(s).oscore["d1"]
    kv = MemoryKV()
    log = MemoryTransportContext().log

    def reserved() -> int:
        ((value, _),) = kv.rows.values()
        return int(value)

    first = DeviceContext("d1", config, bytes.fromhex(SECRET), kv, log)
    await first.load()
    assert (first.sender_sequence_number, reserved()) == (0, BLOCK)
    for _ in range(BLOCK - LOW_WATER + 1):  # into the low-water mark: a block is added
        first.new_sequence_number()
    await first.ensure_headroom()
    assert reserved() == 2 * BLOCK
    # Never a number beyond what is stored, even if the store lags behind.
    first.sender_sequence_number = 2 * BLOCK
    with pytest.raises(oscore.ContextUnavailable):
        first.new_sequence_number()
    await first.aclose()
    # A restart (even after a crash: nothing is written at stop) continues after the
    # last reserved block, whatever was used of it.
    again = DeviceContext("d1", config, bytes.fromhex(SECRET), kv, log)
    await again.load()
    assert again.sender_sequence_number >= 2 * BLOCK
    assert reserved() >= again.sender_sequence_number + BLOCK
    assert "0102" not in repr(again)  # no key material in aiocoap's logs


async def test_two_contexts_with_one_key_fail_the_start(secret_env: dict[str, str]) -> None:
    # Same secret and salt, and the gateway's ID reused as the other device's: d2's
    # recipient key is d1's sender key.
    devices: list[dict[str, object]] = [
        {"device": "d1", "oscore": oscore_table("d1", secret_env)},
        {"device": "d2", "oscore": {**oscore_table("d2", secret_env), "recipient_id": "a1"}},
    ]
    s = settings(devices)
    transport = CoapTransport(s, MemoryTransportContext(s.devices))
    with pytest.raises(ConfigError, match=r"devices\[1\]\.oscore\.master_secret.*'d1'"):
        await transport.start()
