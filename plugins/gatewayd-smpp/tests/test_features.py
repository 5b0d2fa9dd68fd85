"""Bind pools, split TX/RX binds, message_payload MT, max_rate, resume after a restart, TLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from conftest import SmsContext, Starter, base_options, make_settings
from gatewayd_sim.harness import Pki
from gatewayd_smpp.transport import SmppTransport
from gatewayd_testing import MemoryKV, StaticCredentials
from peer_events import Event
from strict_smsc import StrictSmsc
from structlog.testing import capture_logs
from test_strict import downlink

from gatewayd.api import server_context


class WatchedKV(MemoryKV):
    """A MemoryKV that says when it was written to."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Condition()

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        await super().put_many(items, ttl=ttl)
        async with self.written:
            self.written.notify_all()


async def recorded(kv: WatchedKV, msg_id: str) -> None:
    """Until the submit record of ``msg_id`` is written (right after its submit_sm_resp)."""
    async with asyncio.timeout(5), kv.written:
        await kv.written.wait_for(lambda: f"mt:{msg_id}" in kv.rows)


async def stopped_while_waiting(
    strict: StrictSmsc, start_strict: Starter, kv: WatchedKV, msg_id: str
) -> Event:
    """A transport on ``kv`` submits ``msg_id`` and is stopped while waiting for its
    receipt (as in a gateway restart); returns the SMSC's submit_sm event."""
    first, _ = await start_strict(kv=kv, receipt_timeout=8.0)
    waiting = asyncio.create_task(first.deliver(downlink("once", msg_id=msg_id)))
    submit = await strict.next("submit_sm")
    await recorded(kv, msg_id)
    waiting.cancel()
    await first.stop()
    return submit


async def test_a_pool_of_binds_spreads_submits(strict: StrictSmsc, start_strict: Starter) -> None:
    transport, _ = await start_strict(binds=3, window=2, receipts=False)
    await strict.wait_for(lambda e: e["event"] == "bind", count=3)
    for link in transport.links:
        await asyncio.wait_for(link.bound.wait(), 5)
    outcomes = await asyncio.gather(
        *(transport.deliver(downlink(f"m{i}", msg_id=f"d{i}")) for i in range(12))
    )
    assert all(o.delivered for o in outcomes)
    submits = strict.of("submit_sm")
    assert len(submits) == 12
    # 12 at once, a window of 2 per bind: every bind carries some.
    assert len({e["conn"] for e in submits}) == 3
    assert {e["kind"] for e in strict.of("bind")} == {"transceiver"}


async def test_split_binds_send_on_transmitters_and_receive_on_the_receiver(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    strict.auto_receipt = "DELIVRD"
    transport, context = await start_strict(binds=2, bind_mode="split")
    await strict.wait_for(lambda e: e["event"] == "bind", count=3)
    kinds = sorted(e["kind"] for e in strict.of("bind"))
    assert kinds == ["receiver", "transmitter", "transmitter"]
    for link in transport.links:
        await asyncio.wait_for(link.bound.wait(), 5)
    assert (await transport.deliver(downlink("hi"))).delivered
    assert strict.of("submit_sm")[0]["bind"] == "transmitter"
    resp = await strict.deliver(short_message=b"MO on RX")
    assert resp.status.name == "ESME_ROK"
    assert context.accepted[0].payload == "MO on RX"


async def test_mt_as_message_payload(strict: StrictSmsc, start_strict: Starter) -> None:
    transport, _ = await start_strict(mt_field="message_payload", receipts=False)
    text = "long " * 80  # 400 septets: three parts as short_message, one PDU here
    assert (await transport.deliver(downlink(text))).delivered
    (submit,) = strict.of("submit_sm")
    assert submit["short_message"] == ""
    assert bytes.fromhex(submit["message_payload"]) == text.encode()
    assert submit["esm_class"] == 0
    assert submit["data_coding"] == 0


async def test_max_rate_limits_submits_per_second(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    transport, _ = await start_strict(max_rate=20.0, window=10, receipts=False)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(transport.deliver(downlink("x", msg_id=f"r{i}")) for i in range(11))
    )
    assert all(o.delivered for o in outcomes)
    stamps = [e["at"] for e in strict.of("submit_sm")]
    # 11 submits at 20/s: the last one at least 0.5 s after the first.
    assert stamps[-1] - stamps[0] >= 0.45
    assert time.monotonic() - started >= 0.45


async def test_a_retry_after_restart_resumes_instead_of_resending(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Receipt correlation across a restart, unit-sized: two transport instances share
    one MemoryKV (the store); the first stops while waiting for the receipt."""
    kv = WatchedKV()
    submit = await stopped_while_waiting(strict, start_strict, kv, "mt-1")
    second, _ = await start_strict(kv=kv, receipt_timeout=8.0)
    retry = asyncio.create_task(second.deliver(downlink("once", msg_id="mt-1")))
    await asyncio.sleep(0.3)
    assert not retry.done()
    await strict.receipt(int(submit["message_id"]), "DELIVRD")
    assert (await asyncio.wait_for(retry, 5)).delivered
    assert len(strict.of("submit_sm")) == 1
    assert [k for k in kv.rows if k.startswith("mt:")] == []  # forgotten once final


async def test_a_receipt_before_the_retry_is_kept_for_it(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    kv = WatchedKV()
    submit = await stopped_while_waiting(strict, start_strict, kv, "mt-2")
    second, _ = await start_strict(kv=kv, receipt_timeout=8.0)
    strict.receipt_tlvs = True
    await strict.receipt(int(submit["message_id"]), "UNDELIV")
    await strict.next("deliver_sm_resp")
    outcome = await second.deliver(downlink("once", msg_id="mt-2"))
    assert outcome.permanent
    assert outcome.cause is not None
    assert outcome.cause.startswith("UNDELIV")
    assert len(strict.of("submit_sm")) == 1


async def test_a_lost_receipt_is_resent_on_retry(strict: StrictSmsc, start_strict: Starter) -> None:
    transport, _ = await start_strict(receipt_timeout=0.3)
    first = await transport.deliver(downlink("again", msg_id="mt-3"))
    assert not first.delivered
    assert not first.permanent
    strict.auto_receipt = "DELIVRD"
    assert (await transport.deliver(downlink("again", msg_id="mt-3"))).delivered
    assert len(strict.of("submit_sm")) == 2


async def test_smpp_over_tls_with_a_client_certificate_from_a_backend(
    loopback_pki: Pki,
) -> None:
    """The SMSC requires a client certificate from our CA; the transport takes its
    certificate and trust anchors from a [credentials.NAME] backend."""
    smsc = StrictSmsc()
    server_tls = server_context(loopback_pki.identity("server"), loopback_pki.trust())
    await smsc.start(ssl_context=server_tls)
    settings = make_settings(
        base_options(smsc.port, host="localhost", tls=True, tls_credentials="smsc", receipts=False)
    )
    context = SmsContext(settings.devices)
    context.backends["smsc"] = StaticCredentials(
        loopback_pki.identity("gateway"), loopback_pki.trust(), name="smsc"
    )
    transport = SmppTransport(settings, context)
    try:
        with capture_logs() as logs:
            await transport.start()
            await asyncio.wait_for(transport.bound.wait(), 10)
        assert (await transport.deliver(downlink("over TLS"))).delivered
        assert [e["tls"] for e in logs if e["event"] == "smpp.bound"] == [True]
        peer = smsc.conns[0].writer.get_extra_info("peercert")
        assert peer is not None
    finally:
        await transport.stop()
        await smsc.stop()


async def test_smpp_over_tls_without_a_client_certificate_is_refused(
    loopback_pki: Pki,
) -> None:
    smsc = StrictSmsc()
    await smsc.start(
        ssl_context=server_context(loopback_pki.identity("server"), loopback_pki.trust())
    )
    settings = make_settings(base_options(smsc.port, host="localhost", tls=True))
    transport = SmppTransport(settings, SmsContext(settings.devices))
    try:
        with capture_logs() as logs:
            await transport.start()
            await asyncio.sleep(0.5)
        assert not transport.bound.is_set()
        assert smsc.of("bind") == []
        failed = [e for e in logs if e["event"] == "smpp.connect.failed"]
        assert failed
        assert failed[0]["hint"] == "the SMSC may have refused our client certificate"
    finally:
        await transport.stop()
        await smsc.stop()


async def test_a_receipt_stored_while_down_counts_after_receipt_timeout(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    kv = WatchedKV()
    submit = await stopped_while_waiting(strict, start_strict, kv, "mt-4")
    second, _ = await start_strict(kv=kv, receipt_timeout=0.2)
    await strict.receipt(int(submit["message_id"]), "DELIVRD")
    await strict.next("deliver_sm_resp")
    await asyncio.sleep(0.3)  # the core's retry comes after receipt_timeout has passed
    assert (await second.deliver(downlink("once", msg_id="mt-4"))).delivered
    assert len(strict.of("submit_sm")) == 1


class CountingKV(MemoryKV):
    """A MemoryKV that records each call (one store transaction each in the gateway)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        self.calls.append(("get", keys))
        return await super().get_many(keys)

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        self.calls.append(("put", [f"{k}={v}" for k, v in items.items() if k.startswith("mt:")]))
        await super().put_many(items, ttl=ttl)

    async def delete(self, keys: Iterable[str]) -> None:
        self.calls.append(("delete", list(keys)))
        await super().delete(keys)


async def test_without_receipts_a_one_part_mt_writes_nothing(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Its outcome follows the submit_sm_resp at once: a record written then would be
    deleted right after its commit. Only the look-up for an earlier attempt remains."""
    kv = CountingKV()
    transport, _ = await start_strict(kv=kv, receipts=False)
    assert (await transport.deliver(downlink("one part", msg_id="mt-5"))).delivered
    assert [call for call, _ in kv.calls] == ["get"]
    assert kv.rows == {}


async def test_without_receipts_the_parts_before_the_last_are_written_down(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    kv = CountingKV()
    transport, _ = await start_strict(kv=kv, receipts=False)
    assert (await transport.deliver(downlink("x" * 200, msg_id="mt-6"))).delivered
    first_id = strict.of("submit_sm")[0]["message_id"]
    assert [call for call, _ in kv.calls] == ["get", "put", "delete"]
    (record,) = kv.calls[1][1]  # part 1's id, written before part 2 went out
    assert f'"ids":{{"0":"{first_id}"}}' in record
    assert kv.rows == {}


async def test_with_receipts_an_mt_is_looked_up_written_and_removed(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    strict.auto_receipt = "DELIVRD"
    kv = CountingKV()
    transport, _ = await start_strict(kv=kv, receipt_timeout=5.0)
    assert (await transport.deliver(downlink("with receipt", msg_id="mt-7"))).delivered
    assert [call for call, _ in kv.calls] == ["get", "put", "delete"]
    assert kv.rows == {}


async def test_a_refused_mt_that_wrote_nothing_deletes_nothing(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    kv = CountingKV()
    transport, _ = await start_strict(kv=kv)
    strict.submit_statuses = ["ESME_RINVDSTADR"]
    assert (await transport.deliver(downlink("refused", msg_id="mt-8"))).permanent
    assert [call for call, _ in kv.calls] == ["get"]


class GatedKV(MemoryKV):
    """A MemoryKV whose writes wait for ``opened``: a test acts between two parts."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()
        self.writing = asyncio.Event()

    async def put_many(self, items: Mapping[str, str], *, ttl: float) -> None:
        self.writing.set()
        await self.opened.wait()
        await super().put_many(items, ttl=ttl)


async def test_without_receipts_a_retry_sends_only_the_parts_never_sent(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    kv = GatedKV()
    transport, _ = await start_strict(kv=kv, receipts=False)
    first = asyncio.create_task(transport.deliver(downlink("y" * 200, msg_id="mt-9")))
    await asyncio.wait_for(kv.writing.wait(), 5)  # part 1 is in, its id being written
    strict.submit_statuses = ["ESME_RX_T_APPN"]  # part 2 is refused, for now
    kv.opened.set()
    outcome = await asyncio.wait_for(first, 5)
    assert not outcome.delivered
    assert not outcome.permanent
    assert (await transport.deliver(downlink("y" * 200, msg_id="mt-9"))).delivered
    seqs = [bytes.fromhex(e["short_message"])[5] for e in strict.of("submit_sm")]
    assert seqs == [1, 2, 2]  # part 1 once; part 2 refused, then sent on the retry
    assert kv.rows == {}


async def test_a_receipt_that_overtakes_its_submit_on_another_bind_is_not_looked_up(
    strict: StrictSmsc, start_strict: Starter
) -> None:
    """Split binds: the receipt comes on the receiver, its submit_sm_resp on a
    transmitter, and is often read first. It used to be looked up in the store (a
    transaction) and logged as unmatched, then matched all the same."""
    strict.auto_receipt = "DELIVRD"
    kv = CountingKV()
    transport, _ = await start_strict(kv=kv, binds=2, bind_mode="split", receipt_timeout=5.0)
    await strict.wait_for(lambda e: e["event"] == "bind", count=3)
    for link in transport.links:
        await asyncio.wait_for(link.bound.wait(), 5)
    with capture_logs() as logs:
        outcomes = await asyncio.gather(
            *(transport.deliver(downlink("x", msg_id=f"o{i}")) for i in range(100))
        )
    assert all(o.delivered for o in outcomes)
    assert [e for e in logs if e["event"] == "smpp.receipt.unmatched"] == []
    assert [call for call, _ in kv.calls].count("get") == 100  # the records' look-ups only
    assert kv.rows == {}
