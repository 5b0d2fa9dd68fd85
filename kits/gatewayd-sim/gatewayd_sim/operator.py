"""The operator interface: plain HTTP on loopback, for demos, tests and people.

Unauthenticated by design, hence loopback only (the settings refuse anything else), a
loopback Host header only (DNS rebinding) and JSON bodies only (a browser's
cross-origin "simple" POST cannot send application/json without a preflight, which
this interface never answers). Documented in docs/sim.md.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

if TYPE_CHECKING:
    from gatewayd_sim.server import SimServer

log = structlog.get_logger(__name__)

_SIM: web.AppKey[SimServer] = web.AppKey("sim")


# Host header values a same-host client sends; anything else is a rebound DNS name.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _same_host_only(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Loopback alone does not keep a browser out: a web page can reach 127.0.0.1 by a
    rebound DNS name (its own Host) or with a cross-origin "simple" POST (text/plain,
    no preflight). Refuse a non-loopback Host, and any POST that is not JSON."""
    host = request.headers.get("Host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.lower() not in _LOOPBACK_HOSTS:
        log.warning("sim.operator_refused", reason="host", path=request.path)
        return web.json_response({"error": "Host must be a loopback name"}, status=403)
    if request.method == "POST" and request.content_type != "application/json":
        log.warning("sim.operator_refused", reason="content_type", path=request.path)
        return web.json_response({"error": "Content-Type must be application/json"}, status=415)
    return await handler(request)


def operator_app(sim: SimServer) -> web.Application:
    """The aiohttp application serving ``/operator/*`` for ``sim``."""
    app = web.Application(middlewares=[_same_host_only])
    app[_SIM] = sim
    app.add_routes(
        [
            web.post("/operator/downlink", _downlink),
            web.get("/operator/uplinks", _uplinks),
            web.get("/operator/reports", _reports),
            web.get("/operator/registrations", _registrations),
            web.get("/operator/pushes", _pushes),
            web.post("/operator/fail", _fail),
        ]
    )
    return app


def _bad(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "body is not JSON"}', content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be an object"}', content_type="application/json"
        )
    return data


async def _downlink(request: web.Request) -> web.Response:
    data = await _body(request)
    to, payload = data.get("to"), data.get("payload")
    if not isinstance(to, str) or not (payload is None or isinstance(payload, str)):
        return _bad('"to" (string) is required; "payload" must be a string')
    optional = {k: data.get(k) for k in ("from", "appId", "msgId")}
    if any(v is not None and not isinstance(v, str) for v in optional.values()):
        return _bad('"from", "appId" and "msgId" must be strings')
    report = data.get("delivStReqInd")
    if report is not None and not isinstance(report, bool):
        return _bad('"delivStReqInd" must be a boolean')
    result = await request.app[_SIM].send_downlink(
        to,
        payload,
        from_=optional["from"],
        app_id=optional["appId"],
        deliv_st_req_ind=report,
        msg_id=optional["msgId"],
    )
    return web.json_response(result.to_json(), status=200 if result.ok else 502)


async def _uplinks(request: web.Request) -> web.Response:
    sim = request.app[_SIM]
    return web.json_response(
        [
            {
                **u.to_json(),
                "duplicates": sim.duplicates[(u.gw_id, u.message.ori_addr.addr, u.message.msg_id)],
            }
            for u in sim.uplinks
        ]
    )


async def _reports(request: web.Request) -> web.Response:
    return web.json_response([r.to_json() for r in request.app[_SIM].reports])


async def _registrations(request: web.Request) -> web.Response:
    return web.json_response([r.to_json() for r in request.app[_SIM].registrations])


async def _pushes(request: web.Request) -> web.Response:
    return web.json_response([p.to_json() for p in request.app[_SIM].pushes])


async def _fail(request: web.Request) -> web.Response:
    data = await _body(request)
    status, retry_after = data.get("status", 503), data.get("retry_after", 1)
    count, seconds = data.get("count"), data.get("seconds")
    if status not in (429, 500, 503) or not isinstance(retry_after, int):
        return _bad('"status" must be 429, 500 or 503 and "retry_after" an integer')
    if (count is None) == (seconds is None):
        return _bad('give exactly one of "count" and "seconds"')
    if count is not None and (not isinstance(count, int) or count < 1):
        return _bad('"count" must be a positive integer')
    if seconds is not None and (not isinstance(seconds, int | float) or seconds <= 0):
        return _bad('"seconds" must be a positive number')
    request.app[_SIM].fail(status, retry_after=retry_after, count=count, seconds=seconds)
    return web.json_response(
        {"status": status, "retry_after": retry_after, "count": count, "seconds": seconds}
    )
