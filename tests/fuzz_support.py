"""Support for tests/test_api_fuzz.py: the 3GPP files loaded for schemathesis, a loopback
deployment running in a thread of its own, and the checks schemathesis has no built-in for.

Why a thread: schemathesis drives ``requests`` synchronously from inside Hypothesis, so
the servers under test cannot share the test's thread; they get their own event loop,
and the test thread only ever talks to them over real mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hypothesis.strategies as st
import requests
import schemathesis
from gatewayd_sim import harness, schemas
from gatewayd_sim.harness import DEMO_SERVICE_ID, Pki
from gatewayd_sim.server import SimServer
from schemathesis import Case, CheckContext, HookContext, Response
from schemathesis.schemas import BaseSchema

from gatewayd import pki

T = TypeVar("T")

N3G_FILE = "TS29538_MSGG_N3GDelivery.yaml"
L3G_FILE = "TS29538_MSGG_L3GDelivery.yaml"
MSGS_FILE = "TS29538_MSGS_MSGDelivery.yaml"
GWREG_FILE = schemas.EXTENSION_FILE
PROBLEM_JSON = "application/problem+json"


def load_api(api_file: str) -> BaseSchema:
    """An OpenAPI file as schemathesis sees it, with its cross-file ``$ref``s resolving.

    The document is read from the 3GPP folder (or gatewayd-sim's package data for our extension) and
    given the address :func:`schemas.uri_of` gives it, inside the 3GPP folder: the
    relative ``$ref``s (``TS29571_CommonData.yaml#/...``) then land on the files next
    to it, without copying or linking anything.
    """
    # from_dict normalises keys in place; the cached document is shared with the validator.
    document = copy.deepcopy(dict(schemas.load(api_file)))
    schema = schemathesis.openapi.from_dict(document)
    schema.location = schemas.uri_of(api_file)
    return schema


# --- the request body's schema, as the oracle for "malformed" --------------------------


def body_schema(case: Case) -> tuple[str, str]:
    """(api file, schema name) of the JSON request body of ``case``'s operation."""
    definition = case.operation.definition.raw
    ref = definition["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    where, _, pointer = ref.partition("#")
    api_file = where or _file_of(case.operation.schema)
    return api_file, pointer.rsplit("/", 1)[1]


def _file_of(schema: BaseSchema) -> str:
    location = schema.location or ""
    return location.rsplit("/", 1)[-1]


def body_violations(case: Case) -> tuple[str, ...]:
    """How the body ``case`` sends violates the spec (empty: it conforms)."""
    api_file, name = body_schema(case)
    return schemas.problems(api_file, name, case.body)


# --- checks schemathesis does not have ------------------------------------------------


def errors_are_problem_details(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx/5xx is ``application/problem+json`` holding a valid ``ProblemDetails``
    whose ``status`` repeats the HTTP status (TS 29.500 clause 5.2.7.2)."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, (
        f"{response.status_code} answered with Content-Type {content_type!r}, "
        f"not {PROBLEM_JSON}: {response.text[:200]!r}"
    )
    body = json.loads(response.text)
    schemas.validate_problem(body)
    assert body.get("status") == response.status_code, body
    return True


def no_content_means_no_body(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 204 carries neither a body nor a Content-Type (RFC 9110 clause 15.3.5)."""
    if response.status_code != 204:
        return None
    assert response.content == b"", response.content[:200]
    assert "content-type" not in {k.lower() for k in response.headers}, response.headers
    return True


def malformed_body_is_400(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A JSON body the spec refuses gets 400 with ``invalidParams``; one it accepts never
    gets 400 for its shape (only for a rule the schema cannot say: see SEMANTIC_400).

    The oracle is the official schema itself (gatewayd_sim.schemas), not the
    generation mode: schemathesis's "negative" cases are sometimes valid after all.
    """
    if case.media_type != "application/json" or "requestBody" not in case.operation.definition.raw:
        return None
    violations = body_violations(case)
    if violations:
        assert response.status_code == 400, (
            f"malformed body answered {response.status_code}; violations: {violations}"
        )
        body = json.loads(response.text)
        assert body.get("invalidParams"), f"400 without invalidParams: {body}"
        assert all(p["param"].startswith("/") for p in body["invalidParams"]), body
        return True
    if response.status_code == 400:
        body = json.loads(response.text)
        params = {p.get("param") for p in body.get("invalidParams", [])}
        assert params <= SEMANTIC_400.get(case.operation.label, set()), (
            f"a body that conforms to the spec was refused as malformed: {body}"
        )
    return True


# A message segment (TS 23.554 8.5.4, docs/segmentation.md) needs segInd, a segId, a
# segNumb from 1 to its count, a payload, and a count its set agrees on: the schema makes
# every one of them optional.
_SEGMENT_RULES = {
    "/segInd",
    "/segParams",
    "/segParams/segId",
    "/segParams/segNumb",
    "/segParams/totalSegCount",
    "/segParams/lastSegFlag",
    "/payload",
}

# 400s for a conforming body that are right anyway: rules the schema cannot express.
SEMANTIC_400: dict[str, set[str]] = {
    # A registration that has already expired (TS 29.571 DateTime cannot say "future").
    "POST /registrations": {"/expiry"},
    "PUT /registrations/{registrationId}": {"/expiry"},
    "POST /deliver-message": _SEGMENT_RULES,
    "POST /deliver-ue-message": _SEGMENT_RULES,
}

FUZZ_CHECKS = [errors_are_problem_details, no_content_means_no_body, malformed_body_is_400]


# --- steering: valid bodies that reach the success paths ------------------------------


def steer_toward(schema: BaseSchema, replace: Mapping[str, object]) -> None:
    """Offer, for every generated body that conforms to the spec, a twin with the fields
    in ``replace`` set (e.g. a destination this gateway serves): random Service IDs
    would otherwise only ever exercise the 403 paths. Malformed bodies are left alone so
    that negative testing keeps its meaning."""

    @schema.hook
    def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
        if not isinstance(body, dict) or context.operation is None:
            return st.just(body)
        case = context.operation.Case(body=body, media_type="application/json")
        if body_violations(case):
            return st.just(body)
        return st.sampled_from([body, {**body, **replace}])


# --- the deployment -------------------------------------------------------------------


class LoopThread:
    """An event loop in a named daemon thread; :meth:`run` runs a coroutine on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # As asyncio.run does: cancel what is left, let it unwind, then stop the loop.
        self.run(_cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


@dataclass(frozen=True, slots=True)
class Client:
    """How the fuzzer calls one API: base URL plus mutual TLS as ``requests`` kwargs.

    schemathesis sets ``verify`` per request from its own config (default True), which
    overrides a session's ``verify``; so CA and certificate go in as request kwargs.
    """

    base_url: str
    verify: str
    cert: tuple[str, str]
    # One keep-alive session: a full mutual-TLS handshake per case would dominate the run.
    session: requests.Session

    def under(self, path: str) -> Client:
        return Client(self.base_url + path, self.verify, self.cert, self.session)

    def kwargs(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "session": self.session,
            "verify": self.verify,
            "cert": self.cert,
        }


@dataclass(frozen=True, slots=True)
class Site:
    """One sim and one gateway of a role, and clients for both APIs."""

    sim: SimServer
    gateway_api: Client  # the gateway's MSGG API, called as the server
    sim_api: Client  # the sim's MSGS APIs, called as the gateway (root only)


def transport_toml(token_file: Path) -> str:
    # One HTTP device: the gateway then serves DEMO_SERVICE_ID, so downlinks can get 204.
    return f"""
[transports.web]
plugin = "http"
listen = "127.0.0.1:0"
[[transports.web.devices]]
device = "sensor-1"
service_id = "{DEMO_SERVICE_ID}"
token = {{ file = "{token_file}" }}
"""


@contextlib.asynccontextmanager
async def site(tls: Pki, state: Path, gateway_type: str) -> Any:
    """A sim allowing the demo gateway in ``gateway_type``, and that gateway, registered."""
    token = state / "device-token"  # written by deployment(): no blocking I/O in here
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            SimServer(harness.sim_settings(tls, gateway_type=gateway_type), schema_check=True)
        )
        settings = harness.write_config(
            state / "gatewayd.toml",
            harness.gateway_toml(
                tls,
                api_root=sim.api_root,
                state_dir=state / "state",
                transports=transport_toml(token),
                gateway_type=gateway_type,
                # Durability is not under test here; a 204 need not wait for an fsync.
                extra='[store]\nsynchronous = "normal"\n',
            ),
        )
        gw = await stack.enter_async_context(harness.running(settings))
        await sim.wait_for(lambda: bool(sim.registrations))
        ca = str(tls["ca"])
        to_gateway, to_sim = requests.Session(), requests.Session()
        stack.callback(to_gateway.close)
        stack.callback(to_sim.close)
        prefix = "/msgg-l3gdelivery/v1" if gateway_type == "L3G" else "/msgg-n3gdelivery/v1"
        yield Site(
            sim=sim,
            gateway_api=Client(
                f"https://localhost:{gw.api_port}{prefix}",
                ca,
                (str(tls["server_client"]), str(tls["server_client_key"])),
                to_gateway,
            ),
            sim_api=Client(
                sim.api_root, ca, (str(tls["gateway"]), str(tls["gateway_key"])), to_sim
            ),
        )


@contextlib.contextmanager
def deployment(directory: Path) -> Iterator[tuple[Site, Site]]:
    """An N3G and an L3G site (a sim each: a sim allows one role per gateway identity)."""
    tls = harness.make_pki(directory / "pki")
    for role in ("n3g", "l3g"):
        (directory / role).mkdir(parents=True)
        (directory / role / "device-token").write_text("device-secret-1", encoding="utf-8")
    with LoopThread("fuzz-servers") as thread, contextlib.ExitStack() as stack:
        n3g_cm = site(tls, directory / "n3g", "N3G")
        l3g_cm = site(tls, directory / "l3g", "L3G")
        n3g = thread.run(n3g_cm.__aenter__())
        stack.callback(lambda: thread.run(n3g_cm.__aexit__(None, None, None)))
        l3g = thread.run(l3g_cm.__aenter__())
        stack.callback(lambda: thread.run(l3g_cm.__aexit__(None, None, None)))
        yield n3g, l3g


GATEWAY_ID = pki.DEMO_GATEWAY_ID
