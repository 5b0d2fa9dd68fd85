"""Our MSGG_N3GDelivery / MSGG_L3GDelivery server: the MSGin5G Server calls us here.

Refusal order matters for TR 33.862 key issue #4: the TLS handshake already demands a
client certificate from a trusted CA; before a body is read, the peer's certificate
identity must be on ``api.allowed_peers`` and, with ``[api.token]``, its bearer token
must verify (TS 33.501 13.4.1: issuer, audience, expiry, signature, scope, and the
binding to this very certificate). Only then is the body parsed, validated and
authorized (we accept downlink only for UE Service IDs we serve), and only once it is
durably stored does the server get its 204.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gatewayd import metrics, segments
from gatewayd.config import RelaySettings
from gatewayd.envelope import downlink_request, report_in_request
from gatewayd.errors import BacklogFullError, InvalidBodyError, TokenRejectedError
from gatewayd.listener import GuardedSite, ListenerLimits
from gatewayd.listener import runner as guarded_runner
from gatewayd.log import bound_message
from gatewayd.msgin5g.model import (
    Address,
    AddressType,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    InvalidParam,
    ProblemDetails,
)
from gatewayd.northbound.paths import gateway_api_prefix
from gatewayd.relay import Directory
from gatewayd.security.tls import PeerIdentity, peer_identity
from gatewayd.security.tokens import TokenGate
from gatewayd.store import Queue, Route, Store

log = structlog.get_logger(__name__)

PEER = web.RequestKey("peer", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(
    status: int,
    title: str,
    *,
    detail: str | None = None,
    cause: str | None = None,
    invalid: tuple[InvalidParam, ...] = (),
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = ProblemDetails(
        status=status, title=title, detail=detail, cause=cause, invalid_params=invalid
    )
    return web.Response(
        status=status,
        text=json.dumps(body.to_json()),
        content_type="application/problem+json",
        headers=headers,
    )


class GatewayApi:
    """The aiohttp application and its site. ``ssl`` is shared and may be reloaded in place."""

    def __init__(
        self,
        *,
        gateway_type: str,
        store: Store,
        directory: Directory,
        allowed_peers: tuple[str, ...],
        max_body: int,
        reply_route_ttl: float,
        relay: RelaySettings,
        retry_after: float = 5.0,
        token: TokenGate | None = None,
        limits: ListenerLimits | None = None,
        on_unknown: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._store = store
        # Several instances on a shared store: look there before refusing a destination
        # (a device another instance learned a moment ago).
        self._on_unknown = on_unknown
        self._limits = limits or ListenerLimits()
        self._token = token
        self._directory = directory
        self._allowed = allowed_peers
        self._route_ttl = reply_route_ttl
        self._relay = relay  # segment limits and the reassembly timeout
        self._retry_after = retry_after
        self.prefix = gateway_api_prefix(gateway_type)
        self.app = web.Application(
            client_max_size=max_body, middlewares=[self._errors, self._authenticate]
        )
        self.app.router.add_post(f"{self.prefix}/deliver-message", self._deliver_message)
        self.app.router.add_post(f"{self.prefix}/deliver-report", self._deliver_report)
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        self._runner = guarded_runner(self.app, self._limits, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = GuardedSite(
            self._runner, host, port, limits=self._limits, ssl_context=tls, label="api"
        )
        await self._site.start()
        return self._site.port

    async def stop_intake(self) -> None:
        if self._site is not None:
            await self._site.stop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(  # noqa: PLR0911 - one answer per exception it translates
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refusal as refusal:
            return refusal.response
        except InvalidBodyError as exc:
            return _invalid(exc)
        except web.HTTPRequestEntityTooLarge:
            return problem(413, "Payload Too Large", cause="PAYLOAD_TOO_LARGE")
        except web.HTTPNotFound:
            return problem(404, "Not Found", cause="RESOURCE_NOT_FOUND")
        except web.HTTPMethodNotAllowed as exc:
            # RFC 9110 15.5.6: a 405 must say which methods the resource has.
            allow = ", ".join(sorted(exc.allowed_methods))
            return problem(405, "Method Not Allowed", headers={"Allow": allow})
        except BacklogFullError as exc:
            log.warning("api.intake_refused", reason=exc.reason)
            retry = str(int(exc.retry_after or self._retry_after))
            return problem(
                503,
                "Service Unavailable",
                detail="the gateway's backlog is full",
                cause="BACKLOG_FULL",
                headers={"Retry-After": retry},
            )
        except Exception:
            log.exception("api.internal_error", path=request.path)
            return problem(500, "Internal Server Error", cause="SYSTEM_FAILURE")

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        peer = peer_identity(ssl_object)
        # The handshake already required a trusted certificate; this is authorization.
        if peer is None or not any(peer.is_identity(p) for p in self._allowed):
            log.warning(
                "auth.peer_rejected",
                direction="inbound",
                peer=peer.primary if peer else None,
                remote=request.remote,
                reason="not in api.allowed_peers",
            )
            return problem(403, "Forbidden", cause="PEER_NOT_ALLOWED")
        if self._token is not None:
            refused = self._check_token(self._token, request, ssl_object, peer)
            if refused is not None:
                return refused
        request[PEER] = peer.primary
        return await handler(request)

    def _check_token(
        self, gate: TokenGate, request: web.Request, ssl_object: Any, peer: PeerIdentity
    ) -> web.Response | None:
        """The refusal for a bad or missing bearer token, or ``None`` when it verifies.

        The answer carries no reason (that stays in our log) and, like every refusal
        before the body is read, nothing about the Service IDs we serve.
        """
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            gate.check(request.headers.get("Authorization"), peer_cert_der=der, peer=peer)
        except TokenRejectedError as exc:
            log.warning(
                "auth.token_rejected",
                direction="inbound",
                peer=peer.primary,
                remote=request.remote,
                reason=exc.reason,
            )
            status, challenge = gate.challenge(exc)
            return problem(
                status,
                "Forbidden" if status == 403 else "Unauthorized",
                headers={"WWW-Authenticate": challenge},
            )
        return None

    # --- handlers ------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise _Refusal(
                problem(415, "Unsupported Media Type", detail="expected application/json")
            )
        if request.content_length is None and request.headers.get("Transfer-Encoding") is None:
            raise _Refusal(problem(411, "Length Required"))
        try:
            # Bytes, not request.json(): JSON is UTF-8 whatever charset= says (RFC 8259
            # 8.1), and an unknown charset would be a LookupError, i.e. a 500.
            body = json.loads(await request.read())
            # Unpaired surrogates (refused by I-JSON, RFC 7493 2.1) cannot be stored or
            # logged as UTF-8: refuse them here rather than fail in the store.
            json.dumps(body, ensure_ascii=False).encode()
        except (ValueError, UnicodeError, RecursionError):  # RecursionError: deep nesting
            raise _Refusal(
                problem(
                    400,
                    "Bad Request",
                    detail="body is not JSON",
                    cause="INVALID_MSG_FORMAT",
                    invalid=(InvalidParam(param="/", reason="is not valid JSON"),),
                )
            ) from None
        return body

    async def _served(self, destination: Address, what: str) -> str:
        """The UE Service ID a message or report is for, if this gateway serves it."""
        known = self._directory.endpoint(destination.addr) is not None
        if not known and self._on_unknown is not None and destination.addr_type == AddressType.UE:
            await self._on_unknown()
            known = self._directory.endpoint(destination.addr) is not None
        if destination.addr_type != AddressType.UE or not known:
            log.warning(f"auth.{what}_refused", reason="destination not served")
            raise _Refusal(
                problem(
                    403,
                    "Forbidden",
                    detail=f"the {what}'s destination is not served by this gateway",
                    cause="DESTINATION_NOT_SERVED",
                )
            )
        return destination.addr

    async def _deliver_message(self, request: web.Request) -> web.StreamResponse:
        message = GatewayMessageDelivery.from_json(await self._json(request))
        with bound_message(message.msg_id, peer=request[PEER]):
            service_id = await self._served(message.dest_addr, "message")
            if segments.is_segment(message):
                await self._segment(message, service_id)
                return web.Response(status=204)
            pipeline = self._directory.pipeline(service_id)
            # The message and its reply route in one transaction: a reply from the device
            # can never find the message stored but the route missing (or the reverse).
            (result,) = await self._store.put_many(
                Queue.DOWNLINK,
                [downlink_request(message, service_id, pipeline=pipeline)],
                route=Route(service_id, message.ori_addr.to_json(), self._route_ttl),
            )
            metrics.accepted(
                "downlink", metrics.transport_of(service_id), duplicate=result.duplicate
            )
            log.debug("message.received", direction="downlink", duplicate=result.duplicate)
        return web.Response(status=204)

    async def _segment(self, message: GatewayMessageDelivery, service_id: str) -> None:
        """Store a segment (204 only once stored); its message goes out once whole."""
        result = await segments.put_downlink_segment(
            self._store,
            message,
            service_id=service_id,
            pipeline=self._directory.pipeline(service_id),
            timeout=self._relay.reassembly_timeout,
            max_segments=self._relay.max_segments,
        )
        await self._store.remember_route(service_id, message.ori_addr.to_json(), self._route_ttl)
        params = message.seg_params
        log.debug(
            "segment.received",
            seg_id=segments.whole_msg_id(message),
            seg_numb=params.seg_numb if params else None,
            duplicate=result.duplicate,
            complete=result.whole is not None,
        )
        if result.whole is not None:
            metrics.accepted(
                "downlink", metrics.transport_of(service_id), duplicate=result.whole.duplicate
            )
            log.debug(
                "message.received",
                direction="downlink",
                duplicate=result.whole.duplicate,
                msg_id=segments.whole_msg_id(message),
            )

    async def _deliver_report(self, request: web.Request) -> web.StreamResponse:
        report = DeliveryStatusReport.from_json(await self._json(request))
        with bound_message(report.msg_id, peer=request[PEER]):
            service_id = await self._served(report.dest_addr, "report")
            pipeline = self._directory.pipeline(service_id)
            put = report_in_request(report, service_id, pipeline=pipeline)
            await self._store.put_many(Queue.DOWNLINK, [put])
            metrics.report("received")
            log.debug("report.received", delivered=report.delivered)
        return web.Response(status=204)


class _Refusal(Exception):  # control flow inside this module only
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _invalid(exc: InvalidBodyError) -> web.Response:
    return problem(
        400,
        "Bad Request",
        detail=str(exc),
        cause="INVALID_MSG_FORMAT",
        invalid=(InvalidParam(param=exc.pointer or "/", reason=exc.reason),),
    )
