"""The device-facing HTTP API: authentication, body limits, and the hand-over to intake.

Order per request, chosen so nothing is read from an unauthenticated peer:
authenticate (headers or TLS only) -> authorize the path's device -> content type ->
size -> JSON -> ``context.accept`` -> 202. The 202 leaves only after ``accept``
returned, i.e. after the gateway stored the message durably.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from gatewayd.api import IntakeRefusedError, Logger, Rejection, TransportContext, peer_identity
from gatewayd_http.config import BEARER, HttpConfig
from gatewayd_http.messages import parse_report, parse_uplink
from gatewayd_http.problems import Problem, refusal

_REALM = 'Bearer realm="gatewayd"'
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What authenticates each device: its token (bearer) or certificate identity."""

    tokens: Mapping[str, bytes]  # device name -> token
    identities: Mapping[str, str]  # certificate SAN -> device name


class Intake:
    """Builds the aiohttp application that receives device messages and reports."""

    def __init__(
        self, config: HttpConfig, credentials: Credentials, context: TransportContext
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._context = context

    def app(self) -> web.Application:
        """The application; ``client_max_size`` makes aiohttp enforce ``max_body``."""
        app = web.Application(client_max_size=self._config.max_body, middlewares=[self._problems])
        app.router.add_post("/v1/devices/{device}/messages", self._messages)
        app.router.add_post("/v1/devices/{device}/reports", self._reports)
        return app

    async def _messages(self, request: web.Request) -> web.Response:
        device = self._authorize(request)
        raw = await self._body(request)
        try:
            uplink = parse_uplink(device, _decode(raw))
        except Problem as problem:
            await self._reject(device, problem, raw)
            raise
        log = self._context.log.bind(device=device, msg_id=uplink.msg_id)
        try:
            acceptance = await self._context.accept(uplink)
        except IntakeRefusedError as exc:
            _log_refusal(log, exc, event="http.uplink.refused")
            raise refusal(exc) from None
        log.info("http.uplink.accepted", msg_id=acceptance.msg_id, duplicate=acceptance.duplicate)
        return web.json_response(
            {"msgId": acceptance.msg_id, "duplicate": acceptance.duplicate}, status=202
        )

    async def _reports(self, request: web.Request) -> web.Response:
        device = self._authorize(request)
        # A report is no message: a bad one is answered 400 and logged, not kept.
        report = parse_report(device, _decode(await self._body(request)))
        log = self._context.log.bind(device=device, msg_id=report.msg_id)
        try:
            await self._context.accept_report(report)
        except IntakeRefusedError as exc:
            _log_refusal(log, exc, event="http.report.refused")
            raise refusal(exc) from None
        log.info("http.report.accepted", delivered=report.delivered)
        return web.json_response({"msgId": report.msg_id}, status=202)

    @web.middleware
    async def _problems(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Every error leaves as problem JSON, aiohttp's own (404, 405) included."""
        try:
            return await handler(request)
        except Problem as problem:
            answer = problem
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            keep = ("allow", "retry-after")
            headers = {k: v for k, v in exc.headers.items() if k.lower() in keep}
            answer = Problem(exc.status, exc.reason, headers=headers)
        except Exception:
            # A bug or an unexpected failure in intake: the device gets a 500 and
            # retries; the traceback goes to the log, not to the device.
            self._context.log.exception("http.request.failed", path=request.path)
            answer = Problem(500, "internal error; retry later", logged=True)
        if not answer.logged:
            self._context.log.info(
                "http.request.problem", path=request.path, status=answer.status, cause=answer.cause
            )
        return answer.response()

    # --- authentication ---------------------------------------------------------------

    def _authorize(self, request: web.Request) -> str:
        """The authenticated device, which must be the one named in the path."""
        claimed = request.match_info["device"]
        if self._config.device_auth == BEARER:
            device = self._bearer_device(request)
        else:
            device = self._cert_device(request)
        if device != claimed:
            # A device may only send as itself; the answer does not say whether the
            # claimed device exists.
            self._context.log.warning("http.auth.forbidden", device=device, claimed=claimed)
            raise Problem(403, f"not allowed to act for device {claimed!r}")
        return device

    def _bearer_device(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "a bearer token is required", headers={"WWW-Authenticate": _REALM})
        presented = token.strip().encode()
        found = None
        # Compare against every token, without stopping at a match, so the time taken
        # says nothing about which device (if any) a token belongs to.
        for name, expected in self._credentials.tokens.items():
            if hmac.compare_digest(presented, expected):
                found = name
        if found is None:
            self._context.log.warning("http.auth.failed", peer=request.remote)
            raise Problem(
                401,
                "the bearer token is not valid",
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        return found

    def _cert_device(self, request: web.Request) -> str:
        transport = request.transport
        peer = peer_identity(transport.get_extra_info("ssl_object") if transport else None)
        names = (*peer.uris, *peer.dns_names) if peer else ()
        if not names:
            # The TLS listener requires a certificate, so this means TLS is not in use.
            raise Problem(401, "a client certificate is required")
        for name in names:
            device = self._credentials.identities.get(name)
            if device is not None:
                return device
        self._context.log.warning("http.auth.forbidden", peer=request.remote, identity=names[0])
        raise Problem(403, "the client certificate is not mapped to a device")

    # --- body -------------------------------------------------------------------------

    async def _reject(self, device: str, problem: Problem, raw: bytes) -> None:
        """An authenticated device's body that is no message: kept in the gateway's
        dead-letter queue (queue ``intake``), logged and counted, then answered 400."""
        try:
            await self._context.reject(
                Rejection(device=device, reason="invalid_body", detail=problem.detail, content=raw)
            )
        except IntakeRefusedError as exc:  # not even the record fits (disk full): 503
            _log_refusal(self._context.log.bind(device=device), exc, event="http.uplink.refused")
            raise refusal(exc) from None
        # The core's intake.rejected is the refusal's line: no http.request.problem too.
        problem.logged = True

    async def _body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            raise Problem(415, "the body must be application/json")
        length = request.content_length
        if length is not None and length > self._config.max_body:
            raise _too_large(self._config.max_body)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            # A chunked body, or one longer than its Content-Length said.
            raise _too_large(self._config.max_body) from None


def _log_refusal(log: Logger, exc: IntakeRefusedError, *, event: str) -> None:
    """One line per refusal: a permanent one was logged by the core (``intake.rejected``),
    so only a refusal for now (503: store full) is ours to log above debug."""
    if exc.permanent:
        log.debug(event, reason=exc.reason, detail=exc.detail)
    else:
        log.warning(event, reason=exc.reason, detail=exc.detail)


def _decode(raw: bytes) -> object:
    """The JSON value of a body, or a 400 problem: never a 500 and a traceback."""
    try:
        value = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # deep nesting: [[[[...]]]]
        raise Problem(400, "the body is not valid JSON: nested too deeply") from None
    try:
        # A lone surrogate ("\ud800") is valid JSON but no Unicode text (I-JSON, RFC
        # 7493 2.1): it could not be stored, logged or forwarded as UTF-8.
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise Problem(400, "the body holds a lone surrogate: not valid Unicode text") from None
    except RecursionError:
        raise Problem(400, "the body is not valid JSON: nested too deeply") from None
    return value


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the body exceeds {limit} bytes")
