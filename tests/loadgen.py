"""A load generator for the HTTP transport: several bearer-token devices posting uplinks.

It behaves like a well-written device: each message has its own ``msgId``, a message is
resent (same ``msgId``) until the gateway answers ``202``, a ``503`` is retried no sooner
than its ``Retry-After`` says, and a connection error (the gateway was killed) is retried
after a short pause. Each device sends its messages one after the other, so the order in
which a device's messages were accepted is the order of their numbers.

``acked`` holds every ``msgId`` the gateway acknowledged: the gateway promised to deliver
each of those. Used by the reliability tests.

:class:`GatewayProcess` runs the gateway as the operator runs it (``python -m
gatewayd.cli run --config``), with JSON logs in one file per start, from which the HTTP
transport's real port is read (it listens on port 0, so every start gets a new one); it
can be SIGKILLed and started again on the same state directory.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.server import SimServer
from jsonlog import entries

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]


def device_tokens(count: int, *, prefix: str = "dev") -> dict[str, str]:
    """``count`` device names and a distinct token for each."""
    return {f"{prefix}{i}": f"tok-{prefix}{i}-{i * 7919:08d}" for i in range(count)}


def bearer_devices(tokens: Mapping[str, str], *, service_prefix: str = "ue-") -> str:
    """The ``[[transports.web.devices]]`` tables for ``tokens``; each token read from
    the environment variable :func:`token_env` names (the config refuses inline secrets)."""
    return "".join(
        f"""
[[transports.web.devices]]
device = "{name}"
service_id = "{service_prefix}{name}@iot.example"
token = {{ env = "{token_env(name)}" }}
"""
        for name in tokens
    )


def token_env(device: str) -> str:
    return f"GATEWAYD_LOADGEN_TOKEN_{device.upper()}"


def token_environment(tokens: Mapping[str, str]) -> dict[str, str]:
    return {token_env(name): token for name, token in tokens.items()}


def export_tokens(monkeypatch: pytest.MonkeyPatch, count: int) -> dict[str, str]:
    """``count`` devices' tokens, exported where an in-process gateway's config reads them."""
    found = device_tokens(count)
    for name, value in token_environment(found).items():
        monkeypatch.setenv(name, value)
    return found


def device_url(gw: Any) -> Callable[[], str]:
    """The base URL of an in-process gateway's HTTP transport, for :class:`LoadGen`."""
    host, port = gw.transports["web"].address
    return lambda: f"http://{host}:{port}"


def msg_id(device: str, seq: int) -> str:
    return f"{device}-{seq:06d}"


@dataclass
class Stats:
    """What the generator saw; every field is filled as it goes."""

    acked: set[str] = field(default_factory=set)
    duplicates_acked: int = 0  # 202s with "duplicate": true (a resend of a stored message)
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    latencies: list[float] = field(default_factory=list)  # first POST -> 202, seconds
    retry_after_seen: list[float] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)


class LoadGen:
    """Posts ``per_device`` messages from each device to ``url()`` (``None``: gateway down).

    ``rate`` caps the total messages started per second (``None``: as fast as the
    answers come), so a short run can still span several crash cycles.
    """

    def __init__(
        self,
        url: Callable[[], str | None],
        tokens: Mapping[str, str],
        *,
        per_device: int,
        rate: float | None = None,
        payload_size: int = 64,
        give_up_after: float = 120.0,
        body_extra: Mapping[str, object] | None = None,
        start_gap: float = 0.0,
    ) -> None:
        self._url = url
        self._tokens = dict(tokens)
        self._per_device = per_device
        self._interval = len(tokens) / rate if rate else 0.0
        self._payload = "x" * payload_size
        self._give_up_after = give_up_after
        self._extra = dict(body_extra or {})
        self._start_gap = start_gap
        self.stats = Stats()
        self.sent_ids = [msg_id(d, i) for d in self._tokens for i in range(per_device)]

    async def run(self) -> Stats:
        connector = aiohttp.TCPConnector(limit=0)
        # A short timeout: a killed gateway leaves requests hanging only until the kernel
        # resets the connection, but a stalled one must not hold a device for long.
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            asyncio.TaskGroup() as group,
        ):
            for index, device in enumerate(self._tokens):
                group.create_task(
                    self._device(session, device, index * self._start_gap), name=f"loadgen:{device}"
                )
        return self.stats

    async def _device(self, session: aiohttp.ClientSession, device: str, delay: float) -> None:
        await asyncio.sleep(delay)  # ``start_gap``: devices joining one after another
        headers = {"Authorization": f"Bearer {self._tokens[device]}"}
        next_start = time.monotonic()
        for seq in range(self._per_device):
            if self._interval:
                next_start += self._interval
                await asyncio.sleep(max(0.0, next_start - time.monotonic()))
            body = {"payload": f"{seq}:{self._payload}", "msgId": msg_id(device, seq)}
            body.update(self._extra)
            await self._send_until_acked(session, device, headers, body)

    async def _send_until_acked(
        self,
        session: aiohttp.ClientSession,
        device: str,
        headers: Mapping[str, str],
        body: Mapping[str, object],
    ) -> None:
        stats = self.stats
        first = time.monotonic()
        ident = str(body["msgId"])
        while time.monotonic() - first < self._give_up_after:
            base = self._url()
            if base is None:
                await asyncio.sleep(0.05)
                continue
            try:
                async with session.post(
                    f"{base}/v1/devices/{device}/messages", json=body, headers=headers
                ) as resp:
                    stats.statuses[resp.status] += 1
                    answer = await resp.json(content_type=None)
                    if resp.status == 202:
                        assert answer["msgId"] == ident, answer
                        stats.acked.add(ident)
                        stats.duplicates_acked += bool(answer.get("duplicate"))
                        stats.latencies.append(time.monotonic() - first)
                        return
                    if resp.status == 503:
                        wait = float(resp.headers.get("Retry-After", "1"))
                        stats.retry_after_seen.append(wait)
                        # Honour it, capped so a test does not idle for the full figure.
                        await asyncio.sleep(min(wait, 1.0))
                        continue
                    raise AssertionError(f"unexpected answer {resp.status}: {answer}")
            except (aiohttp.ClientError, TimeoutError, ValueError):
                # Killed or restarting gateway: the message was maybe stored, maybe not;
                # resending the same msgId is always safe.
                stats.connection_errors += 1
                await asyncio.sleep(0.05)
        stats.given_up.append(ident)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


def check_delivery(sim: SimServer, load: LoadGen) -> dict[str, int]:
    """Every acked id arrived, nothing unknown arrived, each device's order held."""
    delivered = [u.message.msg_id for u in sim.uplinks]
    assert len(delivered) == len(set(delivered))  # the sim records each msgId once
    missing = load.stats.acked - set(delivered)
    assert not missing, f"{len(missing)} acknowledged messages never arrived: {sorted(missing)[:5]}"
    assert set(delivered) <= set(load.sent_ids)
    per_device: dict[str, list[int]] = {}
    for ident in delivered:
        device, _, seq = ident.rpartition("-")
        per_device.setdefault(device, []).append(int(seq))
    for device, seqs in per_device.items():
        assert seqs == sorted(seqs), f"{device}: out of order {seqs}"
    return {
        "acked": len(load.stats.acked),
        "delivered": len(delivered),
        "server_duplicates": sum(sim.duplicates.values()),
        "resends_acked_as_duplicate": load.stats.duplicates_acked,
        "connection_errors": load.stats.connection_errors,
    }


# --- the gateway as a process -------------------------------------------------------


def http_bearer_transport(tokens: Mapping[str, str], *, max_body: int = 65536) -> str:
    """An HTTP transport on loopback port 0 with one bearer-token device per token."""
    return f"""
[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
max_body = {max_body}
{bearer_devices(tokens)}
"""


def write_gateway_config(
    path: Path,
    tls: Pki,
    *,
    api_root: str,
    tokens: Mapping[str, str],
    extra: str = "",
    drain_timeout: float | None = None,
    northbound_timeout: float | None = None,
) -> Path:
    text = harness.gateway_toml(
        tls,
        api_root=api_root,
        state_dir=path.parent / "state",
        transports=http_bearer_transport(tokens),
        extra='[log]\nformat = "json"\n' + extra,
    )
    if drain_timeout is not None:
        text = text.replace("drain_timeout = 5.0", f"drain_timeout = {drain_timeout}")
    if northbound_timeout is not None:
        text = text.replace("\ntimeout = 5.0", f"\ntimeout = {northbound_timeout}")
    path.write_text(text, encoding="utf-8")
    return path


class GatewayProcess:
    """``gatewayd run --config`` as a child process; :meth:`start` again after a kill."""

    def __init__(self, config: Path, tokens: Mapping[str, str], log_dir: Path) -> None:
        self.config = config
        self.env = {**os.environ, **token_environment(tokens)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.port: int | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str | None:
        """The device-facing base URL while running, ``None`` while down."""
        return None if self.port is None else f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> int:
        self.starts += 1
        self.log_path = self.log_dir / f"gatewayd-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *GATEWAYD,
                "run",
                "--config",
                str(self.config),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise AssertionError(f"gatewayd exited {self.proc.returncode}:\n{self.log()}")
            # Started with its transports: with gateway.processes = 2, the devices part
            # (the northbound part may be up before it).
            if any(
                event.get("event") == "gateway.started" and event.get("part") != "northbound"
                for event in self.events()
            ):
                self.port = self._listening_port()
                return self.port
            await asyncio.sleep(0.05)
        raise AssertionError(f"gatewayd did not start within {timeout}s:\n{self.log()}")

    def _listening_port(self) -> int:
        for event in self.events():
            if event.get("event") == "http.listening":
                return int(event["port"])
        raise AssertionError(f"no http.listening event:\n{self.log()}")

    async def kill(self) -> None:
        """SIGKILL by pid: no cleanup of any kind runs in the gateway."""
        assert self.proc is not None
        self.port = None
        os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def kill_part(self, rng: random.Random) -> str:
        """gateway.processes = 2: SIGKILL one part, chosen by ``rng``, and wait for the
        owner to stop the other and exit; the part's name."""
        assert self.proc is not None
        self.port = None
        parts = {
            e["part"]: e["pid"] for e in self.events() if e.get("event") == "processes.started"
        }
        part = rng.choice(sorted(parts))
        os.kill(parts[part], signal.SIGKILL)
        await self.proc.wait()
        return part

    async def terminate(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds the process took to exit."""
        assert self.proc is not None
        self.port = None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"gatewayd ignored SIGTERM for {timeout}s") from None
        return code, time.monotonic() - began

    async def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return entries(self.log())
