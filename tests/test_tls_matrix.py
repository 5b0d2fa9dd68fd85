"""Issue 3: the negative TLS matrix, on both legs of the northbound link.

Outbound (gateway -> server): the gateway dials an impostor presenting a bad
certificate or TLS offer; it must refuse, name the refusal, stop with exit code 3, and
the impostor must receive zero application bytes (no registration, no Service ID).
Inbound (server -> gateway): a caller presenting a bad certificate or TLS offer gets a
TLS failure (or, for a trusted but not allowed identity, a ProblemDetails without any
Service ID) and nothing is stored. The reference server refuses the same callers.

Every exchange carries data: with TLS 1.3 a refused client certificate shows only on
the first read. CRL checking is on everywhere the gateway is involved, which proves
the "every trusted CA needs a CRL" setup as a side effect. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.schemas import validate_problem
from gatewayd_sim.server import SimServer
from gatewayd_sim.settings import SimSettings
from gatewayd_testing import running_gateway
from structlog.testing import capture_logs
from tls_cases import (
    CASES,
    UPLINK,
    BioImpostor,
    attacker_client_context,
    attacker_server_context,
    gateway_toml_with_crl,
    make_material,
    post,
)

from gatewayd import config, pki
from gatewayd.api import TrustAnchors
from gatewayd.daemon import Gateway
from gatewayd.errors import ExitCode, PeerRefusedError
from gatewayd.northbound import paths
from gatewayd.plugins import Plugins

TRANSPORT = harness.http_transport_bearer()

# What OpenSSL says for each case, wherever it is the one refusing (either leg).
REASON = {
    "unknown CA": "unable to get local issuer certificate",
    "expired": "certificate has expired",
    "not yet valid": "certificate is not yet valid",
    "revoked": "certificate revoked",
    "self-signed": "self-signed certificate",
    "weak key": "key too weak",
    "no client certificate": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "TLS 1.1": "UNSUPPORTED_PROTOCOL",
}
OUTBOUND_REASON = {
    **REASON,
    # The gateway dials 127.0.0.1 and the certificate does not name it.
    "wrong identity": "IP address mismatch",
    # The 1.1-only peer finds no common version in our offer and says so with an alert.
    "TLS 1.1": "ALERT_PROTOCOL_VERSION",
}
# A server always presents a certificate: "no client certificate" is an inbound case
# (and, outbound, the gateway cannot even be configured without one: see the check-
# config test). Over TLS 1.1 the impostor refuses our offer before any certificate.
OUTBOUND_CASES = [c for c in CASES if c != "no client certificate"]


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")


def _gateway(tmp_path: Path, tls: Pki, api_root: str, crl: Path | None) -> config.Settings:
    text = harness.gateway_toml(
        tls, api_root=api_root, state_dir=tmp_path / "state", transports=TRANSPORT
    )
    if crl is not None:
        text = gateway_toml_with_crl(text, tls, crl)
    return harness.write_config(tmp_path / "gw.toml", text)


def _auth_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if str(e["event"]).startswith("auth.")]


# --- outbound: the gateway refuses the server ---------------------------------------


@pytest.mark.parametrize("case", OUTBOUND_CASES)
async def test_outbound_gateway_refuses_server(
    tmp_path: Path, loopback_pki: Pki, case: str
) -> None:
    material = make_material(loopback_pki, tmp_path / "bad", role="server")
    impostor = BioImpostor(attacker_server_context(material, case))
    async with impostor.running():
        settings = _gateway(
            tmp_path, loopback_pki, f"https://127.0.0.1:{impostor.port}", material.crl
        )
        with capture_logs() as logs, pytest.raises(PeerRefusedError) as refused:
            await Gateway(settings, Plugins()).run()
    assert refused.value.exit_code == ExitCode.PEER_REFUSED
    assert impostor.connections >= 1, "the gateway never even tried"
    assert impostor.received == b"", "an unverified server received application bytes"
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert len(rejected) == 1, _auth_events(logs)
    assert rejected[0]["direction"] == "outbound"
    assert OUTBOUND_REASON[case] in rejected[0]["reason"]
    assert OUTBOUND_REASON[case] in str(refused.value)
    # Neither the log nor the error names a Service ID.
    assert DEMO_SERVICE_ID not in str(_auth_events(logs)) + str(refused.value)


# --- the server refuses our certificate: TLS 1.3 shows it only on the first read -----


@pytest.fixture
def foreign_trust_sim_settings(loopback_pki: Pki) -> SimSettings:
    """The reference server, with its usual certificate, trusting client certificates
    from another CA only: the gateway's own certificate is refused server-side."""
    other = pki.create_ca("a CA the gateway's certificate is not from")
    base = harness.sim_settings(loopback_pki)
    return SimSettings(
        identity=base.identity,
        client_identity=base.client_identity,
        trust=TrustAnchors(ca_pem=other.cert_pem),
        allow=base.allow,
    )


async def test_server_refusing_our_certificate_over_tls13_stops_the_gateway(
    tmp_path: Path, loopback_pki: Pki, foreign_trust_sim_settings: SimSettings
) -> None:
    async with SimServer(foreign_trust_sim_settings) as sim:
        settings = _gateway(tmp_path, loopback_pki, sim.api_root, None)
        with capture_logs() as logs, pytest.raises(PeerRefusedError) as refused:
            # Without the classification this would retry forever (registration.retry).
            await asyncio.wait_for(Gateway(settings, Plugins()).run(), timeout=20)
        assert sim.registrations == []
    assert refused.value.exit_code == ExitCode.PEER_REFUSED
    assert "client certificate" in str(refused.value)
    refusal = next(e for e in logs if e["event"] == "auth.refused_by_peer")
    assert refusal["stage"] == "tls"
    assert "right after the TLS handshake" in refusal["reason"]
    assert any(e["event"] == "registration.refused" for e in logs)
    assert not any(e["event"] == "registration.retry" for e in logs)
    # The server's side names it too (its TLS context is built by gatewayd.security).
    server_side = [
        e for e in logs if e["event"] == "auth.peer_rejected" and e.get("direction") == "inbound"
    ]
    assert server_side
    assert "certificate" in server_side[0]["reason"]


async def test_server_refusing_our_certificate_over_tls12_with_an_alert(
    tmp_path: Path, loopback_pki: Pki
) -> None:
    """A peer that gets its alert out (not asyncio) names the refusal in the handshake."""
    material = make_material(loopback_pki, tmp_path / "bad", role="server")
    ctx = attacker_server_context(
        material, "good", require_client_cert_from=material.other_ca, max_tls12=True
    )
    impostor = BioImpostor(ctx)
    async with impostor.running():
        settings = _gateway(tmp_path, loopback_pki, f"https://127.0.0.1:{impostor.port}", None)
        with capture_logs() as logs, pytest.raises(PeerRefusedError) as refused:
            await Gateway(settings, Plugins()).run()
    assert refused.value.exit_code == ExitCode.PEER_REFUSED
    assert impostor.handshakes == 0
    assert impostor.received == b""
    assert impostor.errors
    assert "CERTIFICATE_VERIFY_FAILED" in impostor.errors[0]
    refusal = next(e for e in logs if e["event"] == "auth.refused_by_peer")
    assert refusal["stage"] == "tls"
    assert "ALERT_UNKNOWN_CA" in refusal["reason"]


# --- inbound: the gateway's API refuses the caller ------------------------------------


@pytest.mark.parametrize("case", CASES)
async def test_inbound_gateway_api_refuses_caller(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer, case: str
) -> None:
    material = make_material(loopback_pki, tmp_path / "bad", role="caller")
    settings = _gateway(tmp_path, loopback_pki, sim.api_root, material.crl)
    async with running_gateway(settings) as gw:
        assert gw.api_port is not None
        with capture_logs() as logs:
            seen = await post(
                gw.api_port,
                attacker_client_context(material, case),
                f"{paths.gateway_api_prefix('N3G')}/deliver-message",
            )
        stats = await gw.store.stats()
    downlink = stats["queues"]["downlink"]
    assert (downlink["pending"], downlink["done"], downlink["dead"]) == (0, 0, 0)
    assert DEMO_SERVICE_ID.encode() not in seen.received
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert len(rejected) == 1, _auth_events(logs)
    assert rejected[0]["direction"] == "inbound"
    if case == "wrong identity":
        # Trusted chain, so the handshake holds; the identity is not allowed.
        assert seen.status == 403
        validate_problem(seen.body)
        assert seen.body == {"title": "Forbidden", "status": 403, "cause": "PEER_NOT_ALLOWED"}
        assert rejected[0]["reason"] == "not in api.allowed_peers"
    else:
        # Nothing but a TLS failure: no HTTP byte came back. (asyncio reports the
        # alert as a plain EOF or a reset, hence no assertion on the error's kind.)
        assert seen.received == b"", seen.received[:200]
        assert rejected[0]["stage"] == "tls"
        assert REASON[case] in rejected[0]["reason"]


# --- the reference server refuses the same callers -----------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c != "revoked"])
async def test_reference_server_refuses_caller(
    tmp_path: Path, loopback_pki: Pki, sim: SimServer, case: str
) -> None:
    """The sim has no CRL configured, so "revoked" does not apply to it."""
    material = make_material(loopback_pki, tmp_path / "bad", role="caller")
    with capture_logs() as logs:
        seen = await post(
            sim.port, attacker_client_context(material, case), paths.DELIVER_UE_MESSAGE, UPLINK
        )
    assert sim.uplinks == []
    assert sim.registrations == []
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert rejected, logs
    if case == "wrong identity":
        assert seen.status == 403, seen.received
        assert DEMO_SERVICE_ID.encode() not in seen.received
    else:
        assert seen.received == b""
        assert rejected[0]["direction"] == "inbound"
        assert REASON[case] in rejected[0]["reason"]


# --- our own identity is checked before the gateway starts ---------------------------


def _own_cert(loopback_pki: Pki, case: str) -> pki.Issued:
    ca = pki.load_ca(loopback_pki["ca"], loopback_pki["ca_key"])
    now = dt.datetime.now(dt.UTC)
    names: dict[str, Any] = {"dns": ("localhost",), "uris": (pki.DEMO_GATEWAY_ID,)}
    if case == "expired":
        return pki.issue(
            ca,
            "gw",
            not_before=now - dt.timedelta(days=9),
            not_after=now - dt.timedelta(1),
            **names,
        )
    if case == "not yet valid":
        return pki.issue(
            ca,
            "gw",
            not_before=now + dt.timedelta(days=1),
            not_after=now + dt.timedelta(9),
            **names,
        )
    return pki.issue(ca, "gw", key=pki.new_key("rsa", 1024), **names)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("expired", "expired on"),
        ("not yet valid", "is not valid before"),
        ("weak key", "RSA key has 1024 bits; at least 2048 are required"),
        ("no identity", "TLS identity"),
    ],
)
async def test_check_config_refuses_own_identity(
    tmp_path: Path, loopback_pki: Pki, case: str, says: str
) -> None:
    text = harness.gateway_toml(
        loopback_pki, api_root="https://127.0.0.1:9", state_dir=tmp_path / "s", transports=TRANSPORT
    )
    if case == "no identity":
        # Trust only: a gateway that would dial the server without a client certificate.
        text = text.replace(f'cert = "{loopback_pki["gateway"]}"\n', "")
        text = text.replace(f'key = "{loopback_pki["gateway_key"]}"\n', "")
    else:
        cert, key = pki.write_pair(tmp_path, "own", _own_cert(loopback_pki, case))
        text = text.replace(str(loopback_pki["gateway"]), str(cert))
        text = text.replace(str(loopback_pki["gateway_key"]), str(key))
    path = tmp_path / "gw.toml"
    path.write_text(text, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd.cli",
        "check-config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == ExitCode.CREDENTIALS, (out, err)
    assert says in err.decode(), err.decode()
    assert json.dumps(DEMO_SERVICE_ID) not in err.decode()
