"""Hostile JSON bodies on the device API: a 400 problem, never a 500 and a traceback
(issue 8 finding 7), and a message that is no message kept in the gateway's DLQ
(issue 9: every bad input visible in the log, a metric and the dead-letter queue)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

TOKEN1 = "tok-sensor-1-secret"

DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE = {
    "deep array": DEEP,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep inside a message": b'{"payload": "p", "x": ' + DEEP + b"}",
    "surrogate payload": b'{"payload": "\\ud800"}',
    "surrogate msgId": b'{"payload": "p", "msgId": "a\\udfffb"}',
    "surrogate in a key": b'{"payload": "p", "\\udc00": 1}',
    "surrogate deep inside": b'{"payload": "p", "extra": [{"k": ["\\ud834"]}]}',
}


def url(transport: Any, what: str) -> str:
    host, port = transport.address
    return f"http://{host}:{port}/v1/devices/sensor-1/{what}"


async def raw_post(target: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {TOKEN1}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(target, data=body, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_body_is_a_400_and_kept(start_transport: Any, bearer: Any, case: str) -> None:
    transport, ctx = await start_transport({"max_body": 1_000_000}, bearer())
    with capture_logs() as logs:
        for what in ("messages", "reports"):
            status, headers, body = await raw_post(url(transport, what), HOSTILE[case])
            assert status == 400
            assert headers["Content-Type"].startswith("application/problem+json")
            assert body["status"] == 400
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not [e for e in logs if "exc_info" in e or e["event"] == "http.request.failed"]
    # The message is recorded once (reports are not messages), and nothing was accepted.
    assert [(d, r) for d, r, _ in ctx.rejected] == [("sensor-1", "invalid_body")]
    assert ctx.accepted == []
    assert ctx.reports == []
