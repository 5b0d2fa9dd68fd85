"""Scale-out: two transports in one shared-subscription group split the traffic."""

from __future__ import annotations

import json

from gatewayd_testing import MemoryTransportContext, until
from mosquitto import Mosquitto
from mqtt_helpers import device_client, make_transport, publish_all, running

N = 1000


async def test_shared_group_splits_without_loss_or_duplicates(broker: Mosquitto) -> None:
    one, two = MemoryTransportContext(), MemoryTransportContext()
    ids = [f"s-{i}" for i in range(N)]
    items = [
        (f"devices/sensor-{i % 7}/up", json.dumps({"msgId": m}).encode()) for i, m in enumerate(ids)
    ]
    a = make_transport(broker, one, name="a", shared_group="g")
    b = make_transport(broker, two, name="b", shared_group="g")
    async with running(a), running(b), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await until(lambda: len(one.by_msg_id) + len(two.by_msg_id) >= N)
    assert set(one.by_msg_id).isdisjoint(two.by_msg_id)
    assert sorted([*one.by_msg_id, *two.by_msg_id]) == sorted(ids)
    assert one.by_msg_id  # both took a share
    assert two.by_msg_id
