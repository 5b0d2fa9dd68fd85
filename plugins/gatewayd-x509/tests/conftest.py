"""Fixtures for the x509/systemd backend tests: a real throw-away PKI and a tiny context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from gatewayd import pki
from gatewayd.api import CredentialBackend, Options, PluginSettings


class Context:
    """A minimal real PluginContext: a structlog logger and a dict of backends."""

    def __init__(self) -> None:
        self.backends: dict[str, CredentialBackend] = {}

    @property
    def log(self) -> Any:
        # Looked up on each use so structlog.testing.capture_logs sees the events.
        return structlog.get_logger("test")

    def credentials(self, name: str) -> CredentialBackend:
        return self.backends[name]


Make = Callable[..., CredentialBackend]


@pytest.fixture
def context() -> Context:
    return Context()


@pytest.fixture
def ca() -> pki.Issued:
    return pki.create_ca("test CA")


@pytest.fixture
def make(tmp_path: Path, context: Context) -> Callable[..., CredentialBackend]:
    """Build a backend class from an options dict, as the core would from TOML."""

    def _make(cls: type[CredentialBackend], options: dict[str, Any], name: str = "north") -> Any:
        settings = PluginSettings(
            name=name,
            plugin="x509",
            options=Options(options, f"credentials.{name}", source="gw.toml"),
            base_dir=tmp_path,
        )
        backend = cls(settings, context)
        context.backends[name] = backend
        return backend

    return _make
