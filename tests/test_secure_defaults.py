"""Secure by default (issue 8): what a new user gets from `pki init` and the minimal config.

The negative matrix sets the options; these tests set as few as the config allows and
check that the defaults alone keep Service IDs from every unverified party.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from impostor import Impostor
from structlog.testing import capture_logs
from test_northbound_security import MESSAGE, _call_api

from gatewayd import config, pki
from gatewayd.api import TlsIdentity, client_context, server_context
from gatewayd.daemon import Gateway
from gatewayd.errors import ConfigError, ExitCode, PeerRefusedError
from gatewayd.plugins import Plugins

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")


def _gatewayd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAYD, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _pki_init(directory: Path) -> Pki:
    """`gatewayd pki init`, exactly as a new user runs it."""
    result = _gatewayd("pki", "init", str(directory))
    assert result.returncode == 0, result.stderr
    return Pki({p.split()[0]: Path(p.split()[1]) for p in result.stdout.splitlines()})


def _minimal_config(tls: Pki, api_root: str, state_dir: Path, *, server_identity: bool) -> str:
    """Only the keys without a default (plus one device), as a new user writes them."""
    identity = f'server_identity = "{pki.DEMO_SERVER_ID}"\n' if server_identity else ""
    return f"""
[gateway]
id = "{pki.DEMO_GATEWAY_ID}"
type = "N3G"
state_dir = "{state_dir}"

[northbound]
api_root = "{api_root}"
credentials = "northbound"
{identity}
[api]
listen = "127.0.0.1:0"

[credentials.northbound]
plugin = "x509"
cert = "{tls["gateway"]}"
key = "{tls["gateway_key"]}"
ca = "{tls["ca"]}"

{harness.http_transport_bearer()}
"""


def _ekus(path: Path) -> set[x509.ObjectIdentifier]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san]


def test_pki_init_issues_role_specific_certificates(tmp_path: Path) -> None:
    tls = _pki_init(tmp_path / "pki")
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    # A device is a TLS client only: no serverAuth, no host name, no loopback address.
    assert _ekus(tls["device"]) == {client_auth}
    assert _sans(tls["device"]) == [pki.DEMO_DEVICE_ID]
    # The server serves with one certificate and calls gateways with another; each is
    # fit for that role only, and only these two carry the server's identity.
    assert _sans(tls["server"])[:2] == ["localhost", pki.DEMO_SERVER_ID]
    assert _ekus(tls["server"]) == {server_auth}
    assert _sans(tls["server_client"]) == [pki.DEMO_SERVER_ID]  # its URN, no host or address
    assert _ekus(tls["server_client"]) == {client_auth}
    assert pki.DEMO_SERVER_ID not in _sans(tls["gateway"]) + _sans(tls["device"])
    assert _ekus(tls["gateway"]) == {server_auth, client_auth}
    assert pki.DEMO_GATEWAY_ID in _sans(tls["gateway"])


async def test_new_user_setup_keeps_service_ids_from_device_and_gateway_certificates(
    tmp_path: Path,
) -> None:
    """Done-when of issue 8: `pki init`, a minimal config; check-config says which key is
    missing (exit 78); then a device's or gateway's certificate served on the server's
    address gets 0 application bytes."""
    tls = _pki_init(tmp_path / "pki")
    path = tmp_path / "gatewayd.toml"
    path.write_text(
        _minimal_config(tls, "https://localhost:9", tmp_path / "state", server_identity=False)
    )
    result = _gatewayd("check-config", str(path))
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert f"{path}: northbound.server_identity: is required" in result.stderr

    path.write_text(
        _minimal_config(tls, "https://localhost:9", tmp_path / "state", server_identity=True)
    )
    result = _gatewayd("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"primary identity '{pki.DEMO_SERVER_ID}'" in result.stdout  # the check in force
    assert f"(api.allowed_peers): {pki.DEMO_SERVER_ID}" in result.stdout

    for stem in ("device", "gateway"):
        identity = TlsIdentity(
            cert_chain_pem=tls[stem].read_bytes(), key_pem=tls[f"{stem}_key"].read_bytes()
        )
        impostor = Impostor(server_context(identity, None, require_client_cert=False))
        async with impostor.running():
            text = _minimal_config(
                tls,
                f"https://localhost:{impostor.port}",
                tmp_path / f"state-{stem}",
                server_identity=True,
            )
            settings = harness.write_config(tmp_path / f"{stem}.toml", text)
            with pytest.raises(PeerRefusedError):
                await asyncio.wait_for(Gateway(settings, Plugins()).run(), 30)
        assert impostor.connections >= 1, "the gateway never even tried"
        assert impostor.received == b"", f"a {stem} certificate received HTTP bytes"


@contextlib.asynccontextmanager
async def _beside_the_server(tmp_path: Path, tls: Pki) -> AsyncIterator[tuple[SimServer, Gateway]]:
    """The reference server, and a gateway with the minimal config, pointed at it."""
    async with SimServer(harness.sim_settings(tls)) as sim:
        api_root = f"https://localhost:{sim.port}"
        text = _minimal_config(tls, api_root, tmp_path / "state", server_identity=True)
        settings = harness.write_config(tmp_path / "gatewayd.toml", text)
        async with running_gateway(settings) as gw:
            yield sim, gw


async def _deliver(port: int, ctx: object) -> int:
    # A downlink with a spoofed AS sender: what an admitted impostor would inject.
    body = {**MESSAGE, "oriAddr": {"addrType": "AS", "addr": "as-spoofed"}, "msgId": "inj-1"}
    status, _ = await _call_api(port, ctx, body)
    return status


async def test_default_allowed_peers_admit_the_server_identity_only(tmp_path: Path) -> None:
    """Finding 2: without api.allowed_peers, a certificate carrying the server's host name
    (the old default) or the server's URN as a second SAN cannot deliver a downlink."""
    tls = _pki_init(tmp_path / "pki")
    ca = pki.load_ca(tls["ca"], tls["ca_key"])
    callers = {
        # What an old `pki init` device looked like: the server's host name as a SAN.
        "host name": pki.issue(ca, "device", dns=("localhost",), uris=(pki.DEMO_DEVICE_ID,)),
        # The server's identity present, but not as the primary one.
        "second SAN": pki.issue(ca, "device", uris=(pki.DEMO_DEVICE_ID, pki.DEMO_SERVER_ID)),
    }
    async with _beside_the_server(tmp_path, tls) as (_, gw):
        assert gw.api_port is not None
        for name, cert in callers.items():
            identity = TlsIdentity(cert_chain_pem=cert.cert_pem, key_pem=cert.key_pem)
            with capture_logs() as logs:
                status = await _deliver(gw.api_port, client_context(tls.trust(), identity))
            assert status == 403, name
            assert any(e["event"] == "auth.peer_rejected" for e in logs), name
        # The control: the server itself is let in.
        server = client_context(tls.trust(), tls.identity("server_client"))
        assert await _deliver(gw.api_port, server) in (200, 202, 204)


async def test_server_calls_gateways_with_its_client_certificate_only(tmp_path: Path) -> None:
    """Finding 1: with `pki init` and a default gateway config, the server's downlink
    (with its client certificate) is accepted, while its serving certificate, which is
    serverAuth only, is refused as a caller in the handshake: no HTTP, nothing stored."""
    tls = _pki_init(tmp_path / "pki")
    async with _beside_the_server(tmp_path, tls) as (sim, gw):
        assert gw.api_port is not None
        await sim.wait_for(lambda: bool(sim.registrations), timeout=10)
        pushed = await sim.send_downlink(DEMO_SERVICE_ID, "hi", msg_id="dl-1")
        assert (pushed.status, pushed.error) == (204, None)
        serving = client_context(tls.trust(), tls.identity("server"))
        with capture_logs() as logs, pytest.raises(aiohttp.ClientError):
            await _deliver(gw.api_port, serving)  # TLS 1.3: refused on the first read
        downlink = (await gw.store.stats())["queues"]["downlink"]
    assert downlink["pending"] + downlink["done"] + downlink["dead"] == 1  # the server's only
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert [(e["direction"], e["stage"]) for e in rejected] == [("inbound", "tls")]
    assert "unsuitable certificate purpose" in rejected[0]["reason"]


def test_empty_allowed_peers_is_a_config_error(tmp_path: Path) -> None:
    tls = harness.make_pki(tmp_path / "pki")
    text = _minimal_config(tls, "https://localhost:9", tmp_path / "state", server_identity=True)
    text = text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nallowed_peers = []')
    with pytest.raises(ConfigError) as refused:
        harness.write_config(tmp_path / "gw.toml", text)
    assert refused.value.key == "api.allowed_peers"
    assert refused.value.exit_code == ExitCode.CONFIG


def test_default_allowed_peers_is_the_server_identity(tmp_path: Path) -> None:
    tls = harness.make_pki(tmp_path / "pki")
    text = _minimal_config(tls, "https://localhost:9", tmp_path / "state", server_identity=True)
    settings: config.Settings = harness.write_config(tmp_path / "gw.toml", text)
    assert settings.api.allowed_peers == (pki.DEMO_SERVER_ID,)


async def test_revoked_intermediate_ca_is_refused(tmp_path: Path) -> None:
    """Finding 3: CRLs are checked along the whole chain, not for the leaf only."""
    tls = harness.make_pki(tmp_path / "pki")
    root = pki.load_ca(tls["ca"], tls["ca_key"])
    intermediate = pki.create_ca("revoked intermediate", issuer=root)
    leaf = pki.issue(
        intermediate, "m5s", dns=("localhost",), ips=("127.0.0.1",), uris=(pki.DEMO_SERVER_ID,)
    )
    root_crl = tmp_path / "root.crl.pem"
    root_crl.write_bytes(pki.create_crl(root, revoked=(intermediate.cert,)))
    intermediate_crl = tmp_path / "intermediate.crl.pem"
    intermediate_crl.write_bytes(pki.create_crl(intermediate))  # the leaf itself is fine
    chain = TlsIdentity(cert_chain_pem=leaf.cert_pem + intermediate.cert_pem, key_pem=leaf.key_pem)
    impostor = Impostor(server_context(chain, None, require_client_cert=False))
    async with impostor.running():
        text = harness.gateway_toml(
            tls,
            api_root=f"https://localhost:{impostor.port}",
            state_dir=tmp_path / "state",
            transports=harness.http_transport_bearer(),
        ).replace(
            f'ca = "{tls["ca"]}"', f'ca = "{tls["ca"]}"\ncrl = ["{root_crl}", "{intermediate_crl}"]'
        )
        settings = harness.write_config(tmp_path / "gw.toml", text)
        with capture_logs() as logs, pytest.raises(PeerRefusedError):
            await asyncio.wait_for(Gateway(settings, Plugins()).run(), 30)
    assert impostor.received == b""
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert rejected
    assert rejected[0]["reason"] == "certificate revoked"


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """The negotiated TLS 1.2 cipher, or None when the handshake failed."""

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost"), 10
        )
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    finally:
        listener.close()
    cipher = writer.get_extra_info("cipher")
    writer.close()
    return str(cipher[0]) if cipher else None


def _tls12_peer(purpose: int, ciphers: str, tls: Pki, stem: str | None) -> ssl.SSLContext:
    """A peer outside our profile: TLS 1.2 only, with ``ciphers``."""
    ctx = ssl.SSLContext(purpose)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.load_verify_locations(cadata=tls["ca"].read_text())
        ctx.check_hostname = False
    if stem is not None:
        ctx.load_cert_chain(tls[stem], tls[f"{stem}_key"])
    return ctx


@pytest.mark.parametrize(
    "ciphers",
    ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    ids=["CBC+SHA1", "CBC+SHA384", "AEAD (control)"],
)
async def test_tls12_takes_ecdhe_with_aead_only(tmp_path: Path, ciphers: str) -> None:
    """TS 33.210 profile: no CBC, no SHA-1 MAC, on our servers and our clients alike."""
    tls = harness.make_pki(tmp_path / "pki")
    ours_server = server_context(tls.identity("server"), None, require_client_cert=False)
    ours_client = client_context(tls.trust(), check_hostname=False)
    peer_client = _tls12_peer(ssl.PROTOCOL_TLS_CLIENT, ciphers, tls, None)
    peer_server = _tls12_peer(ssl.PROTOCOL_TLS_SERVER, ciphers, tls, "server")
    expected = ciphers if "GCM" in ciphers else None
    assert await _handshake(ours_server, peer_client) == expected
    assert await _handshake(peer_server, ours_client) == expected
