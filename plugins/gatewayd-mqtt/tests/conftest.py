"""Fixtures for gatewayd-mqtt: a real mosquitto per test, and the in-memory context."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))

from mosquitto import Mosquitto
from mqtt_helpers import MemoryContext


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
def context() -> MemoryContext:
    return MemoryContext()
