"""Issue 14: the PostgreSQL store restarted under load.

Two gateway instances (real ``gatewayd run`` processes) share a database on a
PostgreSQL server of this test's own (the session's server is shared with other tests,
so it is not the one stopped here). HTTP devices (``loadgen.LoadGen``) send to both
while the server is stopped for a few seconds and started again. The promises:

- while the database is away, intake is refused with ``503`` and a ``Retry-After``
  (the devices resend later), never acknowledged and dropped;
- nothing acknowledged (``202``) is lost: every one reaches the reference server, in
  each device's order;
- the instances recover by themselves: acknowledgements resume, the backlog drains,
  ``/readyz`` answers ready again.

The multi-instance tests over MQTT (SIGKILL cycles, a downlink crossing instances) are
in plugins/gatewayd-mqtt/tests/test_shared_store.py: they need mosquitto.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import until
from gatewayd_testing.postgres import PostgresServer, free_port
from loadgen import LoadGen, check_delivery, device_tokens, write_gateway_config
from shared_store import Instance, pending, store_toml

OUTAGE = 4.0  # seconds the database is away
LEASE = 3.0


async def _ready(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _not_ready(session: aiohttp.ClientSession, port: int) -> bool:
    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status == 503


async def test_postgres_restart_under_load_loses_nothing_and_recovers(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> None:
    pg = PostgresServer(tmp_path / "pg")
    await asyncio.to_thread(pg.start)
    try:
        await _restart_under_load(tmp_path, loopback_pki, sim, pg)
    finally:
        await asyncio.to_thread(pg.close)


async def _restart_under_load(tmp_path: Path, tls: Pki, sim: SimServer, pg: PostgresServer) -> None:
    db = f"test_{uuid.uuid4().hex[:16]}"
    pg.create_database(db)
    tokens = device_tokens(6)
    gws: list[Instance] = []
    admin: list[int] = []
    for name in ("a", "b"):
        port = free_port()
        admin.append(port)
        extra = store_toml(pg, db, lease=LEASE) + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        (tmp_path / name).mkdir()
        config = write_gateway_config(
            tmp_path / name / "gw.toml", tls, api_root=sim.api_root, tokens=tokens, extra=extra
        )
        gws.append(Instance(config, tokens, tmp_path / name))
    # Devices alternate between the instances, as behind a load balancer.
    turn = [0]

    def url() -> str | None:
        turn[0] += 1
        return gws[turn[0] % 2].url

    per_device = 150
    load = LoadGen(url, tokens, per_device=per_device, rate=40.0)
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as probe:
        try:
            for gw in gws:
                await gw.start()
            running = asyncio.create_task(load.run(), name="loadgen")
            await until(lambda: len(load.stats.acked) >= 60, timeout=60, what="load flowing")
            before = load.stats.statuses[503]
            acked_before = len(load.stats.acked)
            stopped_at = time.monotonic()
            await asyncio.to_thread(pg.stop)
            # Refused while it is away: the devices see 503s, and nothing is acked.
            await until(
                lambda: load.stats.statuses[503] > before, timeout=30, what="503 while away"
            )
            acked_while_away = len(load.stats.acked)
            # Each instance says so on /readyz once it had intake refused.
            for port in admin:
                await until(
                    lambda p=port: _not_ready(probe, p),  # type: ignore[misc]
                    timeout=30,
                    what="/readyz not ready while the database is away",
                )
            unready_after = time.monotonic() - stopped_at
            # The outage itself is the scenario: the database stays away this long.
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped_at)))
            refused = load.stats.statuses[503] - before
            assert len(load.stats.acked) == acked_while_away, "acked with the database down"
            await asyncio.to_thread(pg.start)
            restarted_at = time.monotonic()
            await until(
                lambda: len(load.stats.acked) > acked_while_away,
                timeout=60,
                what="acks resumed",
            )
            resumed = time.monotonic() - restarted_at
            stats = await asyncio.wait_for(running, 300)
            assert not stats.given_up
            assert len(stats.acked) == len(tokens) * per_device
            await sim.wait_for(lambda: len(sim.uplinks) >= len(stats.acked), timeout=120)
            figures = check_delivery(sim, load)

            async def drained() -> bool:
                return await asyncio.to_thread(pending, pg, db) == 0

            await until(drained, timeout=60, what="the backlog drained")
            for port in admin:
                await until(lambda p=port: _ready(probe, p), timeout=30, what="/readyz ready")  # type: ignore[misc]
            for gw in gws:
                code, _ = await gw.terminate()
                assert code == 0, gw.log()
        finally:
            for gw in gws:
                await gw.ensure_dead()
    assert refused > 0
    assert all(wait > 0 for wait in load.stats.retry_after_seen)
    figures |= {
        "acked_before_stop": acked_before,
        "refused_503_during_outage": refused,
        "refused_503_total": load.stats.statuses[503],
        "readyz_not_ready_after_s": round(unready_after, 2),
        "acks_resumed_after_s": round(resumed, 2),
        "seconds": round(time.monotonic() - began, 1),
    }
    print(f"\npostgres restart under load: {figures}")
