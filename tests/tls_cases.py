"""The negative TLS matrix's material: bad certificates, bad peers, and the probes.

Every certificate is made at test time. The peers here are deliberately *not* built
with :mod:`gatewayd.security.tls`: an attacker does not follow our profile, so they
use OpenSSL's security level 0 (to load an RSA-1024 key) and may cap TLS at 1.1.

:class:`BioImpostor` runs its TLS through memory BIOs instead of asyncio's SSL
transport, because asyncio closes a failed handshake before its alert leaves the
buffer: a peer that wants to *tell* the gateway why (``protocol_version``,
``unknown_ca``) has to flush the alert itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from impostor import Impostor

from gatewayd import pki

# Attackers' cipher string: everything OpenSSL can still do.
ANY_CIPHER = "DEFAULT:@SECLEVEL=0"

# The matrix. "no client certificate" and "wrong identity" are not certificate
# defects of a server in the outbound sense, so the outbound leg treats them apart.
CASES = (
    "unknown CA",
    "expired",
    "not yet valid",
    "wrong identity",
    "revoked",
    "no client certificate",
    "self-signed",
    "weak key",
    "TLS 1.1",
)


@dataclass(frozen=True, slots=True)
class Material:
    """The certificates of every case, issued by (or beside) one loopback PKI."""

    tls: Pki
    ca: pki.Issued
    other_ca: pki.Issued
    certs: dict[str, pki.Issued]  # case -> the certificate the bad peer presents
    crl: Path  # the loopback CA's CRL, revoking certs["revoked"]
    directory: Path


def _named(issuer: pki.Issued, **options: Any) -> pki.Issued:
    """A certificate with the server's names: only the case's own defect is wrong."""
    return pki.issue(
        issuer,
        "m5s",
        dns=("localhost",),
        ips=("127.0.0.1",),
        uris=(pki.DEMO_SERVER_ID,),
        **options,
    )


def _self_signed() -> pki.Issued:
    # Subject == issuer and signed by its own key, yet a leaf (CA:FALSE).
    key = pki.new_key()
    return _named(pki.create_ca("m5s", key=key), key=key)


def make_material(tls: Pki, directory: Path, *, role: str) -> Material:
    """Certificates for each case, with the server's names and identity so that, were
    the case's defect ignored, the gateway would accept the peer. ``role`` "caller"
    changes only "wrong identity": a trusted certificate not on ``api.allowed_peers``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.load_ca(tls["ca"], tls["ca_key"])
    other_ca = pki.create_ca("someone else's CA")
    now = dt.datetime.now(dt.UTC)
    certs = {
        "unknown CA": _named(other_ca),
        "expired": _named(
            ca, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
        "not yet valid": _named(
            ca, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
        ),
        # Trusted CA, but not the name the gateway dials (127.0.0.1).
        "wrong identity": pki.issue(
            ca, "impostor", dns=("impostor.example",), uris=("urn:gatewayd:impostor",)
        ),
        "revoked": _named(ca),
        "self-signed": _self_signed(),
        "weak key": _named(ca, key=pki.new_key("rsa", 1024)),
        "TLS 1.1": _named(ca),
    }
    if role == "caller":
        certs["wrong identity"] = pki.issue(
            ca, "device", dns=("localhost",), uris=("urn:gatewayd:not-the-server",)
        )
    crl = directory / "ca.crl.pem"
    crl.write_bytes(pki.create_crl(ca, revoked=(certs["revoked"].cert,)))
    return Material(tls, ca, other_ca, certs, crl, directory)


def gateway_toml_with_crl(text: str, tls: Pki, crl: Path) -> str:
    """Add a CRL to the gateway's credentials. The gateway trusts one CA, so one CRL
    covers every trusted CA, as OpenSSL demands once CRL checking is on."""
    line = f'ca = "{tls["ca"]}"'
    assert line in text
    return text.replace(line, f'{line}\ncrl = ["{crl}"]')


def _tls11(ctx: ssl.SSLContext) -> None:
    # ssl warns that TLS 1.1 is deprecated, and the suite turns warnings into errors;
    # offering it anyway is the very point of this peer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1


def _load(ctx: ssl.SSLContext, issued: pki.Issued, directory: Path, stem: str) -> None:
    path = directory / f"{stem.replace(' ', '_')}.pem"
    pki.write_private(path, issued.cert_pem + issued.key_pem)
    ctx.load_cert_chain(path)


def attacker_server_context(
    material: Material,
    case: str,
    *,
    require_client_cert_from: pki.Issued | None = None,
    max_tls12: bool = False,
) -> ssl.SSLContext:
    """The context of an impostor server presenting ``case``'s certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers(ANY_CIPHER)
    if case == "TLS 1.1":
        _tls11(ctx)
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if require_client_cert_from is not None:
        ctx.load_verify_locations(cadata=require_client_cert_from.cert_pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    issued = material.certs.get(case) or _named(material.ca)
    _load(ctx, issued, material.directory, f"srv-{case}")
    return ctx


def attacker_client_context(material: Material, case: str) -> ssl.SSLContext:
    """The context of a caller presenting ``case``'s certificate (or none). It trusts the
    gateway's CA: the caller is happy to talk, only the gateway must not be."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers(ANY_CIPHER)
    ctx.load_verify_locations(cadata=material.ca.cert_pem.decode())
    if case == "TLS 1.1":
        _tls11(ctx)
    if case != "no client certificate":
        issued = material.certs.get(case) or _named(material.ca)
        _load(ctx, issued, material.directory, f"cli-{case}")
    return ctx


class BioImpostor(Impostor):
    """An impostor that also counts completed handshakes and, unlike asyncio's own TLS,
    flushes its alert before closing, so the client learns why it was refused."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(ctx)
        self.handshakes = 0
        self.errors: list[str] = []

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._ctx.wrap_bio(incoming, outgoing, server_side=True)

        async def pump() -> bool:
            """Send what TLS wrote, then feed it what the client sent; False on EOF."""
            if pending := outgoing.read():
                writer.write(pending)
                await writer.drain()
            data = await reader.read(65536)
            if not data:
                return False
            incoming.write(data)
            return True

        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if not await pump():
                        return
            self.handshakes += 1
            while True:
                try:
                    self.received += tls.read(65536)
                except ssl.SSLWantReadError:
                    if not await pump():
                        return
        except ssl.SSLZeroReturnError:
            pass  # the client closed TLS cleanly
        except ssl.SSLError as exc:
            self.errors.append(str(exc.reason))
        except ConnectionError:
            pass  # the client gave up: expected
        finally:
            # The alert (if any) is still in the BIO: send it, then close.
            with contextlib.suppress(ConnectionError):
                if pending := outgoing.read():
                    writer.write(pending)
                    await writer.drain()
            writer.close()


@dataclass(slots=True)
class Exchange:
    """What a caller got back: every byte after the handshake, and the error, if any."""

    received: bytes = b""
    error: str | None = None
    handshake_done: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        if not self.received.startswith(b"HTTP/1.1 "):
            return None
        return int(self.received[9:12])

    @property
    def body(self) -> object:
        _, _, body = self.received.partition(b"\r\n\r\n")
        return json.loads(body) if body else None


DOWNLINK = {
    "oriAddr": {"addrType": "AS", "addr": "as-1"},
    "destAddr": {"addrType": "UE", "addr": DEMO_SERVICE_ID},
    "msgId": "matrix-1",
    "payload": "would reveal a Service ID",
}
UPLINK = {
    "oriAddr": {"addrType": "UE", "addr": DEMO_SERVICE_ID},
    "destAddr": {"addrType": "AS", "addr": "as-1"},
    "msgId": "matrix-1",
    "stoAndFwInd": False,
    "payload": "would reveal a Service ID",
}


async def post(
    port: int, ctx: ssl.SSLContext, path: str, message: dict[str, object] = DOWNLINK
) -> Exchange:
    """POST ``message`` (which names a Service ID) over raw TLS and read until the peer
    closes: shows exactly what the caller sees, alert or HTTP answer, with nothing hidden
    by a client library. The request says ``Connection: close`` so EOF ends the answer."""
    out = Exchange()
    body = json.dumps(message).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        out.handshake_done = True  # TLS 1.3: done on our side, maybe not on theirs
        writer.write(request)
        await writer.drain()
        out.received = await asyncio.wait_for(reader.read(), timeout=10)
    except (OSError, asyncio.IncompleteReadError) as exc:  # ssl.SSLError is an OSError
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return out
