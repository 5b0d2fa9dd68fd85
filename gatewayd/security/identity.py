"""What our own certificate says: identities and validity, checked before we start."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from gatewayd.errors import CredentialError
from gatewayd.security.tls import PeerIdentity

# The TLS profile's floor (OpenSSL security level 2: 112-bit security). Checked here
# too, so that a weak own key is refused at start with a sentence, not an OpenSSL code.
MIN_RSA_BITS = 2048
MIN_EC_BITS = 224


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    identity: PeerIdentity
    subject: str
    not_before: datetime
    not_after: datetime
    key_weakness: str | None = None  # why the key is below the profile, if it is

    def days_left(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (self.not_after - now).total_seconds() / 86400


def leaf_facts(chain_pem: bytes) -> CertificateFacts:
    try:
        cert = x509.load_pem_x509_certificates(chain_pem)[0]
    except (ValueError, IndexError) as exc:
        raise CredentialError(f"not a PEM certificate chain: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = (), ()
    return CertificateFacts(
        identity=PeerIdentity(uris=uris, dns_names=dns),
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_weakness=key_weakness(cert),
    )


def key_weakness(cert: x509.Certificate) -> str | None:
    """Why ``cert``'s public key is too weak for the TLS profile, or ``None``."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"its RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        return f"its EC key has {key.curve.key_size} bits; at least {MIN_EC_BITS} are required"
    if isinstance(key, dsa.DSAPublicKey):
        return "it has a DSA key, which TLS 1.3 and the 3GPP profile do not allow"
    return None


def check_own_certificate(chain_pem: bytes, *, expected_id: str, what: str) -> CertificateFacts:
    """Refuse to start with an identity that is expired, not yet valid, too weak (RSA
    under 2048 bits), or not ours: each would only fail later, at the peer, less clearly."""
    facts = leaf_facts(chain_pem)
    now = datetime.now(UTC)
    if facts.not_after <= now:
        raise CredentialError(
            f"{what}: the certificate {facts.subject} expired on {facts.not_after.isoformat()}"
        )
    if facts.not_before > now:
        raise CredentialError(
            f"{what}: the certificate {facts.subject} is not valid before "
            f"{facts.not_before.isoformat()}"
        )
    if facts.key_weakness is not None:
        raise CredentialError(
            f"{what}: the certificate {facts.subject} is too weak for the TLS profile: "
            f"{facts.key_weakness}"
        )
    if not facts.identity.matches(expected_id):
        raise CredentialError(
            f"{what}: gateway.id {expected_id!r} is not among the certificate's subjectAltNames "
            f"({', '.join(facts.identity.uris + facts.identity.dns_names) or 'none'})"
        )
    return facts
