"""A-XDR, OBIS, APDUs and suite 0 security: bytes in, values out, no I/O.

Field cases FC-04..FC-08 (``tests/data/dlms``) must decode to the values
``shared/field-cases/README.md`` names; the suite 0 vectors are the Green Book worked
example as reproduced in a public DLMS test suite.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, hdlc, security
from ies_drivers.dlms.axdr import CosemDateTime, Data, DataType
from ies_drivers.dlms.errors import (
    ApduError,
    AxdrError,
    DateTimeError,
    ObisError,
    ProfileError,
    SecurityError,
)
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.profiles import (
    ObjectRef,
    Scale,
    decode_rows,
    load_profile,
)
from ies_drivers.errors import DecodeError

DATA = Path(__file__).parent / "data" / "dlms"
IS15959 = load_profile("is15959")


def hex_lines(name: str) -> list[bytes]:
    """Return the hex lines of a capture file as bytes, comments skipped."""
    text = (DATA / name).read_text()
    return [
        bytes.fromhex(line)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


# --- OBIS ---------------------------------------------------------------------------


def test_obis_reads_every_written_form_and_prints_the_short_one() -> None:
    forms = ["1-0:32.7.0", "1-0:32.7.0*255", "1-0:32.7.0.255", "1.0.32.7.0.255"]
    parsed = {Obis.parse(f) for f in forms}
    assert parsed == {Obis(1, 0, 32, 7, 0, 255)}
    assert str(Obis(1, 0, 32, 7, 0)) == "1-0:32.7.0"
    assert str(Obis(1, 0, 1, 8, 0, 101)) == "1-0:1.8.0*101"
    assert Obis.from_bytes(bytes.fromhex("0100200700ff")).dotted == "1.0.32.7.0.255"


@pytest.mark.parametrize("text", ["1-0:32.7", "1-0:32.7.0.256", "abc", ""])
def test_obis_refuses_what_is_not_six_groups(text: str) -> None:
    with pytest.raises(ObisError, match="OBIS"):
        Obis.parse(text)


# --- A-XDR --------------------------------------------------------------------------


def every_type() -> Data:
    """One value of every COSEM data type, nested."""
    stamp = CosemDateTime.from_datetime(
        datetime(2025, 7, 23, 8, 30, 24, tzinfo=timezone(timedelta(minutes=330))),
        india_deviation_sign=True,
    )
    compact = axdr.CompactArray(
        axdr.TypeDescription(
            DataType.STRUCTURE,
            2,
            (
                axdr.TypeDescription(DataType.UNSIGNED),
                axdr.TypeDescription(DataType.LONG),
            ),
        ),
        (
            axdr.structure((axdr.uint8(1), axdr.int16(-2))),
            axdr.structure((axdr.uint8(3), axdr.int16(400))),
        ),
    )
    return axdr.structure(
        (
            axdr.null(),
            axdr.array((axdr.uint16(1), axdr.uint16(65535))),
            axdr.boolean(True),
            Data(DataType.BIT_STRING, axdr.BitString(b"\xa0", 3)),
            axdr.int32(-2_000_000_000),
            axdr.uint32(4_000_000_000),
            Data(DataType.FLOATING_POINT, 1.5),
            axdr.octet_string(b"\x01\x02"),
            axdr.visible_string("IS15959"),
            Data(DataType.UTF8_STRING, "मीटर"),
            Data(DataType.BCD, 0x42),
            axdr.int8(-128),
            axdr.int16(-32768),
            axdr.uint8(255),
            Data(DataType.COMPACT_ARRAY, compact),
            axdr.int64(-(2**63)),
            axdr.uint64(2**64 - 1),
            axdr.enum(30),
            axdr.float32(229.99),
            axdr.float64(0.1),
            Data(DataType.DATE_TIME, stamp),
            Data(DataType.DATE, axdr.CosemDate(2025, 7, 23, 3)),
            Data(DataType.TIME, axdr.CosemTime(8, 30, 24, 0)),
            axdr.octet_string(b"x" * 300),
        )
    )


def test_every_cosem_type_round_trips() -> None:
    value = every_type()
    encoded = axdr.encode(value)
    decoded = axdr.decode(encoded)
    assert axdr.encode(decoded) == encoded
    assert decoded.items[1].items[1].value == 65535
    assert decoded.items[14].items[1].items[1].value == 400
    assert decoded.items[20].value == every_type().items[20].value
    assert axdr.numeric_text(decoded.items[18]) == "229.99"


def test_lengths_use_the_long_form_above_127() -> None:
    assert axdr.encode_length(127) == b"\x7f"
    assert axdr.encode_length(128) == b"\x81\x80"
    assert axdr.encode_length(300) == b"\x82\x01\x2c"
    assert axdr.decode_length(b"\x82\x01\x2c", 0) == (300, 3)


@pytest.mark.parametrize(
    ("hex_text", "message"),
    [
        ("0203 1100 1101", "shorter than announced"),  # structure of 3, 2 given
        ("0202 1100 1101 1102", "longer than its structure announces"),
        ("0105 11", "announces 5 elements"),
        ("09 05 0102", "needs 5 bytes"),
        ("ff", "unknown data type tag 0xFF"),
        ("12 00", "needs 2 bytes"),
        ("", "value was expected"),
    ],
)
def test_broken_data_gives_typed_errors_with_a_reason(
    hex_text: str, message: str
) -> None:
    with pytest.raises(AxdrError, match=message) as caught:
        axdr.decode(bytes.fromhex(hex_text))
    assert isinstance(caught.value, DecodeError)


def test_data_deeper_than_the_limit_is_refused() -> None:
    deep = b"\x02\x01" * (axdr.MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(AxdrError, match="deeper"):
        axdr.decode(deep)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("07E9 0D 17 03 08 1E 18 00 014A 00", "month 13"),
        ("07E9 07 17 03 18 1E 18 00 014A 00", "hour 24"),
        ("07E9 07 17 03 08 3C 18 00 014A 00", "minute 60"),
        ("07E9 07 17 09 08 1E 18 00 014A 00", "day of week 9"),
        ("07E9 07 17 03 08 1E 18 00 0400 00", "deviation"),
    ],
)
def test_invalid_date_time_fields_are_refused(fields: str, message: str) -> None:
    raw = bytes.fromhex("090C" + fields.replace(" ", ""))
    value = axdr.decode(raw)
    with pytest.raises(DateTimeError, match=message):
        value.as_datetime()


def test_a_date_that_does_not_exist_is_refused_when_used() -> None:
    stamp = CosemDateTime.from_bytes(bytes.fromhex("07E9021E0108000000014A00"))
    with pytest.raises(DateTimeError, match="not a real date"):
        stamp.to_datetime(india_deviation_sign=True)


def test_from_datetime_round_trips_under_both_conventions() -> None:
    moment = datetime(2025, 1, 5, 12, 0, tzinfo=ZoneInfo("Asia/Kolkata"))
    india = CosemDateTime.from_datetime(moment, india_deviation_sign=True)
    blue = CosemDateTime.from_datetime(moment, india_deviation_sign=False)
    assert (india.deviation, blue.deviation) == (330, -330)
    assert india.to_datetime(india_deviation_sign=True) == moment
    assert blue.to_datetime(india_deviation_sign=False) == moment


# --- field cases --------------------------------------------------------------------


def fc06() -> dict[str, object]:
    loaded: dict[str, object] = json.loads((DATA / "FC-06.json").read_text())
    return loaded


def test_fc06_clock_uses_the_indian_deviation_sign() -> None:
    raw = base64.b64decode("CQwH6QcXAwgeGP8BSgA=")
    stamp = axdr.decode(raw).as_datetime()
    india = stamp.to_datetime(india_deviation_sign=IS15959.india_deviation_sign)
    assert india is not None
    assert india.isoformat() == "2025-07-23T08:30:24+05:30"
    assert india.astimezone(UTC) == datetime(2025, 7, 23, 3, 0, 24, tzinfo=UTC)
    blue = stamp.to_datetime(india_deviation_sign=False)
    assert blue is not None and blue.isoformat().endswith("-05:30")  # 11 h off


def test_fc06_every_register_gives_the_head_end_value() -> None:
    case = fc06()
    registers = case["registerValues"]
    assert isinstance(registers, list)
    checked = 0
    for entry in registers:
        data = axdr.decode(base64.b64decode(entry["registerValue"]))
        expected = entry["formattedValue"]
        obis = Obis.parse(entry["formattedRegisterObisCode"])
        if entry["attributeId"] == 5:
            # MD capture time: all fields unspecified means "no timestamp".
            assert data.as_datetime().to_datetime(india_deviation_sign=True) is None
            assert expected == ""
            checked += 1
            continue
        if obis == Obis(0, 0, 1, 0, 0):
            continue
        text = axdr.numeric_text(data, entry["scalar"])
        assert expected.split(" ")[0] == text, (obis, expected, text)
        checked += 1
    assert checked == 18  # 19 entries, the clock checked above
    # The named ones, spelled out.
    values = {
        e["formattedRegisterObisCode"]: axdr.numeric_text(
            axdr.decode(base64.b64decode(e["registerValue"])), e["scalar"]
        )
        for e in registers
        if e["attributeId"] == 2 and e["formattedRegisterObisCode"] != "0.0.1.0.0.255"
    }
    assert values["1.0.12.7.0.255"] == "229.99"
    assert values["1.0.13.7.0.255"] == "1.00"
    assert values["1.0.14.7.0.255"] == "50.0"
    assert values["1.0.1.8.0.255"] == "950"
    assert values["1.0.9.8.0.255"] == "1050"
    assert values["0.0.94.91.14.255"] == "622224"
    assert values["0.0.96.2.0.255"] == "155"


def test_fc06_as_a_profile_row_names_quantities_from_the_is15959_file() -> None:
    registers = fc06()["registerValues"]
    assert isinstance(registers, list)
    columns = []
    cells = []
    scales = {}
    for entry in registers:
        obis = Obis.parse(entry["formattedRegisterObisCode"])
        attribute = entry["attributeId"]
        class_id = 8 if obis == Obis(0, 0, 1, 0, 0) else (4 if obis.d == 6 else 3)
        columns.append(ObjectRef(class_id, obis, attribute))
        cells.append(axdr.decode(base64.b64decode(entry["registerValue"])))
        if attribute == 2 and class_id != 8:
            scales[obis] = Scale(entry["scalar"], entry["unit"])
    rows = decode_rows(columns, axdr.array([axdr.structure(cells)]), IS15959, scales)
    (row,) = rows
    assert row.time is not None and row.time.isoformat() == "2025-07-23T08:30:24+05:30"
    named = {c.name: (c.value, c.unit) for c in row.cells}
    assert named["voltage"] == ("229.99", "V")
    assert named["frequency"] == ("50.0", "Hz")
    assert named["energy_import"] == ("950", "Wh")
    assert named["apparent_energy_import"] == ("1050", "VAh")
    assert named["power_on_minutes"] == ("622224", "min")
    md = next(c for c in row.cells if c.name == "max_demand_active")
    assert md.value == "0" and md.captured is None


def test_fc07_null_clock_cells_follow_the_capture_period_across_new_year() -> None:
    (raw,) = [b"".join(hex_lines("FC-07.hex"))]
    buffer = axdr.decode(raw)
    columns = [
        ObjectRef(8, Obis(0, 0, 1, 0, 0)),
        ObjectRef(1, Obis(0, 0, 96, 10, 1)),
        ObjectRef(3, Obis(1, 0, 1, 8, 0)),
        ObjectRef(3, Obis(1, 0, 2, 8, 0)),
    ]
    blue_book = IS15959.__class__(**{**IS15959.__dict__, "quirks": frozenset()})
    rows = decode_rows(columns, buffer, blue_book, {}, period_s=3600)
    times = [r.time.isoformat() if r.time else None for r in rows]
    assert times == [
        "2019-12-31T23:00:00+01:00",
        "2020-01-01T00:00:00+01:00",
        "2020-01-01T01:00:00+01:00",
        "2020-01-01T02:00:00+01:00",
    ]
    for row in rows:
        values = {str(c.column.obis): c.value for c in row.cells}
        assert values == {"0-0:96.10.1": "6", "1-0:1.8.0": "1517", "1-0:2.8.0": "1620"}


def test_fc07_null_clock_without_a_period_is_an_error_not_a_guess() -> None:
    buffer = axdr.decode(b"".join(hex_lines("FC-07.hex")))
    columns = [ObjectRef(8, Obis(0, 0, 1, 0, 0))] + [
        ObjectRef(3, Obis(1, 0, 1, 8, n)) for n in range(3)
    ]
    with pytest.raises(AxdrError, match="null-data"):
        decode_rows(columns, buffer, IS15959, {}, period_s=0)


def test_fc04_apdus_decode_to_get_normal_of_the_logical_name() -> None:
    request, response = (hdlc.decode_frame(f).info[3:] for f in hex_lines("FC-04.hex"))
    get = ap.decode_apdu(request)
    assert isinstance(get, ap.GetRequestNormal)
    assert get.invoke == 0xC1
    assert get.descriptor == ap.AttributeDescriptor(1, Obis(1, 0, 32, 32, 0), 1)
    answer = ap.decode_apdu(response)
    assert isinstance(answer, ap.GetResponseNormal)
    assert answer.result == axdr.octet_string(bytes.fromhex("0100202000ff"))
    assert get.to_bytes() == request and answer.to_bytes() == response


def test_fc05_data_notification_values_and_tariff_sums() -> None:
    apdu = ap.decode_apdu(hdlc.reassemble(hex_lines("FC-05.hex")))
    assert isinstance(apdu, ap.DataNotification)
    assert apdu.long_invoke == 262700
    assert apdu.date_time is not None
    stamp = CosemDateTime.from_bytes(apdu.date_time).to_datetime()
    assert stamp is not None
    assert stamp.isoformat() == "2021-11-02T21:51:00+01:00"
    assert stamp.astimezone(UTC).strftime("%H:%M:%SZ") == "20:51:00Z"
    values = {}
    for entry in apdu.body.items:
        obis_raw, value, *scaler = entry.items
        obis = str(Obis.from_bytes(obis_raw.as_bytes()))
        if scaler:
            scale = scaler[0].items[0].as_int()
            values[obis] = axdr.numeric_text(value, scale)
        else:
            values[obis] = value.as_text()
    assert values["0-0:96.1.0"] == "12345678"
    assert values["0-0:96.1.1"] == "123456"
    assert values["1-1:1.8.0"] == "58276"
    assert values["1-1:2.8.0"] == "3038"
    assert values["1-0:32.7.0"] == "233.6"
    assert values["1-0:31.7.0"] == "0.00"
    assert int(values["1-1:1.8.1"]) + int(values["1-1:1.8.2"]) == int(
        values["1-1:1.8.0"]
    )
    assert int(values["1-1:2.8.1"]) + int(values["1-1:2.8.2"]) == int(
        values["1-1:2.8.0"]
    )


def test_fc08_deviation_0x8000_is_unknown_not_minus_32768_minutes() -> None:
    apdu = ap.decode_apdu(hdlc.reassemble(hex_lines("FC-08.hex")))
    assert isinstance(apdu, ap.DataNotification)
    body = apdu.body.items
    assert len(body) == 25
    stamp = body[0] if apdu.date_time is None else None
    assert stamp is None  # the time comes in the APDU header
    assert apdu.date_time is not None
    moment = CosemDateTime.from_bytes(apdu.date_time)
    assert moment.deviation is None
    assert moment.to_datetime() == datetime(2022, 1, 24, 18, 58, 50)
    site = ZoneInfo("Europe/Oslo")
    assumed = moment.to_datetime(assumed_tz=site)
    assert assumed is not None and assumed.tzinfo is site
    assert body[0].as_text() == "Kamstrup_V0001"
    pairs = {
        str(Obis.from_bytes(body[i].as_bytes())): body[i + 1] for i in range(1, 25, 2)
    }
    assert pairs["1-1:0.0.5"].as_text() == "1234567890123456"
    assert pairs["1-1:96.1.1"].as_text() == "6841138BN245101090"
    assert axdr.numeric_text(pairs["1-1:1.7.0"]) == "826"
    assert axdr.numeric_text(pairs["1-1:3.7.0"]) == "104"
    currents = [axdr.numeric_text(pairs[f"1-1:{c}.7.0"], -2) for c in (31, 51, 71)]
    assert currents == ["2.37", "0.89", "0.75"]
    volts = [axdr.numeric_text(pairs[f"1-1:{c}.7.0"]) for c in (32, 52, 72)]
    assert volts == ["232", "233", "236"]


# --- security suite 0 ---------------------------------------------------------------


def suite0() -> dict[str, dict[str, str] | str]:
    loaded: dict[str, dict[str, str] | str] = json.loads(
        (DATA / "suite0.json").read_text()
    )
    return loaded


def test_green_book_encryption_example() -> None:
    v = suite0()
    enc = v["encrypt"]
    assert isinstance(enc, dict)
    ek = bytes.fromhex(str(v["block_cipher_key"]))
    ak = bytes.fromhex(str(v["authentication_key"]))
    args = (
        int(enc["security_control"], 16),
        bytes.fromhex(enc["system_title"]),
        int(enc["invocation_counter"], 16),
        ek,
        ak,
    )
    ciphered = security.encrypt(*args, bytes.fromhex(enc["plaintext"]))
    assert ciphered == bytes.fromhex(enc["ciphertext_and_tag"])
    assert security.decrypt(*args, ciphered) == bytes.fromhex(enc["plaintext"])
    tampered = bytes([ciphered[0] ^ 1]) + ciphered[1:]
    with pytest.raises(SecurityError, match="does not verify"):
        security.decrypt(*args, tampered)


def test_green_book_gmac_example() -> None:
    v = suite0()
    g = v["gmac"]
    assert isinstance(g, dict)
    tag = security.gmac(
        bytes.fromhex(g["client_system_title"]),
        int(g["client_invocation_counter"], 16),
        bytes.fromhex(str(v["block_cipher_key"])),
        bytes.fromhex(str(v["authentication_key"])),
        bytes.fromhex(g["server_to_client_challenge"]),
    )
    assert tag == bytes.fromhex(g["tag"])


def test_keys_of_the_wrong_size_are_refused_and_never_printed() -> None:
    with pytest.raises(SecurityError, match="block cipher key has 15 bytes"):
        security.SecurityKeys(b"k" * 15, b"a" * 16, b"t" * 8)
    keys = security.SecurityKeys(b"k" * 16, b"a" * 16, b"t" * 8)
    assert "6b6b" not in repr(keys) and "hidden" in repr(keys)


# --- APDUs --------------------------------------------------------------------------


def test_association_apdus_round_trip() -> None:
    aarq = ap.Aarq(
        ap.InitiateRequest().to_bytes(),
        ap.CONTEXT_LN_CIPHERED,
        ap.MECHANISM_HLS_GMAC,
        b"ABCDEFGH",
        b"challenge-123456",
    )
    assert ap.decode_apdu(aarq.to_bytes()) == aarq
    aare = ap.Aare(1, 13, "user", b"", ap.CONTEXT_LN)
    assert ap.decode_apdu(aare.to_bytes()) == aare
    assert ap.decode_apdu(ap.ReleaseRequest(0).to_bytes()) == ap.ReleaseRequest(0)
    initiate = ap.InitiateResponse(0x1F, 512)
    assert ap.InitiateResponse.from_bytes(initiate.to_bytes()) == initiate


def test_service_apdus_round_trip() -> None:
    clock = ap.AttributeDescriptor(8, Obis(0, 0, 1, 0, 0), 2)
    access = ap.range_access(Obis(0, 0, 1, 0, 0), b"\x00" * 12, b"\xff" * 12)
    apdus: list[ap.Apdu] = [
        ap.GetRequestNormal(clock, access, 0xC2),
        ap.GetRequestNext(7, 0xC2),
        ap.GetRequestWithList(((clock, None), (clock, ap.entry_access(1, 2))), 0xC3),
        ap.GetResponseNormal(ap.AccessFailure(4)),
        ap.GetResponseBlock(3, True, b"\x01\x02"),
        ap.GetResponseWithList((axdr.uint8(1), ap.AccessFailure(3))),
        ap.SetRequestNormal(clock, axdr.octet_string(b"\x00" * 12)),
        ap.SetResponseNormal(0),
        ap.ActionRequestNormal(
            ap.MethodDescriptor(15, Obis(0, 0, 40, 0, 0), 1), axdr.octet_string(b"x")
        ),
        ap.ActionResponseNormal(0, axdr.octet_string(b"y")),
        ap.DataNotification(1, None, axdr.uint32(5)),
        ap.ExceptionResponse(1, 2),
        ap.ConfirmedServiceError(1, 6, 0),
        ap.CipheredApdu(ap.Tag.GLO_GET_REQUEST, 0x30, 5, b"\x00" * 20),
        ap.CipheredApdu(ap.Tag.GENERAL_GLO_CIPHERING, 0x30, 5, b"\x00" * 20, b"T" * 8),
    ]
    for item in apdus:
        assert ap.decode_apdu(item.to_bytes()) == item


@pytest.mark.parametrize(
    "hex_text",
    [
        "",
        "c401",
        "c401c1",
        "c40fc100",
        "60",
        "6105a203020100ff",
        "c801",
        "c4 01 c1 00 1100 ff",
    ],
)
def test_broken_apdus_give_typed_errors(hex_text: str) -> None:
    with pytest.raises((ApduError, AxdrError)):
        ap.decode_apdu(bytes.fromhex(hex_text.replace(" ", "")))


# --- the profile file ---------------------------------------------------------------


def test_is15959_profile_file_says_india_and_lists_every_profile() -> None:
    assert IS15959.india_deviation_sign
    assert set(IS15959.profiles) >= {
        "name_plate",
        "instantaneous",
        "block_load",
        "daily_load",
        "billing",
        "events_voltage",
    }
    block = IS15959.profile("block_load")
    assert block.obis == Obis(1, 0, 99, 1, 0) and block.scaler == Obis(1, 0, 94, 91, 4)
    assert IS15959.name_plate["ser"].obis == Obis(0, 0, 96, 1, 0)
    spec = IS15959.quantity(Obis(1, 0, 1, 8, 0))
    assert spec is not None and spec.cumulative and spec.unit == "Wh"


def test_a_broken_profile_file_names_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[profile]\nid = "bad"\nclock = "0-0:1.0.0.255"\n\n'
        '[profiles.x]\nobis = "1-0:99.1"\nkind = "interval"\n'
    )
    with pytest.raises(
        ProfileError, match=r"bad.toml:6: profiles.x.obis: .*not an OBIS"
    ):
        load_profile(bad)
    bad.write_text('[profile]\nid = "bad"\nquirks = ["us_sign"]\n')
    with pytest.raises(ProfileError, match="quirks"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="no such file"):
        load_profile("no-such-profile")
