"""Fixtures for the x509/systemd backend tests: a real throw-away PKI and the test kit's
plugin context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gatewayd_testing import MemoryPluginContext, plugin_settings

from gatewayd import pki
from gatewayd.api import CredentialBackend

Make = Callable[..., CredentialBackend]


@pytest.fixture
def context() -> MemoryPluginContext:
    return MemoryPluginContext()


@pytest.fixture
def ca() -> pki.Issued:
    return pki.create_ca("test CA")


@pytest.fixture
def make(tmp_path: Path, context: MemoryPluginContext) -> Callable[..., CredentialBackend]:
    """Build a backend class from an options dict, as the core would from TOML."""

    def _make(cls: type[CredentialBackend], options: dict[str, Any], name: str = "north") -> Any:
        settings = plugin_settings(name, options, tmp_path, plugin="x509")
        backend = cls(settings, context)
        context.backends[name] = backend
        return backend

    return _make
