"""Binding, keepalive, unbinding and reconnecting, against the real SMSC."""

from __future__ import annotations

import asyncio
import struct

import structlog
from conftest import PASSWORD, Starter
from gatewayd_smpp.pdu import Pdu
from gatewayd_smpp.session import Session
from smsc_peer import Smsc
from strict_smsc import StrictSmsc
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


async def test_a_nack_racing_the_sessions_end_is_not_a_crash() -> None:
    """Defect 9: our generic_nack for an unknown PDU, written after the SMSC closed,
    was logged as smpp.handler.crashed."""

    async def smsc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # An unknown command (0x00000111) and the end of the stream, back to back.
        writer.write(struct.pack(">IIII", 16, 0x111, 0, 7))
        writer.write_eof()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(smsc, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with capture_logs() as logs:
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Let the PDU and the EOF both arrive before the session reads: it then sees
            # the end right after dispatching the PDU, before its nack is written.
            await asyncio.sleep(0.05)

            async def ignore(session: Session, pdu: Pdu) -> None:
                raise AssertionError("no deliver_sm was sent")

            session = Session(
                reader, writer, on_deliver=ignore, log=structlog.get_logger("t"), name="t"
            )
            session.start()
            await asyncio.wait_for(session.closed.wait(), 5)
            await session.aclose("test over")
    server.close()
    await server.wait_closed()
    assert [e for e in logs if e["event"] == "smpp.handler.crashed"] == []
    assert len([e for e in logs if e["event"] == "smpp.pdu.unexpected"]) == 5


async def test_enquire_link_only_after_idle_time(strict: StrictSmsc, start_strict: Starter) -> None:
    _, context = await start_strict(enquire_link=0.4)
    for n in range(8):  # 1.2 s of traffic, never 0.4 s quiet
        await strict.deliver(short_message=b"tick %d" % n)
        await asyncio.sleep(0.15)
    assert strict.of("enquire_link") == []
    quiet_since = asyncio.get_running_loop().time()
    await strict.next("enquire_link", timeout=5)
    assert asyncio.get_running_loop().time() - quiet_since >= 0.2
    assert len(context.accepted) == 8
