"""RFC 7807 problem answers: every error the device-facing API gives has this shape."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web

from gatewayd.api import IntakeRefusedError

PROBLEM_JSON = "application/problem+json"

# TS 29.500-style cause strings where one fits, so operators see the same words on
# both sides of the gateway.
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CAUSES = {
    400: "INVALID_MSG_FORMAT",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "RESOURCE_NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "SYSTEM_FAILURE",
    503: "NF_CONGESTION",
}

# How each intake refusal reads in HTTP terms; an unknown transient reason is a 503 so a
# device retries rather than dropping its message.
_REFUSALS: Mapping[str, tuple[int, str]] = {
    "unknown_device": (404, "UNKNOWN_DEVICE"),
    "device_refused": (403, "DEVICE_REFUSED"),
    "invalid_message": (400, "INVALID_MESSAGE"),
    "backlog_full": (503, "BACKLOG_FULL"),
}


class Problem(Exception):
    """Raised inside a handler; the middleware turns it into the problem response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        cause: str | None = None,
        headers: Mapping[str, str] | None = None,
        logged: bool = False,
    ) -> None:
        super().__init__(detail)
        # True when the raiser already logged it with the message's context (msg_id):
        # the middleware then adds no second, context-free line.
        self.logged = logged
        self.status = status
        self.detail = detail
        self.cause = cause or _CAUSES.get(status, "UNSPECIFIED")
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The ``application/problem+json`` answer."""
        body = {
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "cause": self.cause,
        }
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type=PROBLEM_JSON,
            headers=self.headers,
        )


def refusal(exc: IntakeRefusedError) -> Problem:
    """The problem answer for a message the gateway refused to take (already logged)."""
    # An unknown reason: final if the core says so (4xx), else "try later" (503).
    default = (400, exc.reason.upper()) if exc.permanent else (503, exc.reason.upper())
    status, cause = _REFUSALS.get(exc.reason, default)
    headers = {}
    if status == 503:
        # Retry-After takes whole seconds; round up so a device never comes back early.
        delay = exc.retry_after if exc.retry_after is not None else 1.0
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    return Problem(status, exc.detail, cause=cause, headers=headers, logged=True)
