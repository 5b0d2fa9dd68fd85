"""Downlink: POST a JSON body to a device's webhook and judge the outcome by HTTP status."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gatewayd.api import DeliveryOutcome


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    """Where one device receives downlinks; ``ssl_context`` is set for https URLs."""

    url: str
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)


def classify(status: int) -> DeliveryOutcome:
    """The delivery outcome a webhook's HTTP status stands for.

    408 and 429 are the endpoint asking us to come back later; other 4xx mean the
    endpoint refused this message and a retry would get the same answer. A 3xx is
    never followed (a redirect must not carry a device's message elsewhere) and counts
    as a refusal: the webhook URL needs fixing.
    """
    if 200 <= status < 300:
        return DeliveryOutcome.success()
    cause = f"HTTP {status}"
    if status in (408, 429) or status >= 500:
        return DeliveryOutcome.failure(cause, permanent=False)
    return DeliveryOutcome.failure(cause, permanent=True)


async def post(
    session: aiohttp.ClientSession, hook: Webhook, body: dict[str, Any]
) -> DeliveryOutcome:
    """POST ``body`` to ``hook``; connection errors and timeouts are transient failures."""
    try:
        async with session.post(
            hook.url,
            json=body,
            ssl=hook.ssl_context if hook.ssl_context is not None else True,
            allow_redirects=False,
        ) as response:
            # Read (and drop) the body so the connection goes back to the pool.
            await response.read()
            return classify(response.status)
    except TimeoutError:
        return DeliveryOutcome.failure("timeout", permanent=False)
    except aiohttp.ClientError as exc:
        return DeliveryOutcome.failure(f"{type(exc).__name__}: {exc}", permanent=False)
