"""Intake refusals with the real core over HTTP (issue 9): an ``expiry`` in the past is
refused, not forwarded; every permanent refusal is kept in the DLQ, logged and counted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import structlog
from gatewayd_sim.server import SimServer
from gatewayd_testing import refusal_line, running_gateway
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


async def test_one_refusal_is_one_log_line(
    sim: SimServer, tokens: dict[str, str], gateway_config: Callable[..., config.Settings]
) -> None:
    """Monitoring counts log lines: a refused input was logged by the core
    (``intake.rejected``) and again by the transport (``http.uplink.refused``), or, for
    a body that does not parse, followed by ``http.request.problem``. The core's line is
    now the only one, with the transport, device, reason and msg_id."""
    settings = gateway_config(http_bearer_transport(tokens))
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    headers = {"Authorization": f"Bearer {tokens['dev0']}", "Content-Type": "application/json"}
    inputs = {
        "invalid_body": b"{not json",  # the transport's parser refuses it
        "invalid_message": b'{"msgId": "late", "payload": "p", "expiry": "%s"}' % past.encode(),
    }
    msg_ids = {}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as session:
        await sim.wait_for(lambda: bool(sim.registrations), timeout=20)
        url = f"{device_url(gw)()}/v1/devices/dev0/messages"
        for reason, body in inputs.items():
            # Every line about the input is logged before the answer leaves.
            with structlog.testing.capture_logs() as logs:
                async with session.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 400
            line = refusal_line(logs, transport="web", device="dev0", reason=reason)
            msg_ids[reason] = line["msg_id"]
        kept = await gw.store.list_items(queue=Queue.INTAKE, state="dead", limit=5)
    # The line names the dead-letter record: the message's own id when it had one.
    assert msg_ids == {r.body["reason"]: r.msg_id for r in kept}
    assert msg_ids["invalid_message"] == "late"
