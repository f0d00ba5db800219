"""``ies-agent decode --protocol dlms-hdlc|dlms-apdu HEX``, run as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import run_agent

DATA = Path(__file__).parent / "data" / "dlms"


def lines(name: str) -> list[str]:
    text = (DATA / name).read_text()
    return [x for x in text.splitlines() if x.strip() and not x.startswith("#")]


def test_fc04_response_prints_addresses_control_and_the_obis_code() -> None:
    _, response = lines("FC-04.hex")
    result = run_agent("decode", "--protocol", "dlms-hdlc", response)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "to:      1 (1 byte)" in out
    assert "logical 1, physical 3875" in out
    assert "N(S)=1 N(R)=2" in out
    assert "FCS:     0x8C7E (valid)" in out
    assert "get-response" in out
    assert "OBIS 1-0:32.32.0" in out


def test_fc05_three_frames_as_one_argument_decode_and_one_alone_fails() -> None:
    frames = lines("FC-05.hex")
    result = run_agent("decode", "--protocol", "dlms-hdlc", " ".join(frames))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data-notification" in result.stdout
    assert "OBIS 1-1:1.8.0" in result.stdout
    assert "double-long-unsigned 58276" in result.stdout
    alone = run_agent("decode", "--protocol", "dlms-hdlc", frames[0])
    assert alone.returncode == 1
    assert "incomplete" in alone.stdout


def test_a_broken_fcs_exits_1_with_the_reason() -> None:
    _, response = lines("FC-04.hex")
    broken = response[:-8] + "00 8C 7E"
    result = run_agent("decode", "--protocol", "dlms-hdlc", broken)
    assert result.returncode == 1
    assert "FCS check failed" in result.stdout


@pytest.mark.parametrize(
    ("apdu", "expected"),
    [
        ("C0 01 C1 00 01 01 00 20 20 00 FF 01 00", "class 1, 1-0:32.32.0, attribute 1"),
        (
            "C4 01 C1 00 09 0C 07 E9 07 17 03 08 1E 18 FF 01 4A 00",
            "IS 15959: UTC+05:30",
        ),
        ("61 05 A2 03 02 01 01", "rejected (permanent)"),
    ],
)
def test_apdus_print_their_type_and_data(apdu: str, expected: str) -> None:
    result = run_agent("decode", "--protocol", "dlms-apdu", apdu)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout


def test_a_truncated_apdu_exits_1() -> None:
    result = run_agent("decode", "--protocol", "dlms-apdu", "C4 01 C1 00 02 03 11")
    assert result.returncode == 1
    assert "invalid frame" in result.stdout


def test_modbus_rtu_still_decodes() -> None:
    result = run_agent(
        "decode", "--protocol", "modbus-rtu", "01 03 04 00 00 3F 80 EA 63"
    )
    assert result.returncode == 0 and "unit:      1" in result.stdout
