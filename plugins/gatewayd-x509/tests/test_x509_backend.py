"""The x509 and systemd backends against real files from a throw-away PKI."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from gatewayd_x509.backend import SystemdBackend, X509Backend
from structlog.testing import capture_logs

from gatewayd import pki
from gatewayd.api import ConfigError, CredentialError
from gatewayd.plugins import Plugins
from gatewayd.security import tls

NOW = dt.datetime.now(dt.UTC)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _pem_files(tmp: Path, ca: pki.Issued, issued: pki.Issued, stem: str = "gw") -> dict[str, str]:
    cert, key = pki.write_pair(tmp, stem, issued)
    ca_path = _write(tmp, "ca.pem", ca.cert_pem)
    return {"cert": str(cert), "key": str(key), "ca": str(ca_path)}


def test_plugin_registers_both_backends() -> None:
    plugins = Plugins(autoload=True)
    assert plugins.credential_backends.get("x509") is X509Backend
    assert plugins.credential_backends.get("systemd") is SystemdBackend


async def test_plain_pem(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    leaf = pki.issue(ca, "gw", dns=("localhost",))
    _pem_files(tmp_path, ca, leaf)
    # Relative names resolve against the config file's folder.
    backend = make(X509Backend, {"cert": "gw.pem", "key": "gw.key", "ca": "ca.pem"})
    await backend.load()
    identity = backend.tls_identity()
    assert identity is not None
    assert identity.cert_chain_pem == leaf.cert_pem
    assert identity.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE" not in repr(identity)
    trust = backend.trust_anchors()
    assert trust is not None
    assert trust.ca_pem == ca.cert_pem
    assert trust.crl_pem == ()
    assert backend.not_after == leaf.cert.not_valid_after_utc
    assert set(backend.watched_paths()) == {
        tmp_path / "gw.pem",
        tmp_path / "gw.key",
        tmp_path / "ca.pem",
    }


@pytest.mark.parametrize("case", ["pkcs8/env", "pkcs8/file", "traditional/env", "traditional/file"])
async def test_encrypted_key_with_passphrase(
    tmp_path: Path, ca: pki.Issued, make: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    fmt, via = case.split("/")
    leaf = pki.issue(ca, "gw")
    private_format = (
        serialization.PrivateFormat.PKCS8
        if fmt == "pkcs8"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        private_format,
        serialization.BestAvailableEncryption(b"s3cret-phrase"),
    )
    assert b"ENCRYPTED" in encrypted
    _write(tmp_path, "gw.pem", leaf.cert_pem)
    _write(tmp_path, "gw.key", encrypted)
    if via == "env":
        monkeypatch.setenv("GW_KEY_PASS", "s3cret-phrase")
        ref = {"env": "GW_KEY_PASS"}
    else:
        _write(tmp_path, "pass.txt", b"s3cret-phrase\n")  # trailing newline, as editors leave
        ref = {"file": str(tmp_path / "pass.txt")}
    backend = make(X509Backend, {"cert": "gw.pem", "key": "gw.key", "key_passphrase": ref})
    with capture_logs() as logs:
        await backend.load()
    identity = backend.tls_identity()
    assert identity is not None
    # Re-serialised unencrypted, in memory only: the file on disk stays encrypted.
    assert identity.key_pem == leaf.key_pem
    assert "s3cret-phrase" not in repr(logs)
    assert backend.trust_anchors() is None


async def test_encrypted_key_wrong_or_missing_passphrase(
    tmp_path: Path, ca: pki.Issued, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaf = pki.issue(ca, "gw")
    _write(tmp_path, "gw.pem", leaf.cert_pem)
    _write(
        tmp_path,
        "gw.key",
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"right"),
        ),
    )
    monkeypatch.setenv("GW_KEY_PASS", "wrong-one")
    wrong = make(
        X509Backend, {"cert": "gw.pem", "key": "gw.key", "key_passphrase": {"env": "GW_KEY_PASS"}}
    )
    with pytest.raises(CredentialError, match="wrong passphrase") as info:
        await wrong.load()
    assert "wrong-one" not in str(info.value)
    missing = make(X509Backend, {"cert": "gw.pem", "key": "gw.key"}, name="other")
    with pytest.raises(CredentialError, match="encrypted; set key_passphrase"):
        await missing.load()


async def test_pkcs12_with_passphrase(
    tmp_path: Path, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = pki.create_ca("root")
    # An intermediate CA, so the bag holds a chain whose order must be rebuilt.
    inter = _sign_as_intermediate(root, pki.new_key())
    leaf = pki.issue(inter, "gw-p12", uris=(pki.DEMO_GATEWAY_ID,))
    bundle = pkcs12.serialize_key_and_certificates(
        b"gw",
        leaf.key,
        leaf.cert,
        [root.cert, inter.cert],  # deliberately root first
        serialization.BestAvailableEncryption(b"p12-pass"),
    )
    _write(tmp_path, "gw.p12", bundle)
    monkeypatch.setenv("P12_PASS", "p12-pass")
    backend = make(X509Backend, {"pkcs12": "gw.p12", "pkcs12_passphrase": {"env": "P12_PASS"}})
    await backend.load()
    identity = backend.tls_identity()
    assert identity is not None
    assert identity.cert_chain_pem == leaf.cert_pem + inter.cert_pem + root.cert_pem
    assert identity.key_pem == leaf.key_pem
    monkeypatch.setenv("P12_PASS", "nope")
    with pytest.raises(CredentialError, match="wrong pkcs12_passphrase"):
        await backend.load()
    # A failed reload keeps the previous material in service.
    assert backend.tls_identity() == identity


def _sign_as_intermediate(root: pki.Issued, key: Any) -> pki.Issued:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return pki.Issued(cert, key)


async def test_chain_out_of_order(tmp_path: Path, make: Any) -> None:
    root = pki.create_ca("root")
    inter = _sign_as_intermediate(root, pki.new_key())
    leaf = pki.issue(inter, "gw")
    _write(tmp_path, "gw.pem", inter.cert_pem + leaf.cert_pem)
    pki.write_private(tmp_path / "gw.key", leaf.key_pem)
    backend = make(X509Backend, {"cert": "gw.pem", "key": "gw.key"})
    with pytest.raises(CredentialError, match="leaf first"):
        await backend.load()
    _write(tmp_path, "gw.pem", leaf.cert_pem + inter.cert_pem)
    await backend.load()
    assert backend.tls_identity() is not None


async def test_mismatched_key(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    leaf = pki.issue(ca, "gw")
    _write(tmp_path, "gw.pem", leaf.cert_pem)
    pki.write_private(tmp_path / "other.key", pki.issue(ca, "other").key_pem)
    backend = make(X509Backend, {"cert": "gw.pem", "key": "other.key"})
    with pytest.raises(CredentialError, match="does not match the certificate gw") as info:
        await backend.load()
    assert "other.key" in str(info.value)


async def test_expired_certificate(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    end = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    leaf = pki.issue(ca, "old-gw", not_before=end - dt.timedelta(days=90), not_after=end)
    pki.write_pair(tmp_path, "gw", leaf)
    backend = make(X509Backend, {"cert": "gw.pem", "key": "gw.key"})
    with pytest.raises(CredentialError) as info:
        await backend.load()
    message = str(info.value)
    assert "gw.pem" in message
    assert "old-gw expired on 2024-03-01 12:00:00 UTC" in message


async def test_not_yet_valid_certificate(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    start = NOW + dt.timedelta(days=2)
    leaf = pki.issue(ca, "future", not_before=start, not_after=start + dt.timedelta(days=9))
    pki.write_pair(tmp_path, "gw", leaf)
    backend = make(X509Backend, {"cert": "gw.pem", "key": "gw.key"})
    with pytest.raises(CredentialError, match=f"not valid before {start:%Y-%m-%d}"):
        await backend.load()


def test_inline_passphrase_refused(make: Any) -> None:
    with pytest.raises(ConfigError, match=r"credentials\.north\.key_passphrase: inline secrets"):
        make(X509Backend, {"cert": "a", "key": "b", "key_passphrase": "hunter2"})


def test_unknown_option_refused(make: Any) -> None:
    with pytest.raises(ConfigError, match=r"credentials\.north\.certt: unknown key"):
        make(X509Backend, {"certt": "a.pem", "ca": "ca.pem"})


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"cert": "a"}, "cert"),
        ({"key": "a"}, "key"),
        ({"pkcs12": "a", "cert": "b", "key": "c"}, "pkcs12"),
        ({"crl": ["x"]}, "crl"),
        ({}, "cert"),
    ],
)
def test_inconsistent_options(make: Any, options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(X509Backend, options)
    assert info.value.key == f"credentials.north.{key}"


async def test_trust_only_with_crl(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    _write(tmp_path, "ca.pem", ca.cert_pem)
    _write(tmp_path, "ca.crl", pki.create_crl(ca))
    backend = make(X509Backend, {"ca": "ca.pem", "crl": ["ca.crl"]})
    await backend.load()
    assert backend.tls_identity() is None
    assert backend.not_after is None
    trust = backend.trust_anchors()
    assert trust is not None
    assert trust.crl_pem == ((tmp_path / "ca.crl").read_bytes(),)
    # A CA without its CRL would make every handshake fail: refused at load instead.
    other = pki.create_ca("other CA")
    _write(tmp_path, "ca.pem", ca.cert_pem + other.cert_pem)
    with pytest.raises(CredentialError, match="no CRL was given for other CA"):
        await backend.load()


async def test_mutual_tls_handshake(tmp_path: Path, ca: pki.Issued, make: Any) -> None:
    server_dir, client_dir = tmp_path / "s", tmp_path / "c"
    server_dir.mkdir()
    client_dir.mkdir()
    server = pki.issue(ca, "server", dns=("localhost",), uris=(pki.DEMO_SERVER_ID,))
    client = pki.issue(ca, "gateway", uris=(pki.DEMO_GATEWAY_ID,))
    _write(tmp_path, "ca.crl", pki.create_crl(ca))
    s_files = _pem_files(server_dir, ca, server, "server")
    s_backend = make(X509Backend, {**s_files, "crl": [str(tmp_path / "ca.crl")]}, name="srv")
    c_files = _pem_files(client_dir, ca, client, "client")
    c_backend = make(X509Backend, c_files, name="cli")
    await s_backend.load()
    await c_backend.load()
    s_identity, c_identity = s_backend.tls_identity(), c_backend.tls_identity()
    s_trust, c_trust = s_backend.trust_anchors(), c_backend.trust_anchors()
    assert s_identity is not None
    assert c_identity is not None
    assert c_trust is not None
    server_ctx = tls.server_context(s_identity, s_trust)
    client_ctx = tls.client_context(c_trust, c_identity)

    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = tls.peer_identity(writer.get_extra_info("ssl_object"))
        seen.append(peer.primary if peer else "")
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        server_seen = tls.peer_identity(writer.get_extra_info("ssl_object"))
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        await writer.wait_closed()
    finally:
        srv.close()
        await srv.wait_closed()
    assert seen == [pki.DEMO_GATEWAY_ID]
    assert server_seen is not None
    assert server_seen.primary == pki.DEMO_SERVER_ID


async def test_systemd_credentials(
    tmp_path: Path, ca: pki.Issued, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    leaf = pki.issue(ca, "gw")
    _write(creds, "gw-cert", leaf.cert_pem)
    _write(creds, "gw-key", leaf.key_pem)
    _write(creds, "gw-ca", ca.cert_pem)
    options = {"cert": "gw-cert", "key": "gw-key", "ca": "gw-ca"}
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    backend = make(SystemdBackend, options)
    assert backend.watched_paths() == ()
    with pytest.raises(CredentialError, match=r"'gw-cert'.*CREDENTIALS_DIRECTORY is not set"):
        await backend.load()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    await backend.load()
    identity = backend.tls_identity()
    assert identity is not None
    assert identity.cert_chain_pem == leaf.cert_pem
    assert backend.watched_paths() == (creds / "gw-cert", creds / "gw-key", creds / "gw-ca")
    (creds / "gw-ca").unlink()
    with pytest.raises(CredentialError, match=r"'gw-ca' \(credentials\.north\.ca\): not found in"):
        await backend.load()


def test_systemd_refuses_paths(make: Any) -> None:
    with pytest.raises(ConfigError, match="expected a credential name"):
        make(SystemdBackend, {"ca": "/etc/ssl/ca.pem"})
