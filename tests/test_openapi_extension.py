"""gatewayd-sim's openapi/MSGS_GWRegistration.yaml: valid OpenAPI 3.0 that fits the wire types.

The file $refs TS29571_CommonData.yaml by a relative name, so it is validated from a temp
folder holding a copy of it next to symlinks of the 3GPP files (nothing is copied into
the repository).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from gatewayd_sim import schemas
from openapi_spec_validator import validate
from openapi_spec_validator.validation.validators import OpenAPIV30SpecValidator

from gatewayd.msgin5g import GatewayRegistration, GatewayRegistrationAck
from gatewayd.msgin5g.registration import API_NAME, API_VERSION

OURS = schemas.file_path(schemas.EXTENSION_FILE)  # package data of gatewayd-sim


def _spec() -> dict[str, Any]:
    loaded = yaml.safe_load(OURS.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_valid_openapi_30_with_refs_into_3gpp(tmp_path: Path) -> None:
    for item in schemas.spec_dir().glob("*.yaml"):
        (tmp_path / item.name).symlink_to(item)
    copy = tmp_path / OURS.name
    copy.write_bytes(OURS.read_bytes())
    # validate() resolves every $ref (TS29571 and what it pulls in); raises if invalid.
    validate(_spec(), base_uri=copy.as_uri(), cls=OpenAPIV30SpecValidator)
    assert _spec()["openapi"] == "3.0.0"


def test_marked_as_extension_and_served_where_the_code_expects() -> None:
    spec = _spec()
    assert spec["info"]["title"] == "MSGS_GWRegistration"
    assert "NOT A 3GPP API" in spec["info"]["description"]
    assert spec["servers"][0]["url"] == f"{{apiRoot}}/{API_NAME}/{API_VERSION}"
    paths = spec["paths"]
    assert set(paths["/registrations"]) == {"post"}
    assert set(paths["/registrations/{registrationId}"]) == {"put", "delete"}
    created = paths["/registrations"]["post"]["responses"]["201"]
    assert created["headers"]["Location"]["required"] is True
    assert "204" in paths["/registrations/{registrationId}"]["delete"]["responses"]
    forbidden = paths["/registrations"]["post"]["responses"]["403"]["$ref"]
    assert forbidden == "TS29571_CommonData.yaml#/components/responses/403"


def test_schemas_match_the_wire_types() -> None:
    components = _spec()["components"]["schemas"]
    assert components["GatewayRegistration"]["required"] == [
        "gwId",
        "gwType",
        "targetUri",
        "ueSvcIds",
    ]
    assert components["GatewayRegistrationAck"]["required"] == ["gwId", "expiry"]
    registration = GatewayRegistration(
        gw_id="urn:gw:1",
        gw_type="L3G",
        target_uri="https://gw.example",
        ue_svc_ids=("a", "b"),
        expiry=datetime(2030, 1, 1, tzinfo=UTC),
    )
    schemas.validate(schemas.EXTENSION_FILE, "GatewayRegistration", registration.to_json())
    ack = GatewayRegistrationAck(gw_id="urn:gw:1", expiry=datetime(2030, 1, 1, tzinfo=UTC))
    schemas.validate(schemas.EXTENSION_FILE, "GatewayRegistrationAck", ack.to_json())
    # The open enumeration admits a future gateway type; an empty id list is refused.
    body = {**registration.to_json(), "gwType": "BG"}
    schemas.validate(schemas.EXTENSION_FILE, "GatewayRegistration", body)
    assert schemas.problems(schemas.EXTENSION_FILE, "GatewayRegistration", {**body, "ueSvcIds": []})
