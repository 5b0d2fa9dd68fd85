"""Uplink intake over plain HTTP with bearer tokens: auth, refusals, limits, reports."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gatewayd.api import (
    Address,
    BacklogFullError,
    DeviceReport,
    IntakeRefusedError,
    InvalidMessageError,
    UnknownDeviceError,
)

TOKEN1 = "tok-sensor-1-secret"


def url(transport: Any, device: str = "sensor-1", what: str = "messages") -> str:
    host, port = transport.address
    return f"http://{host}:{port}/v1/devices/{device}/{what}"


def auth(token: str = TOKEN1) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(
    target: str, body: Any = None, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as session:
        if body is not None:
            kw["json"] = body
        async with session.post(target, headers=headers, **kw) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)


def assert_problem(status: int, headers: dict[str, str], body: Any, expected: int) -> None:
    assert status == expected
    assert headers["Content-Type"].startswith("application/problem+json")
    assert set(body) == {"title", "status", "detail", "cause"}
    assert body["status"] == expected


async def test_answers_only_after_accept_returns(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    ctx.gate = asyncio.Event()
    request = asyncio.create_task(post(url(transport), {"payload": "hi", "msgId": "m1"}, auth()))
    await asyncio.wait_for(ctx.entered.wait(), 5)
    # accept() is running but has not returned: the device must still be waiting.
    await asyncio.sleep(0.2)
    assert not request.done()
    assert ctx.accepted == []
    ctx.gate.set()
    status, _, body = await asyncio.wait_for(request, 5)
    assert status == 202
    assert body == {"msgId": "m1", "duplicate": False}
    assert [u.msg_id for u in ctx.accepted] == ["m1"]


async def test_full_uplink_is_mapped(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    body = {
        "payload": "temp=21",
        "msgId": "m2",
        "appId": "app-7",
        "dest": {"addrType": "AS", "addr": "as-1@iot.example"},
        "deliveryReport": True,
        "expiry": "2030-01-02T03:04:05Z",
        "futureField": 1,
    }
    status, _, answer = await post(url(transport), body, auth())
    assert status == 202
    assert answer == {"msgId": "m2", "duplicate": False}
    (uplink,) = ctx.accepted
    assert uplink.device == "sensor-1"
    assert uplink.payload == "temp=21"
    assert uplink.app_id == "app-7"
    assert uplink.dest == Address("AS", "as-1@iot.example")
    assert uplink.report_requested is True
    assert uplink.expiry == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


async def test_gateway_msg_id_and_duplicate_flag(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    ctx.duplicate = True
    status, _, answer = await post(url(transport), {"payload": "x"}, auth())
    assert status == 202
    assert answer == {"msgId": "gw-1", "duplicate": True}


async def test_missing_token_is_401(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(url(transport), {"payload": "x"})
    assert_problem(status, headers, body, 401)
    assert headers["WWW-Authenticate"] == 'Bearer realm="gatewayd"'
    assert ctx.accepted == []


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Basic dXNlcjpwdw==", "Bearer "])
async def test_bad_token_is_401(start_transport: Any, bearer: Any, header: str) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(url(transport), {"payload": "x"}, {"Authorization": header})
    assert_problem(status, headers, body, 401)
    assert headers["WWW-Authenticate"].startswith('Bearer realm="gatewayd"')
    assert ctx.accepted == []


@pytest.mark.parametrize("claimed", ["sensor-2", "no-such-device"])
async def test_device_may_only_send_as_itself(
    start_transport: Any, bearer: Any, claimed: str
) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(url(transport, claimed), {"payload": "x"}, auth())
    assert_problem(status, headers, body, 403)
    status, headers, body = await post(
        url(transport, claimed, "reports"), {"msgId": "d1", "delivered": True}, auth()
    )
    assert_problem(status, headers, body, 403)
    assert ctx.accepted == []
    assert ctx.reports == []


@pytest.mark.parametrize(
    ("refusal", "status", "cause"),
    [
        (UnknownDeviceError("not mapped"), 404, "UNKNOWN_DEVICE"),
        (InvalidMessageError("payload too long"), 400, "INVALID_MESSAGE"),
        (BacklogFullError("store full", retry_after=2.5), 503, "BACKLOG_FULL"),
    ],
)
async def test_refusals_map_to_status(
    start_transport: Any, bearer: Any, refusal: IntakeRefusedError, status: int, cause: str
) -> None:
    transport, ctx = await start_transport({}, bearer())
    ctx.refuse = refusal
    got, headers, body = await post(url(transport), {"payload": "x", "msgId": "m"}, auth())
    assert_problem(got, headers, body, status)
    assert body["cause"] == cause
    assert body["detail"] == refusal.detail
    if status == 503:
        assert headers["Retry-After"] == "3"  # 2.5 s rounded up
    else:
        assert "Retry-After" not in headers


async def test_backlog_full_without_hint_still_says_retry_after(
    start_transport: Any, bearer: Any
) -> None:
    transport, ctx = await start_transport({}, bearer())
    ctx.refuse = BacklogFullError("disk full")
    status, headers, body = await post(url(transport), {"payload": "x"}, auth())
    assert_problem(status, headers, body, 503)
    assert headers["Retry-After"] == "1"


async def test_body_too_large_is_413(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({"max_body": 100}, bearer())
    big = {"payload": "x" * 200}
    status, headers, body = await post(url(transport), big, auth())
    assert_problem(status, headers, body, 413)

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        yield b'{"payload": "'
        yield b"y" * 200
        yield b'"}'

    status, headers, body = await post(
        url(transport), None, {**auth(), "Content-Type": "application/json"}, data=chunks()
    )
    assert_problem(status, headers, body, 413)
    assert ctx.accepted == []


async def test_wrong_content_type_is_415(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(
        url(transport), None, {**auth(), "Content-Type": "text/plain"}, data=b'{"payload":"x"}'
    )
    assert_problem(status, headers, body, 415)
    assert ctx.accepted == []


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "payload"),
        (b'{"payload": 5}', "payload"),
        (b'{"payload": "x", "dest": {"addrType": "UE"}}', "dest.addr"),
        (b'{"payload": "x", "deliveryReport": "yes"}', "deliveryReport"),
        (b'{"payload": "x", "expiry": "tomorrow"}', "expiry"),
        (b'{"payload": "x", "expiry": "2030-01-01T00:00:00"}', "time zone"),
    ],
)
async def test_bad_body_is_400(start_transport: Any, bearer: Any, raw: bytes, detail: str) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(
        url(transport), None, {**auth(), "Content-Type": "application/json"}, data=raw
    )
    assert_problem(status, headers, body, 400)
    assert detail in body["detail"]
    assert ctx.accepted == []


async def test_device_report_is_accepted(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, _, body = await post(
        url(transport, what="reports"),
        {"msgId": "down-1", "delivered": False, "cause": "display off"},
        auth(),
    )
    assert status == 202
    assert body == {"msgId": "down-1"}
    assert ctx.reports == [
        DeviceReport(device="sensor-1", msg_id="down-1", delivered=False, cause="display off")
    ]


async def test_report_needs_delivered(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    status, headers, body = await post(url(transport, what="reports"), {"msgId": "d"}, auth())
    assert_problem(status, headers, body, 400)
    assert "delivered" in body["detail"]
    assert ctx.reports == []


async def test_unknown_route_and_method_are_problems(start_transport: Any, bearer: Any) -> None:
    transport, _ = await start_transport({}, bearer())
    host, port = transport.address
    status, headers, body = await post(f"http://{host}:{port}/nope", {"payload": "x"}, auth())
    assert_problem(status, headers, body, 404)
    async with aiohttp.ClientSession() as session, session.get(url(transport)) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        problem = await resp.json(content_type=None)
    assert problem["status"] == 405


async def test_logs_bind_msg_id_and_never_show_tokens(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    with capture_logs() as logs:
        await post(url(transport), {"payload": "x", "msgId": "m9"}, auth())
        await post(url(transport), {"payload": "x"}, auth("tok-wrong-guess"))
        ctx.refuse = BacklogFullError("full")
        await post(url(transport), {"payload": "x", "msgId": "m10"}, auth())
    events = {entry["event"]: entry for entry in logs}
    assert events["http.uplink.accepted"]["msg_id"] == "m9"
    assert events["http.uplink.refused"]["msg_id"] == "m10"
    assert "http.auth.failed" in events
    # A refusal is one line, with its msg_id; no second, context-free line.
    assert [e["status"] for e in logs if e["event"] == "http.request.problem"] == [401]
    text = repr(logs)
    assert TOKEN1 not in text
    assert "tok-wrong-guess" not in text


async def test_unexpected_failure_is_500_problem(start_transport: Any, bearer: Any) -> None:
    transport, ctx = await start_transport({}, bearer())
    ctx.refuse = RuntimeError("store exploded")
    with capture_logs() as logs:
        status, headers, body = await post(url(transport), {"payload": "x"}, auth())
    assert_problem(status, headers, body, 500)
    assert "exploded" not in body["detail"]  # internals stay in the log
    assert [e["event"] for e in logs] == ["http.request.failed"]
