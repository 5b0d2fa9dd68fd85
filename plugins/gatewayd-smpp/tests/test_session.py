"""Binding, keepalive, unbinding and reconnecting, against the real SMSC."""

from __future__ import annotations

import asyncio

from conftest import PASSWORD, Starter
from smsc_peer import Smsc
from structlog.testing import capture_logs


async def test_binds_as_transceiver_with_configured_credentials(
    smsc: Smsc, start_transport: Starter
) -> None:
    await start_transport(system_type="gw")
    (bind,) = smsc.of("bind")
    assert bind["system_id"] == "gatewayd"
    assert bind["password"] == PASSWORD
    assert bind["system_type"] == "gw"
    assert bind["status"] == 0


async def test_enquire_link_keeps_the_session_alive(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport(enquire_link=0.1)
    await smsc.wait_for(lambda e: e["event"] == "enquire_link", count=3, timeout=5)
    assert transport.bound.is_set()
    assert transport.binds == 1


async def test_stop_unbinds_cleanly(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    await transport.stop()
    await smsc.next("unbind")
    assert not transport.bound.is_set()


async def test_reconnects_after_smsc_restart(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    with capture_logs() as logs:
        await smsc.restart()
        await smsc.next("bind", timeout=10)
        await asyncio.wait_for(transport.bound.wait(), 10)
    assert transport.binds == 2
    events = [e["event"] for e in logs]
    assert "smpp.unbound" in events
    assert events.count("smpp.bound") == 1


async def test_reconnects_after_unbind_from_smsc(smsc: Smsc, start_transport: Starter) -> None:
    transport, _ = await start_transport()
    await smsc.command("unbind")
    await smsc.next("unbind_resp")
    await smsc.next("bind", after=1, timeout=10)
    await asyncio.wait_for(transport.bound.wait(), 10)
    assert transport.binds == 2


async def test_refused_credentials_are_not_retried_in_a_tight_loop(
    smsc: Smsc, start_transport: Starter
) -> None:
    await smsc.command("bind_status", status=0x0E)  # ESME_RINVPASWD
    with capture_logs() as logs:
        transport, _ = await start_transport(bound=False, reconnect_max=1.0)
        await smsc.next("bind")
        await asyncio.sleep(0.6)
        # reconnect_initial is 0.05 s: a tight loop would have bound ~10 times by now.
        assert len(smsc.of("bind")) == 1
        assert not transport.bound.is_set()
        await smsc.command("bind_status", status=0)
        await asyncio.wait_for(transport.bound.wait(), 5)
    refused = [e for e in logs if e["event"] == "smpp.bind.refused"]
    assert refused[0]["status"] == "ESME_RINVPASWD"
    assert refused[0]["credentials"] is True
    assert all(PASSWORD not in repr(e) for e in logs)
