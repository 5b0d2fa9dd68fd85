"""The aiomqtt client as this transport needs it: CONNACK kept, acknowledgements by hand.

This module is the only place that reaches below aiomqtt's public API. Two things are
missing there (aiomqtt 2.5, paho-mqtt 2.2):

- the CONNACK properties (MQTT 5 Receive Maximum, ...), which aiomqtt drops: a
  subclass overriding ``_on_connect`` keeps them;
- manual acknowledgement: only paho's client has it, as ``manual_ack_set(True)`` and
  ``ack(mid, qos)``. :class:`ManualAck` wraps that private access;
- a socket reader that can pause: aiomqtt hands every PUBLISH the broker sends to an
  unbounded queue, and brokers do not all hold to our Receive Maximum (mosquitto 2.0.11
  stops once acknowledgements flow), so the subclass installs its own reader, which
  stops reading while ``intake_limit`` messages are held (see :meth:`release`);
- a PUBLISH decoder whose MQTT 5 properties are decoded on first use
  (:mod:`gatewayd_mqtt.publish`): the subclass puts it in place of paho's
  ``_handle_publish`` for QoS 0 and 1, and hands QoS 2 to paho's own.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.types import PahoSocket
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd_mqtt import publish

# CONNACK codes that mean "your credentials are not good": retrying at once cannot help.
# MQTT 3.1.1: 4 bad user name or password, 5 not authorized. MQTT 5: 0x86, 0x87, 0x8A
# (banned), 0x8C (bad authentication method).
AUTH_REFUSALS = frozenset({4, 5, 0x86, 0x87, 0x8A, 0x8C})

DEFAULT_RECEIVE_MAXIMUM = 65535  # MQTT 5 3.2.2.3.3: absent means 65,535


class GatewayClient(aiomqtt.Client):
    """An :class:`aiomqtt.Client` that remembers what the broker said in its CONNACK,
    and stops reading from the broker while ``intake_limit`` messages are held."""

    def __init__(
        self, *args: Any, intake_limit: int = DEFAULT_RECEIVE_MAXIMUM, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.connack_properties: Properties | None = None
        self.session_present = False
        # Received (paho called on_message) and not yet released by the transport: the
        # messages this connection holds in memory, queued or in progress.
        self.intake_limit = intake_limit
        self.held = 0
        self.max_held = 0
        self.pauses = 0
        # Resume below the limit, not at it: one reader toggle (two epoll_ctl calls)
        # per quarter of the window instead of per message when the store is the brake.
        self._resume_at = intake_limit - max(1, intake_limit // 4)
        self._paused = False
        self._fd: int | None = None  # the socket the reader watches, while it is open
        # Set before connecting: a resumed session sends its unacknowledged messages
        # right after CONNACK, and those must not be acked on arrival either.
        v5 = kwargs.get("protocol") == aiomqtt.ProtocolVersion.V5
        self.acks = ManualAck(self, v5=v5)
        if v5:
            self._client._handle_publish = self._handle_publish  # type: ignore[method-assign]

    def _handle_publish(self) -> MQTTErrorCode:
        # In place of paho's (see the module docstring), on the paho client's read path.
        paho_client = self._client
        header, packet = paho_client._in_packet["command"], paho_client._in_packet["packet"]
        if header & 0x06 == 0x04:  # QoS 2: paho's own exchange (PUBREC, PUBREL, PUBCOMP)
            return paho.Client._handle_publish(paho_client)
        message = publish.decode(header, packet)
        message.timestamp = time.monotonic()
        paho_client._handle_on_message(message)
        # QoS 1: acknowledged by hand (ManualAck), once the message is stored.
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.connack_properties = properties
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    # --- intake backpressure ----------------------------------------------------------
    # Replaces aiomqtt's socket callbacks (aiomqtt 2.5 ``_on_socket_open``): the same
    # reader, plus a pause. While paused nothing is read, so PUBLISHes wait in the
    # kernel's socket buffers and then in the broker's queue for our session (TCP flow
    # control): memory here stays bounded whatever the broker does. paho keeps no
    # complete packet of its own between reads (only a partial one), so a pause loses
    # nothing. Everything arriving also waits, PINGRESP included: a pause longer than
    # about twice ``keepalive`` ends the connection (paho's keepalive check), and the
    # unacked messages come back with the session.

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: PahoSocket) -> None:
        fd = sock.fileno()

        def opened() -> None:  # paho calls us from the connect executor thread
            self._fd = fd
            if not self._paused:
                self._loop.add_reader(fd, self._read_socket)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(opened)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: PahoSocket) -> None:
        self._fd = None  # never re-add a reader to a closed (perhaps reused) descriptor
        super()._on_socket_close(client, userdata, sock)

    def _read_socket(self) -> None:
        paho_client = self._client
        try:
            while not self._paused and self._fd is not None:
                paho_client.loop_read()
                # An SSL socket may hold decrypted bytes the kernel no longer signals
                # (paho issue 131): read them now, as aiomqtt does.
                sock = paho_client._sock  # private: see the module docstring
                pending = getattr(sock, "pending", None)
                if pending is None or pending() <= 0:
                    break
        except Exception as exc:  # a broken connection, as in aiomqtt
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        if self.held >= self.intake_limit and not self._paused:
            # Checked before each read: at most one more read's worth arrives (paho
            # reads as many packets per call as our own QoS > 0 publishes in flight).
            self._paused = True
            self.pauses += 1
            if self._fd is not None:
                self._loop.remove_reader(self._fd)
        super()._on_message(client, userdata, message)

    def release(self, count: int = 1) -> None:
        """``count`` received messages are no longer held here (acknowledged, left with
        the broker, or a QoS 0 one handled): read again once enough are released."""
        self.held -= count
        if self._paused and self.held <= self._resume_at:
            self._paused = False
            if self._fd is not None:
                self._loop.add_reader(self._fd, self._read_socket)
                # Bytes an SSL socket decrypted before the pause raise no readiness.
                self._loop.call_soon(self._read_socket)

    @property
    def receive_maximum(self) -> int:
        """How many QoS > 0 PUBLISHes the broker accepts in flight from us (MQTT 5)."""
        props = self.connack_properties
        value = getattr(props, "ReceiveMaximum", None) if props is not None else None
        return int(value) if value else DEFAULT_RECEIVE_MAXIMUM

    def failure_detail(self) -> str | None:
        """Why a connect attempt failed below MQTT (a TLS alert), if the socket said so.

        Reading it also marks the future's exception as retrieved, so asyncio does not
        complain about it when the failed client is collected.
        """
        fut = self._disconnected
        if fut.done() and not fut.cancelled() and (exc := fut.exception()) is not None:
            return f"{type(exc).__name__}: {exc}"
        return None


class ManualAck:
    """Acknowledge received QoS 1/2 messages only when told to.

    paho sends PUBACK (QoS 1) / PUBCOMP (QoS 2) once ``on_message`` returns unless
    manual acknowledgement is on; aiomqtt 2.5 offers no switch for it, so this reaches
    into aiomqtt's private ``_client`` (the paho client). Keep it the only such access.
    """

    def __init__(self, client: aiomqtt.Client, *, v5: bool = False) -> None:
        self._paho: paho.Client = client._client  # private: see the class docstring
        self._paho.manual_ack_set(True)
        self._v5 = v5

    def ack(self, mid: int, qos: int, reason: int = 0) -> bool:
        """Send the PUBACK/PUBCOMP for ``mid``; ``False`` when the connection is gone.

        ``reason`` is an MQTT 5 PUBACK reason code (>= 0x80: the message is refused for
        good, e.g. 0x99 payload format invalid). paho's ``ack`` cannot carry one, so
        that PUBACK is built here (MQTT 5 3.4: fixed header, packet id, reason code) and
        queued like paho's own. MQTT 3.1.1 has no reason codes: a plain PUBACK; QoS 2 is
        complete on arrival in paho anyway (see docs/transports/mqtt.md).
        """
        if qos == 0:
            return True
        if reason and qos == 1 and self._v5:
            packet = struct.pack("!BBHB", paho.PUBACK, 3, mid, reason)
            rc = self._paho._packet_queue(paho.PUBACK, packet, mid, 1)  # private, as above
            return bool(rc == paho.MQTT_ERR_SUCCESS)
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS


def connect_properties(*, session_expiry: int, receive_maximum: int) -> Properties:
    """MQTT 5 CONNECT properties: keep the session, and bound what the broker sends us."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call] # paho is untyped here
    props.SessionExpiryInterval = session_expiry
    props.ReceiveMaximum = receive_maximum
    return props


def publish_properties(msg_id: str) -> Properties:
    """MQTT 5 PUBLISH properties: the message id as a user property, for raw payloads."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = ("msgId", msg_id)
    return props


def user_property(properties: Properties | None, name: str) -> str | None:
    """The first MQTT 5 user property called ``name`` on a received message."""
    for key, value in getattr(properties, "UserProperty", None) or ():
        if key == name:
            return str(value)
    return None
