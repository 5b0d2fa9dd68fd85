"""Our client of the MSGin5G Server: MSGS_MSGDelivery and MSGS_GWRegistration.

One pooled aiohttp session with keep-alive: a full mutual-TLS handshake costs about
2.5 ms of CPU per side, so connections are reused, never opened per message. The
server's certificate chain and name are checked inside the TLS handshake, so a server
that fails them never receives a single byte of HTTP: no registration, no Service ID.

A server that refuses *our* certificate is harder to see. Over TLS 1.2 it aborts the
handshake; over TLS 1.3 our handshake completes and the refusal arrives on the first
read. An asyncio peer does not even get its alert out: we see a reset or an EOF, which
looks like a network fault. Retrying that forever would hide a credential problem, so
a connection cut during or right after the handshake, before any response, is tried
once more on a fresh connection and, if cut again, reported as a refusal
(:class:`PeerRefusedError`, exit code 3). See docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog

from gatewayd import metrics
from gatewayd.errors import (
    PeerRefusedError,
    PeerUnavailableError,
    ProtocolError,
    RequestRejectedError,
)
from gatewayd.msgin5g.model import (
    DeliveryStatusReport,
    MessageDeliveryAck,
    ProblemDetails,
    UEMessageDelivery,
)
from gatewayd.msgin5g.registration import GatewayRegistration, GatewayRegistrationAck
from gatewayd.northbound import paths
from gatewayd.retry import is_permanent, parse_retry_after
from gatewayd.security.tls import CIPHERS, handshake_reason
from gatewayd.tasks import TaskSet

log = structlog.get_logger(__name__)

T = TypeVar("T")

TokenSource = Callable[[], Awaitable[str | None]]

# Pause before the one confirming attempt after a cut handshake: long enough for a
# restarting server to settle, short enough not to delay a start noticeably.
CONFIRM_DELAY = 0.2

# Alerts by which a server tells us it refuses our certificate (TLS 1.2, or any peer
# that gets its alert out before closing).
_CREDENTIAL_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "DECRYPT_ERROR")
# What we (or the server) say when the server's TLS offer is below our profile.
_PROFILE_REFUSALS = (
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "WRONG_VERSION_NUMBER",
    "PROTOCOL_VERSION",
    "HANDSHAKE_FAILURE",
    "INSUFFICIENT_SECURITY",
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
    "KEY_TOO_SMALL",
    "MD_TOO_WEAK",
)


class _Cut(Exception):  # control flow inside this module only
    """The connection was cut during or right after the TLS handshake, before any
    response: a network fault, or a server refusing our client certificate."""


@dataclass(frozen=True, slots=True)
class Registered:
    location: str
    ack: GatewayRegistrationAck


class MsgsClient:
    """Calls the MSGin5G Server. Owns one connection pool; :meth:`use_tls` swaps it."""

    def __init__(
        self,
        api_root: str,
        tls: ssl.SSLContext,
        *,
        server_name: str,
        timeout: float,
        max_connections: int,
        token: TokenSource | None = None,
        mutual: bool = True,
    ) -> None:
        """``mutual`` says that ``tls`` carries our client certificate: only then can a
        cut handshake mean that the server refused it."""
        self._api_root = api_root
        self._mutual = mutual
        self._server_name = server_name
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._token = token
        self._session = self._new_session(tls)
        self._retired = TaskSet()

    def _new_session(self, tls: ssl.SSLContext) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            ssl=tls, limit=self._max_connections, keepalive_timeout=60.0
        )
        # Tells a request whether it opened its connection (and so ran a handshake) or
        # reused a pooled one, which a server may close at any time for its own reasons.
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(_mark_fresh)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            raise_for_status=False,
            trace_configs=[trace],
        )

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """Send new requests over connections made with ``tls`` (rotated credentials).

        Requests already on the old pool finish there; the old pool closes afterwards.
        """
        old, self._session = self._session, self._new_session(tls)
        self._retired.spawn("northbound:retire-pool", self._retire(old))

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        # Give requests in flight on the old pool their full timeout to finish.
        await asyncio.sleep(self._timeout.total or 10.0)
        await session.close()

    async def aclose(self) -> None:
        await self._retired.aclose()
        await self._session.close()

    # --- MSGS_MSGDelivery ---------------------------------------------------------------

    async def deliver_ue_message(self, message: UEMessageDelivery) -> MessageDeliveryAck:
        _, body, _ = await self._call("POST", paths.DELIVER_UE_MESSAGE, message.to_json(), 200)
        return _parse(MessageDeliveryAck.from_json, body)

    async def deliver_report(self, report: DeliveryStatusReport) -> MessageDeliveryAck:
        _, body, _ = await self._call("POST", paths.DELIVER_REPORT, report.to_json(), 200)
        return _parse(MessageDeliveryAck.from_json, body)

    # --- MSGS_GWRegistration (our extension) -----------------------------------------

    async def register(self, registration: GatewayRegistration) -> Registered:
        _, body, headers = await self._call(
            "POST", paths.REGISTRATIONS, registration.to_json(), 201
        )
        location = headers.get("Location")
        if not location:
            raise ProtocolError("registration answered 201 without a Location header")
        return Registered(location, _parse(GatewayRegistrationAck.from_json, body))

    async def update(self, location: str, registration: GatewayRegistration) -> Registered:
        _, body, _ = await self._call("PUT", location, registration.to_json(), 200)
        return Registered(location, _parse(GatewayRegistrationAck.from_json, body))

    async def deregister(self, location: str) -> None:
        await self._call("DELETE", location, None, 204)

    # --- plumbing ------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, expected: int
    ) -> tuple[int, Any, Any]:
        url = path if path.startswith("https://") else f"{self._api_root}{path}"
        headers = {"Accept": "application/json, application/problem+json"}
        if self._token is not None:
            token = await self._token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
        try:
            with metrics.northbound_request(method, path):
                status, data, resp_headers = await self._send(method, path, url, body, headers)
        except _Cut as first:
            if not self._mutual:
                raise PeerUnavailableError(f"{method} {path}: {first}") from None
            # One fault can be the network's; the same cut on a fresh handshake again is
            # the server refusing our certificate (it closes before any response).
            await asyncio.sleep(CONFIRM_DELAY)
            try:
                status, data, resp_headers = await self._send(method, path, url, body, headers)
            except _Cut as second:
                if not await self._answers_tls():
                    # Cut without a word of TLS from the server: nothing was refused,
                    # the server is down, overloaded or not a TLS server at all.
                    log.warning(
                        "northbound.unreachable", peer=self._server_name, reason="no TLS answer"
                    )
                    raise PeerUnavailableError(
                        f"{method} {path}: the server at {self._api_root} closed the connection "
                        f"{second} without answering TLS: unreachable or not a TLS server"
                    ) from None
                reason = f"connection cut {second}, twice"
                log.warning(
                    "auth.refused_by_peer", peer=self._server_name, stage="tls", reason=reason
                )
                raise PeerRefusedError(
                    f"the MSGin5G server at {self._api_root} closed the connection {second}, "
                    "twice: it most likely refuses our client certificate (unknown CA, "
                    "revoked, expired) or our TLS offer; check the server's trust for "
                    "our certificate"
                ) from None
        if status == expected:
            return status, data, resp_headers
        if 300 <= status < 400:
            # Never followed: a redirect could send the registration (gwId, every
            # ueSvcId) to another host, or in cleartext. It is a configuration problem.
            target = resp_headers.get("Location", "")
            log.warning(
                "northbound.redirect_refused", peer=self._server_name, status=status, path=path
            )
            raise RequestRejectedError(
                status,
                f"{method} {path} was redirected to {target!r}; redirects are not followed "
                "(check northbound.api_root)",
                cause="REDIRECT_NOT_FOLLOWED",
            )
        problem = _problem(data, status)
        detail = problem.detail or problem.title or "no detail"
        if status in (401, 403):
            log.warning(
                "auth.refused_by_peer", peer=self._server_name, status=status, cause=problem.cause
            )
        if is_permanent(status):
            raise RequestRejectedError(status, detail, cause=problem.cause)
        raise PeerUnavailableError(
            f"{method} {path}: HTTP {status}: {detail}",
            retry_after=parse_retry_after(resp_headers.get("Retry-After")),
        )

    async def _send(
        self,
        method: str,
        path: str,
        url: str,
        body: dict[str, Any] | None,
        headers: dict[str, str],
    ) -> tuple[int, Any, Any]:
        """One request; translates transport failures into our errors (or :class:`_Cut`)."""
        attempt = SimpleNamespace(fresh=False, answered=False)
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                headers=headers,
                server_hostname=self._server_name,
                trace_request_ctx=attempt,
                allow_redirects=False,
            ) as resp:
                attempt.answered = True
                data = await resp.json(content_type=None) if resp.content_length != 0 else None
                return resp.status, data, resp.headers
        except aiohttp.ClientConnectorCertificateError as exc:
            # We refuse the server: its chain, validity, revocation or name failed.
            reason = _reason(exc.certificate_error)
            log.warning(
                "auth.peer_rejected",
                peer=self._server_name,
                direction="outbound",
                stage="certificate",
                reason=reason,
            )
            raise PeerRefusedError(
                f"the MSGin5G server at {self._api_root} failed certificate verification: {reason}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise self._tls_refusal(exc) from None
        except aiohttp.ClientConnectorError as exc:
            # TCP was up (a refused or unreachable port is ConnectionRefusedError or
            # OSError), then the peer cut the TLS handshake: TLS 1.2 credential refusal
            # from an asyncio server, whose alert never leaves its buffer.
            if isinstance(exc.os_error, ConnectionResetError | ConnectionAbortedError):
                raise _Cut("during the TLS handshake") from None
            raise PeerUnavailableError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # TLS 1.3: our handshake completed, then the server closed before answering.
            cut = isinstance(exc, aiohttp.ServerDisconnectedError) or exc.errno in (
                errno.ECONNRESET,
                errno.ECONNABORTED,
                errno.EPIPE,
            )
            if cut and attempt.fresh and not attempt.answered:
                raise _Cut("right after the TLS handshake, before any response") from None
            raise PeerUnavailableError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PeerUnavailableError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def _answers_tls(self) -> bool:
        """Whether the server answers a TLS ClientHello at all (with its ServerHello).

        A server refusing our certificate has run its half of the handshake first; one
        that closes without answering (a listener cutting new connections, a port that
        is not TLS) has refused nothing. A fresh probe tells the two apart; it carries
        no certificate and no HTTP, so it discloses nothing.
        """
        parts = urlsplit(self._api_root)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.minimum_version = ssl.TLSVersion.TLSv1_2
        probe.set_ciphers(CIPHERS)  # our offer, as on the real connection
        # Only whether any TLS answer comes: the probe never verifies and never sends data.
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        tls = probe.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=None)
        try:
            async with asyncio.timeout(self._timeout.total or 10.0):
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 443)
                try:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.do_handshake()  # writes our ClientHello to ``outgoing``
                    writer.write(outgoing.read())
                    await writer.drain()
                    return bool(await reader.read(5))  # a TLS record header, or EOF
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False

    def _tls_refusal(self, exc: aiohttp.ClientSSLError) -> PeerRefusedError:
        """Name a handshake failure: who refused whom, and why."""
        reason = _reason(exc.os_error)
        if "ALERT" in reason and any(word in reason for word in _CREDENTIAL_ALERTS):
            log.warning("auth.refused_by_peer", peer=self._server_name, stage="tls", reason=reason)
            return PeerRefusedError(
                f"the MSGin5G server at {self._api_root} refused our client certificate: {reason}"
            )
        if any(word in reason for word in _PROFILE_REFUSALS):
            log.warning(
                "auth.peer_rejected",
                peer=self._server_name,
                direction="outbound",
                stage="tls",
                reason=reason,
            )
            return PeerRefusedError(
                f"the MSGin5G server at {self._api_root} offers no TLS version or cipher of our "
                f"profile (TLS 1.2 or newer, security level 2): {reason}"
            )
        log.warning("auth.tls_failed", peer=self._server_name, reason=reason)
        return PeerRefusedError(f"TLS with {self._api_root} failed: {reason}")


async def _mark_fresh(
    _session: aiohttp.ClientSession,
    context: SimpleNamespace,
    _params: aiohttp.TraceConnectionCreateEndParams,
) -> None:
    if isinstance(context.trace_request_ctx, SimpleNamespace):
        context.trace_request_ctx.fresh = True


def _reason(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLError):
        return handshake_reason(error)
    return str(error) if error is not None else "unknown"


def _problem(data: Any, status: int) -> ProblemDetails:
    try:
        return ProblemDetails.from_json(data)
    except Exception:  # a broken error body must not hide the status
        return ProblemDetails(status=status, title=f"HTTP {status}")


def _parse(parse: Callable[[Any], T], body: Any) -> T:
    try:
        return parse(body)
    except Exception as exc:
        raise ProtocolError(f"the server's answer does not match TS 29.538: {exc}") from None
