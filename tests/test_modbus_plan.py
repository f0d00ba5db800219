"""Read planning: points merged into blocks, and blocks decoded back into values.

The SunSpec model 203 block of field case FC-02 (``tests/data/modbus/FC-02.hex``) checks
that scale factors are applied across blocks and that one bad point never stops the
others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from ies_drivers.errors import DecodeError, ExceptionResponse, TemplateError
from ies_drivers.modbus.model import PointSpec, PointType, RegisterFunction
from ies_drivers.modbus.plan import (
    Block,
    decode_block,
    decode_device,
    decode_scale_factors,
    plan_blocks,
)
from ies_drivers.modbus.rtu import parse_hex
from ies_drivers.reading import ReadingState

DATA = Path(__file__).parent / "data" / "modbus"


def u16(name: str, address: int, function: RegisterFunction = "holding") -> PointSpec:
    return PointSpec(name, address, PointType.U16, function=function)


def spans(blocks: list[Block]) -> list[tuple[int, int, int]]:
    return [(b.function, b.address, b.count) for b in blocks]


# --- planning ------------------------------------------------------------------------


def test_adjacent_points_make_one_block() -> None:
    points = [
        u16("a", 0),
        PointSpec("b", 1, PointType.U32),
        PointSpec("c", 3, PointType.F32),
    ]
    blocks = plan_blocks(points)
    assert spans(blocks) == [(3, 0, 5)]
    assert [p.name for p in blocks[0].points] == ["a", "b", "c"]


def test_small_gap_is_read_through_wide_gap_is_not() -> None:
    points = [u16("a", 0), u16("b", 17), u16("c", 35)]
    # a..b: 16 unused registers (1..16) are cheaper than a request; b..c: 17 are not.
    assert spans(plan_blocks(points, max_gap=16)) == [(3, 0, 18), (3, 35, 1)]
    assert spans(plan_blocks(points, max_gap=0)) == [(3, 0, 1), (3, 17, 1), (3, 35, 1)]


def test_blocks_hold_at_most_125_registers() -> None:
    points = [u16(f"r{i}", 1000 + i) for i in range(300)]
    assert spans(plan_blocks(points)) == [(3, 1000, 125), (3, 1125, 125), (3, 1250, 50)]


def test_a_point_is_never_split_across_blocks() -> None:
    points = [u16(f"r{i}", i) for i in range(124)] + [
        PointSpec("w", 124, PointType.U32)
    ]
    blocks = plan_blocks(points)
    assert spans(blocks) == [(3, 0, 124), (3, 124, 2)]
    assert blocks[1].points[0].name == "w"


def test_smaller_max_block_for_devices_that_need_it() -> None:
    points = [u16(f"r{i}", i) for i in range(100)]
    assert spans(plan_blocks(points, max_block=60)) == [(3, 0, 60), (3, 60, 40)]


def test_holding_and_input_registers_are_planned_apart_holding_first() -> None:
    points = [u16("i", 0, function="input"), u16("h", 0), u16("h2", 1)]
    assert spans(plan_blocks(points)) == [(3, 0, 2), (4, 0, 1)]


def test_overlapping_points_share_registers() -> None:
    points = [PointSpec("both", 10, PointType.U32), u16("hi", 10), u16("lo", 11)]
    blocks = plan_blocks(points)
    assert spans(blocks) == [(3, 10, 2)]
    assert len(blocks[0].points) == 3


def test_plan_does_not_depend_on_the_order_of_the_points() -> None:
    points = [u16(f"r{i}", i * 7) for i in range(80)] + [
        u16(f"i{i}", i * 3, function="input") for i in range(50)
    ]
    expected = plan_blocks(points)
    for seed in range(5):
        shuffled = points[:]
        random.Random(seed).shuffle(shuffled)
        assert plan_blocks(shuffled) == expected


def test_no_points_no_blocks() -> None:
    assert plan_blocks([]) == []


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (PointSpec("sn", 0, PointType.STRING), "needs a length"),
        (PointSpec("big", 0, PointType.STRING, length=126), "do not fit"),
        (PointSpec("end", 65535, PointType.U32), "outside"),
    ],
)
def test_points_that_cannot_be_read_are_template_errors(
    point: PointSpec, message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        plan_blocks([point])


def test_max_block_must_be_a_protocol_size() -> None:
    with pytest.raises(ValueError, match="max_block 126"):
        plan_blocks([u16("a", 0)], max_block=126)


# --- decoding: field case FC-02, SunSpec model 203 -----------------------------------

BASE = 40190  # first payload register of model 203 in FC-02


def fc02_registers() -> list[int]:
    response = next(
        line for line in (DATA / "FC-02.hex").read_text().splitlines() if "<--" in line
    )
    data = parse_hex(response.removeprefix("<--"))
    payload = data[9:]  # MBAP header (7), function, byte count
    assert data[8] == len(payload) == 210
    return [int.from_bytes(payload[i : i + 2], "big") for i in range(0, 210, 2)]


def m203(
    name: str, offset: int, kind: PointType, sf: str | None, unit: str = ""
) -> PointSpec:
    return PointSpec(name, BASE + offset, kind, unit=unit, scale_factor=sf)


S16, U16, ACC32, SSF = PointType.S16, PointType.U16, PointType.ACC32, PointType.SUNSSF

# Offsets from sunspec/models json/model_203.json (105 registers, checked in FC-02).
MODEL_203 = [
    m203("A", 0, S16, "A_SF", "A"),
    m203("AphA", 1, S16, "A_SF", "A"),
    m203("A_SF", 4, SSF, None),
    m203("PhVphA", 6, S16, "V_SF", "V"),
    m203("PPV", 9, S16, "V_SF", "V"),
    m203("V_SF", 13, SSF, None),
    m203("Hz", 14, S16, "Hz_SF", "Hz"),
    m203("Hz_SF", 15, SSF, None),
    m203("W", 16, S16, "W_SF", "W"),
    m203("WphA", 17, S16, "W_SF", "W"),
    m203("WphB", 18, S16, "W_SF", "W"),
    m203("WphC", 19, S16, "W_SF", "W"),
    m203("W_SF", 20, SSF, None),
    m203("VAR", 26, S16, "VAR_SF", "var"),
    m203("VAR_SF", 30, SSF, None),
    m203("PFphA", 32, S16, "PF_SF", "Pct"),
    m203("PF_SF", 35, SSF, None),
    m203("TotWhExp", 36, ACC32, "TotWh_SF", "Wh"),
    m203("TotWhExpPhB", 40, ACC32, "TotWh_SF", "Wh"),
    m203("TotWhImp", 44, ACC32, "TotWh_SF", "Wh"),
    m203("TotWh_SF", 52, SSF, None),
    m203("TotVAhExp", 53, ACC32, "TotVAh_SF", "VAh"),
    m203("TotVAh_SF", 69, SSF, None),
    m203("Evt", 103, PointType.BITFIELD32, None),
]


def read_all(
    points: list[PointSpec], registers: list[int], *, max_block: int
) -> list[tuple[Block, Sequence[int] | Exception]]:
    """Plan, then 'read' each block from the captured register image."""
    reads: list[tuple[Block, Sequence[int] | Exception]] = []
    for block in plan_blocks(points, max_block=max_block):
        reads.append((block, registers[block.address - BASE : block.end - BASE]))
    return reads


def test_fc02_values_with_scale_factors_from_other_blocks() -> None:
    registers = fc02_registers()
    # max_block 20 puts most scale factors in another block than their points.
    reads = read_all(MODEL_203, registers, max_block=20)
    assert len(reads) > 4
    values = {
        r.spec.name: r.value for r in decode_device(MODEL_203, reads, sunspec=True)
    }

    assert values["A"].value == "10.3"
    assert values["AphA"].value == "4.8"
    assert values["PhVphA"].value == "235.49"
    assert values["PPV"].value == "0.00"  # implemented, zero
    assert values["Hz"].value == "49.97"
    assert values["W"].value == "-58"  # int16, export at the grid point
    assert [values[k].value for k in ("WphA", "WphB", "WphC")] == [
        "1087",
        "-123",
        "-1022",
    ]
    assert values["VAR"].value == "-485"
    assert values["PFphA"].value == "-94.99"
    assert values["TotWhExp"].value == "21267458"
    assert values["TotWhImp"].value == "18090016"
    assert values["A_SF"].value == "-1"
    assert values["Evt"].value == "0"


def test_fc02_sentinels_are_not_implemented_never_zero() -> None:
    reads = read_all(MODEL_203, fc02_registers(), max_block=125)
    values = {
        r.spec.name: r.value for r in decode_device(MODEL_203, reads, sunspec=True)
    }
    # TotVAh_SF is 0x8000: every point it scales has no value, not 0.
    assert values["TotVAh_SF"].state is ReadingState.NOT_IMPLEMENTED
    assert values["TotVAhExp"].state is ReadingState.NOT_IMPLEMENTED
    assert values["TotVAhExp"].value is None
    # An acc32 of 0 is SunSpec's "not implemented" (issue 2, section 5). Field case
    # FC-02 lists phase B export as "0 Wh"; this single-phase meter has no phase B.
    assert values["TotWhExpPhB"].state is ReadingState.NOT_IMPLEMENTED


def test_fc02_raw_evidence_text_holds_each_points_registers() -> None:
    reads = read_all(MODEL_203, fc02_registers(), max_block=125)
    raws = {r.spec.name: r.raw for r in decode_device(MODEL_203, reads, sunspec=True)}
    assert raws["W"] == "modbus:fc03:0x9d0e:ffc6"
    assert raws["TotWhExp"] == "modbus:fc03:0x9d22:01448402"


def test_results_come_back_in_the_order_the_points_were_given() -> None:
    points = list(reversed(MODEL_203))
    reads = read_all(points, fc02_registers(), max_block=30)
    assert [r.spec for r in decode_device(points, reads, sunspec=True)] == points


# --- decoding: failures stay with their point or block -------------------------------


def test_a_point_that_fails_to_decode_does_not_stop_the_others() -> None:
    points = [
        PointSpec("nan", 0, PointType.F32),
        u16("ok", 2),
        PointSpec("denormal", 3, PointType.F32),
    ]
    (block,) = plan_blocks(points)
    reads = decode_block(block, [0x7FC0, 0x0000, 7, 0x0000, 0x3F80])
    states = {r.spec.name: (r.value.state, r.value.note) for r in reads}
    assert states["ok"] == (ReadingState.OK, None)
    assert states["nan"][0] is ReadingState.ERROR and "NaN" in str(states["nan"][1])
    assert states["denormal"][0] is ReadingState.ERROR
    assert "word order" in str(states["denormal"][1])


def test_unusable_scale_factor_marks_its_points_with_the_reason() -> None:
    points = [
        PointSpec("P_SF", 0, PointType.SUNSSF),
        PointSpec("P", 1, PointType.S16, scale_factor="P_SF"),
        PointSpec("Q", 2, PointType.S16, scale_factor="Q_SF"),
    ]
    (block,) = plan_blocks(points)
    registers = [40, 100, 5]  # 10^40 is no SunSpec scale factor
    factors, problems = decode_scale_factors([(block, registers)])
    assert factors == {} and "outside -10..10" in problems["P_SF"]
    reads = decode_block(
        block, registers, scale_factors=factors, scale_factor_problems=problems
    )
    by_name = {r.spec.name: r.value for r in reads}
    assert by_name["P"].state is ReadingState.ERROR
    assert "P_SF is unusable" in str(by_name["P"].note)
    assert by_name["Q"].state is ReadingState.ERROR  # its scale factor was never read
    assert "Q_SF was not read" in str(by_name["Q"].note)


def test_a_refused_block_marks_only_its_own_points() -> None:
    points = [u16("a", 0), u16("far", 500)]
    first, second = plan_blocks(points)
    refused = ExceptionResponse(2, 3, 1, 500)
    reads = decode_device(points, [(first, [42]), (second, refused)])
    assert reads[0].value.value == "42"
    assert reads[1].value.state is ReadingState.ERROR
    assert "illegal data address" in str(reads[1].value.note)
    assert reads[1].raw == "modbus:fc03:0x01f4:8302"


def test_scale_and_fixed_multiplier() -> None:
    point = PointSpec("E", 0, PointType.U32, scale=Decimal("0.01"))
    (block,) = plan_blocks([point])
    (read,) = decode_block(block, [0x0001, 0x0000])
    assert read.value.value == "655.36"


def test_wrong_register_count_for_a_block_is_a_decode_error() -> None:
    (block,) = plan_blocks([u16("a", 0), u16("b", 1)])
    with pytest.raises(DecodeError, match="needs 2 registers, got 1"):
        decode_block(block, [1])
