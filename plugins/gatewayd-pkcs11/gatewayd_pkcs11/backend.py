"""The ``pkcs11`` credential backend: a signing key that never leaves an HSM.

PKCS#11 calls block, so every one of them runs in a worker thread, and one session is
never used by two threads at once (a lock per backend). Library errors are translated
here into :class:`CredentialError` that name the token and key but never the PIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pkcs11
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    MultipleObjectsReturned,
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinLenRange,
    PKCS11Error,
    UserAlreadyLoggedIn,
)
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from gatewayd.api import (
    CredentialBackend,
    CredentialError,
    PluginContext,
    PluginSettings,
    SecretRef,
    Signer,
)

DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
_KEY_TYPES: Final = {"ES256": KeyType.EC, "RS256": KeyType.RSA}


def _library(module: str) -> Any:
    # A PKCS#11 module is initialised once per process (C_Initialize); pkcs11.lib keeps
    # one handle per path, shared by every backend that names the same module.
    try:
        return pkcs11.lib(module)
    except (PKCS11Error, OSError) as exc:
        raise CredentialError(f"cannot load the PKCS#11 module {module}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Pkcs11Settings:
    module: Path
    token_label: str
    key_label: str
    pin: SecretRef = field(repr=False)
    algorithm: str
    key_id: str | None


@dataclass(slots=True)
class _Handle:
    """An open, logged-in session and the key objects found in it."""

    session: Any  # pkcs11.Session: its stubs are partial, the calls are checked here
    private_key: Any
    public_key_pem: bytes


class Pkcs11Signer:
    """The :class:`~gatewayd.api.Signer` of a :class:`Pkcs11Backend`.

    It follows the backend: after a reload it signs with the re-opened session.
    """

    def __init__(self, backend: Pkcs11Backend) -> None:
        self._backend = backend

    @property
    def algorithm(self) -> str:
        return self._backend.config.algorithm

    @property
    def key_id(self) -> str | None:
        return self._backend.config.key_id

    @property
    def public_key_pem(self) -> bytes:
        return self._backend.public_key_pem

    async def sign(self, data: bytes) -> bytes:
        return await asyncio.to_thread(self._backend.sign_blocking, data)


class Pkcs11Backend(CredentialBackend):
    """A signing key in a PKCS#11 token (``plugin = "pkcs11"``), e.g. SoftHSM2 or an HSM."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        options = settings.options
        pin = options.secret("pin")
        assert pin is not None  # required=True raises instead of returning None
        self.config = Pkcs11Settings(
            module=options.get_path("module", Path(DEFAULT_MODULE), base=settings.base_dir),
            token_label=options.get_str("token_label"),
            key_label=options.get_str("key_label"),
            pin=pin,
            algorithm=options.get_choice("algorithm", tuple(_KEY_TYPES), "ES256"),
            key_id=options.get_str("key_id", None),
        )
        options.check_unknown()
        self._lock = threading.Lock()  # one thread at a time in the session
        self._handle: _Handle | None = None
        self._signer = Pkcs11Signer(self)

    async def load(self) -> None:
        """Open (or re-check) the session and find the key pair by label."""
        pin = self.config.pin.read_text()  # read here, so a rotated PIN file applies
        await asyncio.to_thread(self._load_blocking, pin)
        # The gateway logs credentials.loaded for every backend; this adds what only
        # this backend knows: which token and key it found.
        self.context.log.info(
            "pkcs11.key_found",
            credentials=self.settings.name,
            token=self.config.token_label,
            key=self.config.key_label,
            algorithm=self.config.algorithm,
        )

    def signer(self) -> Signer | None:
        return self._signer

    @property
    def public_key_pem(self) -> bytes:
        """The public half (SubjectPublicKeyInfo PEM), for verifiers of our signatures."""
        if self._handle is None:
            raise CredentialError(f"credentials {self.settings.name!r} used before load()")
        return self._handle.public_key_pem

    def watched_paths(self) -> tuple[Path, ...]:
        return (Path(self.config.pin.where),) if self.config.pin.kind == "file" else ()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_blocking)

    # --- blocking parts, run in worker threads -----------------------------------------

    def _where(self) -> str:
        return f"PKCS#11 token {self.config.token_label!r}, key {self.config.key_label!r}"

    def _load_blocking(self, pin: str) -> None:
        with self._lock:
            if self._handle is not None:
                # Login state is per token and process: a second login would fail with
                # "already logged in", and closing the old session would log the new one
                # out. So keep a session that still finds its key; replace a dead one.
                try:
                    self._handle = self._find_keys(self._handle.session)
                except (CredentialError, PKCS11Error):
                    self._close_handle()
                else:
                    return
            self._handle = self._open(pin)

    def _open(self, pin: str) -> _Handle:
        lib = _library(str(self.config.module))
        try:
            token = lib.get_token(token_label=self.config.token_label)
        except NoSuchToken:
            raise CredentialError(
                f"no PKCS#11 token labelled {self.config.token_label!r} in {self.config.module}"
            ) from None
        except MultipleObjectsReturned:
            raise CredentialError(
                f"several PKCS#11 tokens are labelled {self.config.token_label!r}"
            ) from None
        try:
            session = token.open(user_pin=pin)
        except (PinIncorrect, PinLenRange):
            # Never echo the PIN, not even its length.
            raise CredentialError(
                f"{self._where()}: the PIN was refused (see {self.settings.options.key('pin')})"
            ) from None
        except UserAlreadyLoggedIn:
            raise CredentialError(
                f"{self._where()}: another session of this process is logged in to the token"
            ) from None
        except PKCS11Error as exc:
            raise CredentialError(f"{self._where()}: cannot log in: {type(exc).__name__}") from None
        try:
            return self._find_keys(session)
        except BaseException:
            session.close()
            raise

    def _find_keys(self, session: Any) -> _Handle:
        key_type = _KEY_TYPES[self.config.algorithm]
        found = []
        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            try:
                found.append(
                    session.get_key(
                        object_class=object_class, key_type=key_type, label=self.config.key_label
                    )
                )
            except NoSuchKey:
                kind = "private" if object_class == ObjectClass.PRIVATE_KEY else "public"
                raise CredentialError(
                    f"{self._where()}: no {kind} {key_type.name} key with this label "
                    f"(algorithm {self.config.algorithm})"
                ) from None
            except MultipleObjectsReturned:
                raise CredentialError(f"{self._where()}: the label is not unique") from None
        private, public = found
        if key_type == KeyType.EC:
            der = encode_ec_public_key(public)
            if public[Attribute.EC_PARAMS] != _P256_PARAMS:
                raise CredentialError(f"{self._where()}: ES256 needs a P-256 key")
        else:
            der = encode_rsa_public_key(public)
        pem = serialization.load_der_public_key(der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _Handle(session=session, private_key=private, public_key_pem=pem)

    def sign_blocking(self, data: bytes) -> bytes:
        """Sign in JWS form. Blocking: call through :class:`Pkcs11Signer` / a thread."""
        with self._lock:
            if self._handle is None:
                raise CredentialError(f"credentials {self.settings.name!r} used before load()")
            key = self._handle.private_key
            try:
                if self.config.algorithm == "ES256":
                    # SoftHSM lacks CKM_ECDSA_SHA256: hash here, sign the digest. The
                    # result is raw r||s, which is exactly JWS's ES256 form.
                    digest = hashlib.sha256(data).digest()
                    return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
                return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
            except PKCS11Error as exc:
                raise CredentialError(
                    f"{self._where()}: signing failed: {type(exc).__name__}"
                ) from None

    def _close_blocking(self) -> None:
        with self._lock:
            self._close_handle()

    def _close_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            # A session may already be gone (token removed, module reset): nothing to do.
            with contextlib.suppress(PKCS11Error):
                handle.session.close()


# DER of the named curve OID for P-256 (secp256r1 / prime256v1), as CKA_EC_PARAMS holds it.
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
