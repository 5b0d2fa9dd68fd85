"""Every bad token, on both legs, refused before anything is read (TS 33.501 13.4.1).

Outbound leg: the gateway calls the reference server (MSGS_MSGDelivery). Inbound leg:
the reference server calls the gateway (MSGG_N3GDelivery). For each case the bad token
is crafted here (TokenIssuer, or by hand where no library would sign it) and sent over
real mutual TLS with the caller's real certificate, and for each case:

- the answer is 401 ``invalid_token`` (403 ``insufficient_scope`` for a missing scope)
  with a bare ProblemDetails: no reason, no Service ID, no Client ID;
- the refusal is one ``auth.token_rejected`` log event with the peer and the reason;
- nothing was stored or forwarded, although the same request with a good token passes
  (the control tests).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from gatewayd_sim import harness
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.schemas import validate_problem
from gatewayd_sim.server import SimServer
from gatewayd_sim.tokens import SimTokens
from gatewayd_testing import running_gateway
from structlog.testing import capture_logs

from gatewayd import config, pki
from gatewayd.daemon import Gateway
from gatewayd.msgin5g.registration import GatewayRegistration
from gatewayd.security.tls import client_context
from gatewayd.security.tokens import TokenIssuer

ISSUER = "https://nrf.sim.example/oauth2"
SERVER_AUDIENCE = "127.0.0.1"  # the name the gateway calls the server by
MSGS_SCOPE = "msgs-msgdelivery msgs-gwregistration"
MSGG_SCOPE = "msgg-n3gdelivery"

CASES = [
    "expired",
    "wrong_aud",
    "wrong_iss",
    "alg_none",
    "hs256_key_confusion",
    "bad_signature",
    "missing_scope",
    "other_certificate",
    # Correctly signed, but a claim of the wrong type or range (issue 8 finding 5).
    "exp_numeric_string",
    "exp_out_of_range",
    "exp_infinite",
    "exp_list",
    "nbf_numeric_string",
]
REASON = {
    "expired": "expired",
    "wrong_aud": "bad_audience",
    "wrong_iss": "bad_issuer",
    "alg_none": "alg_not_allowed",
    "hs256_key_confusion": "alg_not_allowed",
    "bad_signature": "bad_signature",
    "missing_scope": "missing_scope",
    "other_certificate": "cnf_mismatch",
    "exp_numeric_string": "malformed",
    "exp_out_of_range": "malformed",
    "exp_infinite": "malformed",
    "exp_list": "malformed",
    "nbf_numeric_string": "malformed",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Minter:
    """Makes a good token for one leg, and each bad variant of it."""

    key_pem: bytes
    subject: str
    audience: str
    scope: str
    narrow_scope: str  # a real scope of the other API: granted, but not this one
    cert_der: bytes  # the caller's certificate the token is bound to

    def issuer(self, name: str = ISSUER, key_pem: bytes | None = None) -> TokenIssuer:
        return TokenIssuer(issuer=name, key_pem=key_pem or self.key_pem, algorithm="ES256")

    def good(self, **kwargs: Any) -> str:
        args: dict[str, Any] = {
            "subject": self.subject,
            "audience": self.audience,
            "scope": self.scope,
            "client_cert_der": self.cert_der,
            **kwargs,
        }
        return self.issuer().issue(**args)

    def claims(self) -> dict[str, Any]:
        now = int(dt.datetime.now(dt.UTC).timestamp())
        return {
            "iss": ISSUER,
            "sub": self.subject,
            "aud": self.audience,
            "scope": self.scope,
            "iat": now,
            "exp": now + 300,
            "jti": "forged-1",
            "cnf": {"x5t#S256": _b64(hashlib.sha256(self.cert_der).digest())},
        }

    def bad(self, case: str) -> str:
        return {
            # Far beyond the 30 s leeway.
            "expired": lambda: self.good(now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)),
            "wrong_aud": lambda: self.good(audience="urn:someone:else"),
            # The right key, the wrong issuer name: the issuer check alone must catch it.
            "wrong_iss": lambda: self.signed_by(self.issuer("https://rogue-nrf.example")),
            "alg_none": lambda: _compact({"alg": "none", "typ": "JWT"}, self.claims(), b""),
            "hs256_key_confusion": self.hs256_with_public_key,
            # Everything right, signed with a key that is not the pinned one.
            "bad_signature": lambda: self.signed_by(self.issuer(key_pem=_pem(pki.new_key("ec")))),
            "missing_scope": lambda: self.good(scope=self.narrow_scope),
            # A good token; the test presents it over another certificate.
            "other_certificate": self.good,
            "exp_numeric_string": lambda: self.with_claims(exp=str(self.claims()["exp"])),
            "exp_out_of_range": lambda: self.with_claims(exp=10**30),
            "exp_infinite": lambda: self.with_claims(exp=float("inf")),
            "exp_list": lambda: self.with_claims(exp=[self.claims()["exp"]]),
            "nbf_numeric_string": lambda: self.with_claims(nbf="0"),
        }[case]()

    def with_claims(self, **changes: Any) -> str:
        """The good claims with ``changes``, correctly signed with the pinned key."""
        return jwt.encode({**self.claims(), **changes}, self.key_pem, algorithm="ES256")

    def signed_by(self, issuer: TokenIssuer) -> str:
        return issuer.issue(
            subject=self.subject,
            audience=self.audience,
            scope=self.scope,
            client_cert_der=self.cert_der,
        )

    def hs256_with_public_key(self) -> str:
        # "Signed" with the verifier's own public key as an HMAC secret.
        public = self.issuer().public_key_pem
        signing_input = _signing_input({"alg": "HS256", "typ": "JWT"}, self.claims())
        mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(mac)}"


def _signing_input(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return f"{_signing_input(header, claims)}.{_b64(signature)}"


def _twin_context(tls: Pki, identity: str) -> ssl.SSLContext:
    """Another certificate from the same CA for the *same* identity (a re-issued or
    stolen-identity certificate): the token is bound to the certificate, not the name."""
    ca = pki.load_ca(tls["ca"], tls["ca_key"])
    twin = pki.issue(ca, "twin", dns=("localhost",), uris=(identity,), ips=("127.0.0.1",))
    return client_context(tls.trust(), _identity(twin))


def _identity(issued: pki.Issued) -> Any:
    from gatewayd.api import TlsIdentity

    return TlsIdentity(cert_chain_pem=issued.cert_pem, key_pem=issued.key_pem)


async def _post(
    url: str, ctx: ssl.SSLContext, body: dict[str, Any], token: str
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, ssl=ctx, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status, resp.headers.get("WWW-Authenticate", ""), await resp.read()


def _assert_refused(
    case: str, answer: tuple[int, str, bytes], logs: list[dict[str, Any]], *, peer: str
) -> None:
    status, challenge, raw = answer
    if case == "missing_scope":
        assert status == 403
        assert challenge.startswith('Bearer error="insufficient_scope"')
    else:
        assert status == 401
        assert challenge == 'Bearer error="invalid_token"'
    body = json.loads(raw)
    validate_problem(body)
    # Nothing but the status: no reason, no Service ID, no Client ID.
    assert body == {"title": "Forbidden" if status == 403 else "Unauthorized", "status": status}
    for secret in (DEMO_SERVICE_ID, pki.DEMO_GATEWAY_ID, pki.DEMO_SERVER_ID):
        assert secret not in raw.decode()
        assert secret not in challenge
    rejected = [e for e in logs if e["event"] == "auth.token_rejected"]
    assert len(rejected) == 1
    assert (rejected[0]["reason"], rejected[0]["peer"]) == (REASON[case], peer)


# --- outbound: gateway -> reference server (MSGS_MSGDelivery) ----------------------------

UPLINK = {
    "oriAddr": {"addrType": "UE", "addr": DEMO_SERVICE_ID},
    "destAddr": {"addrType": "AS", "addr": harness.DEMO_AS},
    "msgId": "up-1",
    "stoAndFwInd": True,
    "payload": "t=21.5",
}


@dataclass
class Outbound:
    sim: SimServer
    minter: Minter
    gateway: ssl.SSLContext
    twin: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"{self.sim.api_root}/msgs-msgdelivery/v1/deliver-ue-message"


@pytest_asyncio.fixture
async def outbound(loopback_pki: Pki) -> AsyncIterator[Outbound]:
    """The sim requiring tokens, with the gateway registered (by a good token), so the
    bad token is the only thing wrong with the requests below."""
    key = _pem(pki.new_key("ec"))
    settings = harness.sim_settings(
        loopback_pki,
        service_ids=(DEMO_SERVICE_ID,),
        tokens=SimTokens(issuer=ISSUER, key_pem=key, required=True),
    )
    minter = Minter(
        key_pem=key,
        subject=pki.DEMO_GATEWAY_ID,
        audience=SERVER_AUDIENCE,
        scope=MSGS_SCOPE,
        narrow_scope="msgs-gwregistration",
        cert_der=_der(loopback_pki["gateway"].read_bytes()),
    )
    gateway = client_context(loopback_pki.trust(), loopback_pki.identity("gateway"))
    async with SimServer(settings, schema_check=True) as sim:
        registration = GatewayRegistration(
            gw_id=pki.DEMO_GATEWAY_ID,
            gw_type="N3G",
            target_uri="https://127.0.0.1:9",
            ue_svc_ids=(DEMO_SERVICE_ID,),
        )
        status, _, _ = await _post(
            f"{sim.api_root}/msgs-gwregistration/v1/registrations",
            gateway,
            registration.to_json(),
            minter.good(),
        )
        assert status == 201
        yield Outbound(sim, minter, gateway, _twin_context(loopback_pki, pki.DEMO_GATEWAY_ID))


async def test_outbound_good_token_is_accepted(outbound: Outbound) -> None:
    status, _, raw = await _post(outbound.url, outbound.gateway, UPLINK, outbound.minter.good())
    assert status == 200, raw
    assert [u.message.msg_id for u in outbound.sim.uplinks] == ["up-1"]


async def test_outbound_missing_token_is_challenged(outbound: Outbound) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(outbound.url, json=UPLINK, ssl=outbound.gateway) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert outbound.sim.uplinks == []


@pytest.mark.parametrize("case", CASES)
async def test_outbound_bad_token_is_refused(outbound: Outbound, case: str) -> None:
    ctx = outbound.twin if case == "other_certificate" else outbound.gateway
    with capture_logs() as logs:
        answer = await _post(outbound.url, ctx, UPLINK, outbound.minter.bad(case))
    _assert_refused(case, answer, logs, peer=pki.DEMO_GATEWAY_ID)
    # Nothing recorded, nothing forwarded as the AS's report.
    assert outbound.sim.uplinks == []
    assert outbound.sim.pushes == []
    assert not [e for e in logs if e["event"].startswith("sim.uplink")]


# --- inbound: reference server -> gateway (MSGG_N3GDelivery) -----------------------------

DOWNLINK = {
    "oriAddr": {"addrType": "AS", "addr": harness.DEMO_AS},
    "destAddr": {"addrType": "UE", "addr": DEMO_SERVICE_ID},
    "msgId": "down-1",
    "payload": "set-interval=60",
}

TRANSPORT = harness.http_transport_bearer()


@dataclass
class Inbound:
    gw: Gateway
    minter: Minter
    server: ssl.SSLContext
    twin: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://localhost:{self.gw.api_port}/msgg-n3gdelivery/v1/deliver-message"

    async def stored(self) -> Any:
        stats = await self.gw.store.stats()
        # Every item ever put, whatever became of it since (sent, delivered, dead).
        return sum(q["pending"] + q["done"] + q["dead"] for q in stats["queues"].values())


@pytest_asyncio.fixture
async def inbound(
    tmp_path: Path,
    loopback_pki: Pki,
    gateway_config: Callable[..., config.Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Inbound]:
    """A gateway requiring the server's token (``[api.token]``) on its MSGG API."""
    monkeypatch.setenv("GATEWAYD_TEST_TOKEN", "device-secret-1")
    key = pki.new_key("ec")
    public = tmp_path / "nrf.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = gateway_config(
        TRANSPORT, extra=f'[api.token]\nissuer = "{ISSUER}"\nkey = "{public}"\nrequire = true\n'
    )
    minter = Minter(
        key_pem=_pem(key),
        subject=pki.DEMO_SERVER_ID,
        audience=pki.DEMO_GATEWAY_ID,
        scope=MSGG_SCOPE,
        narrow_scope="msgg-l3gdelivery",
        cert_der=_der(loopback_pki["server_client"].read_bytes()),
    )
    async with running_gateway(settings) as gw:
        yield Inbound(
            gw,
            minter,
            client_context(loopback_pki.trust(), loopback_pki.identity("server_client")),
            _twin_context(loopback_pki, pki.DEMO_SERVER_ID),
        )


async def test_inbound_good_token_is_accepted(inbound: Inbound) -> None:
    status, _, raw = await _post(inbound.url, inbound.server, DOWNLINK, inbound.minter.good())
    assert status == 204, raw
    assert await inbound.stored() == 1


async def test_inbound_missing_token_is_challenged(inbound: Inbound) -> None:
    with capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.post(inbound.url, json=DOWNLINK, ssl=inbound.server) as resp,
        ):
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    (event,) = [e for e in logs if e["event"] == "auth.token_rejected"]
    assert (event["reason"], event["peer"]) == ("missing", pki.DEMO_SERVER_ID)
    assert await inbound.stored() == 0


@pytest.mark.parametrize("case", CASES)
async def test_inbound_bad_token_is_refused(inbound: Inbound, case: str) -> None:
    ctx = inbound.twin if case == "other_certificate" else inbound.server
    with capture_logs() as logs:
        answer = await _post(inbound.url, ctx, DOWNLINK, inbound.minter.bad(case))
    _assert_refused(case, answer, logs, peer=pki.DEMO_SERVER_ID)
    # Not stored, no reply route, nothing toward the device.
    assert await inbound.stored() == 0
    assert not [e for e in logs if e["event"] == "message.received"]
