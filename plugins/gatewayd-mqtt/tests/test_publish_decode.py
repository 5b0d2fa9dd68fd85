"""gatewayd_mqtt.publish against paho's own PUBLISH decoder, packet by packet."""

from __future__ import annotations

import copy
import struct

import aiomqtt
import pytest
from gatewayd_mqtt import publish
from gatewayd_mqtt.payloads import PayloadError
from gatewayd_testing import MemoryTransportContext
from mosquitto import Mosquitto
from mqtt_helpers import make_transport
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _packet_of(
    topic: bytes, *, qos: int, mid: int = 0, props: Properties | None = None, payload: bytes = b""
) -> bytes:
    raw_props = (props or _props()).pack()  # type: ignore[no-untyped-call]
    head = struct.pack("!H", len(topic)) + topic
    if qos:
        head += struct.pack("!H", mid)
    return head + raw_props + payload


CASES = [
    ("empty properties, QoS 1", 0x32, _packet_of(b"dev/d1/up", qos=1, mid=7, payload=b'{"a":1}')),
    ("QoS 0, retained", 0x31, _packet_of(b"dev/d1/up", qos=0, payload=b"x")),
    ("dup flag, empty payload", 0x3A, _packet_of(b"t", qos=1, mid=65535)),
    (
        "every PUBLISH property a broker forwards",
        0x32,
        _packet_of(
            "dév/ü/up".encode(),
            qos=1,
            mid=1,
            props=_props(
                PayloadFormatIndicator=1,
                MessageExpiryInterval=3600,
                ContentType="application/json",
                ResponseTopic="dev/d1/reply",
                CorrelationData=b"\x00\x01\xff",
                SubscriptionIdentifier=[42],
                UserProperty=[("msgId", "m-1"), ("k", "v"), ("msgId", "second")],
            ),
            payload=bytes(range(256)),
        ),
    ),
]


@pytest.mark.parametrize(("header", "packet"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decodes_as_paho_does(header: int, packet: bytes) -> None:
    theirs = _packet.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    ours = publish.decode(header, bytearray(packet))  # paho reads into a bytearray
    assert (ours.topic, ours.mid, ours.qos, ours.dup, ours.retain, ours.payload) == (
        theirs.topic.decode(),
        theirs.mid,
        theirs.qos,
        theirs.dup,
        theirs.retain,
        theirs.payload,
    )
    assert type(ours.payload) is bytes
    assert ours.properties.json() == theirs.properties.json()  # type: ignore[union-attr]
    assert getattr(ours.properties, "UserProperty", None) == getattr(
        theirs.properties, "UserProperty", None
    )


def test_properties_are_decoded_only_when_read() -> None:
    header, packet = CASES[3][1:]
    props = publish.decode(header, packet).properties
    assert type(props) is publish.LazyProperties
    assert props.ContentType == "application/json"
    assert type(props) is Properties  # decoded: paho's own from here on
    assert not hasattr(props, "TopicAlias")  # absent stays absent once decoded


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00",  # no room for the topic length
        b"\x00\x09dev/d1",  # topic shorter than its length
        b"\x00\x01t\x00",  # packet id cut short
        b"\x00\x01t\x00\x01",  # no property length
        b"\x00\x01t\x00\x01\x05\x01",  # properties run past the packet
        b"\x00\x01t\x00\x01\xff\xff\xff\xff\x01",  # a five-byte variable integer
    ],
)
def test_broken_framing_is_malformed_at_once_as_with_paho(packet: bytes) -> None:
    with pytest.raises(MalformedPacket):
        _packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    with pytest.raises(MalformedPacket):
        publish.decode(0x32, packet)


def test_properties_that_frame_but_do_not_decode_fail_where_read() -> None:
    # Property 0x7F does not exist: paho refuses the whole packet, and with it the
    # connection; here only a reader of this message's properties sees it.
    packet = b"\x00\x01t\x00\x01" + b"\x02\x7f\x00" + b"payload"
    with pytest.raises(MalformedPacket):
        _packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    message = publish.decode(0x32, packet)
    assert message.payload == b"payload"
    for _ in range(2):  # and again: a failed decode leaves nothing half-read behind
        with pytest.raises(MalformedPacket):
            _ = message.properties.UserProperty  # type: ignore[union-attr]


async def test_raw_message_whose_properties_do_not_decode_is_refused_alone(
    broker: Mosquitto, context: MemoryTransportContext
) -> None:
    # A raw-format uplink reads its msgId user property: the decode fails there, and the
    # transport refuses this message for good (reason code 0x99, as any PayloadError).
    transport = make_transport(broker, context, format="raw")
    packet = b"\x00\x13devices/sensor-1/up\x00\x01" + b"\x02\x7f\x00" + b"payload"
    message = aiomqtt.Message._from_paho_message(publish.decode(0x32, packet))
    with pytest.raises(PayloadError) as refused:
        transport._to_uplink("sensor-1", "devices/sensor-1/up", message, b"payload")
    assert refused.value.reason == "bad_properties"


def test_a_copy_decodes_on_its_own() -> None:
    props = publish.decode(*CASES[3][1:]).properties
    clone = copy.copy(props)
    assert clone.ContentType == "application/json"
    assert props.ContentType == "application/json"
