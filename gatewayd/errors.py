"""The one exception root, and the process exit codes built on it.

Everything gatewayd raises on purpose derives from :class:`GatewaydError`; library
exceptions are translated at the edge where they enter (``raise ... from None`` when
the original adds nothing but noise).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of the ``gatewayd`` command.

    systemd units use them: ``RestartPreventExitStatus=78 77`` stops a restart loop on a
    broken config or credential, which a restart cannot fix.
    """

    OK = 0
    FAILURE = 1  # an unexpected runtime failure; a restart may help
    USAGE = 2  # bad command line (argparse's own code)
    PEER_REFUSED = 3  # the MSGin5G server refused us (authentication/authorization)
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a required service (server, store) is unreachable
    CREDENTIALS = 77  # EX_NOPERM: credentials missing, unreadable, expired or rejected
    CONFIG = 78  # EX_CONFIG: the configuration is invalid


class GatewaydError(Exception):
    """Root of every error gatewayd raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(GatewaydError):
    """A configuration value is missing or wrong; names the file and key path."""

    exit_code = ExitCode.CONFIG

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


class CredentialError(GatewaydError):
    """Credential material is missing, unreadable, expired or does not fit together."""

    exit_code = ExitCode.CREDENTIALS


class PluginError(GatewaydError):
    """A plugin failed to load, declared an unknown hook, or broke the plugin API."""

    exit_code = ExitCode.CONFIG


class ListenError(GatewaydError):
    """A configured listen address cannot be bound (in use, not local, not permitted).

    Exit 69, not 1: a port someone else holds is not fixed by systemd restarting us.
    """

    exit_code = ExitCode.UNAVAILABLE

    def __init__(
        self, key: str, host: str, port: int, reason: str, *, in_use: bool = False
    ) -> None:
        self.key, self.host, self.port, self.reason = key, host, port, reason
        self.in_use = in_use
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"{key}: cannot listen on {shown}: {reason}")

    @staticmethod
    @contextlib.contextmanager
    def naming(key: str, host: str, port: int) -> Iterator[None]:
        """Turn the OSError of a bind into a ListenError naming the config key."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            in_use = exc.errno == errno.EADDRINUSE
            if in_use:
                reason = "the address is already in use by another process"
            raise ListenError(key, host, port, reason, in_use=in_use) from None


class TransportStartError(GatewaydError):
    """A transport's ``start()`` raised; names the transport, keeps the plugin's exit code."""

    def __init__(self, name: str, plugin: str, cause: BaseException) -> None:
        self.transport = name
        self.exit_code = cause.exit_code if isinstance(cause, GatewaydError) else ExitCode.FAILURE
        # A port in use is 69 whoever reports it: a plugin may wrap the OSError.
        link: BaseException | None = cause
        while link is not None:
            if isinstance(link, OSError) and link.errno == errno.EADDRINUSE:
                self.exit_code = ExitCode.UNAVAILABLE
            link = link.__cause__ or link.__context__
        detail = str(cause) or type(cause).__name__
        super().__init__(f"transports.{name} (plugin {plugin}): start failed: {detail}")


class PeerRefusedError(GatewaydError):
    """The remote peer refused us: TLS authentication or authorization failed.

    Never transient: retrying with the same credentials cannot succeed, so callers
    surface it instead of backing off forever.
    """

    exit_code = ExitCode.PEER_REFUSED


class PeerUnavailableError(GatewaydError):
    """The remote peer could not be reached or answered with a transient failure."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProtocolError(GatewaydError):
    """The peer answered something the protocol does not allow."""


class InvalidBodyError(GatewaydError):
    """A JSON body does not match the TS 29.538 schema.

    ``pointer`` is a JSON Pointer to the offending attribute, as ProblemDetails'
    ``invalidParams[].param`` wants it.
    """

    def __init__(self, pointer: str, reason: str) -> None:
        self.pointer = pointer
        self.reason = reason
        super().__init__(f"{pointer or '/'}: {reason}")


class IntakeRefusedError(GatewaydError):
    """The gateway will not take a message from a transport; nothing was stored.

    Transports translate ``reason`` into their own protocol's terms (an HTTP status, an
    MQTT reason code, an SMPP command status). ``permanent`` says whether sending the
    same message again can ever succeed: a permanent refusal (invalid input, a device
    the gateway or the server will not serve) is final, already recorded in the
    dead-letter queue by the gateway, and the transport acknowledges it in its
    protocol's terms so the device does not resend it forever. Only a storage refusal
    (:class:`BacklogFullError`) withholds the acknowledgement.
    """

    reason: str = "refused"
    permanent: bool = False

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class UnknownDeviceError(IntakeRefusedError):
    """The device is not in the mapping and the mapping admits no dynamic devices."""

    reason = "unknown_device"
    permanent = True


class DeviceRefusedError(IntakeRefusedError):
    """The MSGin5G server refused to serve a device the gateway learned from a template."""

    reason = "device_refused"
    permanent = True


class InvalidMessageError(IntakeRefusedError):
    """The device's message cannot become an MSGin5G message (size, encoding, fields)."""

    reason = "invalid_message"
    permanent = True


class BacklogFullError(IntakeRefusedError):
    """The store's backlog limit is reached, or its disk is full or read-only."""

    reason = "backlog_full"


class StoreError(GatewaydError):
    """The durable store failed (I/O error, corruption)."""

    exit_code = ExitCode.UNAVAILABLE


class TokenRejectedError(GatewaydError):
    """An OAuth 2.0 access token failed verification (TS 33.501 13.4.1).

    ``reason`` is stable (one of ``gatewayd.security.tokens.REASONS``), for metrics, log
    events and the ``WWW-Authenticate`` error; ``detail`` is for humans. Neither ever
    contains the token.
    """

    exit_code = ExitCode.PEER_REFUSED

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"access token rejected ({reason}): {detail}")


class RequestRejectedError(GatewaydError):
    """The peer refused one request for good (a 4xx other than 408/429).

    Retrying the same request cannot succeed: the message goes to the dead-letter queue.
    """

    def __init__(self, status: int, detail: str, *, cause: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.cause = cause
