"""Received MQTT 5 PUBLISH packets, with their properties decoded on first use.

paho builds a :class:`~paho.mqtt.properties.Properties` for every PUBLISH it receives:
its constructor alone fills three tables, and the decode walks them: 22 µs per message
against 4 µs here (``bench/mqtt_publish_decode.py``), for properties a JSON envelope
never reads. :func:`decode` reads the fixed fields as paho does and keeps the
property bytes for :class:`LazyProperties`, which decodes them with paho's own code the
first time anything asks.

A packet whose framing is broken raises paho's ``MalformedPacket`` at once, as paho's
decoder does (the connection ends). A property block that frames correctly but does not
decode fails where it is read, for that message alone (the transport's ``_to_uplink``).
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_LENGTH = struct.Struct("!H")
# What paho's own decoder turns into MalformedPacket (paho.mqtt._packet.DECODE_ERRORS).
_DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)


class LazyProperties(Properties):
    """PUBLISH properties kept as received, decoded by paho on first access.

    Until then the instance has none of paho's attributes, so any lookup runs
    :meth:`__getattr__`, which turns the instance into a plain ``Properties`` (paho's
    decoder probes absent names with ``hasattr``: answered by a Python ``__getattr__``
    each probe would cost more than the whole decode), decodes, and looks again.
    paho's ``__setattr__`` checks names against its tables, hence ``object.__setattr__``.
    """

    def __init__(self, raw: bytes) -> None:  # paho's __init__ runs on first access
        object.__setattr__(self, "_raw", raw)

    def __getattr__(self, name: str) -> Any:
        if "_raw" not in self.__dict__:  # made without __init__ (copy, pickle): nothing to read
            raise AttributeError(name)
        raw = self.__dict__.pop("_raw")
        object.__setattr__(self, "__class__", Properties)
        Properties.__init__(self, PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        try:
            self.unpack(raw)  # type: ignore[no-untyped-call]
        except _DECODE_ERRORS as exc:
            # Stay undecoded: every later read fails the same way, none sees half of it.
            self.__dict__.clear()
            object.__setattr__(self, "__class__", LazyProperties)
            object.__setattr__(self, "_raw", raw)
            raise MalformedPacket(f"PUBLISH properties: {exc}") from exc
        return object.__getattribute__(self, name)


def decode(header: int, packet: bytes | bytearray) -> paho.MQTTMessage:
    """An MQTT 5 PUBLISH (``header``: its first byte; ``packet``: what follows the
    remaining length) as paho's message, its properties a :class:`LazyProperties`."""
    try:
        (topic_length,) = _LENGTH.unpack_from(packet, 0)
        at = 2 + topic_length
        topic = bytes(packet[2:at])
        qos = (header & 0x06) >> 1
        mid = 0
        if qos > 0:
            (mid,) = _LENGTH.unpack_from(packet, at)
            at += 2
        props_length, length_bytes = _variable_int(packet, at)
    except struct.error as exc:
        raise MalformedPacket(f"PUBLISH: {exc}") from exc
    props_end = at + length_bytes + props_length
    if len(topic) != topic_length or props_end > len(packet):
        raise MalformedPacket("PUBLISH: a length runs past the packet")
    message = paho.MQTTMessage(mid=mid, topic=topic)
    message.dup = bool(header & 0x08)
    message.qos = qos
    message.retain = bool(header & 0x01)
    message.properties = LazyProperties(bytes(packet[at:props_end]))
    message.payload = bytes(packet[props_end:])
    return message


def _variable_int(packet: bytes | bytearray, at: int) -> tuple[int, int]:
    """An MQTT Variable Byte Integer at ``at``: its value and how many bytes it took."""
    value = 0
    for index in range(4):
        if at + index >= len(packet):
            raise MalformedPacket("PUBLISH: the property length runs past the packet")
        byte = packet[at + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise MalformedPacket("PUBLISH: a property length of more than four bytes")
