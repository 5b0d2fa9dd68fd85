"""A throw-away PKI for demos and tests: a CA, then server, gateway and device certificates.

Not an operator's CA: keys are generated here and written with mode 0600. The profile
follows TS 33.310 6.1.3c in spirit: the identity is in the subjectAltName (a URI for the
instance, DNS names for reachability); the subject CN is informational only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEMO_SERVER_ID = "urn:gatewayd:msgin5g-server:demo"
DEMO_GATEWAY_ID = "urn:gatewayd:gateway:demo-n3g"
DEMO_DEVICE_ID = "urn:gatewayd:device:sensor-1"


@dataclass(frozen=True, slots=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_key(kind: str = "ec", bits: int = 2048) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    name: str = "gatewayd demo CA", *, key: PrivateKey | None = None, issuer: Issued | None = None
) -> Issued:
    """A root CA, or with ``issuer`` an intermediate CA signed by it."""
    key = key or new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = True,
    client: bool = True,
    key: PrivateKey | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 365,
) -> Issued:
    """Issue an end-entity certificate; tests pass odd validity or weak keys on purpose."""
    key = key or new_key()
    now = dt.datetime.now(dt.UTC)
    not_before = not_before or now - dt.timedelta(minutes=5)
    not_after = not_after or now + dt.timedelta(days=days)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def load_ca(cert_path: Path, key_path: Path) -> Issued:
    """A CA written by :func:`init`, to issue more certificates (tests, rotation)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"{key_path}: not an EC or RSA key")
    return Issued(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)


def create_crl(ca: Issued, revoked: tuple[x509.Certificate, ...] = ()) -> bytes:
    """A CRL (PEM) from ``ca`` listing ``revoked``; an empty one is valid too."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=7))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - dt.timedelta(minutes=1))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def write_pair(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(issued.cert_pem)
    write_private(key_path, issued.key_pem)
    return cert_path, key_path


def init(
    directory: Path,
    *,
    server_name: str = "localhost",
    server_id: str = DEMO_SERVER_ID,
    gateway_name: str = "localhost",
    gateway_id: str = DEMO_GATEWAY_ID,
    device_id: str = DEMO_DEVICE_ID,
    device_names: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Create ``ca``, ``server``, ``server_client``, ``gateway`` and ``device``
    certificates in ``directory`` (``server_client`` as ``server-client.pem``/``.key``).

    Each certificate is fit for its role only (docs/security.md, "pki init"), so that
    one party's certificate cannot stand in for another's:

    - server: its URN and host name; serverAuth only, for its API: a gateway refuses it
      as a caller in the handshake.
    - server_client: the same URN, nothing else; clientAuth only. The server is the
      client of every gateway's MSGG API, and presents this one there. Only the server's
      two certificates carry its URN.
    - gateway: its URN; clientAuth, plus serverAuth for its MSGG API under its own name.
    - device: its URN; clientAuth only and no host name or address, so it cannot serve
      TLS at all, unless ``device_names`` asks for a webhook server identity.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = create_ca()
    out: dict[str, Path] = {}
    out["ca"], out["ca_key"] = write_pair(directory, "ca", ca)
    issued = {
        "server": issue(
            ca,
            "msgin5g-server",
            dns=(server_name,),
            uris=(server_id,),
            ips=_loopback(server_name),
            client=False,
        ),
        # Its calls to gateways: the URN is all a gateway checks (api.allowed_peers), and a
        # client needs no host name, so the certificate carries none.
        "server_client": issue(ca, "msgin5g-server", uris=(server_id,), server=False),
        "gateway": issue(
            ca,
            "gatewayd",
            dns=(gateway_name,),
            uris=(gateway_id,),
            ips=_loopback(gateway_name),
        ),
        "device": issue(
            ca,
            "device",
            dns=device_names,
            uris=(device_id,),
            ips=tuple(ip for name in device_names for ip in _loopback(name)),
            server=bool(device_names),
        ),
    }
    for name, item in issued.items():
        out[name], out[f"{name}_key"] = write_pair(directory, name.replace("_", "-"), item)
    out["crl"] = directory / "ca.crl.pem"
    out["crl"].write_bytes(create_crl(ca))
    return out


def _loopback(name: str) -> tuple[str, ...]:
    # "localhost" is reached as 127.0.0.1 or ::1 too; the addresses go to that party only.
    return ("127.0.0.1", "::1") if name == "localhost" else ()
