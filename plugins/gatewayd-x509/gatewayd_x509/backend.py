"""The ``x509`` and ``systemd`` credential backends.

Both read the same options and the same material; they differ only in where a file
name points: ``x509`` takes paths (relative ones against the config file's folder),
``systemd`` takes credential names inside ``$CREDENTIALS_DIRECTORY``, as set up by
``LoadCredential=`` / ``LoadCredentialEncrypted=`` in the unit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gatewayd.api import (
    ConfigError,
    CredentialBackend,
    CredentialError,
    Options,
    PluginContext,
    PluginSettings,
    SecretRef,
    TlsIdentity,
    TrustAnchors,
)
from gatewayd_x509.material import Material, Sources, load_material

_FILE_KEYS = ("cert", "key", "pkcs12", "ca")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileOptions:
    """The options both backends share, as written in the config (names not yet resolved)."""

    files: Mapping[str, str] = field(default_factory=dict)  # role -> name as configured
    crl: tuple[str, ...] = ()
    key_passphrase: SecretRef | None = None
    pkcs12_passphrase: SecretRef | None = None


def read_options(options: Options) -> FileOptions:
    """Read and cross-check the shared options; unknown keys are refused."""
    files = {role: value for role in _FILE_KEYS if (value := options.get_str(role, None))}
    crl = options.get_str_list("crl", ())
    key_passphrase = options.secret("key_passphrase", required=False)
    pkcs12_passphrase = options.secret("pkcs12_passphrase", required=False)
    options.check_unknown()
    if "pkcs12" in files and ("cert" in files or "key" in files):
        raise options.error("pkcs12", "give either pkcs12 or cert + key, not both")
    for one, other in (("cert", "key"), ("key", "cert")):
        if one in files and other not in files:
            raise options.error(one, f"needs {other} as well")
    if key_passphrase is not None and "key" not in files:
        raise options.error("key_passphrase", "is only valid together with key")
    if pkcs12_passphrase is not None and "pkcs12" not in files:
        raise options.error("pkcs12_passphrase", "is only valid together with pkcs12")
    if crl and "ca" not in files:
        raise options.error("crl", "needs ca: a CRL revokes certificates of a trusted CA")
    if not files:
        raise options.error("cert", "nothing to load: give cert + key, pkcs12, and/or ca")
    return FileOptions(
        files=files,
        crl=crl,
        key_passphrase=key_passphrase,
        pkcs12_passphrase=pkcs12_passphrase,
    )


def _secret(ref: SecretRef | None) -> bytes | None:
    return ref.read_text().encode() if ref is not None else None


class FileCredentialBackend(CredentialBackend):
    """Identity and/or trust from files; the subclasses say where a file name points."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        self._options = read_options(settings.options)
        self._material: Material | None = None

    @abstractmethod
    def _resolve(self, role: str, name: str) -> Path:
        """The file a configured ``name`` for option ``role`` refers to."""

    def _sources(self) -> Sources:
        opts = self._options
        paths = {role: self._resolve(role, name) for role, name in opts.files.items()}
        return Sources(
            cert=paths.get("cert"),
            key=paths.get("key"),
            key_passphrase=_secret(opts.key_passphrase),
            pkcs12=paths.get("pkcs12"),
            pkcs12_passphrase=_secret(opts.pkcs12_passphrase),
            ca=paths.get("ca"),
            crl=tuple(self._resolve("crl", name) for name in opts.crl),
        )

    async def load(self) -> None:
        """Read everything afresh; on failure the previous material stays in use.

        The gateway logs ``credentials.loaded`` and ``credentials.expiring`` for every
        backend alike, so this one does not.
        """
        sources = self._sources()
        try:
            # Key decryption and PKCS#12 KDFs take real CPU time: keep them off the loop.
            self._material = await asyncio.to_thread(load_material, sources)
        except CredentialError as exc:
            raise CredentialError(self._naming_key(str(exc))) from None

    def _naming_key(self, message: str) -> str:
        """Prefix a file's error with the option that named the file, so the operator
        sees which line of the config to look at as well as which file."""
        opts = self._options
        named = [*opts.files.items(), *(("crl", name) for name in opts.crl)]
        for role, name in named:
            if message.startswith(f"{self._resolve(role, name)}:"):
                return f"{self.settings.options.key(role)}: {message}"
        return message

    def _loaded(self) -> Material:
        if self._material is None:
            raise CredentialError(f"credentials {self.settings.name!r} used before load()")
        return self._material

    def tls_identity(self) -> TlsIdentity | None:
        return self._loaded().identity

    def trust_anchors(self) -> TrustAnchors | None:
        return self._loaded().trust

    @property
    def not_after(self) -> dt.datetime | None:
        """When our certificate expires (UTC), for metrics; ``None`` without an identity."""
        return self._material.not_after if self._material is not None else None

    def watched_paths(self) -> tuple[Path, ...]:
        try:
            return self._sources_paths()
        except (CredentialError, ConfigError):
            return ()

    def _sources_paths(self) -> tuple[Path, ...]:
        opts = self._options
        found = [self._resolve(role, name) for role, name in opts.files.items()]
        found += [self._resolve("crl", name) for name in opts.crl]
        return tuple(found)


class X509Backend(FileCredentialBackend):
    """X.509 identity and trust from PEM or PKCS#12 files (``plugin = "x509"``)."""

    def _resolve(self, role: str, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.settings.base_dir / path


class SystemdBackend(FileCredentialBackend):
    """The same material, from systemd credentials (``plugin = "systemd"``).

    Each file option names a credential: ``cert = "gateway.pem"`` with
    ``LoadCredential=gateway.pem:/etc/gatewayd/pki/gateway.pem`` in the unit. systemd
    places them in a private, non-swappable directory that only this service can read.
    """

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        options = settings.options
        for role, name in (*self._options.files.items(), *(("crl", n) for n in self._options.crl)):
            if "/" in name or name in (".", ".."):
                raise options.error(role, f"expected a credential name, got the path {name!r}")

    def _resolve(self, role: str, name: str) -> Path:
        key = self.settings.options.key(role)
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise CredentialError(
                f"systemd credential {name!r} ({key}): CREDENTIALS_DIRECTORY is not set; "
                f"add LoadCredential={name}:/path/to/file to the unit"
            )
        path = Path(directory) / name
        if not path.is_file():
            raise CredentialError(
                f"systemd credential {name!r} ({key}): not found in {directory}; "
                f"check LoadCredential={name}:... in the unit"
            )
        return path
