"""A TLS server that records every byte a client sends it: an impostor MSGin5G Server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Self

from gatewayd.api import TlsIdentity, server_context
from gatewayd.pki import Issued


class Impostor:
    """Accepts TCP, runs TLS with ``ctx``, and keeps whatever a client dares to send."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self.connections = 0  # TCP connections accepted (before TLS)
        self.received = bytearray()  # application bytes after a completed handshake
        self.port = 0

    @classmethod
    def presenting(cls, cert: Issued) -> Self:
        identity = TlsIdentity(cert_chain_pem=cert.cert_pem, key_pem=cert.key_pem)
        return cls(server_context(identity, None, require_client_cert=False))

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
    async def running(self) -> AsyncIterator[Self]:
        server = await asyncio.start_server(self._tcp, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()
