"""A gateway as two processes on one SQLite file (``gateway.processes = 2``).

Real ``gatewayd run`` processes: the owner and its two parts, the reference server in
this process, a device with an mTLS webhook, and a real ``NOTIFY_SOCKET`` standing in
for systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_device import Device
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import until
from gatewayd_testing.postgres import alive
from jsonlog import entries, events, tail, wait_for_event
from test_operability import GATEWAYD, NotifySocket, free_port, get

from gatewayd.errors import ExitCode


def admin_ports() -> int:
    """A port free together with the next one: the devices part listens on the next.

    Taken below Linux's ephemeral range (32768 and up): a port picked there and freed
    again may be handed to some other connection before the gateway binds it.
    """
    while True:
        port = random.randrange(20_000, 32_000)
        with contextlib.ExitStack() as held:
            try:
                for candidate in (port, port + 1):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        return port


def write_config(tmp_path: Path, tls: Pki, server_port: int, webhook: str, admin: int) -> Path:
    transports = harness.http_transport_mtls(tls, webhook).replace(
        'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{free_port()}"'
    )
    text = harness.gateway_toml(
        tls,
        api_root=f"https://127.0.0.1:{server_port}",
        state_dir=tmp_path / "state",
        transports=transports,
        extra=f'[log]\nformat = "json"\n[metrics]\nlisten = "127.0.0.1:{admin}"\n',
    ).replace("drain_timeout = 5.0", "drain_timeout = 5.0\nprocesses = 2")
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def device_port(config: Path) -> int:
    listen = tomllib.loads(config.read_text())["transports"]["web"]["listen"]
    return int(listen.rsplit(":", 1)[1])


def folder(path: Path) -> Path:
    path.mkdir()
    return path


class Split:
    """The owner process, its log and what it told the notify socket."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, notify: NotifySocket):
        self.process = process
        self.log = log
        self.notify = notify

    def pids(self) -> dict[str, int]:
        return {e["part"]: e["pid"] for e in events(self.log, "processes.started")}


@contextlib.asynccontextmanager
async def owner(
    config: Path, tmp_path: Path, notify: NotifySocket, env: dict[str, str] | None = None
) -> AsyncIterator[Split]:
    log = tmp_path / "gateway.log"
    notify.drain()  # an earlier owner's
    notify.messages.clear()
    environment = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})}
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *GATEWAYD, "run", "--config", str(config), env=environment, stderr=stderr
        )
    split = Split(process, log, notify)
    try:
        await wait_for_event(log, "processes.started", count=2)
        await until(notify.ready, timeout=30, what="READY=1 from the owner")
        yield split
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in split.pids().values():  # never leave a part behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class World:
    """The reference server, a device with a webhook, and a two-process config for them."""

    sim: SimServer
    device: Device
    config: Path
    admin: int  # the northbound part's admin port; the devices part's is the next


@pytest.fixture
async def world(tmp_path: Path, loopback_pki: Pki) -> AsyncIterator[World]:
    server_port, admin = free_port(), admin_ports()
    device = Device(loopback_pki)
    settings = harness.sim_settings(loopback_pki, port=server_port)
    async with device.serving(), SimServer(settings, schema_check=True) as sim:
        config = write_config(tmp_path, loopback_pki, server_port, device.webhook, admin)
        yield World(sim, device, config, admin)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


async def test_two_processes_carry_both_ways_in_order_under_one_owner(
    tmp_path: Path, world: World, notify: NotifySocket
) -> None:
    """Device intake in one process, the server's side in the other: uplinks reach the
    server in the order sent, downlinks the device in the order pushed, reports and the
    reply route cross between the two, and systemd hears of one service."""
    async with owner(world.config, tmp_path, notify) as split:
        ready = next(m for m in notify.messages if m.get("READY") == "1")
        # One service to systemd: the owner speaks, for both parts.
        assert ready["MAINPID"] == str(split.process.pid)
        assert "northbound: serving" in ready["STATUS"]
        assert "devices: serving" in ready["STATUS"]
        pids = split.pids()
        assert set(pids) == {"northbound", "devices"}
        assert split.process.pid not in pids.values()
        started = {e["part"]: e for e in events(split.log, "gateway.started")}
        assert started["devices"]["transports"] == ["web"]
        assert started["northbound"]["transports"] == []

        port = device_port(world.config)
        for n in range(20):
            status, _ = await world.device.send(
                port, "sensor-1", {"payload": f"n={n}", "msgId": f"up-{n}"}
            )
            assert status == 202
            if n == 9:  # one hostile body among them: refused alone
                status, problem = await world.device.send(
                    port, "sensor-1", {"payload": {"not": "text"}, "msgId": "hostile"}
                )
                assert status == 400, problem
                assert problem["status"] == 400
        await world.sim.wait_for(lambda: len(world.sim.uplinks) == 20, timeout=20)
        assert [u.message.msg_id for u in world.sim.uplinks] == [f"up-{n}" for n in range(20)]

        for n in range(5):
            push = await world.sim.send_downlink(
                DEMO_SERVICE_ID, f"d={n}", deliv_st_req_ind=True, msg_id=f"down-{n}"
            )
            assert push.status == 204
        got = [(await world.device.next())["msgId"] for _ in range(5)]
        assert got == [f"down-{n}" for n in range(5)]
        # Reports put by the devices process, sent by the northbound one.
        await world.sim.wait_for(lambda: len(world.sim.reports) == 5, timeout=20)
        assert {r.report.msg_id for r in world.sim.reports} == {f"down-{n}" for n in range(5)}
        # The reply route the northbound process remembered, read by the devices one.
        await world.device.send(port, "sensor-1", {"payload": "ok", "msgId": "reply"})
        await world.sim.wait_for(lambda: len(world.sim.uplinks) == 21, timeout=20)
        assert world.sim.uplinks[20].message.dest_addr.addr == world.sim.settings.as_address

        # Each part's admin listener: the northbound one on the port, the other next.
        assert await get(world.admin, "/readyz") == (200, "ready\n")
        assert await get(world.admin + 1, "/readyz") == (200, "ready\n")
        (rejected,) = events(split.log, "intake.rejected")
        assert (rejected["part"], rejected["transport"]) == ("devices", "web")
        # Every line says which part wrote it, the writer thread's too.
        parts = {e.get("part") for e in entries(split.log.read_text())}
        assert {"northbound", "devices"} <= parts

        split.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(split.process.wait(), 30) == 0, tail(split.log)
    assert not any(alive(pid) for pid in pids.values())
    assert any(m.get("STOPPING") == "1" for m in notify.drain())
    # The northbound part deregistered on its way out.
    assert world.sim.registrations == []
    (stopped,) = events(split.log, "processes.stopped")
    assert stopped["exit_code"] == 0


async def test_a_part_that_dies_stops_the_gateway_with_a_failure(
    tmp_path: Path, world: World, notify: NotifySocket
) -> None:
    async with owner(world.config, tmp_path, notify) as split:
        pids = split.pids()
        os.kill(pids["devices"], signal.SIGKILL)
        code = await asyncio.wait_for(split.process.wait(), 30)
        assert code == ExitCode.FAILURE, tail(split.log)
        (exited,) = events(split.log, "processes.part_exited")
        assert (exited["part"], exited["exit_code"]) == ("devices", -signal.SIGKILL)
        assert exited["level"] == "error"
        assert not alive(pids["northbound"])


async def test_parts_whose_owner_is_killed_stop_by_themselves(
    tmp_path: Path, world: World, notify: NotifySocket
) -> None:
    async with owner(world.config, tmp_path, notify) as split:
        pids = split.pids()
        split.process.kill()
        await split.process.wait()
        await until(lambda: not any(alive(pid) for pid in pids.values()), timeout=30)
        assert len(events(split.log, "processes.owner_gone")) == 2


async def test_the_watchdog_is_fed_only_while_both_parts_answer(
    tmp_path: Path, world: World, notify: NotifySocket
) -> None:
    """WATCHDOG_USEC for the owner: it pings systemd while both parts ping it; a part
    that stops answering (SIGSTOP) stops the pings, named in the log."""
    async with owner(world.config, tmp_path, notify, {"WATCHDOG_USEC": "1000000"}) as split:
        count = sum(m.get("WATCHDOG") == "1" for m in notify.drain())
        await until(lambda: sum(m.get("WATCHDOG") == "1" for m in notify.drain()) > count + 2)
        assert events(split.log, "processes.watchdog_late") == []
        devices = split.pids()["devices"]
        os.kill(devices, signal.SIGSTOP)
        try:
            await wait_for_event(split.log, "processes.watchdog_late", timeout=10)
            notify.drain()  # what was sent before
            notify.messages.clear()
            await asyncio.sleep(2.0)
            assert not any(m.get("WATCHDOG") == "1" for m in notify.drain())
        finally:
            os.kill(devices, signal.SIGCONT)
        await until(lambda: any(m.get("WATCHDOG") == "1" for m in notify.drain()))
        (late, *_) = events(split.log, "processes.watchdog_late")
        assert late["part"] == "devices"
        split.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(split.process.wait(), 30) == 0, tail(split.log)


async def test_nothing_acknowledged_is_lost_when_a_part_is_killed(
    tmp_path: Path, world: World, notify: NotifySocket
) -> None:
    """SIGKILL the part that sends, right after its neighbour acknowledged a burst: the
    gateway exits 1, and the next start sends every acknowledged message (at least once),
    uplink and downlink alike."""
    port = device_port(world.config)
    sent = [f"up-{n}" for n in range(100)]
    async with owner(world.config, tmp_path, notify) as split:
        answers = await asyncio.gather(
            *(world.device.send(port, "sensor-1", {"payload": "x", "msgId": m}) for m in sent)
        )
        assert all(status == 202 for status, _ in answers)
        os.kill(split.pids()["northbound"], signal.SIGKILL)
        assert await asyncio.wait_for(split.process.wait(), 30) == ExitCode.FAILURE
    assert len(world.sim.uplinks) < len(sent)  # the kill came before the last one left
    async with owner(world.config, folder(tmp_path / "again"), notify) as split:
        await world.sim.wait_for(
            lambda: {u.message.msg_id for u in world.sim.uplinks} >= set(sent), 30
        )
        pushed = [f"down-{n}" for n in range(50)]
        pushes = await asyncio.gather(
            *(world.sim.send_downlink(DEMO_SERVICE_ID, "d", msg_id=m) for m in pushed)
        )
        assert all(push.status == 204 for push in pushes)
        os.kill(split.pids()["devices"], signal.SIGKILL)
        assert await asyncio.wait_for(split.process.wait(), 30) == ExitCode.FAILURE
    got = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append((await world.device.next(timeout=0.5))["msgId"])
    assert len(set(got)) < len(pushed)
    async with owner(world.config, folder(tmp_path / "third"), notify):
        while not set(pushed) <= set(got):
            got.append((await world.device.next(timeout=30))["msgId"])


def test_check_config_binds_the_devices_parts_admin_port_too(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """What a start would refuse, check-config refuses: the devices part listens on the
    port after metrics.listen's, and another process holds it."""
    admin = admin_ports()
    config = write_config(tmp_path, loopback_pki, free_port(), "https://localhost:9/x", admin)
    with socket.socket() as held:
        held.bind(("127.0.0.1", admin + 1))
        held.listen()
        result = subprocess.run(
            [*GATEWAYD, "check-config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert f"metrics.listen: cannot listen on 127.0.0.1:{admin + 1}" in result.stderr
