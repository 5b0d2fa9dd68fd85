"""Scale-out: two transports in one shared-subscription group split the traffic."""

from __future__ import annotations

import json

from mosquitto import Mosquitto
from mqtt_helpers import MemoryContext, device_client, make_transport, publish_all, running, until

N = 1000


async def test_shared_group_splits_without_loss_or_duplicates(broker: Mosquitto) -> None:
    one, two = MemoryContext(), MemoryContext()
    ids = [f"s-{i}" for i in range(N)]
    items = [
        (f"devices/sensor-{i % 7}/up", json.dumps({"msgId": m}).encode()) for i, m in enumerate(ids)
    ]
    a = make_transport(broker, one, name="a", shared_group="g")
    b = make_transport(broker, two, name="b", shared_group="g")
    async with running(a), running(b), device_client(broker) as dev:
        await publish_all(dev, items, qos=1)
        await until(lambda: len(one.accepted) + len(two.accepted) >= N)
    assert set(one.accepted).isdisjoint(two.accepted)
    assert sorted([*one.accepted, *two.accepted]) == sorted(ids)
    assert one.accepted  # both took a share
    assert two.accepted
