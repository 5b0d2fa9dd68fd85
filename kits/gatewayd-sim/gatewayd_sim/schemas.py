"""Validate JSON bodies against the official TS 29.538 OpenAPI files and our extension.

The 3GPP files are reference data kept outside the repository (they must not be
copied in): :func:`spec_dir` finds them. Our own ``MSGS_GWRegistration.yaml`` ships in
this package (``openapi/``) and ``$ref``s ``TS29571_CommonData.yaml`` by a relative name, so it is
given a (virtual) address inside the 3GPP folder: its relative references then resolve
there, exactly as they do for the 3GPP files themselves.

Usage in a test::

    schemas.validate("TS29538_MSGS_MSGDelivery.yaml", "UEMessageDelivery", body)

raises :class:`SchemaMismatchError` listing every violation; :func:`problems` returns
them instead. Enumerations are open in TS 29.538 (``anyOf`` with a free string), so an
unknown enum string is valid, as it must be.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT4

from gatewayd.errors import GatewaydError

ENV_VAR = "GATEWAYD_3GPP_DIR"
EXTENSION_FILE = "MSGS_GWRegistration.yaml"
COMMON_DATA = "TS29571_CommonData.yaml"

_PACKAGE = Path(__file__).resolve().parent
# Our extension ships inside this package; the 3GPP files are not ours to redistribute.
_EXTENSIONS = {EXTENSION_FILE: _PACKAGE / "openapi" / EXTENSION_FILE}
# In a checkout of the gatewayd repository (editable install), the 3GPP files sit in
# ../shared/3gpp beside it; an installed wheel has no such fallback.
_CHECKOUT_SPECS = _PACKAGE.parents[2].parent / "shared" / "3gpp"


class SpecsMissingError(GatewaydError):
    """The 3GPP OpenAPI folder (or one file in it) cannot be found."""


class SchemaMismatchError(GatewaydError):
    """A body does not match its schema; ``problems`` lists each violation."""

    def __init__(self, where: str, problems: tuple[str, ...]) -> None:
        self.problems = problems
        super().__init__(f"{where}: " + "; ".join(problems))


def spec_dir() -> Path:
    """The folder holding the 3GPP OpenAPI files.

    ``$GATEWAYD_3GPP_DIR`` when set; in a checkout of the repository, ``../shared/3gpp``
    beside it. A missing folder or file is an error naming it, never a reason to skip:
    a test that cannot check the wire must fail.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
    elif (_CHECKOUT_SPECS / COMMON_DATA).is_file():
        path = _CHECKOUT_SPECS
    else:
        raise SpecsMissingError(
            f"{ENV_VAR} is not set: set it to the folder holding TS29538_*.yaml and "
            f"{COMMON_DATA} (the 3GPP OpenAPI files are not shipped with gatewayd-sim)"
        )
    if not (path / COMMON_DATA).is_file():
        raise SpecsMissingError(
            f"3GPP OpenAPI files not found in {path} (no {COMMON_DATA}); "
            f"set {ENV_VAR} to the folder holding TS29538_*.yaml and {COMMON_DATA}"
        )
    return path


def file_path(api_file: str) -> Path:
    """Where ``api_file`` is read from: our extension from docs/, the rest from 3GPP's."""
    return _EXTENSIONS.get(api_file) or spec_dir() / api_file


def uri_of(api_file: str) -> str:
    """The address ``api_file`` is known by; always inside the 3GPP folder, so that the
    relative ``$ref``s of our extension land on the 3GPP files next to it."""
    return (spec_dir() / api_file).as_uri()


def load(api_file: str) -> Mapping[str, Any]:
    """The parsed OpenAPI document (cached: the common data file alone is ~100 kB)."""
    return _load(file_path(api_file))


@functools.cache
def _load(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecsMissingError(f"cannot read OpenAPI file {path}: {exc.strerror}") from None
    # BaseLoader would keep every scalar a string; SafeLoader is right for schemas, and
    # the 3GPP files quote what could be misread (status codes, dates).
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise SpecsMissingError(f"{path} is not an OpenAPI document")
    return document


def _retrieve(uri: str) -> Resource[Any]:
    base = spec_dir().as_uri() + "/"
    if not uri.startswith(base):
        # Only the local folder is consulted: a $ref to anywhere else is a broken spec,
        # and tests must never reach out to the network.
        raise NoSuchResource(uri)  # type: ignore[call-arg,unused-ignore]
    name = uri.removeprefix(base)
    return DRAFT4.create_resource(load(name))


@functools.cache
def _registry() -> Registry[Any]:
    # Draft 4 is the JSON Schema base of OpenAPI 3.0; cached so every validation shares
    # the resolved documents.
    return Registry(retrieve=_retrieve)  # type: ignore[call-arg]


@functools.cache
def _validator(api_file: str, schema: str) -> OAS30Validator:
    components = load(api_file).get("components", {}).get("schemas", {})
    if schema not in components:
        raise SpecsMissingError(f"{api_file} has no components/schemas/{schema}")
    ref = {"$ref": f"{uri_of(api_file)}#/components/schemas/{schema}"}
    return OAS30Validator(ref, registry=_registry(), format_checker=OAS30Validator.FORMAT_CHECKER)


def problems(api_file: str, schema: str, body: object) -> tuple[str, ...]:
    """Every way ``body`` violates ``components/schemas/<schema>`` of ``api_file``.

    Each entry reads ``/json/pointer: message``; an empty tuple means valid.
    """
    validator = _validator(api_file, schema)
    found = []
    for error in validator.iter_errors(body):
        pointer = "".join(f"/{part}" for part in error.absolute_path)
        found.append(f"{pointer or '/'}: {error.message}")
    return tuple(sorted(found))


def validate(api_file: str, schema: str, body: object) -> None:
    """Raise :class:`SchemaMismatchError` unless ``body`` matches the schema."""
    found = problems(api_file, schema, body)
    if found:
        raise SchemaMismatchError(f"{api_file}#{schema}", found)


def validate_problem(body: object) -> None:
    """Validate a ``ProblemDetails`` error body (TS 29.571)."""
    validate(COMMON_DATA, "ProblemDetails", body)
