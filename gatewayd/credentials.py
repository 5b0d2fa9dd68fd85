"""The gateway's credential backends as one set: loading, TLS material, rotation, expiry.

The daemon asks this set for the northbound client context and the API server's
material; on SIGHUP or a change on disk it asks for a :class:`Rotation` (validated new
material) and applies it to the live link. Certificate expiry is watched here too: a
warning within ``gateway.cert_warning_days`` at start, on each reload and once a day,
and gauges for the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gatewayd import metrics
from gatewayd.api import CredentialBackend, TlsIdentity, TrustAnchors
from gatewayd.config import Settings
from gatewayd.errors import ConfigError, CredentialError, GatewaydError, PluginError
from gatewayd.plugins import Plugins
from gatewayd.security import tls
from gatewayd.security.identity import check_own_certificate, leaf_facts

log = structlog.get_logger(__name__)

POLL_SECONDS = 2.0
# A rotation writes several files (key, chain, CA, CRL): reload only once the watched
# files have stopped changing for this long, so a half-done rotation is not read.
SETTLE_SECONDS = 0.5
EXPIRY_CHECK_SECONDS = 86400.0  # the once-a-day credentials.expiring check

FileState = dict[Path, tuple[int, int, int]]


class PluginContext:
    """What a credential backend gets: a bound logger and its sibling backends."""

    def __init__(self, name: str, lookup: Callable[[str], CredentialBackend]) -> None:
        self._log = structlog.get_logger("gatewayd.credentials").bind(credentials=name)
        self._lookup = lookup

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        return self._log  # type: ignore[no-any-return]

    def credentials(self, name: str) -> CredentialBackend:
        return self._lookup(name)


@dataclass(frozen=True, slots=True)
class Rotation:
    """New material, already validated: apply it to the live contexts."""

    client_tls: ssl.SSLContext
    api_identity: TlsIdentity
    api_trust: TrustAnchors


class Credentials:
    """The configured ``[credentials.*]`` backends, by name."""

    def __init__(self, settings: Settings, plugins: Plugins) -> None:
        self._settings = settings
        self._plugins = plugins
        self.backends: dict[str, CredentialBackend] = {}
        self._files: FileState = {}
        self._not_after: dict[str, datetime] = {}

    def get(self, name: str) -> CredentialBackend:
        backend = self.backends.get(name)
        if backend is None:
            raise ConfigError(f"credentials.{name}", "no such [credentials.NAME] table")
        return backend

    async def load(self) -> None:
        """Build every backend, then load each (a backend may look up its siblings)."""
        for cs in self._settings.credentials:
            factory = self._plugins.credential_backends.require(cs)
            self.backends[cs.name] = factory(cs, PluginContext(cs.name, self.get))
        self._files = self._file_state()
        await self._load_all()

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()

    async def _load_all(self) -> None:
        for name, backend in self.backends.items():
            try:
                await backend.load()
            except GatewaydError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"credentials.{name}: the backend failed to load: {exc!r}"
                ) from exc
            identity = backend.tls_identity()
            if identity is None:
                log.info("credentials.loaded", credentials=name, identity=False)
                continue
            facts = leaf_facts(identity.cert_chain_pem)
            log.info(
                "credentials.loaded",
                credentials=name,
                subject=facts.subject,
                not_after=facts.not_after.isoformat(),
                days_left=round(facts.days_left(), 1),
            )

    # --- TLS material for the northbound link ---------------------------------------

    def client_tls(self) -> ssl.SSLContext:
        """Our identity toward the server, checked to be ``gateway.id`` and valid now."""
        s = self._settings
        nb = self.get(s.northbound.credentials)
        identity, trust = nb.tls_identity(), nb.trust_anchors()
        if identity is None or trust is None:
            raise CredentialError(
                f"credentials.{s.northbound.credentials} must provide both a TLS identity "
                "and trust anchors for the northbound link (mutual TLS)"
            )
        check_own_certificate(
            identity.cert_chain_pem,
            expected_id=s.gateway_id,
            what=f"credentials.{s.northbound.credentials}",
        )
        return tls.client_context(trust, identity, expected_identity=s.northbound.server_identity)

    def api_material(self) -> tuple[TlsIdentity, TrustAnchors]:
        name = self._settings.api.credentials
        backend = self.get(name)
        identity, trust = backend.tls_identity(), backend.trust_anchors()
        if identity is None or trust is None:
            raise CredentialError(
                f"credentials.{name} must provide a TLS identity and the trust anchors "
                "that vouch for the MSGin5G Server's client certificate"
            )
        return identity, trust

    def server_tls(self) -> ssl.SSLContext:
        identity, trust = self.api_material()
        return tls.server_context(identity, trust, require_client_cert=True)

    def token_source(self) -> Callable[[], Awaitable[str | None]] | None:
        name = self._settings.northbound.token
        if name is None:
            return None
        backend = self.get(name)
        audience = self._settings.northbound.server_name
        scope = self._settings.northbound.token_scope

        async def token() -> str | None:
            return await backend.access_token(audience=audience, scope=scope)

        return token

    # --- rotation ------------------------------------------------------------------------

    async def rotate(self) -> Rotation | None:
        """Re-read every backend and validate the result; ``None`` when it is unusable.

        A broken rotation must not stop the gateway: the caller keeps the material it
        has, and the next change on disk (or SIGHUP) tries again.
        """
        # Taken before reading: a file that changes while we read is seen as changed
        # again by the watcher, so the rotation's last write is never missed.
        self._files = self._file_state()
        try:
            await self._load_all()
            client = self.client_tls()
            identity, trust = self.api_material()
            # A throw-away server context first: bad material must fail here, before
            # either live context is touched.
            tls.server_context(identity, trust, require_client_cert=True)
        except GatewaydError as exc:
            metrics.CREDENTIAL_RELOADS.labels(outcome="failed").inc()
            log.error("credentials.reload_failed", error=str(exc))
            return None
        finally:
            self.check_expiry()
        metrics.CREDENTIAL_RELOADS.labels(outcome="ok").inc()
        return Rotation(client, identity, trust)

    def _file_state(self) -> FileState:
        # mtime alone misses a rewrite within one coarse kernel clock tick; an atomic
        # replace (mv) always changes the inode, a rewrite in place usually the size.
        out = {}
        for backend in self.backends.values():
            for path in backend.watched_paths():
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    out[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    async def watch(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Call ``on_change`` when a watched file changed and then stayed still."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self._file_state() == self._files:
                continue
            # Let a multi-file rotation finish (bounded, so a file rewritten forever
            # still gets reloaded now and then).
            settled = self._file_state()
            for _ in range(20):
                await asyncio.sleep(SETTLE_SECONDS)
                now = self._file_state()
                if now == settled:
                    break
                settled = now
            log.info("credentials.changed_on_disk")
            await on_change()

    # --- expiry ----------------------------------------------------------------------------

    def check_expiry(self) -> None:
        """Warn about every TLS certificate within ``gateway.cert_warning_days`` of its
        end and record its expiry for the metrics: a certificate nobody rotates still
        gets noticed."""
        warning_days = self._settings.cert_warning_days
        not_after: dict[str, datetime] = {}
        for name, backend in self.backends.items():
            try:
                identity = backend.tls_identity()
                facts = leaf_facts(identity.cert_chain_pem) if identity is not None else None
            except GatewaydError:
                continue  # not loaded: start-up or reload already said why
            if facts is None:
                continue
            not_after[name] = facts.not_after
            days_left = facts.days_left()
            if days_left < warning_days:
                log.warning(
                    "credentials.expiring",
                    credentials=name,
                    subject=facts.subject,
                    not_after=facts.not_after.isoformat(),
                    days_left=round(days_left, 1),
                    warning_days=warning_days,
                )
        self._not_after = not_after
        self.set_expiry_gauges()

    def set_expiry_gauges(self) -> None:
        now = datetime.now(UTC)
        for gauge in (metrics.CREDENTIAL_NOT_AFTER, metrics.CREDENTIAL_DAYS_LEFT):
            gauge.clear()  # an instance that no longer has a certificate drops out
        for name, when in self._not_after.items():
            metrics.CREDENTIAL_NOT_AFTER.labels(credentials=name).set(when.timestamp())
            days_left = (when - now).total_seconds() / 86400
            metrics.CREDENTIAL_DAYS_LEFT.labels(credentials=name).set(round(days_left, 3))

    async def expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS)
            self.check_expiry()
