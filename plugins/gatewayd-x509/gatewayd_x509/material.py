"""Reading and checking X.509 material: PEM chains, PEM/PKCS#8 keys, PKCS#12, CAs, CRLs.

Everything here is synchronous and file-system bound; the backends run it off the event
loop. Every failure is a :class:`CredentialError` that names the file and says what to
fix; library messages are not passed on verbatim because some of them are vague and
none of them may ever carry a passphrase.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from gatewayd.api import CredentialError, TlsIdentity, TrustAnchors

_PrivateKey = PrivateKeyTypes


@dataclass(frozen=True, slots=True, kw_only=True)
class Sources:
    """Where one instance's material lives, already resolved to paths.

    ``key_passphrase`` / ``pkcs12_passphrase`` are the secret *values*, read just before
    loading and dropped with this object.
    """

    cert: Path | None = None
    key: Path | None = None
    key_passphrase: bytes | None = field(default=None, repr=False)
    pkcs12: Path | None = None
    pkcs12_passphrase: bytes | None = field(default=None, repr=False)
    ca: Path | None = None
    crl: tuple[Path, ...] = ()

    def paths(self) -> tuple[Path, ...]:
        found = (self.cert, self.key, self.pkcs12, self.ca, *self.crl)
        return tuple(p for p in found if p is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Material:
    """What one successful load produced. ``leaf`` is ``None`` for a trust-only instance."""

    identity: TlsIdentity | None
    trust: TrustAnchors | None
    leaf: x509.Certificate | None

    @property
    def not_after(self) -> dt.datetime | None:
        return self.leaf.not_valid_after_utc if self.leaf is not None else None

    @property
    def subject(self) -> str | None:
        return self.leaf.subject.rfc4514_string() if self.leaf is not None else None


def load_material(sources: Sources, *, now: dt.datetime | None = None) -> Material:
    """Read and cross-check everything ``sources`` names; raise on the first problem."""
    now = now or dt.datetime.now(dt.UTC)
    identity: TlsIdentity | None = None
    leaf: x509.Certificate | None = None
    if sources.pkcs12 is not None:
        chain, key = _read_pkcs12(sources.pkcs12, sources.pkcs12_passphrase)
        identity, leaf = _identity(chain, key, sources.pkcs12, now)
    elif sources.cert is not None and sources.key is not None:
        chain = _read_chain(sources.cert)
        _check_order(chain, sources.cert)
        key = _read_key(sources.key, sources.key_passphrase)
        identity, leaf = _identity(chain, key, sources.cert, now, key_path=sources.key)
    trust = _read_trust(sources.ca, sources.crl, now) if sources.ca is not None else None
    return Material(identity=identity, trust=trust, leaf=leaf)


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its CN, else the whole subject."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else cert.subject.rfc4514_string()
    return value if isinstance(value, str) else value.decode(errors="replace")


def _fmt(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _read_chain(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate chain")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialError(f"{path}: not a PEM certificate chain") from None
    return chain


def _check_order(chain: list[x509.Certificate], path: Path) -> None:
    # OpenSSL sends the chain as given; a peer that gets it out of order may refuse it,
    # so refuse it here, where the operator can see which file is wrong.
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialError(
                f"{path}: certificate #{i + 2} ({describe(parent)}) did not issue certificate "
                f"#{i + 1} ({describe(child)}); the chain must be leaf first, then each issuer"
            ) from None


def _read_key(path: Path, passphrase: bytes | None) -> _PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        # cryptography raises TypeError for a passphrase mismatch in either direction.
        if passphrase is None:
            raise CredentialError(
                f"{path}: the private key is encrypted; set key_passphrase"
            ) from None
        raise CredentialError(
            f"{path}: key_passphrase is set but the private key is not encrypted"
        ) from None
    except ValueError:
        raise CredentialError(
            f"{path}: cannot load the private key (wrong passphrase, or not a PEM key)"
        ) from None
    except Exception:  # unsupported algorithms surface as assorted error types
        raise CredentialError(f"{path}: unsupported private key") from None
    return key


def _read_pkcs12(
    path: Path, passphrase: bytes | None
) -> tuple[list[x509.Certificate], _PrivateKey]:
    data = _read(path, "PKCS#12 file")
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, passphrase)
    except (ValueError, TypeError):
        raise CredentialError(
            f"{path}: cannot open the PKCS#12 file (wrong pkcs12_passphrase, or not PKCS#12)"
        ) from None
    if key is None or cert is None:
        raise CredentialError(f"{path}: the PKCS#12 file must hold a certificate and its key")
    return _order_chain(cert, list(extra)), key


def _order_chain(leaf: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate]:
    """PKCS#12 bags carry no order: rebuild leaf -> issuer -> ... from the pool."""
    chain = [leaf]
    while pool:
        current = chain[-1]
        if current.issuer == current.subject:
            break  # self-signed root reached; a root is not sent anyway, but harmless
        parent = next((c for c in pool if _issued(current, c)), None)
        if parent is None:
            break
        chain.append(parent)
        pool.remove(parent)
    return chain


def _issued(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_der(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _identity(
    chain: list[x509.Certificate],
    key: _PrivateKey,
    path: Path,
    now: dt.datetime,
    *,
    key_path: Path | None = None,
) -> tuple[TlsIdentity, x509.Certificate]:
    if not chain:
        raise CredentialError(f"{path}: no certificate found")
    leaf = chain[0]
    if _public_der(leaf) != _public_der(key):
        raise CredentialError(
            f"{key_path or path}: the private key does not match the certificate "
            f"{describe(leaf)} in {path}"
        )
    for cert in chain:
        _check_validity(cert, path, now)
    try:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    except (ValueError, TypeError):
        raise CredentialError(f"{key_path or path}: this key type cannot be used for TLS") from None
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return TlsIdentity(cert_chain_pem=chain_pem, key_pem=key_pem), leaf


def _check_validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    window = f"(valid from {_fmt(start)} until {_fmt(end)})"
    if now > end:
        raise CredentialError(
            f"{path}: certificate {describe(cert)} expired on {_fmt(end)} {window}"
        )
    if now < start:
        raise CredentialError(
            f"{path}: certificate {describe(cert)} is not valid before {_fmt(start)} {window}"
        )


def _read_trust(ca: Path, crls: tuple[Path, ...], now: dt.datetime) -> TrustAnchors:
    ca_pem = _read(ca, "trust anchors")
    try:
        anchors = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise CredentialError(f"{ca}: not a PEM bundle of CA certificates") from None
    usable = [c for c in anchors if c.not_valid_after_utc >= now]
    if not usable:
        raise CredentialError(f"{ca}: every CA certificate in the bundle has expired")
    crl_pems: list[bytes] = []
    covered: set[x509.Name] = set()
    for path in crls:
        data = _read(path, "CRL")
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError:
            raise CredentialError(f"{path}: not a PEM CRL") from None
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            # OpenSSL refuses every handshake against an expired CRL: say so here instead.
            raise CredentialError(
                f"{path}: the CRL of {crl.issuer.rfc4514_string()} expired on "
                f"{_fmt(next_update)}; fetch a fresh one"
            )
        covered.add(crl.issuer)
        crl_pems.append(data)
    if crl_pems:
        # With CRL checking on, OpenSSL needs a CRL for every CA it may meet.
        missing = [c for c in usable if c.subject not in covered]
        if missing:
            raise CredentialError(
                f"{ca}: CRL checking is on (crl is set) but no CRL was given for "
                f"{describe(missing[0])}; every trusted CA needs one (an empty CRL will do)"
            )
    return TrustAnchors(ca_pem=ca_pem, crl_pem=tuple(crl_pems))
