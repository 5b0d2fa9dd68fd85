"""Intake refusals with the real core over HTTP (issue 9): an ``expiry`` in the past is
refused, not forwarded; every permanent refusal is kept in the DLQ, logged and counted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import structlog
from gatewayd_sim.server import SimServer
from gatewayd_testing import running_gateway
from loadgen import device_url, export_tokens, http_bearer_transport

from gatewayd import config, metrics
from gatewayd.store import Queue


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return export_tokens(monkeypatch, 1)


async def test_expiry_in_the_past_is_refused_and_kept(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    """Defect 5: it was answered 202 and forwarded."""
    settings = gateway_config(http_bearer_transport(tokens))
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    before = metrics.value(
        "gatewayd_intake_rejected_total", transport="web", reason="invalid_message"
    )
    headers = {"Authorization": f"Bearer {tokens['dev0']}"}
    with structlog.testing.capture_logs() as logs:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as session:
            await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
            url = f"{device_url(gw)()}/v1/devices/dev0/messages"
            late = {"msgId": "late", "payload": "p", "expiry": past}
            async with session.post(url, json=late, headers=headers) as resp:
                status, problem = resp.status, await resp.json(content_type=None)
            fine = {"msgId": "fine", "payload": "p"}
            async with session.post(url, json=fine, headers=headers) as resp:
                assert resp.status == 202
            await sim.wait_for(lambda: len(sim.uplinks) == 1, timeout=20)
            (record,) = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=5)
    assert (status, problem["cause"]) == (400, "INVALID_MESSAGE")
    assert "in the past" in problem["detail"]
    assert [u.message.msg_id for u in sim.uplinks] == ["fine"]
    assert (record.msg_id, record.body["device"], record.body["reason"]) == (
        "late",
        "dev0",
        "invalid_message",
    )
    assert (
        metrics.value("gatewayd_intake_rejected_total", transport="web", reason="invalid_message")
        - before
        == 1
    )
    (event,) = [e for e in logs if e["event"] == "intake.rejected"]
    assert (event["device"], event["reason"]) == ("dev0", "invalid_message")
