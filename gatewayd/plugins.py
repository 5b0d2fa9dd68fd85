"""The typed facade over pluggy: the only module that touches ``pm.hook``.

Plugins are found through the ``gatewayd`` entry-point group, first-party ones too.
``GATEWAYD_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points, so a test (or an operator
chasing a misbehaving plugin) loads exactly the plugins it names.

Every hook is called through pluggy's own machinery, so an implementation may take a
subset of the spec's arguments and ``wrapper=True`` implementations run as pluggy
documents. An entry-point plugin declares the plugin API it was written for
(``GATEWAYD_API_VERSION = "1.0"`` in its module); an incompatible or missing
declaration refuses the plugin at load, naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
import structlog

from gatewayd import hookspecs
from gatewayd.api import (
    API_VERSION,
    API_VERSION_ATTRIBUTE,
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

log = structlog.get_logger("gatewayd.plugins")


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One plugin as ``gatewayd plugins`` shows it; ``error`` is set when it was refused."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    api_version: str | None = None
    error: str | None = None


def api_compatible(declared: object) -> str | None:
    """Why a plugin declaring ``declared`` cannot load here, or ``None`` when it can.

    Same major version, and a minor version no newer than ours: minors only add to the
    API, so a plugin written for 1.0 runs on 1.2 but one written for 1.3 may use what
    1.2 lacks.
    """
    if declared is None:
        return (
            f"declares no plugin API version (set {API_VERSION_ATTRIBUTE} = "
            f'"{API_VERSION}" in the entry-point module)'
        )
    ours = _parse(API_VERSION)
    theirs = _parse(declared)
    if ours is None:  # pragma: no cover - API_VERSION is a literal above
        raise AssertionError(API_VERSION)
    if theirs is None:
        return f'{API_VERSION_ATTRIBUTE} = {declared!r} is not "MAJOR.MINOR"'
    if theirs[0] != ours[0] or theirs[1] > ours[1]:
        return (
            f"written for plugin API {declared}, this gatewayd offers {API_VERSION} "
            f"(compatible: {ours[0]}.0 to {API_VERSION})"
        )
    return None


def _parse(version: object) -> tuple[int, int] | None:
    if not isinstance(version, str):
        return None
    major, dot, minor = version.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor)


class Plugins:
    """Loaded plugins and what they registered.

    ``strict`` (the default, what ``run`` and ``check-config`` use) turns a broken plugin
    into a :class:`PluginError` naming it; ``strict=False`` (``gatewayd plugins``) keeps
    loading the others and lists the broken ones in :meth:`info` with their error.
    """

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        extra: tuple[object, ...] = (),
        strict: bool = True,
    ) -> None:
        self._pm = pluggy.PluginManager("gatewayd")
        self._pm.add_hookspecs(hookspecs)
        self._strict = strict
        self._dists: dict[int, metadata.Distribution] = {}
        self._broken: list[PluginInfo] = []
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_SWITCH, "") in ("", "0")
        if autoload:
            for entry_point in sorted(
                metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
            ):
                self._load_entry_point(entry_point)
        for plugin in extra:
            self._add(plugin, None, None)
        # A hook name that matches no spec is a typo we want at start, not a hook that
        # silently never runs.
        while True:
            try:
                self._pm.check_pending()
                break
            except pluggy.PluginValidationError as exc:
                name = self._pm.get_name(exc.plugin) or repr(exc.plugin)
                self._refuse(name, exc.plugin, str(exc), unregister=True)
        self.transports: Registry[TransportFactory] = Registry("transport")
        self.credential_backends: Registry[CredentialFactory] = Registry("credential backend")
        self._register(self.transports, "gatewayd_register_transports")
        self._register(self.credential_backends, "gatewayd_register_credential_backends")

    # --- loading --------------------------------------------------------------------

    def _load_entry_point(self, entry_point: metadata.EntryPoint) -> None:
        name = entry_point.name
        dist = entry_point.dist
        if self._pm.is_blocked(name) or self._pm.has_plugin(name):
            return
        try:
            plugin = entry_point.load()
        except Exception as exc:  # any import-time failure of a third party's code
            self._broken_entry(name, dist, f"failed to import: {type(exc).__name__}: {exc}")
            return
        problem = api_compatible(getattr(plugin, API_VERSION_ATTRIBUTE, None))
        if problem is not None:
            self._broken_entry(name, dist, problem, plugin)
            return
        self._add(plugin, name, dist)

    def _add(self, plugin: object, name: str | None, dist: metadata.Distribution | None) -> None:
        declared = getattr(plugin, API_VERSION_ATTRIBUTE, None)
        label = name or repr(plugin)
        if declared is not None and (problem := api_compatible(declared)) is not None:
            self._broken_entry(label, dist, problem, plugin)
            return
        try:
            registered = self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._broken_entry(label, dist, str(exc), plugin)
            return
        if registered is None:  # blocked by name
            return
        if dist is not None:
            self._dists[id(plugin)] = dist
        if not self._pm.get_hookcallers(plugin):
            # Loadable but useless: most likely a hookimpl marker from another project or
            # a misspelt module path. Worth a warning, not a refusal.
            log.warning(
                "plugin.no_hooks",
                plugin=registered,
                distribution=_dist_name(dist),
                hint="the entry-point module implements no gatewayd_* hook",
            )

    def _broken_entry(
        self,
        name: str,
        dist: metadata.Distribution | None,
        error: str,
        plugin: object | None = None,
    ) -> None:
        self._refuse(name, plugin, error, unregister=False, dist=dist)

    def _refuse(
        self,
        name: str,
        plugin: object | None,
        error: str,
        *,
        unregister: bool,
        dist: metadata.Distribution | None = None,
    ) -> None:
        dist = dist or (self._dists.pop(id(plugin), None) if plugin is not None else None)
        if unregister and plugin is not None:
            self._pm.unregister(plugin)
        label = f"{name} ({_dist_name(dist)})" if dist is not None else name
        if self._strict:
            raise PluginError(f"plugin {label} is refused: {error}")
        self._broken.append(
            PluginInfo(
                name=name,
                distribution=_dist_name(dist),
                version=dist.version if dist else None,
                hooks=(),
                api_version=_declared(plugin),
                error=error,
            )
        )

    # --- hooks ----------------------------------------------------------------------

    def _register(self, registry: Registry[Any], hook_name: str) -> None:
        # Through pluggy, one plugin at a time, so the registry knows who registered
        # what: a subset caller keeps the other plugins' wrappers around each call.
        hook = getattr(self._pm.hook, hook_name)
        impls = hook.get_hookimpls()
        callers = [i.plugin for i in impls if not (i.wrapper or i.hookwrapper)]
        # pluggy calls the last registered first; registration order is simpler to read.
        for plugin in reversed(callers):
            others = [p for p in callers if p is not plugin]
            name = self._pm.get_name(plugin) or repr(plugin)
            registry.current_plugin = name
            try:
                self._pm.subset_hook_caller(hook_name, remove_plugins=others)(registry=registry)
            except PluginError:
                raise
            except Exception as exc:  # a plugin's own bug, reported with its name
                raise PluginError(
                    f"plugin {name} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                registry.current_plugin = "?"

    def uplink_destination(self, uplink: Uplink, device: Device) -> Address | None:
        result: Address | None = self._pm.hook.gatewayd_uplink_destination(
            uplink=uplink, device=device
        )
        return result

    # --- introspection --------------------------------------------------------------

    def info(self) -> list[PluginInfo]:
        """Every loaded plugin, then every refused one (with its error)."""
        out = []
        for name, plugin in sorted(self._pm.list_name_plugin(), key=lambda item: str(item[0])):
            if plugin is None:
                continue
            dist = self._dists.get(id(plugin))
            hooks = tuple(sorted(c.name for c in self._pm.get_hookcallers(plugin) or ()))
            out.append(
                PluginInfo(
                    name=str(name),
                    distribution=_dist_name(dist),
                    version=dist.version if dist else None,
                    hooks=hooks,
                    api_version=_declared(plugin),
                )
            )
        return out + self._broken

    def broken(self) -> list[PluginInfo]:
        """The plugins refused at load (only ever non-empty with ``strict=False``)."""
        return list(self._broken)

    def modules(self) -> list[ModuleType]:
        return [p for p in self._pm.get_plugins() if isinstance(p, ModuleType)]


def _dist_name(dist: metadata.Distribution | None) -> str | None:
    return dist.metadata["Name"] if dist is not None else None


def _declared(plugin: object | None) -> str | None:
    declared = getattr(plugin, API_VERSION_ATTRIBUTE, None)
    return declared if isinstance(declared, str) else None
