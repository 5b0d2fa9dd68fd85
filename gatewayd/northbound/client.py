"""Our client of the MSGin5G Server: MSGS_MSGDelivery and MSGS_GWRegistration.

One pooled aiohttp session with keep-alive: a full mutual-TLS handshake costs about
2.5 ms of CPU per side, so connections are reused, never opened per message. The
server's certificate chain and name are checked inside the TLS handshake, so a server
that fails them never receives a single byte of HTTP: no registration, no Service ID.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

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

log = structlog.get_logger(__name__)

T = TypeVar("T")

TokenSource = Callable[[], Awaitable[str | None]]


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
    ) -> None:
        self._api_root = api_root
        self._server_name = server_name
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._token = token
        self._session = self._new_session(tls)
        self._retired: set[asyncio.Task[None]] = set()

    def _new_session(self, tls: ssl.SSLContext) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            ssl=tls, limit=self._max_connections, keepalive_timeout=60.0
        )
        return aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, raise_for_status=False
        )

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """Send new requests over connections made with ``tls`` (rotated credentials).

        Requests already on the old pool finish there; the old pool closes afterwards.
        """
        old, self._session = self._session, self._new_session(tls)
        task = asyncio.create_task(self._retire(old), name="northbound:retire-pool")
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        # Give requests in flight on the old pool their full timeout to finish.
        await asyncio.sleep(self._timeout.total or 10.0)
        await session.close()

    async def aclose(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
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
            async with self._session.request(
                method, url, json=body, headers=headers, server_hostname=self._server_name
            ) as resp:
                data = await resp.json(content_type=None) if resp.content_length != 0 else None
                status, resp_headers = resp.status, resp.headers
        except aiohttp.ClientConnectorCertificateError as exc:
            log.warning(
                "auth.peer_rejected",
                peer=self._server_name,
                direction="outbound",
                reason=str(exc.certificate_error),
            )
            raise PeerRefusedError(
                f"the MSGin5G server at {self._api_root} failed certificate verification: "
                f"{exc.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            log.warning("auth.tls_failed", peer=self._server_name, reason=str(exc))
            raise PeerRefusedError(f"TLS with {self._api_root} failed: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PeerUnavailableError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status == expected:
            return status, data, resp_headers
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
