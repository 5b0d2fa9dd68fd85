"""Helpers for gatewayd-mqtt: small builders for transports (on the test kit's
in-memory context and static credentials) and device-side clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
from gatewayd_mqtt.transport import MqttTransport
from gatewayd_testing import MemoryTransportContext, StaticCredentials
from mosquitto import Mosquitto

from gatewayd import pki
from gatewayd.api import Device, Options, TlsIdentity, TransportSettings, TrustAnchors

# Burst sizes: the moderate one always runs; the long one only under @pytest.mark.slow.
BURST = 1_000
LONG_BURST = 10_000
TEMPLATE = "{device}@iot.example"


def transport_settings(
    broker: Mosquitto,
    *,
    name: str = "mqtt",
    tls: bool = False,
    template: str | None = TEMPLATE,
    devices: tuple[str, ...] = (),
    **options: Any,
) -> TransportSettings:
    opts: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": broker.tls_port if tls else broker.port,
        "client_id": f"gw-{name}",
        "connect_timeout": 3.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        **options,
    }
    if tls:
        opts["tls"] = "broker"
    return TransportSettings(
        name=name,
        plugin="mqtt",
        options=Options(opts, f"transports.{name}"),
        base_dir=Path(),
        devices=tuple(Device(name=d, service_id=f"{d}@iot.example") for d in devices),
        service_id_template=template,
    )


def tls_credentials(broker: Mosquitto, issued: pki.Issued | None = None) -> StaticCredentials:
    issued = issued or broker.certs.gateway
    return StaticCredentials(
        TlsIdentity(cert_chain_pem=issued.cert_pem, key_pem=issued.key_pem),
        TrustAnchors(ca_pem=broker.certs.ca.cert_pem),
        name="broker",
    )


def make_transport(
    broker: Mosquitto, context: MemoryTransportContext, **kwargs: Any
) -> MqttTransport:
    settings = transport_settings(broker, **kwargs)
    if kwargs.get("tls") and "broker" not in context.backends:
        context.backends["broker"] = tls_credentials(broker)
    return MqttTransport(settings, context)


@contextlib.asynccontextmanager
async def running(transport: MqttTransport) -> AsyncIterator[MqttTransport]:
    """start(), run() in a named task, and stop() + await on the way out."""
    await transport.start()
    task = asyncio.create_task(transport.run(), name=f"transport:{transport.name}")
    try:
        yield transport
    finally:
        await transport.stop()
        await asyncio.wait_for(task, 15)


def device_client(
    broker: Mosquitto,
    client_id: str | None = None,
    *,
    v5: bool = True,
    tls: bool = False,
    **kwargs: Any,
) -> aiomqtt.Client:
    extra: dict[str, Any] = {}
    if tls:
        extra["tls_params"] = aiomqtt.TLSParameters(
            ca_certs=str(broker.certs.ca_file),
            certfile=str(broker.certs.device_cert),
            keyfile=str(broker.certs.device_key),
        )
    client = aiomqtt.Client(
        "127.0.0.1",
        broker.tls_port if tls else broker.port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # paho ignores the broker's Receive Maximum (20 here): exceed it and get kicked.
        max_inflight_messages=20,
        **extra,
        **kwargs,
    )
    client.pending_calls_threshold = 100_000
    return client


async def publish_all(
    client: aiomqtt.Client, items: list[tuple[str, bytes]], qos: int, window: int = 100
) -> None:
    """Publish concurrently, at most ``window`` unacknowledged at once."""
    slots = asyncio.Semaphore(window)

    async def one(topic: str, payload: bytes) -> None:
        async with slots:
            await client.publish(topic, payload, qos=qos, timeout=60)

    async with asyncio.TaskGroup() as tg:
        for i, (topic, payload) in enumerate(items):
            tg.create_task(one(topic, payload), name=f"publish-{i}")


async def publish_stubbornly(
    broker: Mosquitto,
    ids: list[str],
    progress: list[int],
    *,
    devices: int = 1,
    client_id: str = "stubborn-device",
) -> None:
    """A device that republishes whatever was not PUBACKed, across broker restarts
    (at-least-once on its side; the msgIds let the gateway drop the repeats).

    Message ``i`` goes to ``devices/sensor-{i % devices}/up``; ``progress[0]`` counts
    the PUBACKed ones."""
    i = 0
    while i < len(ids):
        try:
            async with device_client(broker, client_id, clean_start=False) as dev:
                while i < len(ids):
                    batch = range(i, min(i + 20, len(ids)))
                    await asyncio.gather(
                        *(
                            dev.publish(
                                f"devices/sensor-{j % devices}/up",
                                json.dumps({"msgId": ids[j], "payload": ids[j]}),
                                qos=1,
                                timeout=5,
                            )
                            for j in batch
                        )
                    )
                    i = batch.stop
                    progress[0] = i
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)
