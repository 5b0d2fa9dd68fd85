"""The ``smpp`` transport: an ESME bound to one SMSC (the L3G role).

Tasks, all owned here and named ``smpp:NAME:...``: one connect loop per bind
(:mod:`gatewayd_smpp.links`) and the sweeper that answers the parts of MO messages
that never completed. Each session owns its reader and its deliver_sm handlers
(:mod:`gatewayd_smpp.session`).

MT submits are written down in the transport's durable key/value table
(``context.kv``): which SMSC message ids each downlink got, per part (without receipts,
only while parts remain to be sent: the outcome follows at once). A retry of the
same downlink after a restart submits only the parts that never got an id, and waits
for the receipts of the others; a receipt that arrives while nobody waits is stored
under its id until its message asks for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
from dataclasses import dataclass

from gatewayd.api import (
    DeliveryOutcome,
    Downlink,
    GatewaydError,
    Logger,
    Transport,
    TransportContext,
    TransportSettings,
    UplinkReport,
    client_context,
)
from gatewayd_smpp import codec, receipts
from gatewayd_smpp.config import SmppConfig
from gatewayd_smpp.intake import Intake
from gatewayd_smpp.links import BindRefusedError, Link
from gatewayd_smpp.pdu import (
    ESM_UDHI,
    Command,
    ResponseError,
    Retry,
    ShortMessage,
    Status,
    Tag,
    message_id,
    retry_of,
    status_name,
)
from gatewayd_smpp.session import SessionClosedError

__all__ = ["BindRefusedError", "SmppTransport"]

_DRAIN = 5.0  # seconds stop() lets MO handlers finish before unbinding
_KEEP_AFTER = 86400.0  # how long submit records outlive receipt_timeout (for restarts)


class _Failed(Exception):
    """A control-flow signal inside deliver(): stop and return ``outcome``."""

    def __init__(self, outcome: DeliveryOutcome, *, forget: bool = False) -> None:
        self.outcome = outcome
        self.forget = forget or outcome.permanent  # drop the submit record: resend next time


@dataclass(slots=True)
class _Record:
    """What the durable table says of one downlink: its parts' SMSC ids so far."""

    ref: int
    parts: int
    ids: dict[int, str]
    at: float  # time.time() of the first submit

    def dump(self) -> str:
        return json.dumps(
            {"ref": self.ref, "parts": self.parts, "ids": self.ids, "at": self.at},
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, raw: str) -> _Record:
        data = json.loads(raw)
        return cls(
            ref=int(data["ref"]),
            parts=int(data["parts"]),
            ids={int(k): str(v) for k, v in data["ids"].items()},
            at=float(data["at"]),
        )


class SmppTransport(Transport):
    """SMS devices behind an SMSC: MO via deliver_sm/data_sm, MT via submit_sm, receipts."""

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        super().__init__(settings, context)
        self.config = cfg = SmppConfig.from_settings(settings)
        self._log: Logger = context.log.bind(smsc=f"{cfg.host}:{cfg.port}")
        self._book = receipts.ReceiptBook(
            submit_format=cfg.submit_id_format,
            receipt_format=cfg.receipt_id_format,
            log=self._log,
            transport=self.name,
        )
        self._intake = Intake(cfg, context, self._book, self._log, self._unclaimed)
        self._password = ""
        self._tls: ssl.SSLContext | None = None
        self._resume_at = 0.0  # monotonic time before which no submit_sm goes out
        self._next_slot = 0.0  # max_rate pacing: monotonic time of the next free slot
        self._refs = itertools.cycle(range(256))
        self._tasks: list[asyncio.Task[None]] = []
        # One future per submit_sm waiting for its response, done once it is answered.
        self._submitting: set[asyncio.Future[None]] = set()
        self._stopped = asyncio.Event()
        self.links = self._make_links()

    def _make_links(self) -> list[Link]:
        cfg = self.config
        if cfg.bind_mode == "split":
            commands = [Command.BIND_TRANSMITTER] * cfg.binds + [Command.BIND_RECEIVER]
        else:
            commands = [Command.BIND_TRANSCEIVER] * cfg.binds
        return [
            Link(
                config=cfg,
                command=command,
                name=f"smpp:{self.name}" + (f":{i}" if len(commands) > 1 else ""),
                log=self._log,
                on_deliver=self._intake.on_deliver,
                password=lambda: self._password,
                tls=self._current_tls,
            )
            for i, command in enumerate(commands)
        ]

    @property
    def bound(self) -> asyncio.Event:
        """Set while the first bind is bound."""
        return self.links[0].bound

    @property
    def binds(self) -> int:
        """Successful binds so far, over all links (for operators' metrics and tests)."""
        return sum(link.binds for link in self.links)

    def link_state(self) -> dict[str, str | int]:
        """For ``gatewayd status``: bound when every configured bind is up, binding while
        some are up or an attempt is under way, unbound when none is and none is tried
        right now (waiting out the backoff, or stopped). ``binds`` is up/configured."""
        states = [link.state for link in self.links]
        up = states.count("bound")
        if up == len(states):
            state = "bound"
        elif up or "binding" in states:
            state = "binding"
        else:
            state = "unbound"
        return {
            "state": state,
            "binds": f"{up}/{len(states)}",
            "rebinds": sum(link.rebinds for link in self.links),
        }

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Read the password and the TLS material (a bad reference stops the start), then
        connect in the background: an SMSC that is down is retried, not fatal."""
        cfg = self.config
        self._password = cfg.password.read_text()
        if len(self._password) > 8:
            raise GatewaydError(
                f"transports.{self.name}.password: SMPP 3.4 allows at most 8 characters"
            )
        if cfg.tls:
            self._tls = self._tls_context()
        self._tasks = [
            asyncio.create_task(link.run(), name=f"{link.name}:connect") for link in self.links
        ]
        self._tasks.append(asyncio.create_task(self._sweep_parts(), name=f"smpp:{self.name}:parts"))

    def _tls_context(self) -> ssl.SSLContext:
        """The core's TLS profile; with ``tls_credentials``, that backend's client
        certificate and trust anchors, else the system's trust store and no certificate."""
        name = self.config.tls_credentials
        if name is None:
            return client_context(None)
        backend = self.context.credentials(name)
        return client_context(backend.trust_anchors(), backend.tls_identity())

    def _current_tls(self) -> ssl.SSLContext | None:
        """The context for a new connection, rebuilt each time so that rotated
        credentials apply to the next bind; the last good one if the backend fails."""
        if not self.config.tls:
            return None
        try:
            self._tls = self._tls_context()
        except Exception as exc:
            self._log.warning("smpp.tls.unchanged", error=repr(exc))
        return self._tls

    async def run(self) -> None:
        """Intake runs in the session tasks; this just lasts as long as the transport."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Let MO handlers finish, unbind every link cleanly, close, end the owned tasks."""
        for link in self.links:
            link.stopping = True
        await asyncio.gather(*(link.stop(_DRAIN) for link in self.links))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopped.set()

    async def _sweep_parts(self) -> None:
        interval = min(1.0, self.config.part_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            await self._intake.expire_parts()

    # --- MT -------------------------------------------------------------------------

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        """submit_sm every part not submitted yet; with receipts, wait for each part's."""
        log = self._log.bind(msg_id=message.msg_id, device=message.device.name)
        key = f"mt:{message.msg_id}"
        stored = await self.context.kv.get(key)
        record = _Record.load(stored) if stored else None
        ref = record.ref if record else next(self._refs)
        try:
            parts = self._parts(message.payload or "", ref)
        except codec.EncodingError as exc:
            log.warning("smpp.submit.failed", cause=str(exc), permanent=True)
            return DeliveryOutcome.failure(str(exc), permanent=True)
        if record is None or record.parts != len(parts):
            record = _Record(ref=ref, parts=len(parts), ids={}, at=time.time())
        elif record.ids:
            log.info("smpp.submit.resumed", smsc_message_ids=list(record.ids.values()))
        futures: dict[int, asyncio.Future[receipts.Receipt]] = {}
        # Whether the table holds rows of this message that the end must remove: a
        # message that never wrote any (and found none) costs no delete.
        written = stored is not None
        try:
            for seq, part in enumerate(parts):
                if seq not in record.ids:
                    smsc_id = await self._submit(log, message.device.name, part)
                    record.ids[seq] = smsc_id
                    if self.config.receipts:
                        # Registered before any await: a receipt read right after the
                        # submit_sm_resp finds its waiter.
                        futures[seq] = self._book.expect(smsc_id)
                    if self.config.receipts or len(record.ids) < len(parts):
                        # Without receipts, the outcome follows the last part at once:
                        # its record would be deleted right after the commit. Only a
                        # part still to send needs the ones before written down.
                        await self._remember(key, message.msg_id, record)
                        written = True
                elif self.config.receipts:
                    futures[seq] = await self._expect_stored(record.ids[seq])
            ids = [record.ids[i] for i in range(len(parts))]
            log.info(
                "smpp.submitted",
                parts=len(parts),
                data_coding=parts[0].data_coding,
                smsc_message_ids=ids,
            )
            if not self.config.receipts:
                if written:
                    await self._forget(key, record)
                return DeliveryOutcome.success()
            outcome = await self._await_receipts(log, record, list(futures.values()))
            await self._forget(key, record)
            return outcome
        except _Failed as failed:
            self._book.forget(record.ids[i] for i in futures)
            outcome = failed.outcome
            log.warning(
                "smpp.submit.failed",
                cause=outcome.cause,
                permanent=outcome.permanent,
                parts_sent=len(record.ids),
            )
            if failed.forget and written:
                await self._forget(key, record)
            return outcome

    def _parts(self, text: str, ref: int) -> list[codec.Part]:
        if self.config.mt_field == "message_payload":
            # The SMSC segments: the whole text goes in one submit_sm's message_payload.
            coding = codec.choose_coding(text, self.config.data_coding)
            raw = codec.encode_whole(text, coding)
            return [codec.Part(data_coding=coding, short_message=raw, udhi=False)]
        return codec.segment(text, policy=self.config.data_coding, ref=ref)

    async def _remember(self, key: str, msg_id: str, record: _Record) -> None:
        ttl = self.config.receipt_timeout + _KEEP_AFTER
        items = {key: record.dump()}
        for smsc_id in record.ids.values():
            for k in self._book.submit_keys(smsc_id):
                items[f"id:{k}"] = msg_id
        await self.context.kv.put_many(items, ttl=ttl)

    async def _forget(self, key: str, record: _Record) -> None:
        keys = [key]
        for smsc_id in record.ids.values():
            for k in self._book.submit_keys(smsc_id):
                keys += [f"id:{k}", f"receipt:{k}"]
        await self.context.kv.delete(keys)

    async def _expect_stored(self, smsc_id: str) -> asyncio.Future[receipts.Receipt]:
        """A waiter for a part submitted before; resolved at once from a stored receipt."""
        future = self._book.expect(smsc_id)
        if not future.done():
            keys = [f"receipt:{k}" for k in self._book.submit_keys(smsc_id)]
            found = await self.context.kv.get_many(keys)
            for k in keys:
                if k in found and not future.done():
                    data = json.loads(found[k])
                    self._book.forget([smsc_id])
                    future = asyncio.get_running_loop().create_future()
                    future.set_result(
                        receipts.Receipt(
                            message_id=smsc_id, state=int(data["state"]), error=data.get("err")
                        )
                    )
        return future

    async def _unclaimed(self, receipt: receipts.Receipt) -> None:
        """A final receipt nobody waits for: keep it durably for the message it names.

        Called before the receipt is acknowledged to the SMSC. A receipt that names no
        message we submitted (its id unknown under every reading) is a warning.

        Most often it merely overtook its own submit_sm_resp (read on another bind, or
        just behind it on this one): so it first waits for the submits answered by then
        (bounded by response_timeout). If one of them took it, nothing is looked up or
        written.
        """
        if self._submitting:
            await asyncio.wait(set(self._submitting), timeout=self.config.response_timeout)
            if not self._book.is_kept(receipt):
                return
        keys = self._book.receipt_keys(receipt.message_id)
        known = await self.context.kv.get_many(f"id:{k}" for k in keys)
        if not known:
            self._log.warning(
                "smpp.receipt.unmatched", smsc_message_id=receipt.message_id, stat=receipt.stat
            )
            return
        named = sorted(set(known.values()))
        if len(named) > 1:
            # Submitted messages it could name under different readings ("auto"): the
            # same rule as in the book, nobody guesses (and nothing is stored for them).
            self._book.ambiguous([receipt.message_id], named)
            return
        matched = [k for k in keys if f"id:{k}" in known]
        self._book.learn(receipt.message_id, matched)
        value = json.dumps({"state": receipt.state, "err": receipt.error})
        ttl = self.config.receipt_timeout + _KEEP_AFTER
        # Only under the keys that matched: another reading of the id may be another
        # message's, whose retry must not take this receipt.
        await self.context.kv.put_many({f"receipt:{k}": value for k in matched}, ttl=ttl)
        msg_id = named[0]
        self._log.info(
            "smpp.receipt.held",
            msg_id=msg_id,
            smsc_message_id=receipt.message_id,
            stat=receipt.stat,
        )

    def _pick(self) -> Link | None:
        """The bound sending link with the fewest submits in flight."""
        ready = [link for link in self.links if link.sends and link.session is not None]
        return min(ready, key=lambda link: link.inflight, default=None)

    def _submit_body(self, device: str, part: codec.Part) -> bytes:
        cfg = self.config
        tlvs: dict[int, bytes] = {}
        short = part.short_message
        if cfg.mt_field == "message_payload":
            tlvs[Tag.MESSAGE_PAYLOAD] = short
            short = b""
        sm = ShortMessage(
            source_addr_ton=cfg.source.ton,
            source_addr_npi=cfg.source.npi,
            source_addr=cfg.source.addr,
            dest_addr_ton=cfg.dest_ton,
            dest_addr_npi=cfg.dest_npi,
            destination_addr=device,
            esm_class=ESM_UDHI if part.udhi else 0,
            registered_delivery=1 if cfg.receipts else 0,
            data_coding=part.data_coding,
            short_message=short,
            tlvs=tlvs,
        )
        try:
            return sm.encode()
        except ValueError as exc:
            # An address SMPP cannot carry: no retry will change it.
            outcome = DeliveryOutcome.failure(f"cannot encode: {exc}", permanent=True)
            raise _Failed(outcome) from None

    async def _submit_once(self, link: Link, body: bytes) -> tuple[int, str]:
        """One submit_sm through ``link``: (status, SMSC message id or the cause)."""
        link.inflight += 1
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with link.window:
                await self._pace()
                session = link.session
                if session is None:
                    raise _Failed(DeliveryOutcome.failure("SMSC not bound"))
                self._submitting.add(answered)  # from here on, the SMSC may answer it
                resp = await session.request(
                    Command.SUBMIT_SM, body, timeout=self.config.response_timeout
                )
        except TimeoutError:
            raise _Failed(DeliveryOutcome.failure("no submit_sm_resp in time")) from None
        except SessionClosedError as exc:
            raise _Failed(DeliveryOutcome.failure(f"SMSC session lost: {exc}")) from None
        except ResponseError as exc:
            return exc.status, str(exc)
        finally:
            link.inflight -= 1
            # Whoever waits on this resumes after deliver() registered the id with the
            # book: nothing between here and ReceiptBook.expect() awaits.
            self._submitting.discard(answered)
            answered.set_result(None)
        if resp.status == Status.ROK:
            return Status.ROK, message_id(resp.body)
        return resp.status, status_name(resp.status)

    async def _submit(self, log: Logger, device: str, part: codec.Part) -> str:
        """Submit one part; its SMSC message id, or :class:`_Failed` per :data:`pdu.RETRY`."""
        cfg = self.config
        body = self._submit_body(device, part)
        cause = "no attempt"
        for attempt in range(cfg.throttle_retries + 1):
            link = self._pick()
            if link is None:
                raise _Failed(DeliveryOutcome.failure("SMSC not bound"))
            status, cause = await self._submit_once(link, body)
            if status == Status.ROK:
                return cause
            kind = retry_of(status)
            if kind == Retry.PERMANENT:
                raise _Failed(DeliveryOutcome.failure(cause, permanent=True))
            if kind == Retry.LATER:
                raise _Failed(DeliveryOutcome.failure(cause))
            if kind == Retry.REBIND:
                log.warning("smpp.rebind", status=cause)
                await link.rebind(f"SMSC answered {cause}")
                raise _Failed(DeliveryOutcome.failure(cause))
            # The SMSC asks us to slow down: pause every submit, not just this one.
            pause = cfg.throttle_backoff * (2**attempt)
            self._resume_at = max(self._resume_at, time.monotonic() + pause)
            log.info("smpp.throttled", status=cause, pause=pause, attempt=attempt + 1)
        raise _Failed(DeliveryOutcome.failure(cause))

    async def _pace(self) -> None:
        """Wait out a throttle pause, then take a slot of ``max_rate`` (if set)."""
        now = time.monotonic()
        start = max(now, self._resume_at)
        if self.config.max_rate > 0:
            start = max(start, self._next_slot)
            self._next_slot = start + 1.0 / self.config.max_rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _await_receipts(
        self, log: Logger, record: _Record, futures: list[asyncio.Future[receipts.Receipt]]
    ) -> DeliveryOutcome:
        ids = [record.ids[i] for i in range(record.parts)]
        left = self.config.receipt_timeout - (time.time() - record.at)
        try:
            if all(f.done() for f in futures):
                # Receipts stored while the gateway was down count, however late it is.
                got = [f.result() for f in futures]
            else:
                async with asyncio.timeout(max(left, 0.0)):
                    got = await asyncio.gather(*futures)
        except TimeoutError:
            # Receipts get lost: a retry of this message submits it again.
            cause = f"no delivery receipt within {self.config.receipt_timeout:g}s"
            raise _Failed(DeliveryOutcome.failure(cause), forget=True) from None
        failed = [r for r in got if not r.delivered]
        log.info(
            "smpp.receipt",
            delivered=not failed,
            stats=[r.stat for r in got],
            smsc_message_ids=ids,
        )
        if failed:
            first = failed[0]
            cause = first.stat + (f" err:{first.error}" if first.error else "")
            return DeliveryOutcome.failure(cause, permanent=True)
        return DeliveryOutcome.success()

    async def deliver_report(self, report: UplinkReport) -> bool:
        """SMS has no channel for a report on a message the device sent: not carried."""
        return False
