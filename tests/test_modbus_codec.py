"""Register images to exact decimals: word orders, types, scale, sentinels, strings.

Tests of ``ies_drivers.modbus.codec`` (owned by the lead). Known values come from field
cases FC-01 (float32 CosPhi with swapped words), FC-02/FC-03 (SunSpec meter, SolarEdge)
and FC-06 (229.99 V, the float32 0x4365FD71).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ies_drivers.errors import DecodeError
from ies_drivers.modbus.codec import (
    decode_point,
    decode_scale_factor,
    encode_point,
    raw_text,
)
from ies_drivers.modbus.model import PointSpec, PointType, WordOrder
from ies_drivers.reading import ReadingState

F32, U32, S32, S16, U16 = (
    PointType.F32,
    PointType.U32,
    PointType.S32,
    PointType.S16,
    PointType.U16,
)


def point(kind: PointType, order: WordOrder = "ABCD", **kw: object) -> PointSpec:
    return PointSpec("p", 0, kind, order=order, **kw)  # type: ignore[arg-type]


# --- word and byte order -------------------------------------------------------------

# 0x4365FD71 is the float32 nearest 229.99, laid out in each of the four orders.
VOLTS = {
    "ABCD": [0x4365, 0xFD71],
    "CDAB": [0xFD71, 0x4365],
    "BADC": [0x6543, 0x71FD],
    "DCBA": [0x71FD, 0x6543],
}


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
def test_float32_in_every_word_order(order: WordOrder) -> None:
    assert decode_point(point(F32, order), VOLTS[order]).value == "229.99"


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCD", [0x0000, 0xBC61]),
        ("CDAB", [0xBC61, 0x0000]),
        ("BADC", [0x0000, 0x61BC]),
        ("DCBA", [0x61BC, 0x0000]),
    ],
)
def test_uint32_in_every_word_order(order: WordOrder, registers: list[int]) -> None:
    assert decode_point(point(U32, order), registers).value == "48225"


def test_fc01_float_low_word_first_is_one() -> None:
    assert decode_point(point(F32, "CDAB"), [0x0000, 0x3F80]).value == "1"


def test_fc01_float_read_big_endian_is_a_denormal_and_refused() -> None:
    with pytest.raises(DecodeError, match="denormal") as caught:
        decode_point(point(F32, "ABCD"), [0x0000, 0x3F80])
    assert "word order ABCD" in str(caught.value)


def test_64_bit_word_swap_reverses_all_four_words() -> None:
    spec = point(PointType.U64, "CDAB")
    assert decode_point(spec, [0x0004, 0x0003, 0x0002, 0x0001]).value == str(
        0x0001000200030004
    )


def test_float64() -> None:
    assert decode_point(point(PointType.F64), [0x4059, 0x0000, 0, 0]).value == "100"


# --- signed integers and scale -------------------------------------------------------


def test_int16_is_signed_fc02_export_power() -> None:
    assert decode_point(point(S16), [0xFFC6]).value == "-58"


def test_int32_is_signed() -> None:
    assert decode_point(point(S32), [0xFFFF, 0xFFFE]).value == "-2"


def test_fixed_scale_is_exact() -> None:
    spec = point(U32, scale=Decimal("0.001"))
    assert decode_point(spec, [0x0000, 0x3039]).value == "12.345"


def test_sunspec_scale_factor_is_a_signed_power_of_ten() -> None:
    spec = point(S16, scale_factor="V_SF")
    value = decode_point(spec, [23549], scale_factors={"V_SF": -2})
    assert value.value == "235.49"
    sf = PointSpec("V_SF", 0, PointType.SUNSSF)
    assert decode_scale_factor(sf, [0xFFFE]) == -2


def test_scale_factor_that_was_not_read_is_an_error() -> None:
    with pytest.raises(DecodeError, match="V_SF was not read"):
        decode_point(point(S16, scale_factor="V_SF"), [1], scale_factors={})


def test_scale_factor_outside_the_sunspec_range_is_refused() -> None:
    with pytest.raises(DecodeError, match=r"outside -10\.\.10"):
        decode_scale_factor(PointSpec("W_SF", 0, PointType.SUNSSF), [11])


# --- "not implemented" ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "registers"),
    [
        (S16, [0x8000]),
        (U16, [0xFFFF]),
        (PointType.ENUM16, [0xFFFF]),
        (S32, [0x8000, 0x0000]),
        (U32, [0xFFFF, 0xFFFF]),
        (PointType.ACC32, [0, 0]),
    ],
)
def test_sunspec_sentinels_are_not_implemented(
    kind: PointType, registers: list[int]
) -> None:
    value = decode_point(point(kind), registers, sunspec=True)
    assert (value.state, value.value) == (ReadingState.NOT_IMPLEMENTED, None)


def test_sunspec_sentinels_are_values_on_other_devices() -> None:
    assert decode_point(point(S16), [0x8000]).value == "-32768"
    assert decode_point(point(U16), [0xFFFF]).value == "65535"


def test_sunspec_only_types_use_their_sentinel_everywhere() -> None:
    assert decode_point(point(PointType.ACC32), [0, 0]).state is (
        ReadingState.NOT_IMPLEMENTED
    )
    assert decode_scale_factor(PointSpec("X_SF", 0, PointType.SUNSSF), [0x8000]) is None


def test_scale_factor_not_implemented_means_no_value_not_zero() -> None:
    spec = point(PointType.ACC32, scale_factor="TotVAh_SF")
    value = decode_point(spec, [0, 5], scale_factors={"TotVAh_SF": None})
    assert value.state is ReadingState.NOT_IMPLEMENTED and value.value is None


def test_template_sentinel() -> None:
    spec = point(U16, not_implemented=0x7FFF)
    assert decode_point(spec, [0x7FFF]).state is ReadingState.NOT_IMPLEMENTED


def test_sunspec_float_nan_is_not_implemented() -> None:
    # SunSpec float models (e.g. 211-214) mark "not implemented" with NaN 0x7FC00000.
    value = decode_point(point(F32), [0x7FC0, 0x0000], sunspec=True)
    assert value.state is ReadingState.NOT_IMPLEMENTED


def test_nan_and_infinity_are_not_readings_outside_sunspec() -> None:
    with pytest.raises(DecodeError, match="NaN"):
        decode_point(point(F32), [0x7FC0, 0x0000])
    with pytest.raises(DecodeError, match="not a number"):
        decode_point(point(F32), [0x7F80, 0x0000])


# --- strings -------------------------------------------------------------------------


def words(text: bytes, count: int) -> list[int]:
    data = text.ljust(count * 2, b"\x00")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, count * 2, 2)]


def test_fc03_nul_padded_manufacturer_string() -> None:
    spec = PointSpec("Mn", 40123, PointType.STRING, length=16)
    assert decode_point(spec, words(b"SolarEdge", 16)).value == "SolarEdge"


def test_string_zero_is_a_value_empty_is_not_implemented() -> None:
    spec = PointSpec("SN", 0, PointType.STRING, length=16)
    assert decode_point(spec, words(b"0", 16)).value == "0"
    assert decode_point(spec, words(b"", 16)).state is ReadingState.NOT_IMPLEMENTED


def test_byte_swapped_string() -> None:
    spec = PointSpec("Md", 0, PointType.STRING, length=2, order="BADC")
    assert decode_point(spec, words(b"ESM-", 2)).value == "SE-M"


def test_unprintable_string_is_refused() -> None:
    spec = PointSpec("Md", 0, PointType.STRING, length=1)
    with pytest.raises(DecodeError, match="unprintable"):
        decode_point(spec, [0x4107])


def test_register_count_must_match_the_type() -> None:
    with pytest.raises(DecodeError, match="expected 2 registers, got 1"):
        decode_point(point(U32), [1])


def test_raw_text_format() -> None:
    assert raw_text(3, 0x5000, [0, 0, 0xBC, 0x614E]) == (
        "modbus:fc03:0x5000:0000000000bc614e"
    )


# --- encode_point is the inverse of decode_point --------------------------------------


@given(
    kind=st.sampled_from([S16, U16, S32, U32]),
    order=st.sampled_from(["ABCD", "CDAB", "BADC", "DCBA"]),
    raw=st.integers(min_value=-(2**15) + 1, max_value=2**15 - 2),
    exponent=st.integers(min_value=-3, max_value=3),
)
def test_encode_then_decode_gives_the_value_back(
    kind: PointType, order: WordOrder, raw: int, exponent: int
) -> None:
    if kind in (U16, U32):
        raw = abs(raw)
    spec = PointSpec("p", 0, kind, order=order, scale_factor="SF")
    value = Decimal(raw).scaleb(exponent)
    registers = encode_point(spec, value, scale_factor=exponent)
    decoded = decode_point(spec, registers, scale_factors={"SF": exponent})
    assert Decimal(str(decoded.value)) == value


def test_encoding_none_gives_the_sunspec_sentinel() -> None:
    spec = point(S16)
    assert encode_point(spec, None) == [0x8000]
    assert decode_point(spec, [0x8000], sunspec=True).state is (
        ReadingState.NOT_IMPLEMENTED
    )


def test_encoding_none_for_a_float_reads_back_as_not_implemented() -> None:
    spec = point(F32)
    registers = encode_point(spec, None)
    assert decode_point(spec, registers, sunspec=True).state is (
        ReadingState.NOT_IMPLEMENTED
    )
