"""Strict readers for JSON objects, reporting errors as JSON Pointers.

Kept apart from the types so every type's ``from_json`` reads the same way and reports
the same way: an :class:`~gatewayd.errors.InvalidBodyError` whose pointer goes into
``ProblemDetails.invalidParams``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gatewayd.errors import InvalidBodyError


def obj(value: object, pointer: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidBodyError(pointer, "must be a JSON object")
    return value


def req_str(data: Mapping[str, Any], key: str, pointer: str) -> str:
    if key not in data:
        raise InvalidBodyError(f"{pointer}/{key}", "is required")
    return _str(data[key], f"{pointer}/{key}")


def opt_str(data: Mapping[str, Any], key: str, pointer: str) -> str | None:
    # Absent is fine; an explicit null is not: TS 29.538 marks nothing nullable.
    return _str(data[key], f"{pointer}/{key}") if key in data else None


def req_bool(data: Mapping[str, Any], key: str, pointer: str) -> bool:
    if key not in data:
        raise InvalidBodyError(f"{pointer}/{key}", "is required")
    return _bool(data[key], f"{pointer}/{key}")


def opt_bool(data: Mapping[str, Any], key: str, pointer: str) -> bool | None:
    return _bool(data[key], f"{pointer}/{key}") if key in data else None


def opt_int(data: Mapping[str, Any], key: str, pointer: str) -> int | None:
    if key not in data:
        return None
    value = data[key]
    # bool is an int in Python but not in JSON Schema; null is not an integer either.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidBodyError(f"{pointer}/{key}", "must be an integer")
    return value


def opt_datetime(data: Mapping[str, Any], key: str, pointer: str) -> datetime | None:
    text = opt_str(data, key, pointer)
    if text is None:
        return None
    try:
        # TS 29.571 DateTime is RFC 3339 with a mandatory offset; fromisoformat in 3.11
        # accepts "Z" as well.
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidBodyError(f"{pointer}/{key}", "must be an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise InvalidBodyError(f"{pointer}/{key}", "must carry a time-zone offset")
    return parsed


def _str(value: object, pointer: str) -> str:
    if not isinstance(value, str):
        raise InvalidBodyError(pointer, "must be a string")
    return value


def _bool(value: object, pointer: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidBodyError(pointer, "must be a boolean")
    return value
