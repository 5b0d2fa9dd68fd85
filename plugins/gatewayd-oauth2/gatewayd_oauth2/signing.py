"""JWS signing through a :class:`~gatewayd.api.Signer`, and a Signer for a local key file.

The assertion is assembled by hand rather than with ``jwt.encode`` because the key may
live in an HSM: only the signing input leaves this process's control, through
``Signer.sign``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gatewayd.api import CredentialError, Signer


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


async def sign_jwt(signer: Signer, claims: dict[str, Any]) -> str:
    """A compact JWS of ``claims`` signed by ``signer`` (its algorithm and kid)."""
    header: dict[str, str] = {"alg": signer.algorithm, "typ": "JWT"}
    if signer.key_id:
        header["kid"] = signer.key_id
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = await signer.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"


class LocalKeySigner:
    """A :class:`~gatewayd.api.Signer` over a PEM private key file (EC P-256 or RSA)."""

    def __init__(
        self, path: Path, *, passphrase: bytes | None, algorithm: str, key_id: str | None
    ) -> None:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
        except OSError as exc:
            raise CredentialError(f"{path}: cannot read the signing key: {exc.strerror}") from None
        except (ValueError, TypeError):
            raise CredentialError(
                f"{path}: cannot load the signing key (wrong passphrase, or not a PEM key)"
            ) from None
        if algorithm == "ES256":
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise CredentialError(f"{path}: ES256 needs an EC P-256 key")
        elif not isinstance(key, rsa.RSAPrivateKey):
            raise CredentialError(f"{path}: RS256 needs an RSA key")
        self._key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = key
        self._algorithm = algorithm
        self._key_id = key_id

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def key_id(self) -> str | None:
        return self._key_id

    async def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            # cryptography returns DER; JWS ES256 wants the fixed-size r||s form.
            r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
