"""Meta-tests of the plugin system: the contract the house style promises."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from gatewayd import hookspecs
from gatewayd.api import Address, Device, Uplink, hookimpl
from gatewayd.errors import PluginError
from gatewayd.plugins import Plugins

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in dir(hookspecs) if name.startswith("gatewayd_")]


def test_every_hook_is_documented() -> None:
    assert HOOKS
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc.split()) >= 20, f"{name} needs a docstring saying when and what"


def test_first_party_plugins_import_only_the_public_api() -> None:
    offenders = []
    for source in ROOT.glob("plugins/*/gatewayd_*/**/*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            offenders += [
                f"{source.relative_to(ROOT)}: {m}"
                for m in modules
                if (m == "gatewayd" or m.startswith("gatewayd.")) and m != "gatewayd.api"
            ]
    assert offenders == []


def test_first_party_plugins_are_found_through_entry_points() -> None:
    plugins = Plugins(autoload=True)
    assert {"http", "mqtt"} <= set(plugins.transports.names())
    assert {"x509", "systemd", "oauth2", "pkcs11"} <= set(plugins.credential_backends.names())
    assert plugins.transports.owner("http") == "http"


class _Destination:
    @hookimpl
    def gatewayd_uplink_destination(self, uplink: Uplink, device: Device) -> Address | None:
        return Address("AS", f"as-for-{device.name}") if uplink.app_id == "route-me" else None


def test_uplink_destination_hook_first_result_wins() -> None:
    plugins = Plugins(autoload=False, extra=(_Destination(),))
    device = Device(name="d1", service_id="ue-d1")
    routed = plugins.uplink_destination(Uplink(device="d1", payload="x", app_id="route-me"), device)
    assert routed == Address("AS", "as-for-d1")
    assert plugins.uplink_destination(Uplink(device="d1", payload="x"), device) is None


class _Misspelt:
    @hookimpl
    def gatewayd_register_transport(self, registry: object) -> None:  # no such hook
        raise AssertionError("never called")


def test_misspelt_hook_fails_fast() -> None:
    with pytest.raises(PluginError, match="gatewayd_register_transport"):
        Plugins(autoload=False, extra=(_Misspelt(),))


class _Twice:
    @hookimpl
    def gatewayd_register_transports(self, registry: object) -> None:
        registry.add("http", object)  # type: ignore[attr-defined]


def test_a_name_registered_twice_is_an_error() -> None:
    with pytest.raises(PluginError, match="registered twice"):
        Plugins(autoload=True, extra=(_Twice(),))
