"""Every inbound HTTP listener's limits: header-read timeout, idle timeout, connection cap.

aiohttp keeps a connection that never sends a request for its keep-alive timeout (an
hour by default) and accepts any number of them, so a few thousand idle or slow-header
clients hold a listener's file descriptors and memory for minutes. :class:`GuardedSite`
replaces ``web.TCPSite`` for the device API, the MSGG API, the metrics endpoint and the
reference server; it wraps each connection's protocol to enforce:

- ``header_timeout``: from accept (the TLS handshake has the same bound) to a complete
  request head; a client still sending headers then is cut.
- ``idle_timeout``: aiohttp's keep-alive timeout: a connection without a request in
  progress for this long is closed (later requests' heads must arrive within it too).
- ``max_connections``: at the cap, a new connection evicts the oldest connection still
  waiting for its first request head; when every connection is busy, the new one is
  closed at once. Idle clients cannot lock out working ones.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, cast

import structlog
from aiohttp import web

from gatewayd.options import Options

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerLimits:
    """``idle_timeout``, ``header_timeout`` (seconds) and ``max_connections``."""

    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    max_connections: int = 1024


def read_limits(opts: Options, defaults: ListenerLimits | None = None) -> ListenerLimits:
    """The three keys from a listener's table (``[api]``, ``[transports.NAME]``, ...)."""
    base = defaults or ListenerLimits()
    return ListenerLimits(
        idle_timeout=opts.get_float("idle_timeout", base.idle_timeout, minimum=0.1),
        header_timeout=opts.get_float("header_timeout", base.header_timeout, minimum=0.1),
        max_connections=opts.get_int("max_connections", base.max_connections, minimum=1),
    )


def runner(app: web.Application, limits: ListenerLimits, **kwargs: Any) -> web.AppRunner:
    """An ``AppRunner`` whose keep-alive timeout is ``limits.idle_timeout``."""
    return web.AppRunner(app, keepalive_timeout=limits.idle_timeout, **kwargs)


class GuardedSite(web.BaseSite):
    """A TCP site (TLS optional) that enforces :class:`ListenerLimits`; see the module."""

    def __init__(
        self,
        app_runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ListenerLimits,
        ssl_context: SSLContext | None = None,
        label: str = "http",
    ) -> None:
        super().__init__(app_runner, ssl_context=ssl_context)
        self._host, self._port = host, port
        self.limits = limits
        self.label = label
        self._guard: _Guard | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the configured one may be 0)."""
        sockets = getattr(self._server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    @property
    def connections(self) -> int:
        """Connections held now (handshaking ones included)."""
        return self._guard.count() if self._guard is not None else 0

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite.__init__ checked it
        loop = asyncio.get_running_loop()
        self._guard = _Guard(server, self.limits, self.label, loop)
        self._server = await loop.create_server(
            self._guard.protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            # The handshake is part of "sending the request head" for a TLS client.
            ssl_handshake_timeout=self.limits.header_timeout if self._ssl_context else None,
        )


class _Guard:
    """Counts a listener's connections and decides about each new one."""

    def __init__(
        self,
        factory: Any,
        limits: ListenerLimits,
        label: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._factory = factory
        self.limits = limits
        self.label = label
        self.loop = loop
        # Connected (TLS done), oldest first; the value says "still waiting for a head".
        self._open: dict[_Guarded, None] = {}
        # Accepted, TLS handshake not done: asyncio tells the protocol nothing if the
        # handshake fails, so these age out after the handshake timeout instead.
        self._handshaking: collections.deque[tuple[float, _Guarded]] = collections.deque()
        self._pending = 0  # entries of _handshaking neither connected nor expired
        self._full = False

    def count(self) -> int:
        self._prune()
        return len(self._open) + self._pending

    def _prune(self) -> None:
        horizon = self.loop.time() - self.limits.header_timeout - 1.0
        while self._handshaking and (
            self._handshaking[0][1].connected or self._handshaking[0][0] < horizon
        ):
            _, conn = self._handshaking.popleft()
            if not conn.connected:
                conn.expired = True  # its handshake failed or timed out: no longer counted
                self._pending -= 1

    def protocol(self) -> asyncio.BaseProtocol:
        if self.count() >= self.limits.max_connections and not self._evict():
            if not self._full:
                self._full = True
                log.warning(
                    "listener.at_capacity",
                    listener=self.label,
                    max_connections=self.limits.max_connections,
                )
            return _Refused()
        self._full = False
        guarded = _Guarded(self, self._factory())
        self._handshaking.append((self.loop.time(), guarded))
        self._pending += 1
        return guarded

    def _evict(self) -> bool:
        """Close the oldest connection still waiting for its first request head."""
        for conn in self._open:
            if conn.waiting:
                conn.close("evicted")
                return True
        return False

    def made(self, conn: _Guarded) -> None:
        if not conn.expired:
            self._pending -= 1
        self._open[conn] = None

    def lost(self, conn: _Guarded) -> None:
        self._open.pop(conn, None)


class _Guarded(asyncio.Protocol):
    """Delegates to aiohttp's protocol; times the request head and reports to the guard."""

    def __init__(self, guard: _Guard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self.connected = False
        self.expired = False  # given up on while handshaking (see _Guard._prune)
        self.waiting = True  # no complete request head yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.connected = True
        self._guard.made(self)
        self._timer = self._guard.loop.call_later(
            self._guard.limits.header_timeout, self.close, "header_timeout"
        )
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.waiting:
            seen = self._tail + data
            # The end of a head: CRLF CRLF (or bare LF LF, which aiohttp then refuses).
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self.waiting = False
                self._cancel_timer()
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._guard.lost(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def close(self, reason: str) -> None:
        self._cancel_timer()
        self._guard.lost(self)  # counts as gone now: the cap is checked before the loss lands
        log.debug("listener.connection_closed", listener=self._guard.label, reason=reason)
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Refused(asyncio.Protocol):
    """Over the cap with nobody to evict: close at once (after TLS, for a TLS listener)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()
