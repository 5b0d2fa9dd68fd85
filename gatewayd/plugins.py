"""The typed facade over pluggy: the only module that touches ``pm.hook``.

Plugins are found through the ``gatewayd`` entry-point group, first-party ones too.
``GATEWAYD_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points, so a test (or an operator
chasing a misbehaving plugin) loads exactly the plugins it names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from gatewayd import hookspecs
from gatewayd.api import (
    Address,
    CredentialFactory,
    Device,
    Registry,
    TransportFactory,
    Uplink,
)
from gatewayd.errors import PluginError

ENTRY_POINT_GROUP = "gatewayd"
AUTOLOAD_SWITCH = "GATEWAYD_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


class Plugins:
    """Loaded plugins and what they registered."""

    def __init__(self, *, autoload: bool | None = None, extra: tuple[object, ...] = ()) -> None:
        self._pm = pluggy.PluginManager("gatewayd")
        self._pm.add_hookspecs(hookspecs)
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_SWITCH, "") in ("", "0")
        try:
            if autoload:
                self._pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            for plugin in extra:
                self._pm.register(plugin)
            # A hook name that matches no spec is a typo we want at start, not a hook
            # that silently never runs.
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r} is invalid: {exc}") from None
        except ImportError as exc:
            raise PluginError(f"a gatewayd plugin failed to import: {exc}") from None
        self.transports: Registry[TransportFactory] = Registry("transport")
        self.credential_backends: Registry[CredentialFactory] = Registry("credential backend")
        self._register(self.transports, "gatewayd_register_transports")
        self._register(self.credential_backends, "gatewayd_register_credential_backends")

    def _register(self, registry: Registry[Any], hook_name: str) -> None:
        # Call each implementation on its own so the registry knows who registered what.
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            registry.current_plugin = self._pm.get_name(impl.plugin) or "?"
            impl.function(registry=registry)

    def uplink_destination(self, uplink: Uplink, device: Device) -> Address | None:
        result: Address | None = self._pm.hook.gatewayd_uplink_destination(
            uplink=uplink, device=device
        )
        return result

    def info(self) -> list[PluginInfo]:
        dists = {id(plugin): dist for plugin, dist in self._pm.list_plugin_distinfo()}
        out = []
        for name, plugin in sorted(self._pm.list_name_plugin(), key=lambda item: str(item[0])):
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            hooks = tuple(sorted(c.name for c in self._pm.get_hookcallers(plugin) or ()))
            out.append(
                PluginInfo(
                    name=str(name),
                    distribution=dist.project_name if dist else None,
                    version=dist.version if dist else None,
                    hooks=hooks,
                )
            )
        return out

    def modules(self) -> list[ModuleType]:
        return [p for p in self._pm.get_plugins() if isinstance(p, ModuleType)]
