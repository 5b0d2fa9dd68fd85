"""The MQTT 5 PUBLISH decode per received message: paho's against gatewayd_mqtt's.

    .venv/bin/python bench/mqtt_publish_decode.py

paho builds and fills a ``Properties`` object for every PUBLISH it receives; the mqtt
transport decodes the same fields and leaves the properties to be decoded when read
(``gatewayd_mqtt.publish``). Times both on the packets of the bench's devices (a JSON
envelope, no properties) and of a raw-format device (a ``msgId`` user property, which
the transport then reads), in CPU microseconds per message, side by side.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from gatewayd_mqtt import publish
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROUNDS = 50_000
REPEATS = 3  # interleaved; the best of each is printed
TOPIC = b"bench/d17/up"
JSON_BODY = b'{"msgId":"run-1-000042","payload":"temperature=21.5 humidity=40"}'


def packet(props: Properties, body: bytes) -> bytes:
    head = struct.pack("!H", len(TOPIC)) + TOPIC + struct.pack("!H", 42)
    return head + props.pack() + body  # type: ignore[no-untyped-call]


def cpu_us(fn: Callable[[], object]) -> float:
    start = time.process_time()
    for _ in range(ROUNDS):
        fn()
    return (time.process_time() - start) / ROUNDS * 1e6


def main() -> None:
    empty = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with_id = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with_id.UserProperty = ("msgId", "run-1-000042")
    cases = {
        "JSON envelope, no properties": (packet(empty, JSON_BODY), False),
        "raw payload, msgId user property (read)": (packet(with_id, b"21.5"), True),
    }
    print("| packet | paho µs/msg | gatewayd_mqtt µs/msg | ratio |")
    print("|---|---|---|---|")
    for name, (raw, read) in cases.items():

        def paho_way(raw: bytes = raw, read: bool = read) -> object:
            # What paho's Client._handle_publish does before on_message.
            result = _packet.decode_publish(0x32, raw, MQTTProtocolVersion.MQTTv5)
            message = paho.MQTTMessage(mid=result.mid, topic=result.topic)
            message.dup, message.qos, message.retain = result.dup, result.qos, result.retain
            message.properties, message.payload = result.properties, result.payload
            return message.properties.UserProperty if read else message  # type: ignore[union-attr]

        def ours(raw: bytes = raw, read: bool = read) -> object:
            message = publish.decode(0x32, raw)
            return message.properties.UserProperty if read else message  # type: ignore[union-attr]

        runs = [(cpu_us(paho_way), cpu_us(ours)) for _ in range(REPEATS)]
        theirs_us, ours_us = min(t for t, _ in runs), min(o for _, o in runs)
        print(f"| {name} | {theirs_us:.1f} | {ours_us:.1f} | {ours_us / theirs_us:.2f} |")


if __name__ == "__main__":
    main()
