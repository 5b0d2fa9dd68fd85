"""The reference MSGin5G Server: MSGS_GWRegistration (our extension) and MSGS_MSGDelivery
over mutual TLS, downlink pushes to gateways, and a loopback operator interface.

It is strict on purpose: every body it receives is parsed by the wire types (and, with
``schema_check``, validated against the OpenAPI files), every body it sends is checked
the same way, and every registration and message is authorized against the identity in
the client certificate. With ``[tokens]`` it is also the OAuth 2.0 authorization server
(``POST /oauth2/token``) and checks the bearer token of every MSGS call before it reads
a body (:mod:`gatewayd_sim.tokens`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog
from aiohttp import web

from gatewayd import listener, segments
from gatewayd.errors import GatewaydError, InvalidBodyError, TokenRejectedError
from gatewayd.msgin5g import (
    Address,
    AddressType,
    DeliveryStatus,
    DeliveryStatusReport,
    GatewayMessageDelivery,
    GatewayRegistration,
    GatewayRegistrationAck,
    MessageDeliveryAck,
    ProblemDetails,
    ReportDeliveryStatus,
    UEMessageDelivery,
)
from gatewayd.msgin5g.model import InvalidParam
from gatewayd.msgin5g.registration import API_NAME, API_VERSION, CAUSE_NOT_REGISTERED
from gatewayd.security import tls
from gatewayd_sim.faults import Fault, Faults
from gatewayd_sim.operator import operator_app
from gatewayd_sim.policy import Refused
from gatewayd_sim.push import GatewayClient
from gatewayd_sim.records import PushResult, Registration, ReportRecord, UplinkRecord
from gatewayd_sim.settings import SimSettings
from gatewayd_sim.tokens import (
    DELIVERY_SCOPE,
    REGISTRATION_SCOPE,
    TOKEN_PATH,
    AuthorizationServer,
    TokenGrant,
)

log = structlog.get_logger(__name__)

REGISTRATION_ROOT = f"/{API_NAME}/{API_VERSION}"
DELIVERY_ROOT = "/msgs-msgdelivery/v1"

EXTENSION_FILE = "MSGS_GWRegistration.yaml"
MSGDELIVERY_FILE = "TS29538_MSGS_MSGDelivery.yaml"
_DOWNLINK_SCHEMA = {
    "N3G": ("TS29538_MSGG_N3GDelivery.yaml", "N3gMessageDelivery"),
    "L3G": ("TS29538_MSGG_L3GDelivery.yaml", "L3gMessageDelivery"),
}

# The sim segments whatever a test asks for; limits are the gateway's business.
_SIM_MAX_SEGMENTS = 10_000

# (api file, schema, body) -> violations; gatewayd_sim.schemas.problems fits.
SchemaCheck = Callable[[str, str, object], tuple[str, ...]]
T = TypeVar("T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SchemaViolationError(GatewaydError):
    """The server was about to send a body its own schema refuses: a bug, never sent."""


class SimTimeoutError(GatewaydError):
    """:meth:`SimServer.wait_for` gave up."""


class SimServer:
    """The server as an async context manager; ``async with SimServer(settings) as sim``.

    Inspect ``registrations``, ``uplinks``, ``reports`` (what gateways sent) and
    ``pushes`` (what the server sent to gateways); ``wait_for`` blocks until a condition
    on them holds.
    """

    def __init__(self, settings: SimSettings, *, schema_check: SchemaCheck | bool = False) -> None:
        self.settings = settings
        if schema_check is True:
            # Imported late: openapi-schema-validator is a test dependency only.
            from gatewayd_sim.schemas import problems

            schema_check = problems
        self._check: SchemaCheck | None = schema_check or None
        self._registrations: dict[str, Registration] = {}
        self.uplinks: list[UplinkRecord] = []
        self.reports: list[ReportRecord] = []
        self.pushes: list[PushResult] = []
        # Keyed (gateway, originator, msgId): a msgId names a message of its originator,
        # so two devices behind one gateway may well pick the same one.
        self.duplicates: Counter[tuple[str, str, str]] = Counter()
        self._seen: set[tuple[str, str, str]] = set()
        # Uplink segments: every one received, and those waiting for the rest of their
        # message, by (gateway, originator, segId) and segment number.
        self.segments: list[UplinkRecord] = []
        self._partial: dict[tuple[str, str, str], dict[int, UEMessageDelivery]] = {}
        self.faults = Faults()
        # Its calls to gateways present the client certificate, never the serving one.
        self._client = GatewayClient(settings.client_identity, settings.trust)
        self.tokens: AuthorizationServer | None = (
            AuthorizationServer(
                settings.tokens,
                settings.identity,
                settings.client_identity,
                lambda gw_id: any(g.identity == gw_id for g in settings.allow.gateways),
            )
            if settings.tokens is not None
            else None
        )
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._operator_runner: web.AppRunner | None = None
        self.port = 0
        self.operator_port: int | None = None

    # --- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen; with mutual TLS required, no peer without a trusted certificate gets in."""
        ctx = tls.server_context(self.settings.identity, self.settings.trust)
        await self._client.start()
        limits = self.settings.limits
        self._runner = listener.runner(self._app(), limits, access_log=None)
        await self._runner.setup()
        await listener.GuardedSite(
            self._runner,
            self.settings.host,
            self.settings.port,
            limits=limits,
            ssl_context=ctx,
            label="sim.api",
        ).start()
        self.port = _bound_port(self._runner)
        if self.tokens is not None:
            # private_key_jwt assertions must name this URL as their audience.
            self.tokens.token_url = f"{self.api_root}{TOKEN_PATH}"
        if self.settings.operator_port is not None:
            op_limits = self.settings.operator_limits
            self._operator_runner = listener.runner(operator_app(self), op_limits, access_log=None)
            await self._operator_runner.setup()
            await listener.GuardedSite(
                self._operator_runner,
                self.settings.operator_host,
                self.settings.operator_port,
                limits=op_limits,
                label="sim.operator",
            ).start()
            self.operator_port = _bound_port(self._operator_runner)
        log.info(
            "sim.started",
            api_root=self.api_root,
            operator_port=self.operator_port,
            gateways=len(self.settings.allow.gateways),
        )

    async def stop(self) -> None:
        """Stop listening, cancel pending report tasks, close the client pool."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in (self._operator_runner, self._runner):
            if runner is not None:
                await runner.cleanup()
        self._operator_runner = self._runner = None
        await self._client.close()
        log.info("sim.stopped")

    @property
    def api_root(self) -> str:
        if self.settings.api_root:
            return self.settings.api_root.rstrip("/")
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - advertising, not binding
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.port}"

    # --- state for tests and the operator ----------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        """Live registrations (expired ones are dropped when looked at)."""
        now = _now()
        return [r for r in self._registrations.values() if r.live(now)]

    def fail(
        self,
        status: int = 503,
        *,
        retry_after: int = 1,
        count: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Answer the next ``count`` MSGS requests (or those within ``seconds``) with
        ``status`` and ``Retry-After``."""
        self.faults.set(Fault(status=status, retry_after=retry_after), count=count, seconds=seconds)
        log.info(
            "sim.fault.set", status=status, retry_after=retry_after, count=count, seconds=seconds
        )

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
    ) -> None:
        """Return once ``predicate()`` holds; it is re-checked on every state change."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise SimTimeoutError(f"condition not met within {timeout}s") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def route(self, service_id: str) -> Registration | None:
        """The live registration serving ``service_id`` (one at most: see _check_not_claimed)."""
        found = [r for r in self.registrations if service_id in r.ue_svc_ids]
        return max(found, key=lambda r: r.expiry) if found else None

    # --- downlink ------------------------------------------------------------------

    async def send_downlink(
        self,
        to: str,
        payload: str | None,
        *,
        from_: str | None = None,
        app_id: str | None = None,
        deliv_st_req_ind: bool | None = None,
        msg_id: str | None = None,
    ) -> PushResult:
        """Push a message for UE ``to`` to the gateway that registered it (expects 204)."""
        return await self.push_message(
            self.downlink_message(
                to,
                payload,
                from_=from_,
                app_id=app_id,
                deliv_st_req_ind=deliv_st_req_ind,
                msg_id=msg_id,
            )
        )

    def downlink_message(
        self,
        to: str,
        payload: str | None,
        *,
        from_: str | None = None,
        app_id: str | None = None,
        deliv_st_req_ind: bool | None = None,
        msg_id: str | None = None,
    ) -> GatewayMessageDelivery:
        """A downlink message for UE ``to`` from our AS (or ``from_``), not yet sent."""
        return GatewayMessageDelivery(
            ori_addr=Address(AddressType.AS.value, from_ or self.settings.as_address),
            dest_addr=Address.ue(to),
            msg_id=msg_id or uuid.uuid4().hex,
            app_id=app_id,
            deliv_st_req_ind=deliv_st_req_ind,
            payload=payload,
        )

    def downlink_segments(
        self, message: GatewayMessageDelivery, *, size: int
    ) -> list[GatewayMessageDelivery]:
        """``message`` as segments of at most ``size`` payload bytes (TS 23.554 8.5.2).

        Returned in order, not sent: a test pushes them with :meth:`push_message` in any
        order, twice, or not at all.
        """
        return segments.split(message, size=size, max_segments=_SIM_MAX_SEGMENTS)

    async def push_message(self, message: GatewayMessageDelivery) -> PushResult:
        """Push one message (or segment) to the gateway serving its destination."""
        to, msg_id = message.dest_addr.addr, message.msg_id
        body = message.to_json()
        bound = log.bind(msg_id=msg_id)
        registration = self.route(to)
        if registration is None:
            bound.warning("sim.downlink.unroutable", to=to)
            result = PushResult(
                kind="deliver-message",
                msg_id=msg_id,
                gw_id=None,
                status=0,
                body=body,
                error="no live registration serves this UE service id",
            )
        else:
            api_file, schema = _DOWNLINK_SCHEMA.get(registration.gw_type, _DOWNLINK_SCHEMA["N3G"])
            self._check_outgoing(api_file, schema, body)
            status, error = await self._client.post(
                registration.gw_id,
                f"{registration.delivery_root}/deliver-message",
                body,
                token=self._push_token(registration),
            )
            result = PushResult(
                kind="deliver-message",
                msg_id=msg_id,
                gw_id=registration.gw_id,
                status=status,
                body=body,
                error=error,
            )
            bound.info("sim.downlink.pushed", gw_id=registration.gw_id, status=status, error=error)
        self.pushes.append(result)
        await self._notify()
        return result

    async def _send_report(self, registration: Registration, uplink: UEMessageDelivery) -> None:
        # The sim plays the destination AS: the message "arrived", so report success.
        if self.settings.report_delay:
            await asyncio.sleep(self.settings.report_delay)
        report = DeliveryStatusReport(
            ori_addr=uplink.dest_addr,
            dest_addr=uplink.ori_addr,
            msg_id=uplink.msg_id,
            deliv_st=ReportDeliveryStatus.REPT_DELY_SUCCESS.value,
        )
        body = report.to_json()
        # Both MSGG APIs take the report type defined in MSGS_MSGDelivery.
        self._check_outgoing(MSGDELIVERY_FILE, "DeliveryStatusReport", body)
        status, error = await self._client.post(
            registration.gw_id,
            f"{registration.delivery_root}/deliver-report",
            body,
            token=self._push_token(registration),
        )
        self.pushes.append(
            PushResult(
                kind="deliver-report",
                msg_id=uplink.msg_id,
                gw_id=registration.gw_id,
                status=status,
                body=body,
                error=error,
            )
        )
        log.info("sim.report.sent", msg_id=uplink.msg_id, gw_id=registration.gw_id, status=status)
        await self._notify()

    def _push_token(self, registration: Registration) -> str | None:
        # With a signing key the sim always sends its token: a gateway that does not
        # require one ignores it, one that does gets what it needs.
        if self.tokens is None:
            return None
        return self.tokens.push_token(registration.gw_id, registration.gw_type)

    @property
    def token_grants(self) -> list[TokenGrant]:
        """Every token issued (endpoint and pushes), oldest first; empty without tokens."""
        return self.tokens.grants if self.tokens is not None else []

    @property
    def token_requests(self) -> int:
        """How many requests reached the token endpoint (granted or refused)."""
        return self.tokens.requests if self.tokens is not None else 0

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sim.task.crashed", task=name)

        task = asyncio.get_running_loop().create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- HTTP ------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorize, self._edge])
        app.add_routes(
            [
                web.post(f"{REGISTRATION_ROOT}/registrations", self._register),
                web.put(f"{REGISTRATION_ROOT}/registrations/{{rid}}", self._update),
                web.delete(f"{REGISTRATION_ROOT}/registrations/{{rid}}", self._deregister),
                web.post(f"{DELIVERY_ROOT}/deliver-ue-message", self._uplink),
                web.post(f"{DELIVERY_ROOT}/deliver-report", self._report),
            ]
        )
        if self.tokens is not None:
            app.router.add_post(TOKEN_PATH, self._token)
        return app

    async def _token(self, request: web.Request) -> web.StreamResponse:
        assert self.tokens is not None  # the route exists only with tokens
        response = await self.tokens.handle(request, _peer(request), self._check_outgoing)
        await self._notify()
        return response

    @web.middleware
    async def _authorize(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """With ``[tokens]``: no MSGS handler runs (no body is read) without a valid token."""
        refused = None if request.path == TOKEN_PATH else self._check_token(request)
        return refused if refused is not None else await handler(request)

    def _check_token(self, request: web.Request) -> web.Response | None:
        """The refusal of an MSGS call whose token does not verify, else ``None``.

        One log event names the peer and the stable reason; the answer says only
        401/403 and the RFC 6750 challenge: no reason, no Service ID.
        """
        if self.tokens is None:
            return None
        scope = REGISTRATION_SCOPE if request.path.startswith(REGISTRATION_ROOT) else DELIVERY_SCOPE
        peer = _peer(request)
        try:
            self.tokens.check(request, scope, peer)
        except TokenRejectedError as exc:
            log.warning(
                "auth.token_rejected",
                direction="inbound",
                peer=peer.primary if peer else None,
                reason=exc.reason,
                path=request.path,
            )
            status, challenge = self.tokens.challenge(scope, exc)
            response = self._problem(status, "Forbidden" if status == 403 else "Unauthorized")
            response.headers["WWW-Authenticate"] = challenge
            return response
        return None

    @web.middleware
    async def _edge(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Injected faults first, then translate refusals and bad bodies to ProblemDetails."""
        # Faults stand for an overloaded MSGin5G Server, not its authorization server.
        fault = None if request.path == TOKEN_PATH else self.faults.take()
        if fault is not None:
            log.info("sim.fault.injected", status=fault.status, path=request.path)
            response = self._problem(fault.status, "Injected failure", cause="SIM_FAULT")
            response.headers["Retry-After"] = str(fault.retry_after)
            return response
        try:
            return await handler(request)
        except Refused as exc:
            peer = _peer(request)
            log.warning(
                "auth.peer_rejected",
                peer=peer.primary if peer else None,
                cause=exc.cause,
                path=request.path,
            )
            title = "Conflict" if exc.status == 409 else "Forbidden"
            return self._problem(exc.status, title, cause=exc.cause, detail=exc.detail)
        except InvalidBodyError as exc:
            return self._problem(
                400,
                "Bad Request",
                cause="INVALID_MSG_FORMAT",
                detail=str(exc),
                invalid=(InvalidParam(param=exc.pointer or "/", reason=exc.reason),),
            )
        except _Answer as answer:
            return answer.response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals (no route, wrong method, body too large) are
            # text/plain; the spec declares ProblemDetails for every error. Allow stays
            # (RFC 9110 requires it on a 405).
            response = self._problem(exc.status, exc.reason)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    def _problem(
        self,
        status: int,
        title: str,
        *,
        cause: str | None = None,
        detail: str | None = None,
        invalid: tuple[InvalidParam, ...] = (),
    ) -> web.Response:
        body = ProblemDetails(
            status=status, title=title, cause=cause, detail=detail, invalid_params=invalid
        ).to_json()
        self._check_outgoing("TS29571_CommonData.yaml", "ProblemDetails", body)
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/problem+json"
        )

    async def _read(
        self, request: web.Request, api_file: str, schema: str, parse: Callable[[object], T]
    ) -> tuple[T, Mapping[str, Any]]:
        """Parse a JSON body with the wire type, then (optionally) check it on the schema.

        The wire type goes first because its errors carry the precise JSON pointer."""
        if request.content_type != "application/json":
            raise _Answer(
                self._problem(415, "Unsupported Media Type", detail="expected application/json")
            )
        try:
            raw = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):  # Recursion: deep nesting
            raise InvalidBodyError("", "is not valid JSON") from None
        parsed = parse(raw)
        if self._check is not None:
            found = self._check(api_file, schema, raw)
            if found:
                pointer, _, reason = found[0].partition(": ")
                raise InvalidBodyError("" if pointer == "/" else pointer, reason)
        return parsed, raw

    def _check_outgoing(self, api_file: str, schema: str, body: object) -> None:
        if self._check is not None:
            found = self._check(api_file, schema, body)
            if found:
                log.error("sim.schema.outgoing_invalid", schema=schema, problems=list(found))
                raise SchemaViolationError(f"{schema}: {'; '.join(found)}")

    def _json(
        self, status: int, api_file: str, schema: str, body: Mapping[str, Any]
    ) -> web.Response:
        self._check_outgoing(api_file, schema, body)
        return web.json_response(dict(body), status=status)

    # MSGS_GWRegistration ------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.StreamResponse:
        body, raw = await self._read(
            request, EXTENSION_FILE, "GatewayRegistration", GatewayRegistration.from_json
        )
        self.settings.allow.check_registration(
            _peer(request), body.gw_id, body.gw_type, body.ue_svc_ids
        )
        self._check_not_claimed(body)
        # One registration per gateway: a gateway that registers again (after a restart)
        # replaces what it registered before.
        for rid, old in list(self._registrations.items()):
            if old.gw_id == body.gw_id:
                del self._registrations[rid]
        registration = self._grant(uuid.uuid4().hex, body, raw)
        log.info(
            "sim.registration.created",
            gw_id=body.gw_id,
            registration_id=registration.registration_id,
            ue_count=len(body.ue_svc_ids),
        )
        response = self._ack(201, registration)
        response.headers["Location"] = (
            f"{self.api_root}{REGISTRATION_ROOT}/registrations/{registration.registration_id}"
        )
        await self._notify()
        return response

    async def _update(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        body, raw = await self._read(
            request, EXTENSION_FILE, "GatewayRegistration", GatewayRegistration.from_json
        )
        self.settings.allow.check_registration(
            _peer(request), body.gw_id, body.gw_type, body.ue_svc_ids
        )
        self._owned(request, rid)
        self._check_not_claimed(body)
        registration = self._grant(rid, body, raw)
        log.info(
            "sim.registration.updated",
            gw_id=body.gw_id,
            registration_id=rid,
            ue_count=len(body.ue_svc_ids),
        )
        await self._notify()
        return self._ack(200, registration)

    async def _deregister(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        registration = self._owned(request, rid)
        del self._registrations[rid]
        log.info("sim.registration.deleted", gw_id=registration.gw_id, registration_id=rid)
        await self._notify()
        return web.Response(status=204)

    def _check_not_claimed(self, body: GatewayRegistration) -> None:
        """Refuse Service IDs another gateway holds a live registration for.

        Letting the latest registration win silently sent one gateway's downlink to
        another gateway. The count only: the ids would tell who serves what.
        """
        taken = {sid for r in self.registrations if r.gw_id != body.gw_id for sid in r.ue_svc_ids}
        clash = sum(1 for service_id in body.ue_svc_ids if service_id in taken)
        if clash:
            raise Refused(
                "SERVICE_ID_CONFLICT",
                f"{clash} UE service id(s) are registered by another gateway",
                status=409,
            )

    def _owned(self, request: web.Request, rid: str) -> Registration:
        entry = self.settings.allow.for_peer(_peer(request))
        registration = self._registrations.get(rid)
        if registration is None or not registration.live(_now()):
            raise _Answer(self._problem(404, "Not Found", cause="REGISTRATION_NOT_FOUND"))
        if registration.gw_id != entry.identity:
            # Only the owner may touch a registration; a 403 (not 404) is fine here since
            # the peer is already an authenticated, allowed gateway.
            raise Refused("NOT_REGISTRATION_OWNER", "the registration belongs to another gateway")
        return registration

    def _grant(self, rid: str, body: GatewayRegistration, raw: Mapping[str, Any]) -> Registration:
        now = _now()
        ceiling = now + timedelta(seconds=self.settings.max_ttl)
        if body.expiry is not None and body.expiry <= now:
            raise InvalidBodyError("/expiry", "must be in the future")
        expiry = min(body.expiry, ceiling) if body.expiry is not None else ceiling
        registration = Registration(
            registration_id=rid,
            gw_id=body.gw_id,
            gw_type=body.gw_type,
            target_uri=body.target_uri,
            ue_svc_ids=body.ue_svc_ids,
            expiry=expiry,
            raw=raw,
        )
        self._registrations[rid] = registration
        return registration

    def _ack(self, status: int, registration: Registration) -> web.Response:
        ack = GatewayRegistrationAck(gw_id=registration.gw_id, expiry=registration.expiry)
        return self._json(status, EXTENSION_FILE, "GatewayRegistrationAck", ack.to_json())

    # MSGS_MSGDelivery ---------------------------------------------------------------

    def _serving(self, request: web.Request, ori: Address) -> Registration:
        """The peer's live registration, provided it serves UE ``ori``; else Refused."""
        entry = self.settings.allow.for_peer(_peer(request))
        now = _now()
        mine = [
            r for r in self._registrations.values() if r.gw_id == entry.identity and r.live(now)
        ]
        if not mine:
            raise Refused(CAUSE_NOT_REGISTERED, "this gateway holds no live registration")
        for registration in mine:
            if ori.addr_type == AddressType.UE and ori.addr in registration.ue_svc_ids:
                return registration
        raise Refused("SERVICE_ID_NOT_ALLOWED", "oriAddr is not a UE this gateway registered")

    async def _uplink(self, request: web.Request) -> web.StreamResponse:
        message, raw = await self._read(
            request, MSGDELIVERY_FILE, "UEMessageDelivery", UEMessageDelivery.from_json
        )
        registration = self._serving(request, message.ori_addr)
        bound = log.bind(msg_id=message.msg_id, gw_id=registration.gw_id)
        key = (registration.gw_id, message.ori_addr.addr, message.msg_id)
        if key in self._seen:
            # A resend after a lost ack: acknowledge again, record (and report) once.
            self.duplicates[key] += 1
            bound.info("sim.uplink.duplicate", count=self.duplicates[key])
        else:
            record = UplinkRecord(gw_id=registration.gw_id, message=message, raw=raw)
            whole = self._reassemble(record) if segments.is_segment(message) else message
            self._seen.add(key)  # only now: a refused segment (400) may be sent again
            if whole is not None:
                if whole is not message:
                    record = UplinkRecord(
                        gw_id=registration.gw_id, message=whole, raw=whole.to_json()
                    )
                self.uplinks.append(record)
                bound.info("sim.uplink.received", dest=str(message.dest_addr))
                if whole.deliv_st_req_ind:
                    self._spawn(
                        f"sim.report:{whole.msg_id}", self._send_report(registration, whole)
                    )
        await self._notify()
        ack = MessageDeliveryAck(
            ori_addr=message.ori_addr, msg_id=message.msg_id, status=DeliveryStatus.DELY_STORED
        )
        return self._json(200, MSGDELIVERY_FILE, "MessageDeliveryAck", ack.to_json())

    def _reassemble(self, record: UplinkRecord) -> UEMessageDelivery | None:
        """Keep a segment; the whole message once its last missing segment arrived.

        The record of a reassembled message holds its JSON as rebuilt (no such body
        crossed the wire); every segment's own record, raw body included, is in
        ``segments``.
        """
        message = record.message
        seg_id, seg_numb = segments.check(message, max_segments=_SIM_MAX_SEGMENTS)
        key = (record.gw_id, message.ori_addr.addr, seg_id)
        parts = self._partial.get(key, {})
        if seg_numb in parts:
            return None  # the same segment again under another msgId: nothing new
        # Assembled before anything is kept: a contradicting segment is refused (400).
        whole = segments.assemble([*parts.values(), message])
        self.segments.append(record)
        if whole is None:
            self._partial[key] = {**parts, seg_numb: message}
        else:
            self._partial.pop(key, None)
        return whole

    async def _report(self, request: web.Request) -> web.StreamResponse:
        report, raw = await self._read(
            request, MSGDELIVERY_FILE, "DeliveryStatusReport", DeliveryStatusReport.from_json
        )
        registration = self._serving(request, report.ori_addr)
        self.reports.append(ReportRecord(gw_id=registration.gw_id, report=report, raw=raw))
        log.info(
            "sim.report.received",
            msg_id=report.msg_id,
            gw_id=registration.gw_id,
            deliv_st=report.deliv_st,
        )
        await self._notify()
        ack = MessageDeliveryAck(ori_addr=report.ori_addr, msg_id=report.msg_id)
        return self._json(200, MSGDELIVERY_FILE, "MessageDeliveryAck", ack.to_json())


class _Answer(GatewaydError):
    """Carries a finished response out of a helper (404, 415)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _peer(request: web.Request) -> tls.PeerIdentity | None:
    transport = request.transport
    return tls.peer_identity(transport.get_extra_info("ssl_object") if transport else None)


def _now() -> datetime:
    return datetime.now(UTC)


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])
