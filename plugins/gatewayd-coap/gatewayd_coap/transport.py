"""The coap transport: devices POST JSON to the gateway; the gateway POSTs to devices.

Uplink: ``POST coap://GW/v1/devices/{device}/messages`` (and ``.../reports`` for a
device's own report on a downlink). The response is sent only after the message is
stored, so a 2.01 is the device's evidence that the gateway has it; refusals are CoAP
codes (4.00, 4.04, 4.13, 4.15, 5.03 with Max-Age as the retry hint, RFC 7252
5.9.3.4).

Downlink and the server's reports: a confirmable ``POST`` to the device's
``endpoint``. The device's response, piggybacked on the ACK or separate, is the delivery
evidence: 2.xx delivered, 4.xx refused for good, 5.xx or no answer retried.

A device with an ``[oscore]`` context (RFC 8613) must protect its requests with it, and
the gateway protects its requests to the device; see :mod:`gatewayd_coap.security`.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap import numbers, oscore, resource
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress

from gatewayd.api import (
    DeliveryOutcome,
    Downlink,
    GatewaydError,
    IntakeRefusedError,
    Logger,
    Rejection,
    Transport,
    TransportContext,
    TransportSettings,
    UplinkReport,
)
from gatewayd_coap.config import CoapConfig, read_config
from gatewayd_coap.messages import (
    BadRequest,
    downlink_body,
    parse_report,
    parse_uplink,
    report_body,
)
from gatewayd_coap.security import DeviceContext, ServerContexts, load_contexts

JSON = numbers.ContentFormat.JSON
_REFUSALS = {
    "unknown_device": numbers.codes.NOT_FOUND,
    "invalid_message": numbers.codes.BAD_REQUEST,
}


class CoapTransport(Transport):
    """One UDP CoAP endpoint for the devices mapped in ``[transports.NAME]``."""

    def __init__(self, settings: TransportSettings, context: TransportContext) -> None:
        super().__init__(settings, context)
        self.config: CoapConfig = read_config(settings)
        self._context: Any = None  # aiocoap.Context, created in the running loop
        self._address: tuple[str, int] | None = None
        self._oscore = ServerContexts(context.log)  # filled at start

    @property
    def address(self) -> tuple[str, int]:
        """Where the endpoint is bound (the real port when ``listen`` asked for port 0)."""
        if self._address is None:
            raise RuntimeError("the CoAP transport is not listening")
        return self._address

    async def start(self) -> None:
        # Secrets and each context's sequence-number state, before the first request.
        self._oscore = await load_contexts(self.config.oscore, self.context.kv, self.context.log)
        # The wrapper unprotects OSCORE requests (and protects their responses); plain
        # ones pass through, and _Site decides who may send unprotected.
        site = OscoreSiteWrapper(_Site(self), self._oscore)
        try:
            # udp6, plus oscore for protected downlink: aiocoap's default set would also
            # open TCP and TLS listeners. oscore comes first: it claims the requests
            # whose URI has a security context, udp6 takes the rest.
            self._context = await aiocoap.Context.create_server_context(
                site, bind=(self.config.host, self.config.port), transports=["oscore", "udp6"]
            )
        except OSError as exc:
            raise GatewaydError(
                f"transports.{self.name}: cannot listen on "
                f"{self.config.host}:{self.config.port}: {exc.strerror}"
            ) from None
        self._address = (self.config.host, _bound_port(self._context))
        for device, secctx in self._oscore.by_device.items():
            endpoint = self.config.endpoints.get(device)
            if endpoint is not None:
                # aiocoap picks a request's context by its URI, as it normalises it.
                uri = _request(endpoint, b"").get_request_uri()
                self._context.client_credentials[uri] = secctx
        self.context.log.info("coap.listening", host=self.config.host, port=self._address[1])

    async def stop(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            await context.shutdown()
        for secctx in self._oscore.by_device.values():
            await secctx.aclose()

    async def deliver(self, message: Downlink) -> DeliveryOutcome:
        log = self.context.log.bind(msg_id=message.msg_id, device=message.device.name)
        outcome = await self._post(message.device.name, downlink_body(message))
        if outcome.delivered:
            log.info("coap.delivery.succeeded")
        else:
            log.warning("coap.delivery.failed", cause=outcome.cause, permanent=outcome.permanent)
        return outcome

    async def deliver_report(self, report: UplinkReport) -> bool:
        log = self.context.log.bind(msg_id=report.msg_id, device=report.device.name)
        outcome = await self._post(report.device.name, report_body(report))
        if outcome.delivered:
            log.info("coap.report.delivered", delivered=report.delivered)
        else:
            log.warning("coap.report.not_delivered", cause=outcome.cause)
        return outcome.delivered

    async def _post(self, device: str, body: bytes) -> DeliveryOutcome:
        endpoint = self.config.endpoints.get(device)
        if endpoint is None:
            return DeliveryOutcome.failure("no endpoint configured", permanent=True)
        if self._context is None:
            return DeliveryOutcome.failure("transport stopped")
        request = _request(endpoint, body)
        secctx = self._oscore.by_device.get(device)
        try:
            async with asyncio.timeout(self.config.delivery_timeout):
                if secctx is not None:
                    await self._ready_to_protect(request, secctx)
                response = await self._context.request(request).response
        except TimeoutError:
            return DeliveryOutcome.failure("no response from the device")
        except oscore.NotAProtectedMessage as exc:
            # The device's OSCORE layer refused the request (a replay, an unknown
            # context, a lost replay window): not evidence from the device's resource.
            plain = exc.plain_message
            detail = plain.payload.decode("utf-8", "replace")[:80]
            return DeliveryOutcome.failure(
                f"the device answered {plain.code.dotted} unprotected: {detail}"
            )
        except coap_error.Error as exc:
            # Retransmissions exhausted, ICMP unreachable, a response that does not
            # unprotect, no sequence number reserved yet...: the device may come back.
            return DeliveryOutcome.failure(f"CoAP: {type(exc).__name__}: {exc}")
        return _outcome(response, secctx)

    async def _ready_to_protect(self, request: aiocoap.Message, secctx: DeviceContext) -> None:
        """A device with a context never gets a plain request: check that aiocoap will
        protect this one, and wait until a sequence number is durably reserved for it."""
        if self._context.client_credentials.get(request.get_request_uri()) is not secctx:
            raise oscore.ContextUnavailable("no OSCORE context for the endpoint")
        await secctx.ensure_headroom()


def _outcome(response: aiocoap.Message, secctx: DeviceContext | None) -> DeliveryOutcome:
    """The device's response as delivery evidence."""
    remote = response.remote
    if secctx is not None and not (
        isinstance(remote, OSCOREAddress) and remote.security_context is secctx
    ):
        # aiocoap hands over only what it could unprotect; check anyway that the
        # evidence comes from the device's own context.
        return DeliveryOutcome.failure("the response is not OSCORE-protected")
    code = response.code
    if code.is_successful():
        return DeliveryOutcome.success()
    cause = f"device answered {code.dotted}"
    return DeliveryOutcome.failure(cause, permanent=code.class_ == 4)


class _Site(resource.Resource, resource.PathCapable):  # type: ignore[misc]
    """The whole endpoint: routes ``v1/devices/{device}/{messages|reports}`` itself."""

    def __init__(self, transport: CoapTransport) -> None:
        super().__init__()
        self._transport = transport

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        refused = _check_request(request, self._transport.config.max_body)
        if refused is not None:
            return refused
        path = request.opt.uri_path
        device, kind = path[2], path[3]
        context = self._transport.context
        log = context.log.bind(device=device, peer=str(request.remote.hostinfo))
        refused = self._authorize(request, device, log)
        if refused is not None:
            return refused
        try:
            if kind == "messages":
                uplink = parse_uplink(device, request.payload)
                log = log.bind(msg_id=uplink.msg_id)
                acceptance = await context.accept(uplink)
            else:
                report = parse_report(device, request.payload)
                log = log.bind(msg_id=report.msg_id)
                await context.accept_report(report)
        except BadRequest as exc:
            return await self._bad_request(device, kind, request.payload, exc, log)
        except IntakeRefusedError as exc:
            # One line per refusal: a permanent one was logged by the core
            # (intake.rejected), so only a refusal for now (5.03) is ours above debug.
            event = "coap.uplink.refused"
            emit = log.debug if exc.permanent else log.warning
            emit(event, kind=kind, reason=exc.reason, detail=exc.detail)
            return _refusal(exc)
        if kind == "reports":
            log.info("coap.report.accepted")
            return _json(numbers.codes.CHANGED, {"msgId": report.msg_id})
        log.info("coap.uplink.accepted", msg_id=acceptance.msg_id, duplicate=acceptance.duplicate)
        return _json(
            numbers.codes.CREATED, {"msgId": acceptance.msg_id, "duplicate": acceptance.duplicate}
        )

    def _authorize(
        self, request: aiocoap.Message, device: str, log: Logger
    ) -> aiocoap.Message | None:
        """The 4.01 for a request that is not from the device in its path, if so.

        A request the OSCORE wrapper unprotected carries its context in ``remote``; that
        context's device must be the one named in the path. An unprotected request is
        only served for a device without a context, on a transport that has such
        devices (and is therefore held on loopback, see config.py). Nothing of a
        refused request is parsed or stored.
        """
        config = self._transport.config
        remote = request.remote
        secctx = remote.security_context if isinstance(remote, OSCOREAddress) else None
        if isinstance(secctx, DeviceContext):
            if secctx.device == device:
                return None
            log.warning("coap.auth.refused", reason="wrong_device", identity=secctx.device)
            return _answer(numbers.codes.UNAUTHORIZED, f"not allowed to act for device {device!r}")
        if device not in config.oscore and not config.oscore_only:
            return None
        log.warning("coap.auth.refused", reason="unprotected")
        return _answer(numbers.codes.UNAUTHORIZED, "OSCORE protection is required")

    async def _bad_request(
        self, device: str, kind: str, raw: bytes, exc: BadRequest, log: Logger
    ) -> aiocoap.Message:
        """A body that is no message. A listed device's uplink is kept in the gateway's
        dead-letter queue (``context.reject``, which logs and counts it); anything else
        is answered and logged here. Without device authentication on this transport,
        junk from unlisted names is not stored: it would let anyone fill the store."""
        context = self._transport.context
        if kind != "messages" or context.device(device) is None:
            log.warning("coap.request.invalid", kind=kind, cause=str(exc))
            return _answer(numbers.codes.BAD_REQUEST, str(exc))
        try:
            await context.reject(
                Rejection(device=device, reason="invalid_body", detail=str(exc), content=raw)
            )
        except IntakeRefusedError as refused:  # not even the record fits: 5.03, retry
            log.warning("coap.uplink.refused", kind=kind, reason=refused.reason)
            return _refusal(refused)
        return _answer(numbers.codes.BAD_REQUEST, str(exc))


_KINDS = ("messages", "reports")


def _check_request(request: aiocoap.Message, limit: int) -> aiocoap.Message | None:
    """The refusal of a request that is not a POST of JSON to a known resource, if any."""
    path = request.opt.uri_path
    if len(path) != 4 or path[:2] != ("v1", "devices") or path[3] not in _KINDS:
        return _answer(numbers.codes.NOT_FOUND, "no such resource")
    if request.code != numbers.codes.POST:
        return _answer(numbers.codes.METHOD_NOT_ALLOWED, "POST only")
    if request.opt.content_format not in (None, JSON):
        return _answer(numbers.codes.UNSUPPORTED_CONTENT_FORMAT, "application/json only")
    if len(request.payload) > limit:
        answer = _answer(numbers.codes.REQUEST_ENTITY_TOO_LARGE, f"over {limit} bytes")
        answer.opt.size1 = limit
        return answer
    return None


def _request(endpoint: str, body: bytes) -> aiocoap.Message:
    return aiocoap.Message(
        code=numbers.codes.POST,
        transport_tuning=aiocoap.Reliable,  # CON: the ACK carries the evidence
        uri=endpoint,
        payload=body,
        content_format=JSON,
    )


def _answer(code: Any, diagnostic: str) -> aiocoap.Message:
    # RFC 7252 5.5.2: an error response may carry a human-readable diagnostic payload.
    return aiocoap.Message(code=code, payload=diagnostic.encode())


def _json(code: Any, body: dict[str, Any]) -> aiocoap.Message:
    return aiocoap.Message(
        code=code, payload=json.dumps(body, separators=(",", ":")).encode(), content_format=JSON
    )


def _refusal(exc: IntakeRefusedError) -> aiocoap.Message:
    code = _REFUSALS.get(exc.reason)
    if code is not None:
        return _answer(code, exc.detail)
    # Backlog full (or another "not now"): 5.03 with Max-Age, the CoAP Retry-After.
    answer = _answer(numbers.codes.SERVICE_UNAVAILABLE, exc.detail)
    delay = exc.retry_after if exc.retry_after is not None else 1.0
    answer.opt.max_age = max(1, math.ceil(delay))
    return answer


def _bound_port(context: Any) -> int:
    """The UDP port aiocoap's udp6 endpoint is bound to.

    aiocoap has no public accessor for it (needed with ``listen`` on port 0), so this is
    the one place that walks its internals: token manager -> message manager -> socket.
    """
    for interface in context.request_interfaces:
        messages = getattr(interface, "token_interface", None)
        endpoint = getattr(messages, "message_interface", None)
        transport = getattr(endpoint, "transport", None)
        if transport is not None:
            return int(transport.get_extra_info("socket").getsockname()[1])
    raise RuntimeError("aiocoap opened no UDP endpoint")
