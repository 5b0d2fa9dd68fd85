"""The ``[transports.NAME]`` options of an MQTT transport, read and checked at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatewayd.api import Options, SecretRef
from gatewayd_mqtt.topics import TopicTemplate

PROTOCOLS = ("3.1.1", "5")
# mosquitto's count of messages it dropped because a session's queue was full.
MOSQUITTO_DROPPED = "$SYS/broker/publish/messages/dropped"
FORMATS = ("raw", "json")


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    """Every option, typed; defaults documented in ``docs/transports/mqtt.md``."""

    host: str
    port: int
    protocol: str
    client_id: str
    username: str | None
    password: SecretRef | None = field(repr=False)
    tls: str | None
    keepalive: int
    session_expiry: int
    uplink: TopicTemplate
    downlink: TopicTemplate
    report: TopicTemplate | None
    device_report: TopicTemplate | None
    format: str
    uplink_qos: int
    downlink_qos: int
    max_payload: int
    max_inflight: int
    receive_maximum: int
    shared_group: str | None
    connect_timeout: float
    publish_timeout: float
    reconnect_initial: float
    reconnect_max: float
    auth_retry: float
    drain_timeout: float
    broker_drop_topic: str | None

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    @classmethod
    def from_options(cls, o: Options) -> MqttConfig:
        """Read every key once; a misspelt or unknown key fails, naming itself."""
        tls = o.get_str("tls", None)
        cfg = cls(
            host=o.get_str("host", "127.0.0.1"),
            port=o.get_int("port", 8883 if tls else 1883, minimum=1),
            protocol=o.get_choice("protocol", PROTOCOLS, "5"),
            client_id=o.get_str("client_id"),
            username=o.get_str("username", None),
            password=o.secret("password", required=False),
            tls=tls,
            keepalive=o.get_int("keepalive", 30, minimum=5),
            session_expiry=o.get_int("session_expiry", 86400, minimum=1),
            uplink=_required(o, "uplink_topic", "devices/{device}/up"),
            downlink=_required(o, "downlink_topic", "devices/{device}/down"),
            report=_template(o, "report_topic", "devices/{device}/report"),
            device_report=_template(o, "device_report_topic", "devices/{device}/ack"),
            format=o.get_choice("format", FORMATS, "json"),
            uplink_qos=_qos(o, "uplink_qos"),
            downlink_qos=_qos(o, "downlink_qos"),
            max_payload=o.get_int("max_payload", 256 * 1024, minimum=1),
            max_inflight=o.get_int("max_inflight", 100, minimum=1),
            receive_maximum=o.get_int("receive_maximum", 100, minimum=1, maximum=65535),
            shared_group=o.get_str("shared_group", None),
            connect_timeout=o.get_float("connect_timeout", 10.0, minimum=0.1),
            publish_timeout=o.get_float("publish_timeout", 30.0, minimum=0.1),
            reconnect_initial=o.get_float("reconnect_initial", 0.5, minimum=0.01),
            reconnect_max=o.get_float("reconnect_max", 30.0, minimum=0.01),
            auth_retry=o.get_float("auth_retry", 60.0, minimum=0.01),
            drain_timeout=o.get_float("drain_timeout", 5.0, minimum=0.0),
            broker_drop_topic=o.get_str("broker_drop_topic", MOSQUITTO_DROPPED) or None,
        )
        o.check_unknown()
        if cfg.password is not None and cfg.username is None:
            raise o.error("password", "needs a username")
        if cfg.broker_drop_topic is not None and not cfg.broker_drop_topic.startswith("$SYS/"):
            raise o.error("broker_drop_topic", "must be a $SYS/ topic (or empty: off)")
        if cfg.shared_group is not None and (
            not cfg.shared_group or any(c in cfg.shared_group for c in "/+#")
        ):
            raise o.error("shared_group", "must be a non-empty name without / + #")
        return cfg


def _template(o: Options, name: str, default: str) -> TopicTemplate | None:
    """A topic template; ``""`` switches an optional topic (reports) off."""
    value = o.get_str(name, default)
    if not value:
        return None
    try:
        return TopicTemplate.parse(value)
    except ValueError as exc:
        raise o.error(name, str(exc)) from None


def _required(o: Options, name: str, default: str) -> TopicTemplate:
    template = _template(o, name, default)
    if template is None:
        raise o.error(name, "must not be empty")
    return template


def _qos(o: Options, name: str) -> int:
    return o.get_int(name, 1, maximum=2)
