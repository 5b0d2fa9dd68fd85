"""Static authorization of gateways (TS 33.501 13.3.0): which authenticated identity may
register as which gateway type, for which UE Service IDs.

Service ID patterns are exact values, globs (``sensor-*@iot.example``) or numeric ranges
(``meter-{100..199}``), and may mix the two. A range matches ASCII decimal numbers in
canonical form only (no sign, no leading zero, no other script's digits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gatewayd.errors import GatewaydError
from gatewayd.security.tls import PeerIdentity

_RANGE = re.compile(r"\{([0-9]+)\.\.([0-9]+)\}")


class Refused(GatewaydError):
    """A request is not authorized; becomes a 403 ProblemDetails with ``cause``."""

    def __init__(self, cause: str, detail: str, *, status: int = 403) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class ServiceIdPattern:
    """One allow-list entry, compiled once: a regex plus the numeric ranges it captures."""

    text: str
    regex: re.Pattern[str]
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str) -> ServiceIdPattern:
        parts: list[str] = []
        ranges: list[tuple[int, int]] = []
        pos = 0
        for match in _RANGE.finditer(text):
            parts.append(_glob(text[pos : match.start()]))
            low, high = int(match.group(1)), int(match.group(2))
            if low > high:
                raise ValueError(f"range {match.group(0)} is empty")
            ranges.append((low, high))
            # ASCII digits in canonical form only: \d would admit Unicode digits (U+0665)
            # and leading zeros ("0005") would give one number several Service IDs.
            parts.append(r"(0|[1-9][0-9]*)")
            pos = match.end()
        parts.append(_glob(text[pos:]))
        return cls(text, re.compile("".join(parts)), tuple(ranges))

    def matches(self, service_id: str) -> bool:
        found = self.regex.fullmatch(service_id)
        if found is None:
            return False
        return all(
            low <= int(value) <= high
            for value, (low, high) in zip(found.groups(), self.ranges, strict=True)
        )


def _glob(literal: str) -> str:
    # Only * and ? are wildcards; everything else (dots, @, brackets) is literal, since
    # service ids are full of characters that regexes and fnmatch treat specially.
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in literal)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayPolicy:
    """One ``[[gateways]]`` entry: an identity, its gateway type, its service ids."""

    identity: str
    gw_type: str
    service_ids: tuple[ServiceIdPattern, ...]

    def serves(self, service_id: str) -> bool:
        return any(pattern.matches(service_id) for pattern in self.service_ids)


@dataclass(frozen=True, slots=True)
class AllowList:
    """The gateways the server accepts, matched against certificate SANs."""

    gateways: tuple[GatewayPolicy, ...]

    def for_peer(self, peer: PeerIdentity | None) -> GatewayPolicy:
        """The entry for an authenticated peer; :class:`Refused` when it has none."""
        if peer is not None:
            for entry in self.gateways:
                if peer.matches(entry.identity):
                    return entry
        raise Refused("GATEWAY_NOT_ALLOWED", "this gateway is not authorized")

    def check_registration(
        self, peer: PeerIdentity | None, gw_id: str, gw_type: str, ids: tuple[str, ...]
    ) -> GatewayPolicy:
        """Authorize a registration body against the peer that sent it."""
        entry = self.for_peer(peer)
        if gw_id != entry.identity:
            raise Refused("GW_ID_MISMATCH", "gwId is not the identity of the client certificate")
        if gw_type != entry.gw_type:
            raise Refused("GW_TYPE_NOT_ALLOWED", f"this gateway may not register as {gw_type}")
        refused = sum(1 for service_id in ids if not entry.serves(service_id))
        if refused:
            # Count only: echoing ids back would tell a probing gateway which ones exist.
            raise Refused("SERVICE_ID_NOT_ALLOWED", f"{refused} UE service id(s) are not allowed")
        return entry
