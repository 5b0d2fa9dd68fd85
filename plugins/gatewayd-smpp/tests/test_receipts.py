"""Matching receipts to submits when ids may read in two bases ("auto")."""

from __future__ import annotations

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
    """A first submit and receipt that only decimal-then-hex links: "1000" is "3e8"."""
    first = book.expect("1000")
    assert book.resolve(delivered("3e8")) is Match.MATCHED
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


async def test_an_ambiguous_receipt_settles_once_the_format_is_learned() -> None:
    book = ReceiptBook()
    ten, sixteen = book.expect("10"), book.expect("16")
    assert book.resolve(delivered("10")) is Match.AMBIGUOUS
    await learned_dec_hex(book)
    assert sixteen.done()
    assert not ten.done()


async def test_the_learned_pair_is_logged_once() -> None:
    book = ReceiptBook()
    with capture_logs() as logs:
        await learned_dec_hex(book)
        for n in (2000, 3000):
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
    future = book.expect("00001234")
    book.resolve(delivered("1234"))
    assert future.done()
    assert book.learned == SAME


async def test_an_early_receipt_is_taken_by_the_one_submit_it_names() -> None:
    book = ReceiptBook()
    assert book.resolve(delivered("3e8")) is Match.UNCLAIMED
    future = book.expect("1000")
    assert future.done()
    assert book.learned == DEC_HEX


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
    future = book.expect("1000")
    book.resolve(delivered("3e8"))
    assert future.done()
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
        await transport._unclaimed(delivered("10"))
    (event,) = events(logs, "smpp.receipt.ambiguous")
    assert event["candidates"] == ["mt-a", "mt-b"]
    assert not [k for k in kv.rows if k.startswith("receipt:")]
    # "3e8" names one message only (as 1000 in hex): stored under its reading alone.
    await transport._remember("mt:mt-c", "mt-c", record("1000"))
    with capture_logs() as logs:
        await transport._unclaimed(delivered("3e8"))
    assert [e["msg_id"] for e in events(logs, "smpp.receipt.held")] == ["mt-c"]
    assert [k for k in kv.rows if k.startswith("receipt:")] == ["receipt:dh:1000"]
    # ... and that taught the book: "10" now names 16 only.
    with capture_logs() as logs:
        await transport._unclaimed(delivered("10"))
    assert [e["msg_id"] for e in events(logs, "smpp.receipt.held")] == ["mt-b"]
