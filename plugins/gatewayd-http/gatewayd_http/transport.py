"""``HttpTransport``: devices POST uplinks to us; we POST downlinks to their webhooks."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gatewayd.api import (
    ConfigError,
    DeliveryOutcome,
    Downlink,
    GatewaydError,
    GuardedSite,
    ManagedTransport,
    TlsIdentity,
    TransportContext,
    TransportSettings,
    TrustAnchors,
    UplinkReport,
    client_context,
    is_loopback,
    listener_runner,
    server_context,
)
from gatewayd_http.config import BEARER, CLIENT_CERT, DeviceConfig, HttpConfig
from gatewayd_http.intake import Credentials, Intake
from gatewayd_http.messages import downlink_body, report_body
from gatewayd_http.webhook import Webhook, post

# How long stop() lets in-flight requests (a device waiting on accept) finish.
_SHUTDOWN_TIMEOUT = 10.0


class HttpTransport(ManagedTransport):
    """Devices on HTTP: an uplink listener and a webhook client for downlinks.

    The whole config is read in the constructor (errors name the key path); secrets and
    credential material are read in :meth:`lifespan` (the context-manager form of a
    transport: see :class:`~gatewayd.api.ManagedTransport`).
    """

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        super().__init__(settings, context)
        self.config = HttpConfig.from_settings(settings)
        _check_unique_identities(self.config)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._webhooks: dict[str, Webhook] = {}

    @property
    def address(self) -> tuple[str, int]:
        """Where the listener is bound (the real port when ``listen`` asked for port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP transport is not listening")
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Read tokens and TLS material, open the webhook client, listen; on the way out
        stop taking new connections first, let in-flight requests finish, then close."""
        credentials = _read_credentials(self.config)
        server_ssl = self._server_ssl()
        identity = None
        if self.config.webhook_identity is not None:
            identity = self.context.credentials(self.config.webhook_identity).tls_identity()
            if identity is None:
                raise ConfigError(
                    self.settings.options.key("webhook_identity"),
                    f"credentials {self.config.webhook_identity!r} provide no TLS identity",
                )
        self._webhooks = {
            device.name: _webhook(device, identity)
            for device in self.config.devices
            if device.webhook
        }
        try:
            # One pooled session for every webhook: keep-alive spares a TLS handshake per
            # message (about 2.5 ms of CPU each side).
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.delivery_timeout)
            )
            app = Intake(self.config, credentials, self.context).app()
            limits = self.config.limits
            self._runner = listener_runner(
                app, limits, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
            )
            await self._runner.setup()
            # Idle and slow-header devices are cut and the connection count capped
            # (idle_timeout, header_timeout, max_connections): see gatewayd.listener.
            site = GuardedSite(
                self._runner,
                self.config.host,
                self.config.port,
                limits=limits,
                ssl_context=server_ssl,
                label=f"transports.{self.settings.name}",
            )
            try:
                await site.start()
            except OSError as exc:
                raise GatewaydError(
                    f"{self.settings.options.key('listen')}: cannot listen on "
                    f"{self.config.host}:{self.config.port}: {exc.strerror or exc}"
                ) from None
            self._site = site
            self._listening(server_ssl)
            yield
        finally:
            listened, self._site = self._site, None
            if listened is not None:
                await listened.stop()
            await self._close()
            if listened is not None:
                self.context.log.info("http.stopped")

    def _listening(self, server_ssl: ssl.SSLContext | None) -> None:
        host, port = self.address
        if server_ssl is None and not is_loopback(self.config.host):
            # TS 33.501 Annex Y.3: TLS protects MSGin5G-4 unless the network does; bearer
            # tokens in clear text are only acceptable on a protected network.
            self.context.log.warning("http.tls.disabled", host=host, port=port)
        self.context.log.info(
            "http.listening",
            host=host,
            port=port,
            tls=server_ssl is not None,
            device_auth=self.config.device_auth,
        )

    def link_state(self) -> dict[str, str | int]:
        """For ``gatewayd status``: listening, and where."""
        if self._site is None:
            return {"state": "stopped"}
        host, port = self.address
        return {"state": "listening", "address": f"{host}:{port}"}

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        """POST the message to the device's webhook; the HTTP status is the evidence."""
        log = self.context.log.bind(msg_id=message.msg_id, device=message.device.name)
        hook = self._webhooks.get(message.device.name)
        if hook is None:
            outcome = DeliveryOutcome.failure("no webhook configured", permanent=True)
        else:
            outcome = await post(self._require_session(), hook, downlink_body(message))
        if outcome.delivered:
            log.info("http.delivery.succeeded")
        else:
            log.warning("http.delivery.failed", cause=outcome.cause, permanent=outcome.permanent)
        return outcome

    async def deliver_report(self, report: UplinkReport) -> bool:
        """POST the server's report to the device's webhook; ``True`` on a 2xx."""
        log = self.context.log.bind(msg_id=report.msg_id, device=report.device.name)
        hook = self._webhooks.get(report.device.name)
        if hook is None:
            log.info("http.report.not_delivered", cause="no webhook configured")
            return False
        outcome = await post(self._require_session(), hook, report_body(report))
        if outcome.delivered:
            log.info("http.report.delivered", delivered=report.delivered)
        else:
            log.warning("http.report.not_delivered", cause=outcome.cause)
        return outcome.delivered

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("deliver() called outside start()/stop()")
        return self._session

    def _server_ssl(self) -> ssl.SSLContext | None:
        if self.config.tls is None:
            return None
        backend = self.context.credentials(self.config.tls)
        identity = backend.tls_identity()
        if identity is None:
            raise ConfigError(
                self.settings.options.key("tls"),
                f"credentials {self.config.tls!r} provide no TLS identity for the listener",
            )
        return server_context(
            identity,
            backend.trust_anchors(),
            require_client_cert=self.config.device_auth == CLIENT_CERT,
        )


def _read_credentials(config: HttpConfig) -> Credentials:
    tokens: dict[str, bytes] = {}
    owners: dict[bytes, str] = {}
    if config.device_auth == BEARER:
        for device in config.devices:
            assert device.token is not None  # the config requires one in bearer mode
            token = device.token.read_text().strip().encode()
            if not token:
                raise ConfigError(device.token.key, "the token is empty")
            if token in owners:
                # A token must name exactly one device, or one could act as the other.
                raise ConfigError(device.token.key, f"same token as device {owners[token]!r}")
            owners[token] = device.name
            tokens[device.name] = token
    identities = {d.identity: d.name for d in config.devices if d.identity is not None}
    return Credentials(tokens=tokens, identities=identities)


def _check_unique_identities(config: HttpConfig) -> None:
    seen: dict[str, str] = {}
    for device in config.devices:
        if device.identity is None:
            continue
        if device.identity in seen:
            raise ConfigError(
                f"{device.key_path}.identity",
                f"{device.identity!r} is already the identity of device {seen[device.identity]!r}",
            )
        seen[device.identity] = device.name


def _webhook(device: DeviceConfig, identity: TlsIdentity | None) -> Webhook:
    """The device's webhook; over https we verify it and, when configured, present our
    own certificate so the device can authenticate the gateway (mutual TLS)."""
    assert device.webhook is not None
    if not device.webhook.startswith("https://"):
        return Webhook(url=device.webhook)
    trust = None
    if device.webhook_ca is not None:
        try:
            trust = TrustAnchors(ca_pem=device.webhook_ca.read_bytes())
        except OSError as exc:
            raise ConfigError(
                f"{device.key_path}.webhook_ca",
                f"cannot read CA file {device.webhook_ca}: {exc.strerror}",
            ) from None
    return Webhook(url=device.webhook, ssl_context=client_context(trust, identity))
