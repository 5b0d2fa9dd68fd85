"""API robustness: schemathesis against the gateway's MSGG APIs and the sim's MSGS APIs.

Requests are generated from the official 3GPP OpenAPI files (and our registration
extension), valid and malformed, and sent over real mutual TLS to servers on loopback.
Every answer must: not be a 5xx; have a status code, Content-Type and body the spec
declares; be ``application/problem+json`` ``ProblemDetails`` when it is an error; be
empty when it is a 204; and be 400 with ``invalidParams`` exactly when the body breaks
the schema. Bounded: a fixed number of examples per operation, derandomized; the
``slow`` variants (``--long``) run many more.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_support import (
    FUZZ_CHECKS,
    GATEWAY_ID,
    GWREG_FILE,
    L3G_FILE,
    MSGS_FILE,
    N3G_FILE,
    Site,
    deployment,
    load_api,
    steer_toward,
)
from gatewayd_sim.harness import DEMO_SERVICE_ID
from gatewayd_sim.schemas import validate_problem
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    *FUZZ_CHECKS,
]

# The CI budget: examples per operation in the fuzzing phase (the coverage phase adds
# its own fixed, deterministic set of boundary and malformed cases).
EXAMPLES = 25
LONG_EXAMPLES = 400

OURS = {"addrType": "UE", "addr": DEMO_SERVICE_ID}

N3G = load_api(N3G_FILE)
L3G = load_api(L3G_FILE)
# The sim serves gateways only: /deliver-as-message (the AS's operation, MSGin5G-3) is
# not offered and is covered by test_unoffered_operation_is_404_problem.
MSGS = load_api(MSGS_FILE).exclude(path="/deliver-as-message")
GWREG = load_api(GWREG_FILE)

# Conforming bodies get a twin aimed at what the servers actually serve.
for _api in (N3G, L3G):
    steer_toward(_api, {"destAddr": OURS})
steer_toward(MSGS, {"oriAddr": OURS})
REGISTRATION = {"gwId": GATEWAY_ID, "gwType": "N3G", "ueSvcIds": [DEMO_SERVICE_ID]}
steer_toward(GWREG, REGISTRATION)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    with deployment(tmp_path_factory.mktemp("fuzz")) as both:
        n3g, _ = both
        # A steered registration replaces the gateway's own: keep it pointing at the
        # gateway, so the sim's delivery reports stay on loopback.
        REGISTRATION["targetUri"] = n3g.sim.registrations[0].target_uri
        yield both


def _bounded(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=True,  # same cases on every run: a CI failure reproduces locally
        database=None,  # nothing written to .hypothesis/, nothing replayed from it
        deadline=None,  # TLS round trips on 2 busy cores vary; time is bounded by count
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def _call(case: Case, client: Any) -> None:
    case.call_and_validate(**client.kwargs(), checks=CHECKS)


@N3G.parametrize()
@_bounded(EXAMPLES)
def test_gateway_n3g_api(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].gateway_api)


@L3G.parametrize()
@_bounded(EXAMPLES)
def test_gateway_l3g_api(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[1].gateway_api)


@MSGS.parametrize()
@_bounded(EXAMPLES)
def test_sim_msgdelivery_api(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].sim_api.under("/msgs-msgdelivery/v1"))


@GWREG.parametrize()
@_bounded(EXAMPLES)
def test_sim_gwregistration_api(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].sim_api.under("/msgs-gwregistration/v1"))


@N3G.parametrize()
@_bounded(LONG_EXAMPLES)
@pytest.mark.slow
def test_gateway_n3g_api_long(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].gateway_api)


@MSGS.parametrize()
@_bounded(LONG_EXAMPLES)
@pytest.mark.slow
def test_sim_msgdelivery_api_long(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].sim_api.under("/msgs-msgdelivery/v1"))


@GWREG.parametrize()
@_bounded(LONG_EXAMPLES)
@pytest.mark.slow
def test_sim_gwregistration_api_long(case: Case, sites: tuple[Site, Site]) -> None:
    _call(case, sites[0].sim_api.under("/msgs-gwregistration/v1"))


# --- regressions: each odd input below once broke a server (found by the runs above) ---

SERVED_MESSAGE = {
    "oriAddr": {"addrType": "AS", "addr": "as-1"},
    "destAddr": OURS,
    "msgId": "m-odd",
    "payload": "hi",
}
JSON = {"Content-Type": "application/json"}

# (api, path under the API root, a valid body for it)
APIS = {
    "gateway": ("gateway_api", "/deliver-message", SERVED_MESSAGE),
    "msgdelivery": (
        "sim_api",
        "/msgs-msgdelivery/v1/deliver-ue-message",
        {
            **SERVED_MESSAGE,
            "oriAddr": OURS,
            "destAddr": {"addrType": "AS", "addr": "as-1"},
            "stoAndFwInd": False,
        },
    ),
    "gwregistration": (
        "sim_api",
        "/msgs-gwregistration/v1/registrations",
        {"gwId": "someone", "gwType": "N3G", "targetUri": "https://x", "ueSvcIds": ["ue-1"]},
    ),
}


def _post(sites: tuple[Site, Site], api: str, data: bytes, headers: dict[str, str]) -> Any:
    attr, path, _ = APIS[api]
    client = getattr(sites[0], attr)
    return client.session.post(
        client.base_url + path,
        data=data,
        headers=headers,
        verify=client.verify,
        cert=client.cert,
        timeout=30,
    )


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    validate_problem(body)
    assert body["status"] == status
    return body


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    ("data", "headers"),
    [
        pytest.param(b"\x00", JSON, id="not-json"),
        pytest.param(b"[" * 5000 + b"]" * 5000, JSON, id="deep-nesting"),  # was a 500
        pytest.param(
            b"{}", {"Content-Type": "application/json; charset=x-unknown"}, id="unknown-charset"
        ),  # was a 500
    ],
)
def test_malformed_json_is_400_with_invalid_params(
    sites: tuple[Site, Site], api: str, data: bytes, headers: dict[str, str]
) -> None:
    body = _problem(_post(sites, api, data, headers), 400)
    assert body["invalidParams"], body
    assert body["invalidParams"][0]["param"].startswith("/")


@pytest.mark.parametrize("api", APIS)
def test_explicit_null_is_malformed_not_absent(sites: tuple[Site, Site], api: str) -> None:
    # Nothing in TS 29.538 is nullable; the gateway used to take null for "absent".
    valid = APIS[api][2]
    field = "expiry" if api == "gwregistration" else "appId"
    data = json.dumps({**valid, field: None}).encode()
    body = _problem(_post(sites, api, data, JSON), 400)
    assert body["invalidParams"][0]["param"] == f"/{field}"


def test_unpaired_surrogate_is_400_not_500(sites: tuple[Site, Site]) -> None:
    # Valid JSON escape, but no UTF-8 form: the store could not write it (was a 500).
    data = json.dumps(SERVED_MESSAGE).replace('"m-odd"', '"\\udc00"').encode()
    body = _problem(_post(sites, "gateway", data, JSON), 400)
    assert body["invalidParams"] == [{"param": "/", "reason": "is not valid JSON"}]


@pytest.mark.parametrize("api", APIS)
def test_non_json_media_type_is_415(sites: tuple[Site, Site], api: str) -> None:
    data = json.dumps(APIS[api][2]).encode()
    _problem(_post(sites, api, data, {"Content-Type": "text/plain"}), 415)


@pytest.mark.parametrize("api", APIS)
def test_wrong_method_is_405_problem_with_allow(sites: tuple[Site, Site], api: str) -> None:
    attr, path, _ = APIS[api]
    client = getattr(sites[0], attr)
    response = client.session.get(
        client.base_url + path, verify=client.verify, cert=client.cert, timeout=30
    )
    _problem(response, 405)  # the sim's was aiohttp's text/plain
    assert response.headers["Allow"] == "POST"  # RFC 9110 15.5.6; the gateway sent none


def test_unoffered_operation_is_404_problem(sites: tuple[Site, Site]) -> None:
    # The sim serves gateways, not ASs: /deliver-as-message is declared but not offered.
    client = sites[0].sim_api
    response = client.session.post(
        client.base_url + "/msgs-msgdelivery/v1/deliver-as-message",
        json={},
        verify=client.verify,
        cert=client.cert,
        timeout=30,
    )
    _problem(response, 404)
