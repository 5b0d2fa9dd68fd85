"""The MQTT transport: devices on an MQTT 3.1.1 / 5 broker, reached through one client.

One connection at a time, owned by a supervisor task that reconnects with jittered
exponential backoff and resumes the same persistent session (fixed client id), so
what the broker holds for us survives both our restarts and the broker's. Uplink
messages are stored by ``context.accept()`` before their PUBACK goes out; downlink
messages are published with QoS 1/2 and count as delivered on PUBACK/PUBCOMP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd.api import (
    Acceptance,
    BacklogFullError,
    CredentialError,
    DeliveryOutcome,
    DeviceReport,
    Downlink,
    GatewaydError,
    IntakeRefusedError,
    InvalidMessageError,
    Logger,
    Rejection,
    Transport,
    TransportContext,
    TransportSettings,
    Uplink,
    UplinkReport,
    client_context,
)
from gatewayd_mqtt.acks import AckQueue, Pending
from gatewayd_mqtt.backoff import Backoff
from gatewayd_mqtt.client import (
    AUTH_REFUSALS,
    GatewayClient,
    connect_properties,
    publish_properties,
    user_property,
)
from gatewayd_mqtt.config import MqttConfig
from gatewayd_mqtt.payloads import (
    PayloadError,
    decode_raw,
    derived_msg_id,
    downlink_json,
    encode_raw,
    parse_device_report,
    parse_envelope,
    report_json,
)

T = TypeVar("T")

# How to acknowledge a received message: ``None`` leaves it with the broker (it is
# redelivered on the next connection), an int is the PUBACK reason code to send (MQTT 5;
# a 3.1.1 PUBACK carries none).
Verdict = int | None
MAX_RETRY_WAIT = 2.0  # seconds between attempts to store a message refused for now
MAX_FAILED_ATTEMPTS = 3  # unexpected errors on one message before it counts as poison
ACK = 0x00
UNSPECIFIED_ERROR = 0x80
# How long the last reading of the broker's drop counter is kept for the next start: a
# gateway away for longer starts from a fresh baseline, as on its very first start.
BROKER_DROPS_TTL = 30 * 86400.0
# A permanent refusal in MQTT 5 terms (MQTT 5 3.4.2.1): the device learns that resending
# is pointless, and the broker counts the message as delivered.
_REASON_CODES = {
    "invalid_message": 0x99,  # Payload format invalid
    "unknown_device": 0x87,  # Not authorized
    "device_refused": 0x87,
}


class TransportStats:
    """Counters for tests, benchmarks and metrics. Mutated only on the event loop."""

    __slots__ = (
        "accepted",
        "broker_dropped",
        "broker_readings",
        "connects",
        "dropped",
        "duplicates",
        "inflight",
        "intake_pauses",
        "max_held_seen",
        "max_inflight_seen",
        "published",
        "refusals",
        "rejected",
    )

    def __init__(self) -> None:
        self.accepted = 0  # uplinks and device reports stored (duplicates included)
        self.duplicates = 0
        self.dropped = 0  # acked, not forwarded: retained copies, stray topics, bad reports
        self.rejected = 0  # refused for good (invalid, unknown device): in the DLQ, acked
        self.refusals = 0  # intake refused for now (backlog full): left unacked
        self.broker_dropped = 0  # what the broker's $SYS counter says it dropped
        self.broker_readings = 0  # $SYS counter readings taken (and their baseline kept)
        self.connects = 0
        self.published = 0  # downlinks and reports completed (PUBACK/PUBCOMP)
        self.inflight = 0  # our QoS > 0 publishes awaiting the broker's ack
        self.max_inflight_seen = 0
        # Intake backpressure (per connection, folded in here): the most received
        # messages held at once (queued, in progress, or stored awaiting their turn to
        # be acked), bounded by receive_maximum; and how often reading paused for it.
        self.max_held_seen = 0
        self.intake_pauses = 0


@dataclass(slots=True, eq=False)
class _Link:
    """One live connection and what belongs to it alone."""

    client: GatewayClient
    acks: AckQueue
    inflight: asyncio.Semaphore  # sized from the broker's Receive Maximum
    limit: int
    lost: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _ErrorTrap(logging.Handler):
    """Keeps paho's last error line: the only place a TLS alert after the handshake shows
    (TLS 1.3 lets the client's handshake finish; the refusal comes on the first read)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


class MqttTransport(Transport):
    """``plugin = "mqtt"``: see ``docs/transports/mqtt.md`` for the options."""

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        super().__init__(settings, context)
        self.config = MqttConfig.from_options(settings.options)
        self.stats = TransportStats()
        self._password: str | None = None
        self._link: _Link | None = None
        self._stopping = asyncio.Event()
        # What ``gatewayd status`` shows: "connecting" while an attempt (CONNECT, CONNACK,
        # SUBSCRIBE) is under way; "disconnected" while waiting out the backoff or stopped.
        # "connected" is read from ``_link`` itself, never from here.
        self._phase = "disconnected"
        self._first: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._pauses_counted = 0  # the current client's intake pauses already in stats
        self._lanes: dict[str, asyncio.Future[bool]] = {}  # topic -> its last message's turn
        self._broker_drops: dict[str, int] = {}  # $SYS counter topic -> last value
        self._broker_drops_saved: dict[str, float] = {}  # -> when kept in kv (monotonic)
        # Bounds the uplinks being stored at once. MQTT 5 brokers hold to our Receive
        # Maximum anyway; for 3.1.1 (and QoS 0) this is the only bound.
        self._uplink_slots = asyncio.Semaphore(self.config.receive_maximum)
        self._reconnect = Backoff(
            initial=self.config.reconnect_initial, maximum=self.config.reconnect_max
        )
        self._retry = Backoff(initial=0.05, maximum=5.0)
        self._paho_log = logging.getLogger(f"gatewayd_mqtt.paho.{settings.name}")
        self._trap = _ErrorTrap()
        self._paho_log.addHandler(self._trap)
        self._bound_log: Logger | None = None
        if self.config.uplink_qos == 2:
            # paho completes a QoS 2 receive before we store it: a crash in between loses
            # a message the device saw acknowledged (docs/transports/mqtt.md).
            self._log.warning(
                "mqtt.config.unsafe",
                key=f"transports.{settings.name}.uplink_qos",
                detail="uplink_qos = 2 cannot keep 'acknowledged only after stored' across "
                "a crash; use 1 (duplicates are removed by msgId)",
            )

    @property
    def _log(self) -> Logger:
        # Bound once: a bind costs a few microseconds, and this runs for every message.
        if self._bound_log is None:
            self._bound_log = self.context.log.bind(transport=self.name)
        return self._bound_log

    def _debug(self, log: Logger) -> bool:
        # A filtered-out debug call still runs structlog's whole processor chain (tens of
        # microseconds): the per-message debug lines ask the level first.
        # Only structlog's stdlib wrapper can tell; any other logger just logs.
        enabled = getattr(log, "isEnabledFor", None)
        return enabled is None or bool(enabled(logging.DEBUG))

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def intake_held(self) -> int:
        """Received messages this connection holds now: queued, being stored, or stored
        and waiting for an earlier one's ack. Reading pauses at ``receive_maximum``."""
        return self._link.client.held if self._link is not None else 0

    def link_state(self) -> dict[str, str | int]:
        """For ``gatewayd status``: connected / connecting / disconnected, the reconnects
        since start, and our QoS > 0 publishes the broker has not acknowledged yet."""
        return {
            "state": "connected" if self._link is not None else self._phase,
            "reconnects": max(0, self.stats.connects - 1),
            "unacked": self.stats.inflight,
        }

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Read the secrets, then connect once. Returns when connected and subscribed,
        or after a first failure that a retry may fix (the supervisor keeps trying).
        Raises :class:`CredentialError` when the broker refuses our credentials."""
        cfg = self.config
        if cfg.password is not None:
            self._password = cfg.password.read_text()
        if cfg.tls is not None:
            self._tls_context()  # fail at start on unusable material, not at connect
        self._first = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"mqtt:{self.name}:connection"
        )
        try:
            await asyncio.shield(self._first)
        except BaseException:
            await self._cancel_supervisor()
            raise

    async def run(self) -> None:
        """Intake runs in the supervisor; this returns when it ends (stop) and re-raises
        if it crashed, which the gateway treats as fatal."""
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)

    async def stop(self) -> None:
        """Stop reading, let in-flight uplinks finish (bounded by ``drain_timeout``) and
        ack them, then DISCONNECT. Unfinished ones stay unacked with the broker."""
        self._stopping.set()
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._supervisor), self.config.drain_timeout + 10
                )
            except TimeoutError:
                await self._cancel_supervisor()
            except Exception as exc:  # already logged where it happened; stop must finish
                self._log.error("mqtt.stop.failed", error=repr(exc))
        await self._cancel_handlers()
        self._paho_log.removeHandler(self._trap)

    async def _cancel_supervisor(self) -> None:
        task = self._supervisor
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _cancel_handlers(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    # --- the connection -------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        """Built anew for every connection, so rotated credentials apply on reconnect."""
        if self.config.tls is None:
            return None
        backend = self.context.credentials(self.config.tls)
        trust = backend.trust_anchors()
        if trust is None:
            raise CredentialError(f"credentials {self.config.tls!r} offer no trust anchors")
        return client_context(trust, backend.tls_identity())

    def _new_client(self) -> GatewayClient:
        cfg = self.config
        extra: dict[str, Any] = {}
        if cfg.v5:
            extra["clean_start"] = False  # resume the session, even on the first connect
            extra["properties"] = connect_properties(
                session_expiry=cfg.session_expiry, receive_maximum=cfg.receive_maximum
            )
        else:
            extra["clean_session"] = False
        self._trap.last = None
        client = GatewayClient(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=self._password,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if cfg.v5 else aiomqtt.ProtocolVersion.V311,
            keepalive=cfg.keepalive,
            timeout=cfg.connect_timeout,
            max_inflight_messages=cfg.max_inflight,
            intake_limit=cfg.receive_maximum,
            tls_context=self._tls_context(),
            logger=self._paho_log,
            **extra,
        )
        # Our semaphores bound the pending publishes; past this aiomqtt would log a
        # warning per publish, which alone costs 20-35 % of a burst's throughput.
        client.pending_calls_threshold = cfg.max_inflight + 16
        return client

    async def _supervise(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            linked = False
            client: GatewayClient | None = None
            delay: float | None = None
            self._phase = "connecting"
            try:
                client = self._new_client()
                async with client:
                    linked = True
                    attempt = 0
                    await self._session(client)
            except MqttConnectError as exc:
                code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
                if code in AUTH_REFUSALS:
                    delay = self._auth_failed(f"CONNACK refused: {exc}", definite=True)
                else:
                    self._log.warning("mqtt.connect_failed", error=str(exc))
            except aiomqtt.MqttError as exc:
                if linked:
                    self._log.warning("mqtt.disconnected", error=str(exc))
                else:
                    delay = self._connect_failed(client, exc)
            except CredentialError as exc:
                delay = self._auth_failed(str(exc), definite=True)
            except GatewaydError as exc:
                self._log.error("mqtt.session_failed", error=str(exc))
            finally:
                self._phase = "disconnected"
            if self._stopping.is_set():
                break
            self._first_done()
            if delay is None:
                delay = self._reconnect.delay(attempt)
                attempt += 1
            await self._sleep(delay)
        self._first_done()

    def _connect_failed(self, client: GatewayClient | None, exc: aiomqtt.MqttError) -> float | None:
        detail = (client.failure_detail() if client else None) or self._trap.last or str(exc)
        if self.config.tls is not None and ("SSL" in detail or "certificate" in detail):
            return self._auth_failed(f"TLS refused: {detail}", definite=True)
        if self.config.tls is not None and "timed out" in str(exc):
            # Over TLS 1.3 a refused client certificate looks exactly like this.
            return self._auth_failed(f"no CONNACK over TLS: {detail}", definite=False)
        self._log.warning("mqtt.connect_failed", error=detail)
        return None

    def _auth_failed(self, detail: str, *, definite: bool) -> float:
        """Log; at start a definite refusal fails the start. Never a tight retry loop."""
        self._log.error("mqtt.auth_failed", detail=detail, definite=definite)
        if definite and self._first is not None and not self._first.done():
            self._first.set_exception(CredentialError(f"MQTT broker refused us: {detail}"))
        return self.config.auth_retry

    def _first_done(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _session(self, client: GatewayClient) -> None:
        """One connection: subscribe, read until it drops or we stop."""
        cfg = self.config
        limit = min(cfg.max_inflight, client.receive_maximum)
        link = _Link(client, AckQueue(client.acks), asyncio.Semaphore(limit), limit)
        self._pauses_counted = 0
        # Read from the start, not only after the SUBACK: a resumed session's messages
        # come before it, and once receive_maximum of them are held the client stops
        # reading until they are handled, so a reader started after the SUBACK would
        # wait for it forever.
        reader = asyncio.create_task(self._read(link), name=f"mqtt:{self.name}:reader")
        stop: asyncio.Task[Any] | None = None
        try:
            await self._subscribe(client)
            self._link = link
            self.stats.connects += 1
            self._log.info(
                "mqtt.connected",
                host=cfg.host,
                port=cfg.port,
                session_present=client.session_present,
                receive_maximum=client.receive_maximum,
                inflight_limit=limit,
            )
            self._first_done()
            stop = asyncio.create_task(self._stopping.wait(), name=f"mqtt:{self.name}:stop")
            await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises MqttError when the connection dropped
                return
            reader.cancel()
            await self._drain()
            self._log.info("mqtt.disconnected", reason="stopping")
        finally:
            tasks = [t for t in (reader, stop) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._count_held(client)
            self._link = None
            if not link.lost.done():
                link.lost.set_result(None)

    async def _subscribe(self, client: GatewayClient) -> None:
        cfg = self.config
        filters = [cfg.uplink.filter]
        if cfg.device_report is not None:
            filters.append(cfg.device_report.filter)
        if cfg.shared_group is not None:
            filters = [f"$share/{cfg.shared_group}/{f}" for f in filters]
        for topic_filter in filters:
            granted = await client.subscribe(topic_filter, qos=cfg.uplink_qos)
            codes = [c.value if isinstance(c, ReasonCode) else c for c in granted]
            if any(code >= 0x80 for code in codes):
                raise GatewaydError(f"broker refused the subscription {topic_filter!r}: {codes}")
            self._log.debug("mqtt.subscribed", filter=topic_filter, qos=codes)
        if cfg.broker_drop_topic is not None:
            # Optional: a broker without the counter, or an ACL that hides $SYS, only
            # costs us the warning (logged once per connection).
            granted = await client.subscribe(cfg.broker_drop_topic, qos=0)
            codes = [c.value if isinstance(c, ReasonCode) else c for c in granted]
            if any(code >= 0x80 for code in codes):
                self._log.info(
                    "mqtt.broker_stats.unavailable", filter=cfg.broker_drop_topic, codes=codes
                )

    async def _drain(self) -> None:
        """Give stored-but-unacked uplinks ``drain_timeout`` to finish and be acked."""
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=self.config.drain_timeout)
        await self._cancel_handlers()

    # --- uplink -----------------------------------------------------------------------

    def _count_held(self, client: GatewayClient) -> None:
        stats = self.stats
        stats.max_held_seen = max(stats.max_held_seen, client.max_held)
        stats.intake_pauses += client.pauses - self._pauses_counted
        self._pauses_counted = client.pauses

    async def _read(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        async for message in link.client.messages:
            self._count_held(link.client)
            await self._uplink_slots.acquire()
            # Tracked here, in arrival order, so acks go out in that order.
            entry = link.acks.track(message.mid, message.qos) if message.qos > 0 else None
            # One lane per topic (per device): a message waits for the one before it, so
            # a refused and retried message is never overtaken by its device's later ones.
            # Not when the gateway promises no per-device order (pipeline above 1): then
            # one device's messages are stored concurrently too.
            before: asyncio.Future[bool] | None = None
            turn: asyncio.Future[bool] | None = None
            if self.context.pipeline == 1:
                topic = message.topic.value
                before = self._lanes.get(topic)
                turn = self._lanes[topic] = loop.create_future()
            task = asyncio.create_task(
                self._handle(link, message, entry, before, turn),
                name=f"mqtt:{self.name}:in:{message.mid}",
            )
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._uplink_slots.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("mqtt.uplink.crashed", error=repr(exc))

    async def _handle(
        self,
        link: _Link,
        message: aiomqtt.Message,
        entry: Pending | None,
        before: asyncio.Future[bool] | None,
        turn: asyncio.Future[bool] | None,
    ) -> None:
        verdict: Verdict = None
        try:
            # A predecessor left with the broker comes back on the next connection,
            # before this one: leave this one too, or it would overtake it.
            if before is None or await asyncio.shield(before):
                verdict = await self._intake(link, message)
        finally:
            if turn is not None:
                if not turn.done():
                    turn.set_result(verdict is not None)
                topic = message.topic.value
                if self._lanes.get(topic) is turn:
                    del self._lanes[topic]
            # Cancelled or refused: no ack, the broker keeps the message for the session.
            # Either way it leaves memory once its ack is out (or given up), in arrival
            # order: only then may the client read another one in its place.
            if entry is not None:
                released = link.acks.settle(entry, ack=verdict is not None, reason=verdict or 0)
            else:
                released = 1  # QoS 0: nothing to acknowledge
            if released:
                link.client.release(released)

    async def _intake(self, link: _Link, message: aiomqtt.Message) -> Verdict:
        """Route one received message; return how to acknowledge it (``None``: don't)."""
        cfg = self.config
        topic = message.topic.value
        raw = message.payload
        # aiomqtt types the payload loosely; paho always hands over bytes.
        payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        log = self._log.bind(topic=topic, mid=message.mid)
        if topic.startswith("$SYS/"):
            await self._broker_stat(topic, payload)
            return ACK
        if message.retain:
            # Only a new subscription delivers with RETAIN set: a stale copy, not news.
            return self._drop(log, "mqtt.uplink.retained_ignored")
        if (device := cfg.uplink.match(topic)) is not None:
            return await self._uplink(link, log, device, message, payload)
        if cfg.device_report is not None and (device := cfg.device_report.match(topic)):
            return await self._device_report(link, log, device, payload)
        return self._drop(log, "mqtt.topic.unexpected")

    async def _uplink(
        self, link: _Link, log: Logger, device: str, message: aiomqtt.Message, payload: bytes
    ) -> Verdict:
        try:
            if len(payload) > self.config.max_payload:
                limit = self.config.max_payload
                raise PayloadError("oversize", f"{len(payload)} bytes; max_payload is {limit}")
            uplink = self._to_uplink(device, message.topic.value, message, payload)
        except PayloadError as exc:
            return await self._reject(link, log, device=device, error=exc, payload=payload)
        # ``device`` joins the bound fields with ``msg_id``: one bind per message, not two.
        # A msgId that is no valid text (a lone surrogate) is logged as its repr().
        msg_id = uplink.msg_id
        if msg_id is not None and not msg_id.isascii():
            msg_id = ascii(msg_id)
        log = log.bind(device=device, msg_id=msg_id)

        async def poison(detail: str) -> Verdict:
            error = PayloadError("internal_error", detail)
            return await self._reject(link, log, device=device, error=error, payload=payload)

        return await self._submit(link, log, lambda: self.context.accept(uplink), poison)

    async def _device_report(
        self, link: _Link, log: Logger, device: str, payload: bytes
    ) -> Verdict:
        try:
            if len(payload) > self.config.max_payload:
                raise PayloadError("oversize", f"{len(payload)} bytes")
            fields = parse_device_report(payload)
        except PayloadError as exc:
            # A report is no message: logged, counted (stats.dropped) and acked.
            return self._drop(
                log, "mqtt.report.invalid", device=device, reason=exc.reason, detail=exc.detail
            )
        report = DeviceReport(
            device=device, msg_id=fields.msg_id, delivered=fields.delivered, cause=fields.cause
        )
        log = log.bind(device=device, msg_id=ascii(report.msg_id))

        async def poison(detail: str) -> Verdict:
            return self._drop(log, "mqtt.report.invalid", reason="internal_error", detail=detail)

        return await self._submit(link, log, lambda: self.context.accept_report(report), poison)

    async def _reject(
        self, link: _Link, log: Logger, *, device: str, error: PayloadError, payload: bytes
    ) -> Verdict:
        """Input that cannot become a message: recorded by the gateway (dead-letter
        queue, metric, and the refusal's one log line, ``intake.rejected``), then
        refused to the device for good."""
        reason, detail = error.reason, error.detail

        async def record() -> None:
            rejection = Rejection(device=device, reason=reason, detail=detail, content=payload)
            await self.context.reject(rejection)
            raise InvalidMessageError(f"{reason}: {detail}")  # recorded: refuse for good

        return await self._submit(link, log, record)

    def _drop(self, log: Logger, event: str, **kw: Any) -> Verdict:
        """Not a device message (stale retained copy, stray topic, bad report): logged,
        not forwarded, and acked so the broker stops redelivering it."""
        self.stats.dropped += 1
        log.warning(event, **kw)
        return ACK

    async def _broker_stat(self, topic: str, payload: bytes) -> None:
        """A broker's dropped-message counter: warn when it grows (see docs).

        The counter is the broker's total since it started, for every client, so only
        its growth is news. The last reading is kept in ``context.kv``: a restarted
        gateway compares its first reading with it (what the broker dropped while the
        gateway was away, its session's queue overflowing, is reported), and the first
        reading with none kept (a first start, or away for longer than
        :data:`BROKER_DROPS_TTL`) is only a baseline: the broker's history is not ours.
        A reading below the last one is a broker that restarted (counters start at 0):
        a new baseline too.
        """
        try:
            value = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return
        # Per broker address: a config moved to another broker starts a new baseline.
        key = f"broker_drops {self.config.host}:{self.config.port} {topic}"
        last = self._broker_drops.get(topic)
        if last is None:
            # A store error (the store logs it) or an unreadable row: a fresh baseline.
            with contextlib.suppress(GatewaydError, ValueError):
                stored = await self.context.kv.get(key)
                last = int(stored) if stored is not None else None
        self._broker_drops[topic] = value
        grown = value - last if last is not None else 0
        if grown > 0:
            self.stats.broker_dropped += grown
            self.context.peer_dropped(
                grown,
                f"the broker's drop counter {topic} grew by {grown} to {value}: messages "
                "devices saw acknowledged are lost; see docs/transports/mqtt.md, "
                "'Broker settings'",
            )
        # Written at the first reading and on a change (a healthy broker's counter never
        # moves), and often enough that the row outlives a long quiet run. A store error
        # costs only the baseline across a restart.
        now = time.monotonic()
        saved = self._broker_drops_saved.get(topic)
        if value != last or saved is None or now - saved > BROKER_DROPS_TTL / 2:
            with contextlib.suppress(GatewaydError):
                await self.context.kv.put(key, str(value), ttl=BROKER_DROPS_TTL)
                self._broker_drops_saved[topic] = now
        self.stats.broker_readings += 1

    def _to_uplink(
        self, device: str, topic: str, message: aiomqtt.Message, payload: bytes
    ) -> Uplink:
        # QoS 0 is never redelivered: no id needed, the core assigns one.
        fallback = derived_msg_id(topic, message.mid, payload) if message.qos > 0 else None
        if self.config.format == "json":
            env = parse_envelope(payload)
            return Uplink(
                device=device,
                payload=env.payload,
                msg_id=env.msg_id or fallback,
                dest=env.dest,
                app_id=env.app_id,
                report_requested=env.report_requested,
                expiry=env.expiry,
            )
        props = message.properties if isinstance(message.properties, Properties) else None
        try:
            msg_id = user_property(props, "msgId")
        except MalformedPacket as exc:  # decoded only now (gatewayd_mqtt.publish)
            raise PayloadError("bad_properties", str(exc)) from None
        return Uplink(device=device, payload=encode_raw(payload), msg_id=msg_id or fallback)

    async def _submit(
        self,
        link: _Link,
        log: Logger,
        call: Callable[[], Awaitable[Acceptance | None]],
        poison: Callable[[str], Awaitable[Verdict]] | None = None,
    ) -> Verdict:
        """Hand a message to the core until it is stored or refused for good.

        A permanent refusal (invalid, unknown or refused device) was recorded by the core
        (dead-letter queue, log line, metric): it is acknowledged, with an MQTT 5 reason
        code, so the broker never redelivers it. A storage refusal (backlog or disk full) is
        retried after its ``retry_after`` (or a backoff) while the message stays
        unacked, so the broker's in-flight window fills and holds the device traffic
        back. Should the connection drop or the transport stop meanwhile, it is given up
        unacked: the broker redelivers it. An unexpected error (a bug, not a refusal)
        that repeats :data:`MAX_FAILED_ATTEMPTS` times makes the message ``poison``:
        retried forever, it would hold its device and every ack behind it.
        """
        attempt = 0
        while True:
            try:
                result = await call()
            except IntakeRefusedError as exc:
                if exc.permanent:
                    self.stats.rejected += 1
                    code = _REASON_CODES.get(exc.reason, UNSPECIFIED_ERROR)
                    # The core logged the refusal (intake.rejected): one line per refusal,
                    # so ours, with the answer we give, is debug only.
                    if self._debug(log):
                        log.debug("mqtt.uplink.rejected", reason=exc.reason, code=code)
                    return code
                self.stats.refusals += 1
                # retry_after is advice for devices (a full disk says 30 s). Trying the
                # local store again is cheap, and only each device's head message does:
                # so the intake resumes within a couple of seconds of space returning.
                delay = min(exc.retry_after or self._retry.delay(attempt), MAX_RETRY_WAIT)
                log.warning(
                    "mqtt.uplink.refused",
                    reason=exc.reason,
                    retry_in=round(delay, 3),
                    attempt=attempt,
                    backlog=isinstance(exc, BacklogFullError),
                )
            except Exception as exc:  # never crash the transport over one message
                delay = self._retry.delay(attempt)
                log.error("mqtt.uplink.accept_failed", error=repr(exc), attempt=attempt)
                # A StoreError (I/O) may pass; anything else is this message's fault.
                bug = not isinstance(exc, GatewaydError)
                if bug and poison is not None and attempt + 1 >= MAX_FAILED_ATTEMPTS:
                    return await poison(repr(exc))
            else:
                self.stats.accepted += 1
                duplicate = result is not None and result.duplicate
                self.stats.duplicates += duplicate
                if self._debug(log):
                    log.debug("mqtt.uplink.accepted", duplicate=duplicate)
                return ACK
            attempt += 1
            if not await self._pause(link, delay):
                log.info("mqtt.uplink.left_with_broker")
                return None

    async def _pause(self, link: _Link, delay: float) -> bool:
        """Sleep ``delay``; ``False`` if the link dropped or the transport stops first."""
        stop = asyncio.create_task(self._stopping.wait(), name=f"mqtt:{self.name}:pause")
        waits: set[asyncio.Future[Any]] = {stop, link.lost}
        try:
            done, _ = await asyncio.wait(waits, timeout=delay)
        finally:
            stop.cancel()
        return not done

    # --- downlink ---------------------------------------------------------------------

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        """Publish to the device's downlink topic; delivered once PUBACK/PUBCOMP is in.

        With QoS 0 that is only "handed to the socket". Any failure is transient: the
        gateway retries, so a device may see a message twice (at-least-once)."""
        log = self._log.bind(msg_id=message.msg_id, device=message.device.name)
        try:
            topic = self.config.downlink.format(message.device.name)
        except ValueError as exc:
            log.error("mqtt.downlink.failed", cause="bad_device_name", detail=str(exc))
            return DeliveryOutcome.failure("bad_device_name", permanent=True)
        props: Properties | None = None
        if self.config.format == "json":
            payload = downlink_json(message)
        else:
            payload = decode_raw(message.payload or "")
            if self.config.v5:
                props = publish_properties(message.msg_id)
        outcome = await self._publish(topic, payload, props)
        if outcome.delivered:
            if self._debug(log):
                log.debug("mqtt.downlink.published", topic=topic)
        else:
            log.warning("mqtt.downlink.failed", topic=topic, cause=outcome.cause)
        return outcome

    async def deliver_report(self, report: UplinkReport) -> bool:
        """Publish the server's report as JSON on the device's report topic."""
        if self.config.report is None:
            return False
        log = self._log.bind(msg_id=report.msg_id, device=report.device.name)
        try:
            topic = self.config.report.format(report.device.name)
        except ValueError:
            return False
        outcome = await self._publish(topic, report_json(report), None)
        if not outcome.delivered:
            log.warning("mqtt.report.failed", cause=outcome.cause)
        return outcome.delivered

    async def _publish(
        self, topic: str, payload: bytes, props: Properties | None
    ) -> DeliveryOutcome:
        link = self._link
        if link is None:
            return DeliveryOutcome.failure("mqtt_disconnected")
        qos = self.config.downlink_qos
        # Never more unacked publishes than the broker's Receive Maximum allows: past it
        # an MQTT 5 broker disconnects us (0x93).
        async with link.inflight:
            self.stats.inflight += 1
            self.stats.max_inflight_seen = max(self.stats.max_inflight_seen, self.stats.inflight)
            publish = asyncio.create_task(
                link.client.publish(
                    topic, payload, qos=qos, properties=props, timeout=self.config.publish_timeout
                ),
                name=f"mqtt:{self.name}:publish",
            )
            try:
                # aiomqtt's publish does not notice a dropped connection; the link does.
                await asyncio.wait({publish, link.lost}, return_when=asyncio.FIRST_COMPLETED)
                if not publish.done():
                    return DeliveryOutcome.failure("mqtt_disconnected")
                publish.result()
            except aiomqtt.MqttError as exc:
                return DeliveryOutcome.failure(f"mqtt_publish_failed: {exc}")
            finally:
                self.stats.inflight -= 1
                if not publish.done():
                    publish.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await publish
        self.stats.published += 1
        return DeliveryOutcome.success()
