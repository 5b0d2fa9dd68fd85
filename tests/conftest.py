"""Shared fixtures come from the gatewayd test kit (gatewayd-testing under kits/, a pytest11
plugin; installing gatewayd alone registers none)."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", help="also run the long modes (crash cycles, soak)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long") or os.environ.get("GATEWAYD_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="long mode: run with --long or GATEWAYD_LONG=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
