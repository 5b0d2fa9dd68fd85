"""The sd_notify protocol, spoken directly: one datagram per state change.

No libsystemd binding is needed: ``$NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket
(an abstract one when it starts with ``@``). Without it every call is a no-op, so the
same code runs under systemd, in a container and in a terminal.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._failing = False  # the last notification could not be sent (logged once)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        wanted = usec is not None and (pid is None or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 1e6 if wanted and usec else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait: a manager that does not read (its queue holds 10 datagrams
                # by default) would otherwise stall the event loop in this call.
                sock.sendto(message, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            # As sd_notify(3): a manager that went away or a full socket queue is the
            # manager's problem; serving traffic goes on. Logged once per episode.
            if not self._failing:
                log.warning("systemd.notify_failed", error=str(exc), fields=sorted(fields))
            self._failing = True
            return
        if self._failing:
            log.info("systemd.notify_recovered")
        self._failing = False

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status, mainpid=os.getpid())

    def stopping(self, status: str) -> None:
        self.notify(stopping=1, status=status)

    def reloading(self) -> None:
        self.notify(reloading=1)

    def status(self, status: str) -> None:
        self.notify(status=status)

    def watchdog(self) -> None:
        self.notify(watchdog=1)
