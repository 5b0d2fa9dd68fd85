"""The test kit for gatewayd and its plugin authors (a pytest plugin, ``pytest11``).

Fixtures start the real parts on loopback: a throw-away PKI, the reference MSGin5G
Server (validating every body it receives and sends against the 3GPP files), and a
gateway built from a config you write. A transport author's end-to-end test::

    async def test_my_transport(loopback_pki, sim, gateway_config):
        settings = gateway_config('''
            [transports.t]
            plugin = "mine"
            ...''')
        async with running_gateway(settings) as gw:
            ...  # drive a device, then: await sim.wait_for(lambda: sim.uplinks)

Every transport should also subclass the conformance suite,
:class:`gatewayd_testing.conformance.TransportConformance` (see docs/plugins.md), and a
test can look at the events logged with the ``gateway_logs`` fixture;
:func:`refusal_line` checks that a refused input was logged once.

For unit tests without a gateway, :mod:`gatewayd_testing.contexts` has in-memory
stand-ins for what the gateway hands a plugin: :class:`MemoryTransportContext` (an
intake that records uplinks and reports, and can hold, slow down or refuse accept()),
:class:`MemoryKV` (its durable key/value table), :class:`MemoryPluginContext` (a
logger and the ``[credentials.NAME]`` backends) and
:class:`StaticCredentials` (a backend holding fixed TLS material).

For a store on PostgreSQL, ``postgres_server`` is one real server for the whole session
(:class:`gatewayd_testing.postgres.PostgresServer`, from the Debian package
``postgresql``; started when a test first asks for it, stopped at the end), and
``postgres_dsn`` a ``postgresql://`` URI of a fresh, empty database for each test::

    async def test_my_store(postgres_dsn):
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            ...
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from gatewayd_sim import harness
from gatewayd_sim.harness import Pki
from gatewayd_sim.harness import running as running_gateway
from gatewayd_sim.server import SimServer
from structlog.testing import capture_logs

from gatewayd import config
from gatewayd_testing.contexts import (
    MemoryKV,
    MemoryPluginContext,
    MemoryTransportContext,
    StaticCredentials,
    plugin_settings,
    transport_settings,
)
from gatewayd_testing.postgres import PostgresServer

__all__ = [
    "MemoryKV",
    "MemoryPluginContext",
    "MemoryTransportContext",
    "Pki",
    "PostgresServer",
    "StaticCredentials",
    "counted_lines",
    "plugin_settings",
    "refusal_line",
    "running_gateway",
    "transport_settings",
    "until",
]


@pytest.fixture
def loopback_pki(tmp_path: Path) -> Pki:
    """A CA with server, gateway and device certificates (SANs for localhost/127.0.0.1)."""
    return harness.make_pki(tmp_path / "pki")


@pytest_asyncio.fixture
async def sim(loopback_pki: Pki) -> AsyncIterator[SimServer]:
    """The reference MSGin5G Server, allowing the demo gateway to serve ``ue-*``.

    It validates every body against the 3GPP OpenAPI files (``schema_check=True``), so a
    gateway that sends a non-conforming body fails the test.
    """
    async with SimServer(harness.sim_settings(loopback_pki), schema_check=True) as server:
        yield server


@pytest.fixture
def gateway_config(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer
) -> Callable[..., config.Settings]:
    """Write a gateway config pointing at ``sim``; you supply the transport tables."""

    def make(transports: str, *, extra: str = "", name: str = "gatewayd.toml") -> config.Settings:
        return harness.write_config(
            tmp_path / name,
            harness.gateway_toml(
                loopback_pki,
                api_root=sim.api_root,
                state_dir=tmp_path / "state",
                transports=transports,
                extra=extra,
            ),
        )

    return make


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (initdb takes a second or more): superuser
    ``gatewayd``, password :data:`gatewayd_testing.postgres.PASSWORD`, on 127.0.0.1.

    Tests share it: take a database of your own with ``postgres_dsn``, and leave the
    server running (a test that stops or kills a server makes its own
    :class:`PostgresServer`)."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The ``postgresql://`` URI (with the password) of a new empty database on the
    session's server, for this test alone."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:16]}")


@pytest.fixture(autouse=True)
def _every_level_reaches_log_capture() -> Iterator[None]:
    """Open the stdlib root level to debug for each test, as it was before any test ran
    ``gatewayd.log.configure``. gatewayd drops a debug or info call below the root level
    before structlog's processors (cheap per-message logging), so after one test set
    ``warning``, ``structlog.testing.capture_logs`` (and :func:`gateway_logs`) in every
    later test would see no info or debug event at all."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    yield
    root.setLevel(level)


@pytest.fixture
def gateway_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event of the test, as dicts (``event``, ``log_level``, the keys).

    Assert on stable event names (docs/logging.md), e.g.
    ``assert any(e["event"] == "transport.stopped" for e in gateway_logs)``.
    """
    with capture_logs() as logs:
        yield logs


_QUIET = ("debug", "info")


def counted_lines(
    logs: Iterable[Mapping[str, Any]], device: str | None = None
) -> list[Mapping[str, Any]]:
    """The lines among ``logs`` that monitoring counts as trouble: every warning and
    error, plus, given ``device``, the info lines naming it (in ``device``, or in a
    request ``path`` or MQTT ``topic`` with ``/<device>/``)."""

    def counts(line: Mapping[str, Any]) -> bool:
        if line["log_level"] not in _QUIET:
            return True
        if line["log_level"] == "debug" or device is None:
            return False
        where = f"{line.get('path', '')} {line.get('topic', '')}"
        return line.get("device") == device or f"/{device}/" in where

    return [e for e in logs if counts(e)]


def refusal_line(
    logs: Iterable[Mapping[str, Any]], *, transport: str, device: str, reason: str
) -> Mapping[str, Any]:
    """The one line ``device``'s input, refused for good, was logged with.

    ``logs`` are the events captured around that one input. Monitoring counts lines,
    so the refusal is exactly one: the core's ``intake.rejected`` (warning) with this
    ``transport``, ``device`` and ``reason``; a transport logs the same refusal at debug
    at most. The line is returned for the caller to check ``msg_id`` and ``detail``.
    """
    lines = counted_lines(logs, device)
    assert len(lines) == 1, f"one refusal, one line; got {lines}"
    (line,) = lines
    assert (line["event"], line["log_level"]) == ("intake.rejected", "warning"), line
    assert (line["transport"], line["device"], line["reason"]) == (transport, device, reason)
    return line


async def until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition"
) -> None:
    """Poll ``predicate`` (a plain or an async callable) until it is true; fail the test
    naming ``what`` after ``timeout`` seconds. For states with no event to wait on: a
    counter, a link state, a log line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
