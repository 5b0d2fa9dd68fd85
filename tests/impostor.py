"""A TLS server that records every byte a client sends it: an impostor MSGin5G Server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

from gatewayd.pki import Issued


class Impostor:
    def __init__(self, cert: Issued, ca_pem: bytes | None = None) -> None:
        from gatewayd.api import TlsIdentity, TrustAnchors, server_context

        trust = TrustAnchors(ca_pem=ca_pem) if ca_pem else None
        identity = TlsIdentity(cert_chain_pem=cert.cert_pem, key_pem=cert.key_pem)
        self._ctx: ssl.SSLContext = server_context(identity, trust, require_client_cert=False)
        self.connections = 0  # TCP connections accepted (before TLS)
        self.received = bytearray()  # application bytes after a completed handshake
        self.port = 0

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await writer.start_tls(self._ctx)
            while chunk := await reader.read(65536):
                self.received += chunk
        except (ssl.SSLError, ConnectionError, OSError):
            pass  # the client gave up during the handshake: exactly what we expect
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Impostor]:
        server = await asyncio.start_server(self._tcp, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()
