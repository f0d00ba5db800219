"""Modbus frames as bytes: CRC, RTU and Modbus TCP framing, finding a response.

Bytes in, frames out, no I/O. The CRC is cross-checked against pymodbus's own
implementation; captured frames come from ``tests/data/modbus`` (field case FC-01).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer.rtu import FramerRTU

from ies_drivers.errors import DecodeError, FrameError
from ies_drivers.modbus.codec import decode_point
from ies_drivers.modbus.model import PointSpec, PointType
from ies_drivers.modbus.rtu import (
    crc16,
    decode_pdu,
    decode_rtu_frame,
    encode_read_request,
    encode_write_request,
    mbap_adu,
    parse_hex,
    read_request_pdu,
    rtu_adu,
    scan_mbap_response,
    scan_rtu_response,
)

DATA = Path(__file__).parent / "data" / "modbus"


def frame_lines(name: str) -> list[str]:
    """Return the hex lines of a captured-frame file, without comments."""
    lines = (DATA / name).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def with_crc(hex_text: str) -> bytes:
    """Return the bytes of ``hex_text`` followed by their CRC, low byte first."""
    body = bytes.fromhex(hex_text)
    return body + crc16(body).to_bytes(2, "little")


# --- CRC -----------------------------------------------------------------------------


def test_crc16_matches_the_catalogue_check_value() -> None:
    # CRC-16/MODBUS check value for the ASCII digits 1..9 (reveng CRC catalogue).
    assert crc16(b"123456789") == 0x4B37


def test_crc16_of_field_case_fc01() -> None:
    assert crc16(bytes.fromhex("01030400003f80")) == 0x63EA


@given(st.binary(min_size=1, max_size=256))
def test_crc16_agrees_with_pymodbus(data: bytes) -> None:
    # pymodbus returns the CRC byte-swapped (as it is sent); ours is the CRC value.
    swapped = FramerRTU.compute_CRC(data)
    assert crc16(data).to_bytes(2, "little") == swapped.to_bytes(2, "big")


# --- FC-01: a captured RTU response --------------------------------------------------


def test_fc01_frame_decodes_to_two_registers() -> None:
    (line,) = frame_lines("FC-01.hex")
    frame = decode_rtu_frame(parse_hex(line))
    assert (frame.unit, frame.function, frame.kind) == (1, 3, "response")
    assert frame.registers == (0x0000, 0x3F80)
    assert frame.count == 2
    assert frame.crc == 0x63EA


def test_fc01_value_is_one_with_low_word_first_and_refused_big_endian() -> None:
    (line,) = frame_lines("FC-01.hex")
    registers = decode_rtu_frame(parse_hex(line)).registers
    cos_phi = PointSpec("CosPhi", 0xF002, PointType.F32, order="CDAB")
    assert decode_point(cos_phi, registers).value == "1"
    wrong = PointSpec("CosPhi", 0xF002, PointType.F32, order="ABCD")
    with pytest.raises(DecodeError, match="denormal"):
        decode_point(wrong, registers)


def test_bad_crc_names_expected_and_received_values() -> None:
    with pytest.raises(FrameError) as caught:
        decode_rtu_frame(parse_hex("01 03 04 00 00 3F 80 EA 64"))
    message = str(caught.value)
    assert "0x63EA" in message  # what the bytes compute to
    assert "0x64EA" in message  # what the frame carries
    assert "EA 64" in message


# --- decoding frames of every kind ---------------------------------------------------


def test_read_request_round_trip() -> None:
    frame = encode_read_request(1, 3, 0, 10)
    # The classic example frame: read 10 holding registers from 0 of unit 1.
    assert frame == bytes.fromhex("01030000000AC5CD")
    decoded = decode_rtu_frame(frame)
    assert (decoded.kind, decoded.address, decoded.count) == ("request", 0, 10)


def test_input_register_request_and_response() -> None:
    request = decode_rtu_frame(encode_read_request(7, 4, 0x5000, 2))
    assert (request.unit, request.function, request.address) == (7, 4, 0x5000)
    response = decode_rtu_frame(with_crc("0704040000bc61"))
    assert response.kind == "response"
    assert response.registers == (0x0000, 0xBC61)


def test_exception_response() -> None:
    frame = decode_rtu_frame(with_crc("018302"))
    assert (frame.kind, frame.function, frame.exception_code) == ("exception", 3, 2)


def test_write_multiple_request_and_response() -> None:
    request = decode_rtu_frame(encode_write_request(1, 100, [1, 0xFFFF]))
    assert (request.kind, request.address, request.count) == ("request", 100, 2)
    assert request.registers == (1, 0xFFFF)
    response = decode_rtu_frame(with_crc("011000640002"))
    assert (response.kind, response.address, response.count) == ("response", 100, 2)


def test_write_single_register_decodes_address_and_value() -> None:
    frame = decode_rtu_frame(with_crc("0106000a1234"))
    assert (frame.address, frame.registers) == (10, (0x1234,))


def test_read_coils_response_holds_bits() -> None:
    frame = decode_rtu_frame(with_crc("010102cd01"))
    assert frame.kind == "response"
    assert frame.data == bytes.fromhex("02cd01")


@pytest.mark.parametrize(
    ("hex_text", "message"),
    [
        ("0103", "too short"),
        ("01030600003f80", "byte count 6 but 4 data bytes"),
        ("01030500003f8000", "odd byte count 5"),
        ("01830201", "expected 1"),
        ("0110006400020400", "disagree"),
        ("011000640002040001", "disagree"),
        ("011000640003040001ffff", "expected 6"),
        ("0106000a12", "expected 4"),
        ("0103007d007e", r"allows 1\.\.125"),
    ],
)
def test_inconsistent_frames_raise_frame_error(hex_text: str, message: str) -> None:
    data = with_crc(hex_text) if len(hex_text) > 4 else bytes.fromhex(hex_text)
    with pytest.raises(FrameError, match=message):
        decode_rtu_frame(data)


def test_frame_over_256_bytes_is_refused() -> None:
    with pytest.raises(FrameError, match="too long"):
        decode_rtu_frame(bytes(300))


def test_unknown_function_is_a_decode_error_not_a_frame_error() -> None:
    with pytest.raises(DecodeError, match="function 43"):
        decode_rtu_frame(with_crc("012b0e0100"))


@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_our_errors(data: bytes) -> None:
    try:
        frame = decode_rtu_frame(data)
    except (FrameError, DecodeError):
        return
    assert frame.unit == data[0]
    assert frame.crc == crc16(data[:-2])


@given(st.binary(min_size=1, max_size=300))
def test_decoding_any_pdu_with_a_valid_crc_raises_only_our_errors(pdu: bytes) -> None:
    try:
        frame = decode_rtu_frame(rtu_adu(1, pdu[:253]))
    except (FrameError, DecodeError):
        return
    assert frame.function == pdu[0] & 0x7F
    assert frame.kind in ("request", "response", "exception")


# --- encoding arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "function", "address", "count"),
    [(256, 3, 0, 1), (1, 5, 0, 1), (1, 3, 0, 0), (1, 3, 0, 126), (1, 3, 65500, 100)],
)
def test_impossible_requests_are_refused(
    unit: int, function: int, address: int, count: int
) -> None:
    with pytest.raises(ValueError):
        encode_read_request(unit, function, address, count)


def test_write_values_must_fit_registers() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        encode_write_request(1, 0, [70000])
    with pytest.raises(ValueError, match="count 124"):
        encode_write_request(1, 0, [0] * 124)


def test_mbap_request_matches_the_captured_fc02_request() -> None:
    request = next(line for line in frame_lines("FC-02.hex") if line.startswith("-->"))
    pdu = read_request_pdu(3, 40190, 105)
    assert mbap_adu(0x93, 1, pdu) == parse_hex(request.removeprefix("-->"))


# --- hex input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "01 03 04 00 00 3F 80 EA 63",
        "01:03:04:00:00:3f:80:ea:63",
        "010304 00003F80EA63",
        "0x01 0x03 0x04 0x00 0x00 0x3F 0x80 0xEA 0x63",
        "  01 03 04 00 00 3f 80 ea 63\n",
    ],
)
def test_parse_hex_accepts_common_spellings(text: str) -> None:
    assert parse_hex(text) == bytes.fromhex("01030400003f80ea63")


def test_parse_hex_names_the_bad_character() -> None:
    with pytest.raises(FrameError, match="'g' is not a hex digit"):
        parse_hex("01 03 0g")


def test_parse_hex_refuses_half_bytes() -> None:
    with pytest.raises(FrameError, match="3 hex digits"):
        parse_hex("01 3")


# --- finding a response on an RTU line -----------------------------------------------

REQUEST = encode_read_request(1, 3, 0, 2)
RESPONSE = with_crc("01030400003f80")


def test_scan_finds_a_plain_response() -> None:
    result = scan_rtu_response(RESPONSE, request=REQUEST, unit=1, function=3)
    assert result.state == "frame"
    assert result.frame is not None and result.frame.registers == (0, 0x3F80)
    assert not result.echo and result.skipped == b""


def test_scan_strips_the_rs485_echo_of_our_request() -> None:
    data = REQUEST + RESPONSE + b"\x00"
    result = scan_rtu_response(data, request=REQUEST, unit=1, function=3)
    assert result.state == "frame" and result.echo
    assert result.end == len(REQUEST + RESPONSE)


def test_scan_waits_while_only_part_of_the_echo_arrived() -> None:
    result = scan_rtu_response(REQUEST[:5], request=REQUEST, unit=1, function=3)
    assert result.state == "incomplete" and result.problem == ""


def test_scan_skips_garbage_before_the_frame() -> None:
    garbage = bytes.fromhex("ff00fe03")
    result = scan_rtu_response(garbage + RESPONSE, request=REQUEST, unit=1, function=3)
    assert result.state == "frame"
    assert result.skipped == garbage


def test_scan_reports_a_frame_from_another_unit() -> None:
    other = with_crc("02030400003f80")
    result = scan_rtu_response(other, request=REQUEST, unit=1, function=3)
    assert result.state == "frame"
    assert result.frame is not None and result.frame.unit == 2


def test_scan_reports_a_bad_crc_as_invalid() -> None:
    damaged = RESPONSE[:-1] + bytes((RESPONSE[-1] ^ 0x01,))
    result = scan_rtu_response(damaged, request=REQUEST, unit=1, function=3)
    assert result.state == "invalid"
    assert "CRC error" in result.problem and "0x63EA" in result.problem


def test_scan_waits_for_the_rest_of_a_short_response() -> None:
    result = scan_rtu_response(RESPONSE[:6], request=REQUEST, unit=1, function=3)
    assert result.state == "incomplete"
    assert "short response" in result.problem and "6 bytes of 9" in result.problem


def test_scan_finds_an_exception_response() -> None:
    result = scan_rtu_response(with_crc("018306"), request=REQUEST, unit=1, function=3)
    assert result.frame is not None
    assert (result.frame.kind, result.frame.exception_code) == ("exception", 6)


def test_scan_describes_bytes_that_hold_no_response() -> None:
    result = scan_rtu_response(b"\x00\x11\x22", request=REQUEST, unit=1, function=3)
    assert result.state == "incomplete"
    assert "hold no response" in result.problem


def test_scan_gives_up_on_a_flood_of_garbage() -> None:
    result = scan_rtu_response(bytes(600), request=REQUEST, unit=1, function=3)
    assert result.state == "invalid"


@given(st.binary(max_size=400))
def test_scan_never_raises(data: bytes) -> None:
    result = scan_rtu_response(data, request=REQUEST, unit=1, function=3)
    assert result.state in ("incomplete", "frame", "invalid")


# --- finding a response on Modbus TCP ------------------------------------------------


def test_mbap_scan_skips_stale_answers_to_earlier_transactions() -> None:
    stale = mbap_adu(6, 1, bytes.fromhex("03020001"))
    fresh = mbap_adu(7, 1, bytes.fromhex("03020002"))
    result = scan_mbap_response(stale + fresh, transaction_id=7, unit=1, function=3)
    assert result.state == "frame"
    assert result.frame is not None and result.frame.registers == (2,)
    assert result.frame.transaction_id == 7 and result.skipped == stale


def test_mbap_scan_rejects_another_protocol_id() -> None:
    data = parse_hex("00 07 00 07 00 05 01 03 02 00 01")
    result = scan_mbap_response(data, transaction_id=7, unit=1, function=3)
    assert result.state == "invalid" and "protocol id 7" in result.problem


def test_mbap_scan_waits_for_a_short_frame() -> None:
    data = mbap_adu(7, 1, bytes.fromhex("0304000100"))[:-1]
    result = scan_mbap_response(data, transaction_id=7, unit=1, function=3)
    assert result.state == "incomplete" and "short response" in result.problem


def test_mbap_scan_rejects_an_answer_to_another_function() -> None:
    data = mbap_adu(7, 1, bytes.fromhex("04020001"))
    result = scan_mbap_response(data, transaction_id=7, unit=1, function=3)
    assert result.state == "invalid" and "function 4" in result.problem


def test_decode_pdu_with_known_role() -> None:
    # Four data bytes read as a request unless we know it is a response.
    frame = decode_pdu(1, bytes.fromhex("0103010203"), role="response")
    assert frame.kind == "response"
