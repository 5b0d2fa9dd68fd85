"""gatewayd-coap's tests use only the installed test kit (gatewayd-testing) and aiocoap."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
from coap_device import Device


@pytest.fixture
async def device() -> AsyncIterator[Device]:
    """A plain CoAP device (no OSCORE) on loopback, started."""
    dev = Device()
    await dev.start()
    yield dev
    await dev.close()
