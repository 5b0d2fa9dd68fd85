"""structlog, configured once for the whole process.

JSON lines when stderr is not a terminal (journald, log shippers), colourful console
lines when it is. Context variables come first, so a ``msg_id`` bound with
:func:`bound_message` appears on every line logged while handling that message, from
any module. Standard-library loggers (aiohttp, asyncio) go through the same processors.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_SECRET_KEYS = frozenset(
    {"password", "passphrase", "pin", "token", "access_token", "client_secret", "key_pem"}
)


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Belt and braces: code never logs secrets on purpose; this catches an accident.
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging. Call once, at process start."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=final,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own request events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def _noop(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


@contextlib.contextmanager
def bound_message(msg_id: str, **extra: Any) -> Iterator[None]:
    """Bind ``msg_id`` (and ``extra``) to every log line in this block, in any module."""
    with structlog.contextvars.bound_contextvars(msg_id=msg_id, **extra):
        yield
