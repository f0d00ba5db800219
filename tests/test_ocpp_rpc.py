"""OCPP-J transport, pure: frames, error codes, tolerant validation, measurands.

Captured frames from the field cases (``tests/data/ocpp``) go in as text and come out as
values; nothing here opens a socket.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA
from ies_drivers.ocpp.measurands import (
    FLAG_UNIT_INCONSISTENT,
    MeasurandTableError,
    NotANumber,
    NumberOutOfRange,
    load_measurand_table,
    plain_number,
)
from ies_drivers.ocpp.rpc import (
    Call,
    CallError,
    CallResult,
    ErrorCode,
    FrameError,
    FrameQuirks,
    call_error,
    dumps,
    loads,
    parse_frame,
    serialise,
)
from ies_drivers.ocpp.validation import (
    PayloadError,
    Quirks,
    UnknownActionError,
    check_payload,
)
from ies_drivers.ocpp.versions import (
    OcppVersion,
    UnknownVersionError,
    negotiate,
)

OCPP = DATA / "ocpp"
V16, V201, V21 = OcppVersion.V16, OcppVersion.V201, OcppVersion.V21


def fc10_lines() -> dict[str, str]:
    """The FC-10 log lines by kind (the frames after 'send:'/'receive:')."""
    frames = {}
    for line in (OCPP / "FC-10.log").read_text().splitlines():
        if line.startswith(("send:", "receive:")):
            frame = line.split(":", 1)[1].strip()
            frames[frame.split(",")[2 if frame.startswith("[2") else 0]] = frame
    return frames


# --- frames -------------------------------------------------------------------------


def test_three_frame_kinds_parse_and_serialise_back() -> None:
    call = parse_frame('[2,"19223201","BootNotification",{"chargePointVendor":"V"}]')
    assert call.message == Call(
        "19223201", "BootNotification", {"chargePointVendor": "V"}
    )
    assert call.warnings == ()
    result = parse_frame('[3,"19223201",{"status":"Accepted"}]').message
    assert result == CallResult("19223201", {"status": "Accepted"})
    error = parse_frame('[4,"1","NotImplemented","no handler",{"x":1}]').message
    assert error == CallError("1", "NotImplemented", "no handler", {"x": 1})
    assert serialise(result) == '[3,"19223201",{"status":"Accepted"}]'
    assert serialise(error) == '[4,"1","NotImplemented","no handler",{"x":1}]'


def test_fc10_numeric_id_and_four_element_result_are_read_with_warnings() -> None:
    # FC-10: the reporter's central system sent a numeric id and a CALLRESULT with
    # an action name. Both are read (the meaning is clear) and reported.
    parsed = parse_frame('[2, 12345678, "RemoteStartTransaction", {"idTag": "TEST"}]')
    assert parsed.message == Call(
        "12345678", "RemoteStartTransaction", {"idTag": "TEST"}
    )
    assert "number" in parsed.warnings[0]
    text = fc10_lines()["[3"].replace("'", '"')
    result = parse_frame(text)
    assert result.message == CallResult(
        "531531541", {"idTagInfo": {"status": "Accepted"}, "transactionId": 45645645}
    )
    assert "action name" in result.warnings[0]
    # Our own output is never like that: string id, three elements.
    assert serialise(result.message).startswith('[3,"531531541",{')
    assert len(json.loads(serialise(result.message))) == 3


def test_strict_frames_refuse_what_is_tolerated_by_default() -> None:
    strict = FrameQuirks(
        numeric_ids=False, result_with_action=False, null_payload=False, long_ids=False
    )
    with pytest.raises(FrameError) as numeric:
        parse_frame('[2, 5, "Heartbeat", {}]', strict)
    assert numeric.value.unique_id == "-1"
    with pytest.raises(FrameError) as four:
        parse_frame('[3,"1","HeartbeatResponse",{}]', strict)
    assert four.value.unique_id is None  # a response is never answered
    with pytest.raises(FrameError):
        parse_frame('[2,"1","Heartbeat",null]', strict)
    assert parse_frame('[2,"1","Heartbeat",null]').message == Call("1", "Heartbeat", {})


@pytest.mark.parametrize(
    ("text", "code", "answer_to"),
    [
        ("not json at all", ErrorCode.RPC_FRAMEWORK_ERROR, "-1"),
        ('{"a": 1}', ErrorCode.RPC_FRAMEWORK_ERROR, "-1"),
        ("[]", ErrorCode.RPC_FRAMEWORK_ERROR, "-1"),
        ('[2,"7","Heartbeat"]', ErrorCode.RPC_FRAMEWORK_ERROR, "7"),
        ('[2,"7",42,{}]', ErrorCode.RPC_FRAMEWORK_ERROR, "7"),
        ('[2,"7","Heartbeat",[1]]', ErrorCode.FORMAT_VIOLATION, "7"),
        ('[9,"7",{}]', ErrorCode.MESSAGE_TYPE_NOT_SUPPORTED, "7"),
        ('[2,"7","Heartbeat",{"v": NaN}]', ErrorCode.RPC_FRAMEWORK_ERROR, "-1"),
        ('[3,"7"]', ErrorCode.RPC_FRAMEWORK_ERROR, None),
        ('[4,"7",1,2,{}]', ErrorCode.RPC_FRAMEWORK_ERROR, None),
    ],
)
def test_unusable_frames_say_how_and_to_whom_to_answer(
    text: str, code: ErrorCode, answer_to: str | None
) -> None:
    with pytest.raises(FrameError) as caught:
        parse_frame(text)
    assert caught.value.code is code
    assert caught.value.unique_id == answer_to
    assert str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "empty frame: no message type"),
        ('{"a": 1}', "got a JSON object"),
        ('"x"', "got a JSON string"),
        ("null", "got null"),
        ('[2,"7","Heartbeat",[1]]', "got a JSON array"),
    ],
)
def test_unusable_frames_are_named_in_json_words(text: str, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        parse_frame(text)
    assert message in str(caught.value)
    assert "list" not in str(caught.value) and "dict" not in str(caught.value)


def test_error_codes_are_spelled_as_each_version_writes_them() -> None:
    assert ErrorCode.FORMAT_VIOLATION.spelling(V16) == "FormationViolation"
    assert ErrorCode.FORMAT_VIOLATION.spelling(V201) == "FormatViolation"
    assert ErrorCode.OCCURRENCE_CONSTRAINT_VIOLATION.spelling(V16) == (
        "OccurenceConstraintViolation"
    )
    assert ErrorCode.RPC_FRAMEWORK_ERROR.spelling(V16) == "ProtocolError"
    assert ErrorCode.from_text("FormationViolation") is ErrorCode.FORMAT_VIOLATION
    error = call_error("x", ErrorCode.TYPE_CONSTRAINT_VIOLATION, "d" * 400, V201)
    assert len(error.description) == 255


def test_decimals_survive_a_round_trip_digit_for_digit() -> None:
    text = '[2,"1","MeterValues",{"v":733.255884,"w":1e3,"x":-0.1470,"y":12346012}]'
    message = parse_frame(text).message
    assert isinstance(message, Call)
    assert message.payload["v"] == Decimal("733.255884")
    assert serialise(message) == text.replace("1e3", "1e+3")
    assert dumps({"k": Decimal("0.10")}) == '{"k":0.10}'


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_raises_frame_error(text: str) -> None:
    try:
        parse_frame(text)
    except FrameError as exc:
        assert exc.code in ErrorCode


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=6))
def test_any_json_array_parses_or_raises_frame_error(frame: list[object]) -> None:
    try:
        parsed = parse_frame(json.dumps(frame))
    except FrameError:
        return
    # What parses serialises back to a frame that parses to the same message.
    assert parse_frame(serialise(parsed.message)).message == parsed.message


# --- versions -----------------------------------------------------------------------


def test_versions_negotiate_per_connection_in_preference_order() -> None:
    assert OcppVersion.parse("ocpp2.0.1") is V201
    assert OcppVersion.parse("1.6J") is V16
    with pytest.raises(UnknownVersionError, match=r"known: 1\.6, 2\.0\.1, 2\.1"):
        OcppVersion.parse("ocpp1.5")
    assert negotiate(["ocpp1.6", "ocpp2.0.1"], [V201, V16]) is V201
    assert negotiate(["ocpp1.6"], [V201, V16]) is V16
    assert negotiate(["ocpp2.1"], [V201, V16]) is None
    assert V21.subprotocol == "ocpp2.1"


# --- validation ---------------------------------------------------------------------


def test_fc09_over_length_boot_is_accepted_with_warnings_unless_strict() -> None:
    frame = json.loads((OCPP / "FC-09.json").read_text())["message"]
    message = parse_frame(json.dumps(frame)).message
    assert isinstance(message, Call)
    checked = check_payload(V16, message.action, message.payload)
    assert len(checked.warnings) == 2
    assert all("too long" in w and "over_length_strings" in w for w in checked.warnings)
    with pytest.raises(PayloadError) as strict:
        check_payload(V16, message.action, message.payload, quirks=Quirks.strict())
    assert strict.value.code is ErrorCode.PROPERTY_CONSTRAINT_VIOLATION
    allowed = Quirks.strict(["over_length_strings"])
    assert check_payload(V16, message.action, message.payload, quirks=allowed).warnings


@pytest.mark.parametrize(
    ("version", "action", "payload", "code"),
    [
        (V16, "MeterValues", {"connectorId": "1", "meterValue": []}, "TYPE"),
        (V16, "StartTransaction", {"connectorId": 1, "meterStart": 0}, "OCCURRENCE"),
        (
            V16,
            "StatusNotification",
            {"connectorId": 1, "errorCode": "NoError", "status": "Dancing"},
            "PROPERTY",
        ),
        (V201, "TransactionEvent", {"eventType": "Started"}, "OCCURRENCE"),
    ],
)
def test_meaningless_payloads_are_refused_with_the_right_code(
    version: OcppVersion, action: str, payload: dict[str, object], code: str
) -> None:
    with pytest.raises(PayloadError) as caught:
        check_payload(version, action, payload)
    assert caught.value.code.name.startswith(code)


def test_unknown_actions_are_not_supported_and_schema_gaps_not_implemented() -> None:
    with pytest.raises(UnknownActionError) as unknown:
        check_payload(V16, "MakeCoffee", {})
    assert unknown.value.code is ErrorCode.NOT_SUPPORTED
    # TransactionEvent exists in 2.0.1, not in 1.6.
    with pytest.raises(UnknownActionError):
        check_payload(V16, "TransactionEvent", {})
    assert check_payload(V21, "Heartbeat", {}).warnings == ()


def test_harmless_sampled_value_breaks_are_tolerated() -> None:
    payload = {
        "connectorId": 1,
        "meterValue": [
            {
                "timestamp": "2025-01-01T00:00:00Z",
                "sampledValue": [
                    {"value": 50, "measurand": "Frequency", "unit": "Hz"},
                    {"value": "1", "vendorField": "x"},
                ],
            }
        ],
    }
    warnings = check_payload(V16, "MeterValues", payload).warnings
    assert any("numeric_sampled_values" in w for w in warnings)
    assert any("sampled_value_enums" in w for w in warnings)
    assert any("unknown_fields" in w for w in warnings)
    with pytest.raises(PayloadError):
        check_payload(V16, "MeterValues", payload, quirks=Quirks.strict())


def test_unknown_quirk_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown quirk"):
        Quirks.strict(["be_nice"])


# --- measurands (FC-11) -------------------------------------------------------------


def _fc11() -> dict[str, list[dict[str, object]]]:
    data = loads((OCPP / "FC-11.json").read_text())
    vectors = {}
    for vector in data["vectors"]:
        if "sampledValue" in vector:
            vectors[vector["id"]] = vector["sampledValue"]
        elif "message" in vector:
            vectors[vector["id"]] = vector["message"][3]["meterValue"][0][
                "sampledValue"
            ]
    return vectors


def _normalised(samples: list[dict[str, object]]) -> dict[str, tuple[str | None, str]]:
    table = load_measurand_table()
    out = {}
    for sample in samples:
        value = table.normalise(sample, V16)
        out[value.quantity] = (value.value, value.unit)
    return out


def test_fc11_a_units_missing_and_mixed() -> None:
    got = _normalised(_fc11()["HC-19a"])
    assert got["Energy.Active.Import.Register"] == ("733255.884", "Wh")
    assert got["Frequency"] == ("49.95", "Hz")  # not Wh: that default is energy's
    assert got["Power.Factor"] == ("-0.147", "1")
    assert got["Power.Active.Import"] == ("0", "W")
    assert got["Power.Active.Import.L2"] == ("0", "W")
    assert got["Temperature"] == ("25", "Celsius")
    assert got["Voltage.L1"] == ("241.87", "V")
    assert got["Voltage.L2"] == ("242.29", "V")
    assert got["Current.Import.L3"] == ("0", "A")
    table = load_measurand_table()
    energy = table.normalise(_fc11()["HC-19a"][3], V16)
    assert energy.obis == "1-0:1.8.0*255" and energy.cumulative


def test_fc11_b_power_in_wh_is_flagged_and_never_a_register() -> None:
    table = load_measurand_table()
    value = table.normalise(_fc11()["HC-19b"][0], V16)
    assert value.value == "0.0"
    assert value.obis is None and not value.cumulative
    assert any(FLAG_UNIT_INCONSISTENT in flag for flag in value.flags)


def test_fc11_c_kw_and_line_to_neutral_phases() -> None:
    got = _normalised(_fc11()["HC-19c"])
    assert got["Energy.Active.Import.Register"] == ("113400", "Wh")
    assert got["Power.Active.Import"] == ("3400", "W")
    assert got["Voltage.L1-N"] == ("230.4", "V")
    assert got["Voltage.L3-N"] == ("237.5", "V")
    assert got["Current.Import.L1"] == ("14.8", "A")
    table = load_measurand_table()
    voltage = table.normalise(_fc11()["HC-19c"][3], V16)
    assert voltage.obis == "1-0:32.7.0*255"  # L1-N shares L1's code


def test_fc11_d_hertz_is_hz() -> None:
    table = load_measurand_table()
    value = table.normalise(
        {"value": "50.01", "measurand": "Frequency", "unit": "Hertz"}, V16
    )
    assert (value.value, value.unit, value.flags) == ("50.01", "Hz", ())


def test_2x_multiplier_and_signed_values_are_kept_exactly() -> None:
    table = load_measurand_table()
    examples = loads((OCPP / "signed_meter_value_examples.json").read_text())
    v201 = table.normalise(examples["ocpp201_sampledValue"], V201)
    assert (v201.value, v201.unit, v201.obis) == ("12346012", "Wh", "1-0:1.8.0*255")
    assert v201.signed is not None and v201.signed.encoding == "OCMF"
    raw = examples["ocpp201_sampledValue"]["signedMeterValue"]
    assert v201.signed.data == raw["signedMeterData"]
    assert v201.signed.public_key == raw["publicKey"]
    v16 = table.normalise(examples["ocpp16_sampledValue"], V16)
    assert v16.value is None  # the value is the signed blob itself
    assert v16.signed is not None
    assert v16.signed.data == examples["ocpp16_sampledValue"]["value"]
    assert v16.signed.encoding == "OCMF"
    kwh = table.normalise(
        {"value": Decimal("1.5"), "unitOfMeasure": {"unit": "kWh", "multiplier": 1}},
        V201,
    )
    assert (kwh.value, kwh.unit) == ("15000", "Wh")


def test_values_that_are_not_numbers_are_flagged_not_guessed() -> None:
    table = load_measurand_table()
    value = table.normalise({"value": "12,5", "measurand": "Voltage"}, V16)
    assert value.value is None
    assert any("not a number" in flag for flag in value.flags)


@pytest.mark.parametrize(
    ("sampled", "version"),
    [
        ({"value": "1e100000", "measurand": "Voltage", "unit": "V"}, V16),
        ({"value": "1e3000000", "measurand": "Voltage", "unit": "V"}, V16),
        ({"value": "1e-100000", "measurand": "Voltage", "unit": "V"}, V16),
        ({"value": "1e999999999999999999999999", "unit": "kWh"}, V16),
        ({"value": "1" * 5000, "measurand": "Voltage", "unit": "V"}, V16),
        ({"value": 10**4000, "unit": "Wh"}, V16),
        ({"value": Decimal("1E+100000"), "unit": "Wh"}, V16),
        ({"value": "1000000000000", "unit": "kWh"}, V16),  # 10^15 Wh
        ({"value": "0.0000000000001", "unit": "Wh"}, V16),  # 13 decimals
        (
            {
                "value": Decimal("1.5"),
                "unitOfMeasure": {"unit": "kWh", "multiplier": 10**30},
            },
            V201,
        ),
        (
            {
                "value": Decimal("1.5"),
                "unitOfMeasure": {"unit": "W", "multiplier": -99},
            },
            V201,
        ),
        (
            {
                "value": Decimal("1"),
                "measurand": "Power.Active.Export",
                "unitOfMeasure": {"unit": "Wh", "multiplier": 10**9},
            },
            V201,
        ),
    ],
)
def test_numbers_out_of_range_are_flagged_never_expanded_or_raised(
    sampled: dict[str, object], version: OcppVersion
) -> None:
    value = load_measurand_table().normalise(sampled, version)
    assert value.value is None
    flags = "; ".join(value.flags)
    assert "value out of range" in flags and len(flags) < 300


def test_numbers_within_range_stay_exact() -> None:
    table = load_measurand_table()
    big = table.normalise({"value": "999999999999.999", "unit": "kWh"}, V16)
    assert big.value == "999999999999999" and not big.flags
    small = table.normalise({"value": "0.000000001", "unit": "kWh"}, V16)
    assert small.value == "0.000001"
    assert plain_number("12345678901234567890", -6) == "12345678901234.567890"
    with pytest.raises(NumberOutOfRange):
        plain_number("1e16")
    with pytest.raises(NotANumber):
        plain_number("Infinity")


@given(st.text(max_size=40) | st.integers() | st.decimals(allow_nan=True))
@settings(max_examples=300, deadline=None)
def test_any_value_normalises_without_raising(raw: object) -> None:
    value = load_measurand_table().normalise(
        {"value": raw, "unitOfMeasure": {"unit": "kWh", "multiplier": 7}}, V201
    )
    assert value.value is None or len(value.value) <= 40


def test_a_broken_measurand_table_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "measurands.toml"
    path.write_text(
        '[dimensions]\nenergy = "Wh"\n\n[units]\nWh = { dimension = "energy", '
        'base = "Wh" }\n\n[measurands."Energy.Active.Import.Register"]\n'
        'dimension = "energy"\nobis = { total = "1.8.0" }\n'
    )
    with pytest.raises(MeasurandTableError) as caught:
        load_measurand_table(path)
    text = str(caught.value)
    assert f"{path}:9" in text and "not an OBIS code" in text
