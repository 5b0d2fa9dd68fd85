"""Every hook gatewayd calls. Plugins implement them with :data:`gatewayd.api.hookimpl`.

Hooks only *register* things; pluggy cannot await, so anything on the message path is an
async method of a registered class instead of a hook. Hooks are called through the
typed facade in :mod:`gatewayd.plugins`, never ``pm.hook`` directly, and always through
pluggy's own machinery: an implementation may take any subset of a spec's arguments,
and ``wrapper=True`` implementations are honoured. The two ``register`` hooks are called
one registering plugin at a time (so a registry knows who added what); a wrapper around
one of them therefore runs once per registering plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gatewayd.api import (
        Address,
        CredentialFactory,
        Device,
        Registry,
        TransportFactory,
        Uplink,
    )

hookspec = pluggy.HookspecMarker("gatewayd")


@hookspec
def gatewayd_register_transports(registry: Registry[TransportFactory]) -> None:
    """Register transport classes: ``registry.add("mqtt", MqttTransport)``.

    Called once at start, before the config's ``[transports.*]`` tables are read; the
    name is what a table's ``plugin`` key refers to. Every implementation is called;
    registering a name twice is an error that stops the start.
    """


@hookspec
def gatewayd_register_credential_backends(registry: Registry[CredentialFactory]) -> None:
    """Register credential backend classes: ``registry.add("x509", X509Backend)``.

    Called once at start, before the config's ``[credentials.*]`` tables are read. Every
    implementation is called; registering a name twice is an error.
    """


@hookspec(firstresult=True)
def gatewayd_uplink_destination(uplink: Uplink, device: Device) -> Address | None:
    """Choose where an uplink message goes when the device did not say.

    Called for each uplink message without ``dest``, after the reply-routing table found
    no route. The first non-``None`` result wins; when every implementation returns
    ``None`` the config's ``relay.default_destination`` is used, and without one the
    message is refused as invalid. Must be fast and must not block: it runs on intake.
    """
