"""The schema-validation test kit: cross-file refs, formats, open enums, our extension."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from gatewayd_sim import schemas

from gatewayd.msgin5g import Address, GatewayRegistration, UEMessageDelivery

MSGDELIVERY = "TS29538_MSGS_MSGDelivery.yaml"


def _uplink() -> dict[str, object]:
    return UEMessageDelivery(
        ori_addr=Address.ue("sensor-1@iot.example"),
        dest_addr=Address("AS", "as-1"),
        msg_id="m-1",
        sto_and_fw_ind=True,
        payload="hello",
        expiry=datetime(2030, 1, 1, tzinfo=UTC),
    ).to_json()


def test_valid_body_passes() -> None:
    body = _uplink()
    assert schemas.problems(MSGDELIVERY, "UEMessageDelivery", body) == ()
    schemas.validate(MSGDELIVERY, "UEMessageDelivery", body)


def test_wrong_body_fails_naming_the_pointer() -> None:
    body = _uplink()
    del body["msgId"]
    body["stoAndFwParams"] = {"exprTime": "tomorrow"}  # format checking is on
    with pytest.raises(schemas.SchemaMismatchError) as caught:
        schemas.validate(MSGDELIVERY, "UEMessageDelivery", body)
    text = "\n".join(caught.value.problems)
    assert "'msgId' is a required property" in text
    assert "/stoAndFwParams/exprTime" in text


def test_cross_file_ref_is_resolved() -> None:
    # Address lives in TS29538_MSGG_L3GDelivery.yaml; a wrong addr type proves it is used.
    body = _uplink()
    body["oriAddr"] = {"addrType": "UE", "addr": 42}
    assert schemas.problems(MSGDELIVERY, "UEMessageDelivery", body) == (
        "/oriAddr/addr: 42 is not of type 'string'",
    )


def test_unknown_enum_strings_pass_because_enums_are_open() -> None:
    body = _uplink()
    body["destAddr"] = {"addrType": "FUTURE_KIND", "addr": "x"}
    schemas.validate(MSGDELIVERY, "UEMessageDelivery", body)
    ack = {"oriAddr": body["oriAddr"], "msgId": "m-1", "status": "DELY_SOMEDAY"}
    schemas.validate(MSGDELIVERY, "MessageDeliveryAck", ack)
    # Open, but still typed: a number is not a string.
    assert schemas.problems(MSGDELIVERY, "MessageDeliveryAck", {**ack, "status": 3})


def test_extension_file_resolves_into_the_3gpp_folder() -> None:
    body = GatewayRegistration(
        gw_id="urn:gw:1",
        gw_type="N3G",
        target_uri="https://gw.example:8443",
        ue_svc_ids=("a@x",),
        expiry=datetime(2030, 1, 1, tzinfo=UTC),
    ).to_json()
    schemas.validate(schemas.EXTENSION_FILE, "GatewayRegistration", body)
    assert schemas.problems(
        schemas.EXTENSION_FILE, "GatewayRegistration", {**body, "expiry": "soon"}
    ) == ("/expiry: 'soon' is not a 'date-time'",)


def test_problem_details() -> None:
    schemas.validate_problem({"status": 403, "title": "Forbidden", "cause": "X"})
    with pytest.raises(schemas.SchemaMismatchError):
        schemas.validate_problem({"status": "403", "invalidParams": []})


def test_unknown_schema_is_an_error() -> None:
    with pytest.raises(schemas.SpecsMissingError, match="NoSuchThing"):
        schemas.validate(MSGDELIVERY, "NoSuchThing", {})


def test_missing_spec_dir_raises_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(schemas.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(schemas.SpecsMissingError, match=schemas.ENV_VAR):
        schemas.spec_dir()


def test_env_var_selects_the_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    real = schemas.spec_dir()
    monkeypatch.setenv(schemas.ENV_VAR, str(real))
    assert schemas.spec_dir() == real
