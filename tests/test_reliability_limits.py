"""A full backlog and a full disk: refuse intake (HTTP 503 + Retry-After), lose nothing
acknowledged, and take messages again once space returns.

The gateway runs in this process, so the test can cap its store's file size
(``Store.limit_size``: SQLite's page limit, which fails exactly like a full disk).
The server answers 503 meanwhile, so nothing drains until the test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway, until
from loadgen import (
    LoadGen,
    Stats,
    device_url,
    export_tokens,
    http_bearer_transport,
)

from gatewayd import config


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return export_tokens(monkeypatch, 5)


def _refused(stats: Stats) -> int:
    return stats.statuses[503]


async def test_backlog_full_refuses_then_recovers(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    settings = gateway_config(http_bearer_transport(tokens), extra="[store]\nmax_messages = 20\n")
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        sim.fail(503, retry_after=1, seconds=600)  # the server is unwell: nothing drains
        load = LoadGen(device_url(gw), tokens, per_device=10)
        running = asyncio.create_task(load.run(), name="loadgen")
        await until(lambda: _refused(load.stats) >= 10, 30, "intake refusals")
        stats = await gw.store.stats()
        assert stats["backlog"]["messages"] == 20  # full, and not one more
        assert len(load.stats.acked) == 20
        assert set(load.stats.retry_after_seen) == {5.0}  # the store's backlog hint

        sim.faults.clear()  # the server is back: the backlog drains, intake resumes
        final = await asyncio.wait_for(running, 120)
        assert len(final.acked) == 50
        await sim.wait_for(lambda: len(sim.uplinks) == 50, timeout=60)
    assert {u.message.msg_id for u in sim.uplinks} == final.acked


async def test_ready_again_when_space_returns_even_without_traffic(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    """/readyz sent the devices elsewhere, so no put proves the disk has space again:
    the expiry sweep's probe does, and the gateway is ready without any intake."""
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        used = (await gw.store.stats())["db_bytes"]
        await gw.store.limit_size(used + 64 * 1024)
        load = LoadGen(device_url(gw), tokens, per_device=30, payload_size=1500)
        running = asyncio.create_task(load.run(), name="loadgen")
        await until(lambda: _refused(load.stats) >= 5, 60, "intake refusals")
        running.cancel()  # the devices went elsewhere
        await asyncio.gather(running, return_exceptions=True)
        assert "the store refuses writes (disk)" in gw.live.not_ready()
        await gw.store.limit_size(None)  # space returns; no device sends anything
        await until(lambda: not gw.live.not_ready(), 30, "ready again")
        assert gw.store.refusing is None


async def test_disk_full_refuses_then_recovers(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    settings = gateway_config(http_bearer_transport(tokens))
    async with running_gateway(settings) as gw:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        sim.fail(503, retry_after=1, seconds=600)
        used = (await gw.store.stats())["db_bytes"]
        await gw.store.limit_size(used + 64 * 1024)  # the disk has 64 KiB left
        # 1.5 KiB bodies: the cap is reached after a few dozen messages.
        load = LoadGen(device_url(gw), tokens, per_device=30, payload_size=1500)
        running = asyncio.create_task(load.run(), name="loadgen")
        await until(lambda: _refused(load.stats) >= 10, 60, "intake refusals")
        held = len(load.stats.acked)
        assert 0 < held < 150
        assert 30.0 in load.stats.retry_after_seen  # a storage failure says "much later"
        # /readyz tells a load balancer to send its devices elsewhere meanwhile.
        assert "the store refuses writes (disk)" in gw.live.not_ready()

        # A sweep of the expiry loop runs meanwhile (every 2 s): the gateway must stay up.
        await asyncio.sleep(2.5)
        assert not gw._stop.is_set()

        await gw.store.limit_size(None)  # space returns
        await until(lambda: len(load.stats.acked) > held, 30, "intake to resume")
        assert not any("store" in reason for reason in gw.live.not_ready())
        sim.faults.clear()
        final = await asyncio.wait_for(running, 120)
        assert len(final.acked) == 150
        await sim.wait_for(lambda: len(sim.uplinks) == 150, timeout=60)
    assert {u.message.msg_id for u in sim.uplinks} == final.acked
