"""Fixtures for gatewayd-mqtt: a real mosquitto per test, and the in-memory context."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))

from gatewayd_testing import MemoryTransportContext
from mosquitto import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto (plain, TLS with client certificates, password listeners)."""
    server = Mosquitto(tmp_path / "broker")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def context() -> MemoryTransportContext:
    return MemoryTransportContext()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``slow`` tests unless long mode is on, also when only this folder runs.

    tests/conftest.py owns ``--long`` and does the same at collection, but pytest loads
    it only when the run includes tests/; hence the option is read with a default.
    """
    if "slow" not in item.keywords:
        return
    if item.config.getoption("--long", default=False) or os.environ.get("GATEWAYD_LONG") == "1":
        return
    pytest.skip("long mode: run with --long or GATEWAYD_LONG=1")
