"""Device authentication by client certificate over real mutual TLS."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gatewayd import pki

ID1 = "urn:gatewayd:device:sensor-1"
ID2 = "urn:gatewayd:device:sensor-2"
DEVICES = [
    {"device": "sensor-1", "identity": ID1},
    {"device": "sensor-2", "identity": ID2},
]


def client_ssl(test_pki: Any, cert: pki.Issued | None, tmp_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(test_pki.ca_file))
    if cert is not None:
        chain, key = pki.write_pair(tmp_path, "client", cert)
        ctx.load_cert_chain(chain, key)
    return ctx


async def post(transport: Any, device: str, ctx: ssl.SSLContext) -> tuple[int, Any]:
    host, port = transport.address
    target = f"https://{host}:{port}/v1/devices/{device}/messages"
    async with (
        aiohttp.ClientSession() as session,
        session.post(target, json={"payload": "x"}, ssl=ctx) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def mtls(start_transport: Any, device_backend: Any) -> Any:
    return await start_transport(
        {"tls": "devices", "device_auth": "client_cert"}, DEVICES, {"devices": device_backend}
    )


async def test_certificate_authenticates_its_device(
    mtls: Any, test_pki: Any, tmp_path: Path
) -> None:
    transport, ctx = mtls
    status, body = await post(
        transport, "sensor-1", client_ssl(test_pki, test_pki.device(ID1), tmp_path)
    )
    assert status == 202
    assert body["duplicate"] is False
    assert [u.device for u in ctx.accepted] == ["sensor-1"]


async def test_certificate_of_another_device_is_403(
    mtls: Any, test_pki: Any, tmp_path: Path
) -> None:
    transport, ctx = mtls
    status, body = await post(
        transport, "sensor-2", client_ssl(test_pki, test_pki.device(ID1), tmp_path)
    )
    assert status == 403
    assert body["cause"] == "FORBIDDEN"
    assert ctx.accepted == []


async def test_unmapped_certificate_is_403(mtls: Any, test_pki: Any, tmp_path: Path) -> None:
    transport, ctx = mtls
    cert = test_pki.device("urn:gatewayd:device:stranger")
    status, body = await post(transport, "sensor-1", client_ssl(test_pki, cert, tmp_path))
    assert status == 403
    assert body["status"] == 403
    assert ctx.accepted == []


async def test_no_certificate_never_reaches_http(mtls: Any, test_pki: Any, tmp_path: Path) -> None:
    transport, ctx = mtls
    # TLS 1.3 lets the client finish its handshake before the server's alert arrives,
    # so the refusal surfaces as a connection error on the first request.
    with pytest.raises(aiohttp.ClientError):
        await post(transport, "sensor-1", client_ssl(test_pki, None, tmp_path))
    assert ctx.accepted == []


async def test_certificate_from_other_ca_is_refused(
    mtls: Any, test_pki: Any, tmp_path: Path
) -> None:
    transport, ctx = mtls
    rogue = pki.issue(pki.create_ca("rogue CA"), "device", uris=(ID1,), server=False)
    with pytest.raises(aiohttp.ClientError):
        await post(transport, "sensor-1", client_ssl(test_pki, rogue, tmp_path))
    assert ctx.accepted == []


async def test_bearer_over_tls(
    start_transport: Any, device_backend: Any, bearer: Any, test_pki: Any, tmp_path: Path
) -> None:
    transport, ctx = await start_transport(
        {"tls": "devices"}, bearer(), {"devices": device_backend}
    )
    host, port = transport.address
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://{host}:{port}/v1/devices/sensor-2/messages",
            json={"payload": "x", "msgId": "t1"},
            headers={"Authorization": "Bearer tok-sensor-2-secret"},
            ssl=client_ssl(test_pki, None, tmp_path),
        ) as resp,
    ):
        assert resp.status == 202
        assert await resp.json() == {"msgId": "t1", "duplicate": False}
    assert [u.device for u in ctx.accepted] == ["sensor-2"]
