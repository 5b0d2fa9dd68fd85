"""The binds of one transport: each keeps one session up, with its own connect loop.

A transport has ``binds`` links. In ``bind_mode = "transceiver"`` each link binds as a
transceiver; in ``"split"`` each link is a transmitter (MT) and one more link binds as
a receiver (MO and receipts), for SMSCs that want them apart. Every link has its own
window of ``submit_sm`` awaiting a response, and its own reconnect backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable

from gatewayd.api import GatewaydError, Logger
from gatewayd_smpp.config import SmppConfig
from gatewayd_smpp.pdu import (
    BIND_AUTH_FAILURES,
    Bind,
    Command,
    PduError,
    Status,
    status_name,
    system_id,
)
from gatewayd_smpp.session import DeliverHandler, Session, SessionClosedError

BIND_NAMES = {
    Command.BIND_TRANSCEIVER: "transceiver",
    Command.BIND_TRANSMITTER: "transmitter",
    Command.BIND_RECEIVER: "receiver",
}


class BindRefusedError(GatewaydError):
    """The SMSC answered a bind with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"bind refused: {status_name(status)}")
        self.status = status


class Link:
    """One bind slot. ``session`` is set while bound; :meth:`run` is its connect loop."""

    def __init__(
        self,
        *,
        config: SmppConfig,
        command: Command,
        name: str,
        log: Logger,
        on_deliver: DeliverHandler,
        password: Callable[[], str],
        tls: Callable[[], ssl.SSLContext | None],
    ) -> None:
        self.config = config
        self.command = command
        self.name = name
        self.log = log.bind(bind=name, bind_type=BIND_NAMES[command])
        self._on_deliver = on_deliver
        self._password = password
        self._tls = tls
        self.session: Session | None = None
        self.bound = asyncio.Event()
        self.window = asyncio.Semaphore(config.window)
        self.inflight = 0  # submits holding or waiting for this link's window
        self.binds = 0
        # For ``gatewayd status``: "binding" while connecting and awaiting the bind
        # response, "unbound" while waiting out the backoff or stopped; "bound" is read
        # from ``session`` (see :attr:`state`).
        self._phase = "unbound"
        self.stopping = False
        # Jitter only spreads reconnects over time; it protects nothing.
        self._jitter = random.Random()  # noqa: S311

    @property
    def state(self) -> str:
        """bound / binding / unbound, as ``gatewayd status`` shows it."""
        return "bound" if self.session is not None else self._phase

    @property
    def rebinds(self) -> int:
        """Successful binds after the first: each one followed a lost session."""
        return max(0, self.binds - 1)

    @property
    def sends(self) -> bool:
        return self.command != Command.BIND_RECEIVER

    async def run(self) -> None:
        """Connect, bind, serve, and reconnect with jittered exponential backoff.

        The backoff is reset only after a session stayed up for ``reconnect_max``
        seconds: an SMSC that accepts the bind and then drops the link would otherwise
        get a new bind every few hundred milliseconds, forever.
        """
        cfg = self.config
        delay = cfg.reconnect_initial
        while not self.stopping:
            self._phase = "binding"
            try:
                session = await self._connect()
            except BindRefusedError as exc:
                auth = exc.status in BIND_AUTH_FAILURES
                # Wrong credentials will not fix themselves: wait the longest backoff.
                wait = cfg.reconnect_max if auth else self._backoff(delay)
                self.log.error(
                    "smpp.bind.refused",
                    status=status_name(exc.status),
                    credentials=auth,
                    retry_in=round(wait, 2),
                )
            except (OSError, TimeoutError, SessionClosedError, PduError) as exc:
                wait = self._backoff(delay)
                extra = {}
                if cfg.tls and isinstance(exc, SessionClosedError | ssl.SSLError):
                    # Over TLS 1.3 a refused client certificate shows up as an EOF right
                    # after the handshake: say what it most likely was.
                    extra["hint"] = "the SMSC may have refused our client certificate"
                self.log.warning(
                    "smpp.connect.failed", error=repr(exc), retry_in=round(wait, 2), **extra
                )
            else:
                started = time.monotonic()
                await self._serve(session)
                if time.monotonic() - started >= cfg.reconnect_max:
                    delay = cfg.reconnect_initial
                wait = self._backoff(delay)
            finally:
                self._phase = "unbound"
            if self.stopping:
                return
            await asyncio.sleep(wait)
            delay = min(delay * 2, cfg.reconnect_max)

    def _backoff(self, delay: float) -> float:
        return delay * self._jitter.uniform(0.5, 1.0)

    async def _connect(self) -> Session:
        cfg = self.config
        context = self._tls()
        async with asyncio.timeout(cfg.connect_timeout):
            reader, writer = await asyncio.open_connection(
                cfg.host,
                cfg.port,
                ssl=context,
                server_hostname=(cfg.tls_server_name or cfg.host) if context else None,
            )
        session = Session(reader, writer, on_deliver=self._on_deliver, log=self.log, name=self.name)
        session.start()
        bind = Bind(
            system_id=cfg.system_id,
            password=self._password(),
            system_type=cfg.system_type,
            addr_ton=cfg.source.ton,
            addr_npi=cfg.source.npi,
        )
        try:
            resp = await session.request(self.command, bind.encode(), timeout=cfg.response_timeout)
        except BaseException:
            await session.aclose("bind failed")
            raise
        if resp.status != Status.ROK:
            await session.aclose("bind refused")
            raise BindRefusedError(resp.status)
        self.log.info(
            "smpp.bound",
            system_id=cfg.system_id,
            smsc_system_id=system_id(resp.body),
            tls=context is not None,
        )
        return session

    async def _serve(self, session: Session) -> None:
        """Keep a bound session alive until it ends: enquire_link after idle time only."""
        self.session = session
        self.binds += 1
        self.bound.set()
        idle = self.config.enquire_link
        try:
            while not session.closed.is_set():
                quiet_for = time.monotonic() - session.last_heard
                if quiet_for < idle:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(idle - quiet_for):
                            await session.closed.wait()
                    continue
                try:
                    await session.request(
                        Command.ENQUIRE_LINK, b"", timeout=self.config.response_timeout
                    )
                except (TimeoutError, SessionClosedError, PduError):
                    await session.aclose("enquire_link unanswered")
        finally:
            self.bound.clear()
            self.session = None
            self._phase = "unbound"
            if not self.stopping:
                await session.aclose(session.close_reason or "session ended")
            self.log.info(
                "smpp.unbound", reason=session.close_reason, by_smsc=session.unbound_by_peer
            )

    async def stop(self, drain: float) -> None:
        """Let MO handlers finish, unbind cleanly and close."""
        self.stopping = True
        session = self.session
        if session is not None:
            await session.drain(drain)
            await session.unbind(self.config.response_timeout)
            await session.aclose("transport stopped")

    async def rebind(self, reason: str) -> None:
        """Drop the session (the SMSC says it is in a bad state); the loop rebinds."""
        session = self.session
        if session is not None:
            await session.aclose(reason)
