"""Matching receipts to submits when ids may read in two bases ("auto")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import SmsContext, base_options, make_settings
from gatewayd_smpp import receipts
from gatewayd_smpp.receipts import DEC_HEX, SAME, Match, Receipt, ReceiptBook
from gatewayd_smpp.transport import SmppTransport, _Record
from gatewayd_testing import MemoryKV
from structlog.testing import capture_logs


def record(smsc_id: str) -> _Record:
    """What the durable table says of a one-part message just submitted."""
    return _Record(ref=1, parts=1, ids={0: smsc_id}, at=time.time())


def delivered(message_id: str) -> Receipt:
    return Receipt(message_id=message_id, state=receipts.DELIVERED)


def undeliverable(message_id: str) -> Receipt:
    return Receipt(message_id=message_id, state=5)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def learned_dec_hex(book: ReceiptBook) -> None:
    """Three submits and receipts that only decimal-then-hex links: "1000" is "3e8"."""
    for n in (1000, 2000, 3000):
        first = book.expect(str(n))
        assert book.resolve(delivered(f"{n:x}")) is Match.MATCHED
        assert first.done()


async def test_a_receipt_in_the_other_base_finds_its_submit() -> None:
    book = ReceiptBook(transport="sms")
    with capture_logs() as logs:
        await learned_dec_hex(book)
    assert book.learned == DEC_HEX
    (learned,) = events(logs, "smpp.receipt.format_learned")
    assert learned["transport"] == "sms"
    assert (learned["submit_id_format"], learned["receipt_id_format"]) == ("decimal", "hex")


async def test_a_receipt_two_submits_could_own_is_not_guessed() -> None:
    """Submits "10" and "16" wait; the SMSC writes hex: its receipt "10" means 16. The
    book used to hand it to "10" (the same text first): the wrong SMS was settled."""
    book = ReceiptBook()
    ten, sixteen = book.expect("10"), book.expect("16")
    with capture_logs() as logs:
        book.resolve(delivered("10"))
    assert not ten.done()
    assert not sixteen.done()
    (event,) = events(logs, "smpp.receipt.ambiguous")
    assert event["log_level"] == "warning"
    assert event["receipt_ids"] == ["10"]
    assert sorted(event["candidates"]) == ["10", "16"]


async def test_after_learning_a_colliding_receipt_goes_by_the_learned_reading() -> None:
    book = ReceiptBook()
    await learned_dec_hex(book)
    ten, sixteen = book.expect("10"), book.expect("16")
    assert book.resolve(delivered("10")) is Match.MATCHED
    assert sixteen.done()
    assert sixteen.result().message_id == "10"
    assert not ten.done()
    assert book.resolve(undeliverable("a")) is Match.MATCHED
    assert ten.result().state == 5


async def test_an_ambiguous_receipt_settles_when_delivered_again_after_learning() -> None:
    """It is left with the SMSC (answered ESME_RX_T_APPN), not kept: only in memory, a
    restart would lose it after the SMSC heard we had it."""
    book = ReceiptBook()
    ten, sixteen = book.expect("10"), book.expect("16")
    assert book.resolve(delivered("10")) is Match.AMBIGUOUS
    assert book._kept == {}
    await learned_dec_hex(book)
    assert not sixteen.done()
    assert book.resolve(delivered("10")) is Match.MATCHED
    assert sixteen.done()
    assert not ten.done()


async def test_the_learned_pair_is_logged_once() -> None:
    book = ReceiptBook()
    with capture_logs() as logs:
        await learned_dec_hex(book)
        for n in (4000, 5000):
            future = book.expect(str(n))
            book.resolve(delivered(f"{n:x}"))
            assert future.done()
    assert len(events(logs, "smpp.receipt.format_learned")) == 1


async def test_same_text_ids_learn_the_string_reading() -> None:
    book = ReceiptBook()
    # "7" reads the same in every way: it teaches nothing decisive yet.
    seven = book.expect("7")
    book.resolve(delivered("7"))
    assert seven.done()
    assert book.learned is None
    for n in (1234, 2345, 3456):
        future = book.expect(f"0000{n}")
        book.resolve(delivered(str(n)))
        assert future.done()
    assert book.learned == SAME


async def test_an_early_receipt_is_taken_by_the_one_submit_it_names() -> None:
    book = ReceiptBook()
    assert book.resolve(delivered("3e8")) is Match.UNCLAIMED
    future = book.expect("1000")
    assert future.done()


async def test_early_receipts_follow_the_same_rule() -> None:
    """Two receipts overtook their submits: "10" (16, or 10) and "a" (10 in hex)."""
    book = ReceiptBook()
    book.resolve(delivered("10"))
    book.resolve(undeliverable("a"))
    with capture_logs() as logs:
        ten = book.expect("10")  # could own either receipt
        sixteen = book.expect("16")  # owns "10" as hex, but "10" also names submit "10"
    assert not ten.done()
    assert not sixteen.done()
    ambiguous = events(logs, "smpp.receipt.ambiguous")
    assert sorted(ambiguous[0]["receipt_ids"]) == ["10", "a"]
    assert sorted(ambiguous[1]["candidates"]) == ["10", "16"]
    await learned_dec_hex(book)  # the kept receipts are read again, one way only
    assert sixteen.result().message_id == "10"
    assert ten.result().message_id == "a"


@pytest.mark.parametrize(
    ("submit_format", "receipt_format", "owner"),
    [("decimal", "hex", "16"), ("string", "string", "10"), ("hex", "hex", "10")],
)
async def test_declared_formats_match_as_declared(
    submit_format: str, receipt_format: str, owner: str
) -> None:
    book = ReceiptBook(submit_format=submit_format, receipt_format=receipt_format)
    futures = {"10": book.expect("10"), "16": book.expect("16")}
    with capture_logs() as logs:
        assert book.resolve(delivered("10")) is Match.MATCHED
    assert [k for k, f in futures.items() if f.done()] == [owner]
    assert logs == []


async def test_one_declared_side_limits_the_readings() -> None:
    """receipt_id_format = "hex" with an "auto" submit side: "10" is 16 or the same text."""
    book = ReceiptBook(receipt_format="hex")
    ten, sixteen = book.expect("10"), book.expect("16")
    assert book.resolve(delivered("10")) is Match.AMBIGUOUS
    await learned_dec_hex(book)
    assert book.learned == DEC_HEX
    book.resolve(delivered("10"))  # the SMSC delivers it again
    assert sixteen.done()
    assert not ten.done()


async def test_forget_cancels_and_drops() -> None:
    book = ReceiptBook()
    future = book.expect("10")
    book.forget(["10"])
    assert future.cancelled()
    assert book.resolve(delivered("10")) is Match.UNCLAIMED


async def test_the_durable_table_does_not_guess_either() -> None:
    """After a restart nobody waits: the receipt is looked up among the submits written
    down. Two messages it could name: it is stored for neither."""
    settings = make_settings(base_options(2775))
    kv = MemoryKV()
    context = SmsContext(settings.devices, kv)
    transport = SmppTransport(settings, context)
    for msg_id, smsc_id in (("mt-a", "10"), ("mt-b", "16")):
        await transport._remember(f"mt:{msg_id}", msg_id, record(smsc_id))
    with capture_logs() as logs:
        # Not acknowledged: nothing keeps it here, the SMSC must.
        assert await transport._unclaimed(delivered("10")) is False
    (event,) = events(logs, "smpp.receipt.ambiguous")
    assert event["candidates"] == ["mt-a", "mt-b"]
    assert not [k for k in kv.rows if k.startswith("receipt:")]
    # "3e8" names one message only (as 1000 in hex): stored under its reading alone.
    for msg_id, n in (("mt-c", 1000), ("mt-d", 2000), ("mt-e", 3000)):
        await transport._remember(f"mt:{msg_id}", msg_id, record(str(n)))
    with capture_logs() as logs:
        for n in (1000, 2000, 3000):
            await transport._unclaimed(delivered(f"{n:x}"))
    assert [e["msg_id"] for e in events(logs, "smpp.receipt.held")] == ["mt-c", "mt-d", "mt-e"]
    stored = [k for k in kv.rows if k.startswith("receipt:")]
    assert stored == ["receipt:dh:1000", "receipt:dh:2000", "receipt:dh:3000"]
    # ... and those taught the book: "10" now names 16 only.
    with capture_logs() as logs:
        await transport._unclaimed(delivered("10"))
    assert [e["msg_id"] for e in events(logs, "smpp.receipt.held")] == ["mt-b"]


async def test_a_submit_id_the_learned_reading_cannot_read_is_still_forgotten() -> None:
    """Decimal-then-hex learned, the SMSC answers a submit with "abc": no decimal key.
    It was registered under no key: forget() could not find it, its entry leaked."""
    book = ReceiptBook()
    await learned_dec_hex(book)
    with capture_logs() as logs:
        odd = book.expect("abc")
        other = book.expect("xyz")
    assert [e["message_id"] for e in events(logs, "smpp.receipt.id_unread")] == ["abc"]
    book.forget(["abc"])
    assert odd.cancelled()
    # Waited for under its text, like any id read as a string.
    assert book.resolve(delivered("XYZ")) is Match.MATCHED
    assert other.done()
    assert book._pending == {}
    assert book._by_id == {}


async def test_a_waiting_submit_the_learned_reading_cannot_read_keeps_its_text() -> None:
    book = ReceiptBook()
    odd = book.expect("abc")  # hex or text; not decimal
    await learned_dec_hex(book)
    assert book.resolve(delivered("abc")) is Match.MATCHED
    assert odd.done()


def transport_with(kv: MemoryKV) -> SmppTransport:
    settings = make_settings(base_options(2775))
    return SmppTransport(settings, SmsContext(settings.devices, kv))


async def overtaken(transport: SmppTransport, receipt: Receipt) -> tuple[Any, Any]:
    """``receipt`` read while a submit waits for its submit_sm_resp: what the intake
    does (resolve, then _unclaimed, which waits for that submit), and that submit."""
    answered: Any = asyncio.get_running_loop().create_future()
    transport._book.in_flight.add(answered)
    assert transport._book.resolve(receipt) is Match.UNCLAIMED
    task = asyncio.create_task(transport._unclaimed(receipt))
    await asyncio.sleep(0)
    return task, answered


def answer(transport: SmppTransport, answered: Any) -> None:
    transport._book.in_flight.discard(answered)
    answered.set_result(None)


async def test_a_receipt_evicted_while_it_waited_is_still_written_down() -> None:
    """The kept receipts are bounded: one pushed out while it waited for the submits in
    flight was taken for claimed (no longer kept), acked, and written nowhere."""
    kv = MemoryKV()
    transport = transport_with(kv)
    transport._book._keep = 1
    await transport._remember("mt:mt-a", "mt-a", record("1000"))
    task, answered = await overtaken(transport, delivered("1000"))
    transport._book.resolve(delivered("77"))  # pushes "1000" out
    with capture_logs() as logs:
        answer(transport, answered)
        await task
    assert [e["msg_id"] for e in events(logs, "smpp.receipt.held")] == ["mt-a"]
    assert "receipt:s:1000" in kv.rows


async def test_a_receipt_the_learned_reading_cannot_read_is_not_taken_for_claimed() -> None:
    """It waited; meanwhile the pair was learned, and "xyz" has no key under it."""
    transport = transport_with(MemoryKV())
    task, answered = await overtaken(transport, delivered("xyz"))
    for n in (1000, 2000, 3000):  # receipts matched in the durable table meanwhile
        transport._book.learn(f"{n:x}", [f"dh:{n}"])
    assert transport._book.learned == DEC_HEX
    with capture_logs() as logs:
        answer(transport, answered)
        await task
    assert [e["smsc_message_id"] for e in events(logs, "smpp.receipt.unmatched")] == ["xyz"]


async def test_a_receipt_a_submit_in_flight_could_own_waits_for_it() -> None:
    """Submit "10" waits; another submit awaits its submit_sm_resp ("16", we will learn).
    The hex receipt "10" (16) named "10" alone: it settled the wrong message, and
    locked the wrong reading."""
    book = ReceiptBook()
    ten = book.expect("10")
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.in_flight.add(answered)
    receipt = delivered("10")
    assert book.resolve(receipt) is Match.UNCLAIMED  # not yet
    kept = book.kept(receipt)
    assert kept is not None
    book.in_flight.discard(answered)
    sixteen = book.expect("16")
    assert book.recheck(kept) is Match.AMBIGUOUS
    assert not ten.done()
    assert not sixteen.done()
    assert book.learned is None


async def test_with_nothing_else_in_flight_the_waiting_submit_takes_it() -> None:
    book = ReceiptBook()
    ten = book.expect("10")
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.in_flight.add(answered)
    receipt = delivered("10")
    assert book.resolve(receipt) is Match.UNCLAIMED
    kept = book.kept(receipt)
    assert kept is not None
    book.in_flight.discard(answered)
    book.expect("99")  # what that submit got: no reading of "10"
    assert book.recheck(kept) is Match.MATCHED
    assert kept.claimed
    assert ten.result() is receipt


async def test_one_match_does_not_lock_the_reading() -> None:
    """A receipt for a message of before a restart ("10", 16 in hex) meets the one
    submit waiting here, "10": that match cannot be told from a right one. It used to
    lock the text reading for good: no receipt in the other base matched again."""
    book = ReceiptBook()
    book.expect("10")
    assert book.resolve(delivered("10")) is Match.MATCHED
    assert book.learned is None
    await learned_dec_hex(book)
    assert book.learned == DEC_HEX


async def test_an_early_receipt_is_not_taken_while_another_submit_could_own_it() -> None:
    book = ReceiptBook()
    receipt = delivered("10")
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.in_flight.add(answered)
    assert book.resolve(receipt) is Match.UNCLAIMED
    kept = book.kept(receipt)
    assert kept is not None
    ten = book.expect("10")  # the other submit is still unanswered: it may be "16"
    assert not ten.done()
    book.in_flight.discard(answered)
    book.expect("16")
    assert book.recheck(kept) is Match.AMBIGUOUS
    assert not ten.done()
