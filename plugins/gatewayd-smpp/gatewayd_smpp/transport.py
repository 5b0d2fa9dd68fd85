"""The ``smpp`` transport: an ESME bound as transceiver to one SMSC (the L3G role).

Tasks, all owned here and named ``smpp:NAME:...``: the connection loop (connect, bind,
keepalive, reconnect with jittered exponential backoff) and the sweeper that answers
the parts of MO messages that never completed. Each session owns its reader and its
deliver_sm handlers (:mod:`gatewayd_smpp.session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time

from gatewayd.api import (
    DeliveryOutcome,
    Downlink,
    GatewaydError,
    Logger,
    Transport,
    TransportContext,
    TransportSettings,
    UplinkReport,
)
from gatewayd_smpp import codec, receipts
from gatewayd_smpp.config import SmppConfig
from gatewayd_smpp.intake import Intake
from gatewayd_smpp.pdu import (
    BIND_AUTH_FAILURES,
    ESM_UDHI,
    Bind,
    Command,
    PduError,
    ShortMessage,
    Status,
    message_id,
    status_name,
    system_id,
)
from gatewayd_smpp.session import Session, SessionClosedError

_RETRY_LATER = frozenset({Status.RTHROTTLED, Status.RMSGQFUL})
_DRAIN = 5.0  # seconds stop() lets MO handlers finish before unbinding


class BindRefusedError(GatewaydError):
    """The SMSC answered bind_transceiver with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"bind refused: {status_name(status)}")
        self.status = status


class _Failed(Exception):
    """A control-flow signal inside deliver(): stop and return ``outcome``."""

    def __init__(self, outcome: DeliveryOutcome) -> None:
        self.outcome = outcome


class SmppTransport(Transport):
    """SMS devices behind an SMSC: MO via deliver_sm, MT via submit_sm, receipts."""

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        super().__init__(settings, context)
        self.config = SmppConfig.from_settings(settings)
        self._log: Logger = context.log.bind(smsc=f"{self.config.host}:{self.config.port}")
        self._book = receipts.ReceiptBook()
        self._intake = Intake(self.config, context, self._book, self._log)
        self._session: Session | None = None
        self._bound = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._password = ""
        self._window = asyncio.Semaphore(self.config.window)
        self._resume_at = 0.0  # monotonic time before which no submit_sm goes out
        self._refs = itertools.cycle(range(256))
        self._tasks: list[asyncio.Task[None]] = []
        # Jitter only spreads reconnects over time; it protects nothing.
        self._jitter = random.Random()  # noqa: S311
        self.binds = 0  # successful binds, for operators' metrics and tests

    @property
    def bound(self) -> asyncio.Event:
        """Set while a session is bound."""
        return self._bound

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Read the password (a bad reference stops the start), then connect in the
        background: an SMSC that is down is retried, not fatal."""
        self._password = self.config.password.read_text()
        if len(self._password) > 8:
            raise GatewaydError(
                f"transports.{self.name}.password: SMPP 3.4 allows at most 8 characters"
            )
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name=f"smpp:{self.name}:connect"),
            asyncio.create_task(self._sweep_parts(), name=f"smpp:{self.name}:parts"),
        ]

    async def run(self) -> None:
        """Intake runs in the session tasks; this just lasts as long as the transport."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Let MO handlers finish, unbind cleanly, close, and end the owned tasks."""
        self._stopping = True
        session = self._session
        if session is not None:
            await session.drain(_DRAIN)
            await session.unbind(self.config.response_timeout)
            await session.aclose("transport stopped")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopped.set()

    # --- connection -----------------------------------------------------------------

    async def _connect_loop(self) -> None:
        delay = self.config.reconnect_initial
        while not self._stopping:
            try:
                session = await self._connect()
            except BindRefusedError as exc:
                auth = exc.status in BIND_AUTH_FAILURES
                # Wrong credentials will not fix themselves: wait the longest backoff.
                wait = self.config.reconnect_max if auth else self._backoff(delay)
                self._log.error(
                    "smpp.bind.refused",
                    status=status_name(exc.status),
                    credentials=auth,
                    retry_in=round(wait, 2),
                )
            except (OSError, TimeoutError, SessionClosedError, PduError) as exc:
                wait = self._backoff(delay)
                self._log.warning("smpp.connect.failed", error=repr(exc), retry_in=round(wait, 2))
            else:
                delay = self.config.reconnect_initial
                await self._serve(session)
                wait = self._backoff(delay)
            if self._stopping:
                return
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.config.reconnect_max)

    def _backoff(self, delay: float) -> float:
        return delay * self._jitter.uniform(0.5, 1.0)

    async def _connect(self) -> Session:
        cfg = self.config
        async with asyncio.timeout(cfg.connect_timeout):
            reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
        session = Session(
            reader,
            writer,
            on_deliver=self._intake.on_deliver,
            log=self._log,
            name=f"smpp:{self.name}",
        )
        session.start()
        bind = Bind(
            system_id=cfg.system_id,
            password=self._password,
            system_type=cfg.system_type,
            addr_ton=cfg.source.ton,
            addr_npi=cfg.source.npi,
        )
        try:
            resp = await session.request(
                Command.BIND_TRANSCEIVER, bind.encode(), timeout=cfg.response_timeout
            )
        except BaseException:
            await session.aclose("bind failed")
            raise
        if resp.status != Status.ROK:
            await session.aclose("bind refused")
            raise BindRefusedError(resp.status)
        self._log.info("smpp.bound", system_id=cfg.system_id, smsc_system_id=system_id(resp.body))
        return session

    async def _serve(self, session: Session) -> None:
        """Keep a bound session alive with enquire_link until it ends."""
        self._session = session
        self.binds += 1
        self._bound.set()
        try:
            while not session.closed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.enquire_link):
                        await session.closed.wait()
                    break
                try:
                    await session.request(
                        Command.ENQUIRE_LINK, b"", timeout=self.config.response_timeout
                    )
                except (TimeoutError, SessionClosedError):
                    await session.aclose("enquire_link unanswered")
        finally:
            self._bound.clear()
            self._session = None
            if not self._stopping:
                await session.aclose(session.close_reason or "session ended")
            self._log.info(
                "smpp.unbound",
                reason=session.close_reason,
                by_smsc=session.unbound_by_peer,
            )

    async def _sweep_parts(self) -> None:
        interval = min(1.0, self.config.part_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            await self._intake.expire_parts()

    # --- MT -------------------------------------------------------------------------

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        """submit_sm every part; with receipts, wait until each part's receipt is final."""
        log = self._log.bind(msg_id=message.msg_id, device=message.device.name)
        try:
            parts = codec.segment(
                message.payload or "", policy=self.config.data_coding, ref=next(self._refs)
            )
        except codec.EncodingError as exc:
            log.warning("smpp.submit.failed", cause=str(exc), permanent=True)
            return DeliveryOutcome.failure(str(exc), permanent=True)
        ids: list[str] = []
        try:
            for part in parts:
                ids.append(await self._submit(log, message.device.name, part))
            log.info(
                "smpp.submitted",
                parts=len(parts),
                data_coding=parts[0].data_coding,
                smsc_message_ids=ids,
            )
            if not self.config.receipts:
                return DeliveryOutcome.success()
            return await self._await_receipts(log, ids)
        except _Failed as failed:
            outcome = failed.outcome
            log.warning(
                "smpp.submit.failed",
                cause=outcome.cause,
                permanent=outcome.permanent,
                parts_sent=len(ids),
            )
            return outcome

    async def _submit(self, log: Logger, device: str, part: codec.Part) -> str:
        cfg = self.config
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
            short_message=part.short_message,
        )
        body = sm.encode()
        for attempt in range(cfg.throttle_retries + 1):
            async with self._window:
                await self._pace()
                session = self._session
                if session is None:
                    raise _Failed(DeliveryOutcome.failure("SMSC not bound"))
                try:
                    resp = await session.request(
                        Command.SUBMIT_SM, body, timeout=cfg.response_timeout
                    )
                except TimeoutError:
                    raise _Failed(DeliveryOutcome.failure("no submit_sm_resp in time")) from None
                except SessionClosedError as exc:
                    raise _Failed(DeliveryOutcome.failure(f"SMSC session lost: {exc}")) from None
            if resp.status == Status.ROK:
                return message_id(resp.body)
            cause = status_name(resp.status)
            if resp.status not in _RETRY_LATER:
                raise _Failed(DeliveryOutcome.failure(cause, permanent=True))
            # The SMSC asks us to slow down: pause every submit, not just this one.
            pause = cfg.throttle_backoff * (2**attempt)
            self._resume_at = max(self._resume_at, time.monotonic() + pause)
            log.info("smpp.throttled", status=cause, pause=pause, attempt=attempt + 1)
        raise _Failed(DeliveryOutcome.failure(cause))

    async def _pace(self) -> None:
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _await_receipts(self, log: Logger, ids: list[str]) -> DeliveryOutcome:
        futures = [self._book.expect(i) for i in ids]
        try:
            async with asyncio.timeout(self.config.receipt_timeout):
                got = await asyncio.gather(*futures)
        except TimeoutError:
            self._book.forget(ids)
            cause = f"no delivery receipt within {self.config.receipt_timeout:g}s"
            raise _Failed(DeliveryOutcome.failure(cause)) from None
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
