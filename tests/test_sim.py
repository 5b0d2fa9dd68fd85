"""The reference MSGin5G Server over real mutual TLS, with certificates made per test."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from gatewayd_sim import SimServer, SimSettings, gateway, load, schemas
from gatewayd_sim.policy import AllowList, ServiceIdPattern

from gatewayd import pki
from gatewayd.api import TlsIdentity, TrustAnchors
from gatewayd.errors import ConfigError
from gatewayd.msgin5g import GatewayMessageDelivery
from gatewayd.security import tls

GW = pki.DEMO_GATEWAY_ID
OTHER_GW = "urn:gatewayd:gateway:other-l3g"
STRANGER = "urn:gatewayd:gateway:not-listed"
EXT = schemas.EXTENSION_FILE
DELIVERY = "TS29538_MSGS_MSGDelivery.yaml"


@dataclass(frozen=True)
class Pki:
    trust: TrustAnchors
    server: TlsIdentity
    client: TlsIdentity  # what the sim presents when it calls gateways
    ca: pki.Issued

    def identity(self, uri: str) -> TlsIdentity:
        issued = pki.issue(self.ca, "gw", uris=(uri,), dns=("localhost",), ips=("127.0.0.1",))
        return TlsIdentity(cert_chain_pem=issued.cert_pem, key_pem=issued.key_pem)


@pytest.fixture(scope="module")
def certs() -> Pki:
    ca = pki.create_ca()
    server = pki.issue(
        ca,
        "sim",
        uris=(pki.DEMO_SERVER_ID,),
        dns=("localhost",),
        ips=("127.0.0.1",),
        client=False,
    )
    client = pki.issue(ca, "sim", uris=(pki.DEMO_SERVER_ID,), server=False)
    return Pki(
        trust=TrustAnchors(ca_pem=ca.cert_pem),
        server=TlsIdentity(cert_chain_pem=server.cert_pem, key_pem=server.key_pem),
        client=TlsIdentity(cert_chain_pem=client.cert_pem, key_pem=client.key_pem),
        ca=ca,
    )


@pytest.fixture
async def sim(certs: Pki) -> AsyncIterator[SimServer]:
    settings = SimSettings(
        identity=certs.server,
        client_identity=certs.client,
        trust=certs.trust,
        allow=gateway_list(),
        max_ttl=600,
    )
    async with SimServer(settings, schema_check=True) as server:
        yield server


def gateway_list() -> AllowList:
    return AllowList(
        (
            gateway(GW, "N3G", ("sensor-*@iot.example", "meter-{1..5}")),
            gateway(OTHER_GW, "L3G", ("sms-*",)),
        )
    )


def client_ctx(certs: Pki, uri: str | None) -> ssl.SSLContext:
    identity = certs.identity(uri) if uri else None
    return tls.client_context(certs.trust, identity)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class FakeGateway:
    """A tiny HTTPS mTLS server standing in for a gateway's MSGG_N3GDelivery API."""

    root: str
    messages: list[dict[str, Any]]
    reports: list[dict[str, Any]]


@pytest.fixture
async def fake_gateway(certs: Pki) -> AsyncIterator[FakeGateway]:
    messages: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []

    async def deliver(request: web.Request) -> web.Response:
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))  # type: ignore[union-attr]
        assert peer is not None
        assert peer.matches(pki.DEMO_SERVER_ID)
        messages.append(await request.json())
        return web.Response(status=204)

    async def report(request: web.Request) -> web.Response:
        reports.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/msgg-n3gdelivery/v1/deliver-message", deliver)
    app.router.add_post("/msgg-n3gdelivery/v1/deliver-report", report)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = tls.server_context(certs.identity(GW), certs.trust)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    yield FakeGateway(f"https://127.0.0.1:{port}", messages, reports)
    await runner.cleanup()


def registration(target: str = "https://127.0.0.1:1", **over: Any) -> dict[str, Any]:
    body = {
        "gwId": GW,
        "gwType": "N3G",
        "targetUri": target,
        "ueSvcIds": ["sensor-1@iot.example", "meter-3"],
    }
    return {**body, **over}


def uplink(ori: str = "sensor-1@iot.example", msg_id: str = "m-1", **over: Any) -> dict[str, Any]:
    body = {
        "oriAddr": {"addrType": "UE", "addr": ori},
        "destAddr": {"addrType": "AS", "addr": "as-1"},
        "msgId": msg_id,
        "stoAndFwInd": False,
        "payload": "21.5C",
    }
    return {**body, **over}


async def post(
    http: aiohttp.ClientSession,
    sim: SimServer,
    ctx: ssl.SSLContext,
    path: str,
    body: Any,
    *,
    method: str = "POST",
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, sim.api_root + path, json=body, ssl=ctx) as resp:
        data = await resp.json(content_type=None) if resp.status != 204 else None
        return resp.status, data, resp


REG = "/msgs-gwregistration/v1/registrations"


async def register(http: aiohttp.ClientSession, sim: SimServer, certs: Pki, target: str) -> str:
    status, _, resp = await post(http, sim, client_ctx(certs, GW), REG, registration(target))
    assert status == 201
    return resp.headers["Location"]


# --- registration ---------------------------------------------------------------------


async def test_registration_allowed(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    ctx = client_ctx(certs, GW)
    asked = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    status, ack, resp = await post(http, sim, ctx, REG, registration(expiry=asked))
    assert status == 201
    schemas.validate(EXT, "GatewayRegistrationAck", ack)
    location = resp.headers["Location"]
    assert location.startswith(f"{sim.api_root}{REG}/")
    # Granted expiry is capped at max_ttl (600 s), not the 30 days asked for.
    granted = datetime.fromisoformat(ack["expiry"])
    assert granted <= datetime.now(UTC) + timedelta(seconds=601)
    assert [r.gw_id for r in sim.registrations] == [GW]
    schemas.validate(EXT, "GatewayRegistration", sim.registrations[0].raw)

    path = location.removeprefix(sim.api_root)
    more = registration(ueSvcIds=["sensor-1@iot.example", "sensor-2@iot.example"])
    status, ack, _ = await post(http, sim, ctx, path, more, method="PUT")
    assert status == 200
    schemas.validate(EXT, "GatewayRegistrationAck", ack)
    assert sim.route("sensor-2@iot.example") is not None

    # Another allowed gateway may not delete it.
    status, problem, _ = await post(
        http, sim, client_ctx(certs, OTHER_GW), path, None, method="DELETE"
    )
    assert status == 403
    assert problem["cause"] == "NOT_REGISTRATION_OWNER"
    status, _, _ = await post(http, sim, ctx, path, None, method="DELETE")
    assert status == 204
    assert sim.registrations == []
    status, problem, _ = await post(http, sim, ctx, path, None, method="DELETE")
    assert status == 404
    schemas.validate_problem(problem)


async def test_gateway_not_on_allow_list_gets_403(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        status, problem, resp = await post(
            http, sim, client_ctx(certs, STRANGER), REG, registration(gwId=STRANGER)
        )
    assert status == 403
    assert resp.content_type == "application/problem+json"
    schemas.validate_problem(problem)
    assert problem["cause"] == "GATEWAY_NOT_ALLOWED"
    rejected = [e for e in logs if e["event"] == "auth.peer_rejected"]
    assert rejected
    assert rejected[0]["peer"] == STRANGER
    assert sim.registrations == []


async def test_registration_checks_id_type_and_service_ids(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    ctx = client_ctx(certs, GW)
    cases = {
        "GW_ID_MISMATCH": registration(gwId=OTHER_GW),
        "GW_TYPE_NOT_ALLOWED": registration(gwType="L3G"),
        "SERVICE_ID_NOT_ALLOWED": registration(ueSvcIds=["sensor-1@iot.example", "meter-6"]),
    }
    for cause, body in cases.items():
        status, problem, _ = await post(http, sim, ctx, REG, body)
        assert (status, problem["cause"]) == (403, cause)
        schemas.validate_problem(problem)
        # The refusal never echoes service ids back.
        assert "meter-6" not in str(problem)
    assert sim.registrations == []


async def test_no_client_certificate_is_refused_in_tls(sim: SimServer, certs: Pki) -> None:
    ctx = client_ctx(certs, None)
    received = b""
    with pytest.raises((ssl.SSLError, ConnectionError)):  # noqa: PT012 - exchange needed
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port, ssl=ctx)
        # TLS 1.3: the client's handshake completes; the refusal shows on the first read,
        # as an alert or (asyncio streams) a bare EOF.
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        received = await reader.read(100)
        writer.close()
        if not received:
            raise ConnectionError("closed without an answer")
    assert received == b""


async def test_malformed_bodies(sim: SimServer, certs: Pki, http: aiohttp.ClientSession) -> None:
    ctx = client_ctx(certs, GW)
    bad = registration()
    del bad["targetUri"]
    status, problem, _ = await post(http, sim, ctx, REG, bad)
    assert status == 400
    schemas.validate_problem(problem)
    assert problem["invalidParams"] == [{"param": "/targetUri", "reason": "is required"}]

    async with http.post(sim.api_root + REG, data=b"gwId=x", ssl=ctx) as resp:
        assert resp.status == 415
        schemas.validate_problem(await resp.json(content_type=None))
    async with http.post(
        sim.api_root + REG, data=b"{not json", ssl=ctx, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
    status, problem, _ = await post(http, sim, ctx, f"{REG}/nope", registration(), method="PUT")
    assert status == 404


# --- uplink ---------------------------------------------------------------------------


async def test_uplink_from_registered_gateway(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    await register(http, sim, certs, "https://127.0.0.1:1")
    ctx = client_ctx(certs, GW)
    path = "/msgs-msgdelivery/v1/deliver-ue-message"
    for _ in range(2):  # the resend is acknowledged again but recorded once
        status, ack, _ = await post(http, sim, ctx, path, uplink())
        assert status == 200
        schemas.validate(DELIVERY, "MessageDeliveryAck", ack)
        assert ack["status"] == "DELY_STORED"
        assert ack["msgId"] == "m-1"
    assert len(sim.uplinks) == 1
    assert sim.duplicates[(GW, "sensor-1@iot.example", "m-1")] == 1
    schemas.validate(DELIVERY, "UEMessageDelivery", sim.uplinks[0].raw)


async def test_same_msg_id_from_two_devices_is_two_messages(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    # A msgId names a message of its originator: devices choose theirs independently.
    await register(http, sim, certs, "https://127.0.0.1:1")
    ctx = client_ctx(certs, GW)
    path = "/msgs-msgdelivery/v1/deliver-ue-message"
    for ori in ("sensor-1@iot.example", "meter-3"):
        status, _, _ = await post(http, sim, ctx, path, uplink(ori=ori, msg_id="1"))
        assert status == 200
    assert [u.message.ori_addr.addr for u in sim.uplinks] == ["sensor-1@iot.example", "meter-3"]
    assert sum(sim.duplicates.values()) == 0

    status, problem, _ = await post(http, sim, ctx, path, uplink(ori="sensor-9@iot.example"))
    assert (status, problem["cause"]) == (403, "SERVICE_ID_NOT_ALLOWED")
    schemas.validate_problem(problem)

    bad = uplink()
    del bad["stoAndFwInd"]
    status, problem, _ = await post(http, sim, ctx, path, bad)
    assert status == 400
    assert problem["invalidParams"][0]["param"] == "/stoAndFwInd"


async def test_uplink_without_registration_is_refused(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    status, problem, _ = await post(
        http, sim, client_ctx(certs, GW), "/msgs-msgdelivery/v1/deliver-ue-message", uplink()
    )
    assert (status, problem["cause"]) == (403, "GATEWAY_NOT_REGISTERED")


async def test_report_requested_is_sent_back_to_the_gateway(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession, fake_gateway: FakeGateway
) -> None:
    await register(http, sim, certs, fake_gateway.root)
    status, _, _ = await post(
        http,
        sim,
        client_ctx(certs, GW),
        "/msgs-msgdelivery/v1/deliver-ue-message",
        uplink(msg_id="m-r", delivStReqInd=True),
    )
    assert status == 200
    await sim.wait_for(lambda: any(p.kind == "deliver-report" for p in sim.pushes))
    (report,) = fake_gateway.reports
    schemas.validate(DELIVERY, "DeliveryStatusReport", report)
    assert report["delivSt"] == "REPT_DELY_SUCCESS"
    assert report["destAddr"] == {"addrType": "UE", "addr": "sensor-1@iot.example"}
    assert report["oriAddr"] == {"addrType": "AS", "addr": "as-1"}


async def test_gateway_report_on_downlink(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    await register(http, sim, certs, "https://127.0.0.1:1")
    body = {
        "oriAddr": {"addrType": "UE", "addr": "meter-3"},
        "destAddr": {"addrType": "AS", "addr": "as-1"},
        "msgId": "d-1",
        "delivSt": "REPT_DELY_FAILED",
        "failureCause": "device offline",
    }
    status, ack, _ = await post(
        http, sim, client_ctx(certs, GW), "/msgs-msgdelivery/v1/deliver-report", body
    )
    assert status == 200
    schemas.validate(DELIVERY, "MessageDeliveryAck", ack)
    assert [r.report.msg_id for r in sim.reports] == ["d-1"]


async def test_fault_injection(sim: SimServer, certs: Pki, http: aiohttp.ClientSession) -> None:
    sim.fail(503, retry_after=7, count=1)
    ctx = client_ctx(certs, GW)
    status, problem, resp = await post(http, sim, ctx, REG, registration())
    assert status == 503
    assert resp.headers["Retry-After"] == "7"
    schemas.validate_problem(problem)
    status, _, _ = await post(http, sim, ctx, REG, registration())
    assert status == 201


# --- downlink -------------------------------------------------------------------------


async def test_downlink_reaches_the_gateway(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession, fake_gateway: FakeGateway
) -> None:
    await register(http, sim, certs, fake_gateway.root)
    result = await sim.send_downlink("meter-3", "open valve", app_id="valves")
    assert (result.status, result.error) == (204, None)
    (body,) = fake_gateway.messages
    schemas.validate("TS29538_MSGG_N3GDelivery.yaml", "N3gMessageDelivery", body)
    message = GatewayMessageDelivery.from_json(body)
    assert message.dest_addr.addr == "meter-3"
    assert message.msg_id == result.msg_id
    # A second push reuses the pooled connection and arrives too.
    again = await sim.send_downlink("meter-3", "close valve")
    assert again.ok
    assert len(fake_gateway.messages) == 2
    unroutable = await sim.send_downlink("meter-4", "x")
    assert unroutable.status == 0
    assert unroutable.gw_id is None


async def test_no_push_to_an_impostor(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession
) -> None:
    # A raw TLS server with a certificate from the same CA, but not naming the gateway.
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                received.append(data)
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    ctx = tls.server_context(certs.identity("urn:gatewayd:gateway:impostor"), certs.trust)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        await register(http, sim, certs, f"https://127.0.0.1:{port}")
        with structlog.testing.capture_logs() as logs:
            result = await sim.send_downlink("meter-3", "secret payload")
        assert result.status == 0
        assert result.error is not None
        assert "refused" in result.error
        assert any(e["event"] == "auth.gateway_identity_rejected" for e in logs)
        await asyncio.sleep(0.2)  # let the impostor's side see the close
        assert received == []
    finally:
        server.close()
        await server.wait_closed()


# --- operator interface ---------------------------------------------------------------


async def test_operator_interface(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession, fake_gateway: FakeGateway
) -> None:
    await register(http, sim, certs, fake_gateway.root)
    base = f"http://127.0.0.1:{sim.operator_port}/operator"
    async with http.post(
        f"{base}/downlink", json={"to": "sensor-1@iot.example", "payload": "hi", "msgId": "op-1"}
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "kind": "deliver-message",
            "msgId": "op-1",
            "gwId": GW,
            "status": 204,
        }
    assert fake_gateway.messages[0]["msgId"] == "op-1"
    async with http.get(f"{base}/registrations") as resp:
        (entry,) = await resp.json()
        assert entry["gwId"] == GW
    async with http.post(f"{base}/fail", json={"status": 429, "count": 2}) as resp:
        assert resp.status == 200
    status, _, resp2 = await post(http, sim, client_ctx(certs, GW), REG, registration())
    assert (status, resp2.headers["Retry-After"]) == (429, "1")
    async with http.post(f"{base}/fail", json={"status": 200, "count": 1}) as resp:
        assert resp.status == 400
    async with http.get(f"{base}/uplinks") as resp:
        assert await resp.json() == []
    async with http.get(f"{base}/reports") as resp:
        assert await resp.json() == []


# --- settings and policy --------------------------------------------------------------


def test_service_id_patterns() -> None:
    glob = ServiceIdPattern.parse("sensor-*@iot.example")
    assert glob.matches("sensor-7@iot.example")
    assert not glob.matches("sensor-7@iotXexample")  # the dot is literal
    ranged = ServiceIdPattern.parse("meter-{10..20}")
    assert ranged.matches("meter-10")
    assert ranged.matches("meter-20")
    assert not ranged.matches("meter-21")
    assert not ranged.matches("meter-x")
    assert ServiceIdPattern.parse("exact").matches("exact")
    with pytest.raises(ValueError, match="empty"):
        ServiceIdPattern.parse("m-{5..1}")


@pytest.fixture
def pki_dir(tmp_path: Path) -> Iterator[dict[str, Path]]:
    return pki.init(tmp_path / "pki")


def test_example_config_loads(pki_dir: dict[str, Path], tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "conf" / "sim.example.toml"
    text = example.read_text(encoding="utf-8").replace("pki/", f"{pki_dir['ca'].parent}/")
    conf = tmp_path / "sim.toml"
    conf.write_text(text, encoding="utf-8")
    settings = load(conf)
    assert settings.allow.for_peer(tls.PeerIdentity(uris=(GW,), dns_names=())).gw_type == "N3G"
    assert settings.operator_host == "127.0.0.1"
    assert settings.trust.crl_pem
    # It calls gateways with the client certificate `pki init` wrote for that.
    assert settings.client_identity.cert_chain_pem == pki_dir["server_client"].read_bytes()
    assert settings.identity.cert_chain_pem == pki_dir["server"].read_bytes()


def test_config_errors_name_the_key(pki_dir: dict[str, Path], tmp_path: Path) -> None:
    conf = tmp_path / "sim.toml"
    base = (
        f'[tls]\ncert = "{pki_dir["server"]}"\nkey = "{pki_dir["server_key"]}"\n'
        f'client_cert = "{pki_dir["server_client"]}"\n'
        f'client_key = "{pki_dir["server_client_key"]}"\n'
        f'ca = "{pki_dir["ca"]}"\n'
    )
    conf.write_text(base + '[operator]\nhost = "0.0.0.0"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"operator\.host"):
        load(conf)
    conf.write_text(base + '[[gateways]]\nidentity = "x"\ntype = "XYZ"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"gateways\[0\].type"):
        load(conf)
    conf.write_text(base + "[tls2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tls2"):
        load(conf)


@pytest.mark.parametrize("key", ["client_cert", "client_key"])
def test_missing_client_identity_is_a_config_error(
    pki_dir: dict[str, Path], tmp_path: Path, key: str
) -> None:
    """No quiet fall-back to the serving certificate: the key is named, with the fix."""
    lines = {
        "cert": pki_dir["server"],
        "key": pki_dir["server_key"],
        "client_cert": pki_dir["server_client"],
        "client_key": pki_dir["server_client_key"],
        "ca": pki_dir["ca"],
    }
    del lines[key]
    conf = tmp_path / "sim.toml"
    conf.write_text("[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in lines.items()))
    with pytest.raises(ConfigError) as refused:
        load(conf)
    assert refused.value.key == f"tls.{key}"
    assert "server-client.pem" in refused.value.problem


def test_serving_certificate_as_client_certificate_is_a_config_error(
    pki_dir: dict[str, Path], tmp_path: Path
) -> None:
    """Gateways would refuse it in every handshake (no clientAuth): say so at load."""
    conf = tmp_path / "sim.toml"
    conf.write_text(
        f'[tls]\ncert = "{pki_dir["server"]}"\nkey = "{pki_dir["server_key"]}"\n'
        f'client_cert = "{pki_dir["server"]}"\nclient_key = "{pki_dir["server_key"]}"\n'
        f'ca = "{pki_dir["ca"]}"\n'
    )
    with pytest.raises(ConfigError) as refused:
        load(conf)
    assert refused.value.key == "tls.client_cert"
    assert "no clientAuth" in refused.value.problem


async def test_push_client_does_not_follow_a_redirect(tmp_path: Path) -> None:
    """Issue 8 finding 4: a gateway answering 307 to http:// gets no second copy."""
    from gatewayd_sim.push import GatewayClient

    files = pki.init(tmp_path / "pki")
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(status=204)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://127.0.0.1:{plain}/stolen"})

    plain_app, tls_app = web.Application(), web.Application()
    plain_app.router.add_post("/stolen", record)
    tls_app.router.add_post("/deliver", redirect)
    runners = [web.AppRunner(plain_app), web.AppRunner(tls_app)]
    for runner in runners:
        await runner.setup()
    await web.TCPSite(runners[0], "127.0.0.1", 0).start()
    plain = runners[0].addresses[0][1]
    trust = TrustAnchors(ca_pem=files["ca"].read_bytes())

    def identity(stem: str) -> TlsIdentity:
        return TlsIdentity(
            cert_chain_pem=files[stem].read_bytes(), key_pem=files[f"{stem}_key"].read_bytes()
        )

    ctx = tls.server_context(identity("gateway"), trust)
    await web.TCPSite(runners[1], "127.0.0.1", 0, ssl_context=ctx).start()
    client = GatewayClient(identity("server_client"), trust)
    await client.start()
    try:
        status, _ = await client.post(
            pki.DEMO_GATEWAY_ID,
            f"https://127.0.0.1:{runners[1].addresses[0][1]}/deliver",
            {"msgId": "m-1"},
            token="push-token",
        )
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
    assert status == 307
    assert seen == []


@pytest.mark.parametrize("exp", ["numeric string", "out of range"])
async def test_client_assertion_with_a_malformed_exp_is_401_not_500(
    tmp_path: Path, exp: str
) -> None:
    """Issue 8 finding 5 at the sim's token endpoint: a correctly signed assertion whose
    exp is "1234" or beyond any date is refused as a failed client authentication."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from gatewayd_sim import harness
    from gatewayd_sim.tokens import TOKEN_PATH, SimTokens, TokenClient

    tls_files = harness.make_pki(tmp_path / "pki")
    client_key = pki.new_key()
    public = client_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tokens = SimTokens(
        issuer="https://sim.example/oauth2",
        key_pem=pki.Issued(pki.create_ca().cert, pki.new_key()).key_pem,
        clients=(TokenClient(client_id=pki.DEMO_GATEWAY_ID, public_key_pem=public),),
    )
    async with SimServer(harness.sim_settings(tls_files, tokens=tokens)) as sim:
        now = int(datetime.now(UTC).timestamp())
        assertion = jwt.encode(
            {
                "iss": pki.DEMO_GATEWAY_ID,
                "sub": pki.DEMO_GATEWAY_ID,
                "aud": f"{sim.api_root}{TOKEN_PATH}",
                "exp": str(now + 60) if exp == "numeric string" else 10**30,
                "jti": "a-1",
            },
            pki.Issued(pki.create_ca().cert, client_key).key_pem,
            algorithm="ES256",
        )
        form = {
            "grant_type": "client_credentials",
            "scope": "msgs-msgdelivery",
            "client_id": pki.DEMO_GATEWAY_ID,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
        ctx = tls.client_context(tls_files.trust(), tls_files.identity("gateway"))
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sim.api_root}{TOKEN_PATH}", data=form, ssl=ctx) as resp,
        ):
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"


def test_numeric_ranges_take_canonical_ascii_numbers_only() -> None:
    """Issue 8 finding 8: meter-{1..999} admitted meter-0005 and meter-<Arabic five>."""
    ranged = ServiceIdPattern.parse("meter-{1..999}")
    assert ranged.matches("meter-5")
    assert ranged.matches("meter-999")
    for other in ("meter-0005", "meter-05", "meter-\u0665", "meter-\uff15", "meter-+5", "meter-"):
        assert not ranged.matches(other), other
    assert ServiceIdPattern.parse("m-{0..3}").matches("m-0")
    # Non-ASCII digits in the pattern make no range either: the braces are literal.
    assert not ServiceIdPattern.parse("m-{\u0661..\u0669}").matches("m-5")


async def test_a_service_id_registered_by_another_gateway_is_refused(
    certs: Pki, http: aiohttp.ClientSession
) -> None:
    """Issue 8 finding 8: the latest registration silently won, so a downlink for one
    gateway's device went to another gateway."""
    third = "urn:gatewayd:gateway:third"
    allow = AllowList(
        (
            gateway(GW, "N3G", ("sensor-*@iot.example",)),
            gateway(third, "N3G", ("sensor-*@iot.example",)),
        )
    )
    settings = SimSettings(
        identity=certs.server,
        client_identity=certs.client,
        trust=certs.trust,
        allow=allow,
        max_ttl=600,
    )
    async with SimServer(settings, schema_check=True) as sim:
        mine = registration(ueSvcIds=["sensor-1@iot.example"])
        status, _, _ = await post(http, sim, client_ctx(certs, GW), REG, mine)
        assert status == 201
        theirs = registration(gwId=third, ueSvcIds=["sensor-2@iot.example", "sensor-1@iot.example"])
        with structlog.testing.capture_logs() as logs:
            status, body, _ = await post(http, sim, client_ctx(certs, third), REG, theirs)
        assert status == 409
        assert body["cause"] == "SERVICE_ID_CONFLICT"
        assert "sensor-1" not in str(body)  # a count, not the ids
        assert any(e.get("cause") == "SERVICE_ID_CONFLICT" for e in logs)
        route = sim.route("sensor-1@iot.example")
        assert route is not None
        assert route.gw_id == GW
        assert sim.route("sensor-2@iot.example") is None
        # Its own ids alone are fine.
        alone = registration(gwId=third, ueSvcIds=["sensor-2@iot.example"])
        status, _, _ = await post(http, sim, client_ctx(certs, third), REG, alone)
        assert status == 201


async def test_operator_refuses_foreign_host_and_non_json_posts(
    sim: SimServer, certs: Pki, http: aiohttp.ClientSession, fake_gateway: FakeGateway
) -> None:
    """Issue 8 finding 9: DNS rebinding (any Host) and a browser's cross-origin text/plain
    POST both reached the unauthenticated operator interface."""
    await register(http, sim, certs, fake_gateway.root)
    base = f"http://127.0.0.1:{sim.operator_port}/operator"
    body = '{"to": "sensor-1@iot.example", "payload": "rebound"}'
    async with http.get(f"{base}/registrations", headers={"Host": "attacker.example"}) as resp:
        assert resp.status == 403
    async with http.post(
        f"{base}/downlink", data=body, headers={"Host": "attacker.example:8081"}
    ) as resp:
        assert resp.status == 403
    async with http.post(
        f"{base}/downlink", data=body, headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 415
    async with http.post(f"{base}/fail", data={"status": "503", "count": "1"}) as resp:
        assert resp.status == 415  # a form post: what an HTML form on any site can send
    assert fake_gateway.messages == []
    for host in ("localhost", f"127.0.0.1:{sim.operator_port}", "[::1]:1"):
        async with http.get(f"{base}/registrations", headers={"Host": host}) as resp:
            assert resp.status == 200, host
