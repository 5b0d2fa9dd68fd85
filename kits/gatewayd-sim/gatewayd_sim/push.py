"""Calls from the server to gateways, over mutual TLS, to the registered identity only.

Python's ``ssl`` can check a peer's DNS name or IP but not a URI SAN, and gateway
identities are URIs (``urn:...``). So each registered identity gets its own client
context whose ``SSLObject`` checks the SANs right after the handshake: a mismatch fails
the connection inside asyncio's handshake step, before aiohttp writes a single HTTP
byte, and the impostor learns nothing but our certificate.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog

from gatewayd.api import TlsIdentity, TrustAnchors
from gatewayd.security import tls

log = structlog.get_logger(__name__)


class GatewayClient:
    """One pooled aiohttp session for every call to every gateway.

    TLS handshakes cost milliseconds of CPU, so connections are kept alive; aiohttp keys
    its pool by SSL context, which keeps one identity's connections apart from another's.
    """

    def __init__(self, identity: TlsIdentity, trust: TrustAnchors) -> None:
        self._identity = identity
        self._trust = trust
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            connector=aiohttp.TCPConnector(limit_per_host=8),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def context_for(self, gw_id: str) -> ssl.SSLContext:
        ctx = self._contexts.get(gw_id)
        if ctx is None:
            # The registered identity, not the URL's host name, is what must match.
            ctx = tls.client_context(
                self._trust, self._identity, check_hostname=False, expected_identity=gw_id
            )
            self._contexts[gw_id] = ctx
        return ctx

    async def post(
        self, gw_id: str, url: str, body: Mapping[str, Any], *, token: str | None = None
    ) -> tuple[int, str | None]:
        """POST JSON to a gateway; (HTTP status, None) or (0, why no exchange happened).

        ``token``: our bearer token for the gateway (sent only over the verified link).
        """
        if self._session is None:
            raise RuntimeError("GatewayClient used before start()")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            # A redirect is answered as its status, never followed: it could carry the
            # message (and our token) to another host or into cleartext.
            async with self._session.post(
                url,
                json=body,
                ssl=self.context_for(gw_id),
                headers=headers,
                allow_redirects=False,
            ) as resp:
                await resp.read()
                return resp.status, None
        except aiohttp.ClientConnectorCertificateError as exc:
            log.warning("auth.gateway_identity_rejected", gw_id=gw_id, url=url)
            return 0, f"gateway certificate refused: {exc.certificate_error}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
