"""structlog, configured once for the whole process.

JSON lines when stderr is not a terminal (journald, log shippers), colourful console
lines when it is. Context variables come first, so a ``msg_id`` bound with
:func:`bound_message` appears on every line logged while handling that message, from
any module. Standard-library loggers (aiohttp, asyncio) go through the same processors.

Per-message events are logged at debug. A call below the configured level returns
before structlog builds an event dict or runs a processor (:class:`_LevelFirstLogger`):
the chain cost ~30 us a line, which at thousands of messages a second is a tenth of the
process. The level is the stdlib root logger's, so :func:`set_level` (SIGHUP) still
changes it for every logger, cached or not.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any, ClassVar, TextIO

import structlog

_SECRET_KEYS = frozenset(
    {"password", "passphrase", "pin", "token", "access_token", "client_secret", "key_pem"}
)


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Belt and braces: code never logs secrets on purpose; this catches an accident.
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


class _BadRequestExcerpts(logging.Filter):
    """Rewrites aiohttp's "Error handling request" lines for requests it could not parse.

    The exception's message quotes the offending bytes (a bare-LF line, an over-long
    header), and those bytes are the request's own headers: a bearer JWT or a device
    token. Only the kind of error, its status and the caller's address are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Imported here: only aiohttp's own loggers get this filter, and every CLI
        # command imports this module, most of them without needing aiohttp.
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            event = "http.bad_request"  # a stable name, catalogued like a logger call's
            record.msg, record.args = event, ()
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:  # a caller's fault, not ours
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.__dict__.update(remote=remote, error=type(exc).__name__, status=exc.code)
        return True


# aiohttp's server-side loggers whose lines may quote request bytes.
_REQUEST_LOGGERS = ("aiohttp.server", "aiohttp.web")


class _LevelFirstLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, asking the stdlib level before anything else.

    ``filter_by_level`` as the first processor would drop the event too, but only after
    the context was copied and the event dict built; ``make_filtering_bound_logger``
    fixes the level when a logger is first used, so a SIGHUP level change would miss
    cached loggers. ``isEnabledFor`` is a cached dict lookup in the stdlib.
    """

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return super().debug(event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.INFO):
            return None
        return super().info(event, *args, **kw)


# The fields of the message being handled (see bound_message): one context variable
# holding them all, set and reset once per message, instead of structlog's one variable
# per key, whose bound_contextvars walks the whole context twice per message.
_MESSAGE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "gatewayd_message", default=None
)


def _merge_message(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    bound = _MESSAGE.get()
    if bound:
        for key, value in bound.items():
            event.setdefault(key, value)
    return event


# Fields on every line of this process, whatever thread logs (tag_process).
_PROCESS: dict[str, Any] = {}


def tag_process(**fields: Any) -> None:
    """Add ``fields`` to every line this process logs (a two-process gateway's part)."""
    _PROCESS.update(fields)


def _merge_process(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _PROCESS.items():
        event.setdefault(key, value)
    return event


# Both structlog's own events and stdlib records (foreign) go through these first.
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    _merge_message,
    _merge_process,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _redact,
]


class _Configured:
    """What :func:`configure` has built in this process, so a second call builds nothing
    again: the CLI sets a default before it knows the config, then the command sets the
    config's level and format. Configuring structlog anew would leave loggers cached on
    first use on the old chain."""

    chain = False  # structlog's processor chain (the same for every level and format)
    formatters: ClassVar[dict[str, logging.Formatter]] = {}  # by resolved format
    handler: logging.StreamHandler[TextIO] | None = None


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging for the process: call it at start, and again
    when the config names another level or format. The processor chain is built once, a
    format's formatter once; the level is set on every call."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if not _Configured.chain:
        structlog.configure(
            processors=[
                # Warnings and errors below the level (level = "error") stop here; debug
                # and info calls below it never got this far (_LevelFirstLogger).
                structlog.stdlib.filter_by_level,
                *_SHARED,
                structlog.processors.StackInfoRenderer(),
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=_LevelFirstLogger,
            cache_logger_on_first_use=True,
        )
        _Configured.chain = True
    formatter = _Configured.formatters.get(fmt)
    if formatter is None:
        formatter = _Configured.formatters[fmt] = _formatter(fmt)
    handler = _Configured.handler
    if handler is None:
        handler = _Configured.handler = logging.StreamHandler(sys.stderr)
    # sys.stderr may have been replaced since (a test capturing it): follow it.
    if handler.stream is not sys.stderr:
        handler.setStream(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own request events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in _REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BadRequestExcerpts) for f in logger.filters):
            logger.addFilter(_BadRequestExcerpts())


def _formatter(fmt: str) -> logging.Formatter:
    """The stdlib formatter that renders every line: JSON, or console lines."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    return structlog.stdlib.ProcessorFormatter(
        # The fields _BadRequestExcerpts puts on aiohttp's records.
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder(("remote", "error", "status"))],
        processors=final,
    )


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def _noop(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


@contextlib.contextmanager
def bound_message(msg_id: str, **extra: Any) -> Iterator[None]:
    """Bind ``msg_id`` (and ``extra``) to every log line in this block, in any module.

    Nested blocks add to the outer one's fields; a field passed to the log call itself
    wins over a bound one.
    """
    outer = _MESSAGE.get()
    fields = {"msg_id": msg_id, **extra} if outer is None else {**outer, "msg_id": msg_id, **extra}
    token = _MESSAGE.set(fields)
    try:
        yield
    finally:
        _MESSAGE.reset(token)
