"""Issue 9 item 7 / issue 8 "inbound listeners": idle and header timeouts and a
connection cap, with real sockets (gatewayd.listener.GuardedSite).

Before, aiohttp kept a connection that never sent a request for its keep-alive timeout
(an hour) and took any number of them: 10,000 idle connections were still open after
95 s, and slow-header clients held the device API for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway

from gatewayd.listener import GuardedSite, ListenerLimits, runner


@contextlib.asynccontextmanager
async def serving(
    limits: ListenerLimits, release: asyncio.Event | None = None
) -> AsyncIterator[GuardedSite]:
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def slow(_request: web.Request) -> web.Response:
        assert release is not None
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    app_runner = runner(app, limits, access_log=None)
    await app_runner.setup()
    site = GuardedSite(app_runner, "127.0.0.1", 0, limits=limits, label="test")
    await site.start()
    try:
        yield site
    finally:
        await app_runner.cleanup()


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closed the connection within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def _get(port: int, path: str = "/") -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        await resp.read()
        return resp.status


async def test_thousands_of_idle_connections_are_closed() -> None:
    count = 2000
    limits = ListenerLimits(idle_timeout=4.0, header_timeout=4.0, max_connections=10_000)
    async with serving(limits) as site:
        opened = time.monotonic()
        conns = []
        for _ in range(count // 100):  # in batches: the listen backlog is 128
            batch = [asyncio.open_connection("127.0.0.1", site.port) for _ in range(100)]
            conns += await asyncio.gather(*batch)
        try:
            await asyncio.sleep(0.2)
            if time.monotonic() - opened < 3.0:  # else the first ones may be gone already
                assert site.connections == count
            closed = await asyncio.gather(*(_closed(r, 15.0) for r, _ in conns))
            elapsed = time.monotonic() - opened
        finally:
            for _, writer in conns:
                writer.close()
        assert all(closed), f"{closed.count(False)} of {count} idle connections still open"
        assert elapsed < 12.0, elapsed
        assert site.connections == 0
        assert await _get(site.port) == 200  # and the listener still serves


async def test_a_slow_header_client_is_cut_at_the_header_timeout() -> None:
    limits = ListenerLimits(idle_timeout=30.0, header_timeout=1.0, max_connections=100)
    async with serving(limits) as site:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        started = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            # A header line every 0.2 s: never idle, never done (slowloris).
            with contextlib.suppress(ConnectionError, OSError):
                for i in range(100):
                    writer.write(f"X-Slow-{i}: y\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.2)

        task = asyncio.create_task(trickle())
        try:
            assert await _closed(reader, 10.0)
        finally:
            task.cancel()
            writer.close()
        elapsed = time.monotonic() - started
        assert 0.8 < elapsed < 3.0, elapsed  # the header timeout, not the idle one
        # A normal client in the meantime is served as usual.
        assert await _get(site.port) == 200


async def test_the_cap_holds_and_normal_clients_are_still_served() -> None:
    cap = 50
    limits = ListenerLimits(idle_timeout=60.0, header_timeout=60.0, max_connections=cap)
    async with serving(limits) as site:
        conns = []
        try:
            for _ in range(4 * cap):
                conns.append(await asyncio.open_connection("127.0.0.1", site.port))
                await asyncio.sleep(0)
                assert site.connections <= cap
            await asyncio.sleep(0.2)
            assert site.connections <= cap
            # Idle connections were evicted oldest first to make room.
            closed = await asyncio.gather(*(_closed(r, 0.5) for r, _ in conns))
            assert closed.count(True) >= 3 * cap
            for _ in range(5):
                assert await _get(site.port) == 200
            assert site.connections <= cap
        finally:
            for _, writer in conns:
                writer.close()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed() -> None:
    release = asyncio.Event()
    limits = ListenerLimits(idle_timeout=60.0, header_timeout=60.0, max_connections=3)
    async with serving(limits, release) as site:
        busy = [asyncio.create_task(_get(site.port, "/slow")) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert site.connections == 3
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        assert await _closed(reader, 2.0)  # refused at once, nobody to evict
        writer.close()
        release.set()
        assert await asyncio.gather(*busy) == [200, 200, 200]
        assert await _get(site.port) == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_gateway_listeners_take_their_limits_from_the_config(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device API (http plugin), the MSGG API and the metrics endpoint are guarded."""
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")
    device_port, metrics_port = _free_port(), _free_port()
    transport = harness.http_transport_bearer().replace(
        'listen = "127.0.0.1:0"',
        f'listen = "127.0.0.1:{device_port}"\nheader_timeout = 0.5\nidle_timeout = 0.5',
    )
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\nheader_timeout = 0.5\n'
    text = harness.gateway_toml(
        loopback_pki,
        api_root=sim.api_root,
        state_dir=tmp_path / "state",
        transports=transport,
        extra=extra,
    ).replace('listen = "127.0.0.1:0"\n', 'listen = "127.0.0.1:0"\nheader_timeout = 0.5\n', 1)
    settings = harness.write_config(tmp_path / "gw.toml", text)
    assert settings.api.limits.header_timeout == 0.5
    assert settings.metrics is not None
    assert settings.metrics.limits.header_timeout == 0.5
    async with running_gateway(settings) as gw:
        assert gw.api_port is not None
        for port in (device_port, gw.api_port, metrics_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            assert await _closed(reader, 5.0), port
            writer.close()
            assert time.monotonic() - started < 3.0, port


async def test_tls_clients_that_never_handshake_count_then_expire(tmp_path: Path) -> None:
    """On a TLS listener a connection counts from accept; one that never completes its
    handshake is cut at header_timeout and stops counting soon after."""
    from gatewayd.api import client_context, server_context

    tls = harness.make_pki(tmp_path / "pki")
    limits = ListenerLimits(idle_timeout=30.0, header_timeout=1.0, max_connections=5)

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    app_runner = runner(app, limits, access_log=None)
    await app_runner.setup()
    ctx = server_context(tls.identity("server"), None, require_client_cert=False)
    site = GuardedSite(app_runner, "127.0.0.1", 0, limits=limits, ssl_context=ctx)
    await site.start()
    client_ctx = client_context(tls.trust())
    url = f"https://localhost:{site.port}/"
    try:
        silent = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert site.connections == 5
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):  # at the cap, nobody to evict
                async with session.get(url, ssl=client_ctx) as resp:
                    await resp.read()
            assert all(await asyncio.gather(*(_closed(r, 3.0) for r, _ in silent)))
            await asyncio.sleep(1.2)  # past the handshake horizon
            assert site.connections == 0
            async with session.get(url, ssl=client_ctx) as resp:
                assert resp.status == 200
        for _, writer in silent:
            writer.close()
    finally:
        await app_runner.cleanup()
