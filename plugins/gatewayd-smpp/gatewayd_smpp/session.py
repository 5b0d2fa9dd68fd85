"""One bound SMPP session over one TCP connection: framing, sequence numbers, responses.

The session reads PDUs in one task, matches responses to the requests waiting for them,
answers enquire_link and unbind itself, and hands every deliver_sm to the transport in
a task of its own (intake may wait for the store; the reader must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gatewayd.api import Logger
from gatewayd_smpp.pdu import (
    HEADER,
    RESPONSE_BODY,
    Command,
    Pdu,
    PduError,
    ResponseError,
    Status,
    parse_header,
    response_id,
)

DeliverHandler = Callable[["Session", Pdu], Coroutine[Any, Any, None]]


class SessionClosedError(ConnectionError):
    """The session ended (peer closed, unbind, broken stream) before a response came."""


class Session:
    """A TCP connection speaking SMPP; :meth:`request` sends and awaits the response."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_deliver: DeliverHandler,
        log: Logger,
        name: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_deliver = on_deliver
        self._log = log
        self._name = name
        # Sequence numbers run 1..0x7FFFFFFF (SMPP 3.4 section 5.1.4), then wrap.
        self._sequence = itertools.cycle(range(1, 0x7FFFFFFF))
        self._waiting: dict[int, asyncio.Future[Pdu]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.unbound_by_peer = False
        # When the SMSC last sent anything: enquire_link is only for a quiet link.
        self.last_heard = time.monotonic()

    def start(self) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"{self._name}:reader")

    # --- sending ------------------------------------------------------------------

    async def _write(self, pdu: Pdu) -> None:
        if self.closed.is_set():
            raise SessionClosedError(self.close_reason or "session closed")
        async with self._write_lock:
            self._writer.write(pdu.encode())
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                self._close(f"write failed: {exc!r}")
                raise SessionClosedError(self.close_reason) from None

    async def request(self, command: Command, body: bytes, *, timeout: float) -> Pdu:
        """Send a request and return its response (any status); raise on timeout/close.

        The response must be this command's own: a generic_nack, or a response to some
        other command that happens to carry our sequence number, raises
        :class:`ResponseError` (matching by sequence number alone once took a nack
        with status 0 for a successful bind).
        """
        sequence = next(self._sequence)
        future: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = future
        try:
            await self._write(Pdu(command, Status.ROK, sequence, body))
            async with asyncio.timeout(timeout):
                response = await future
        finally:
            self._waiting.pop(sequence, None)
        if response.command_id != response_id(command):
            raise ResponseError(command, response)
        return response

    async def respond(self, request: Pdu, status: int, body: bytes | None = None) -> bool:
        """Answer a peer's request; ``False`` when the session is already gone.

        Without ``body``, the response carries the mandatory fields of its kind
        (:data:`RESPONSE_BODY`).
        """
        command = response_id(request.command_id)
        if body is None:
            body = RESPONSE_BODY.get(command, b"")
        return await self._send(Pdu(command, status, request.sequence, body))

    async def _send(self, pdu: Pdu) -> bool:
        # A response racing the session's end has nobody left to read it: not an error.
        try:
            await self._write(pdu)
        except SessionClosedError:
            return False
        return True

    # --- reading ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(HEADER.size)
                length, command_id, status, sequence = parse_header(head)
                body = await self._reader.readexactly(length - HEADER.size)
                self.last_heard = time.monotonic()
                self._dispatch(Pdu(command_id, status, sequence, body))
                if self.closed.is_set():
                    return
        except asyncio.IncompleteReadError:
            self._close("connection closed by the SMSC")
        except (ConnectionError, PduError) as exc:
            self._close(repr(exc))
        except asyncio.CancelledError:
            self._close("session cancelled")
            raise

    def _dispatch(self, pdu: Pdu) -> None:
        if pdu.is_response:
            future = self._waiting.get(pdu.sequence)
            if future is not None and not future.done():
                future.set_result(pdu)
            elif pdu.command_id == Command.GENERIC_NACK:
                self._log.warning("smpp.generic_nack", sequence=pdu.sequence, status=pdu.status)
            return
        if pdu.command_id in (Command.DELIVER_SM, Command.DATA_SM):
            task = asyncio.create_task(
                self._on_deliver(self, pdu), name=f"{self._name}:deliver_sm:{pdu.sequence}"
            )
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)
        elif pdu.command_id == Command.ENQUIRE_LINK:
            self._spawn_respond(pdu, Status.ROK)
        elif pdu.command_id == Command.UNBIND:
            # The SMSC ends the session: answer, then close; the transport reconnects.
            self.unbound_by_peer = True
            self._spawn_respond(pdu, Status.ROK, then_close="unbound by the SMSC")
        else:
            self._log.warning("smpp.pdu.unexpected", command=pdu.command_name)
            nack = Pdu(Command.GENERIC_NACK, Status.RINVCMDID, pdu.sequence)
            task = asyncio.create_task(self._send_nack(nack), name=f"{self._name}:nack")
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    async def _send_nack(self, nack: Pdu) -> None:
        await self._send(nack)

    def _spawn_respond(self, pdu: Pdu, status: int, *, then_close: str = "") -> None:
        async def answer() -> None:
            await self.respond(pdu, status)
            if then_close:
                self._close(then_close)

        task = asyncio.create_task(answer(), name=f"{self._name}:{pdu.command_name}_resp")
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error(
                "smpp.handler.crashed", task=task.get_name(), error=repr(exc), exc_info=exc
            )

    # --- closing ------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(SessionClosedError(reason))
        self._writer.close()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for deliver_sm handlers in flight, e.g. inside ``accept()``."""
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout)

    async def unbind(self, timeout: float) -> None:
        """Ask the SMSC to end the session and wait briefly for its unbind_resp."""
        # A generic_nack or a wrong response (PduError) ends it just the same.
        with contextlib.suppress(SessionClosedError, TimeoutError, PduError):
            await self.request(Command.UNBIND, b"", timeout=timeout)

    async def aclose(self, reason: str) -> None:
        """Close the connection and wait for the reader and deliver_sm handlers."""
        self._close(reason)
        tasks = [t for t in (self._reader_task, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
