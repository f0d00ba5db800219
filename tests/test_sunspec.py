"""SunSpec: model definitions, discovery, whole-model decoding, templates, images.

Field cases FC-02 and FC-03 (tests/data/sunspec, from a SolarEdge site) are replayed
through :class:`CapturedDevice`, a reader that answers only registers the captured
responses hold and fails on anything else, so the walk is checked request by request.
The integration tests run discovery over a real TCP connection, through a pymodbus
client, to a pymodbus server serving images built by ``SunSpecImage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from conftest import DATA, free_port
from ies_drivers.errors import (
    DecodeError,
    DeviceTimeout,
    ExceptionResponse,
    TemplateError,
    TransportError,
)
from ies_drivers.modbus.codec import PointValue, decode_point, decode_scale_factor
from ies_drivers.modbus.model import DeviceTemplate, PointType
from ies_drivers.reading import ReadingState
from ies_drivers.sunspec.discovery import (
    BrokenChainError,
    DiscoveredModel,
    MarkerNotFoundError,
    decode_model,
    discover,
    load_obis_map,
    load_profile,
    plausibility_flags,
    read_model,
    template_for,
    walk_models,
)
from ies_drivers.sunspec.image import SunSpecImage
from ies_drivers.sunspec.models import (
    ModelDefinitionError,
    UnknownModelError,
    model_definition,
    parse_model,
)

SUNSPEC_DATA = DATA / "sunspec"
ROOT = Path(__file__).resolve().parent.parent
DEVICES = ROOT / "configs" / "devices"
OK = ReadingState.OK
NOT_IMPLEMENTED = ReadingState.NOT_IMPLEMENTED

# --- captured frames ------------------------------------------------------------------


class NotInTraceError(LookupError):
    """The walk asked for registers the captured trace does not show."""


def load_frames(name: str) -> list[tuple[str, bytes]]:
    """Return the (direction, MBAP frame) pairs of a captured trace file."""
    frames = []
    for line in (SUNSPEC_DATA / name).read_text().splitlines():
        if line.startswith(("-->", "<--")):
            frames.append((line[:3], bytes.fromhex(line[3:])))
    return frames


class CapturedDevice:
    """Answers reads from the registers that captured responses hold, nothing else.

    Requests and responses are paired by MBAP transaction id; ``inferred`` gives the
    (address, count) of a response whose request line was not published. Every frame
    is checked (MBAP length, unit, function 3, byte count) before it is used.
    """

    def __init__(
        self, *traces: str, inferred: dict[int, tuple[int, int]] | None = None
    ) -> None:
        self.memory: dict[int, int] = {}
        self.asked: list[tuple[int, int]] = []
        self.unit = 1
        requests = dict(inferred or {})
        for trace in traces:
            for direction, frame in load_frames(trace):
                tid, length, unit = (
                    int.from_bytes(frame[0:2], "big"),
                    int.from_bytes(frame[4:6], "big"),
                    frame[6],
                )
                assert length == len(frame) - 6, f"MBAP length of {frame.hex()}"
                assert unit == self.unit and frame[7] == 3
                if direction == "-->":
                    address = int.from_bytes(frame[8:10], "big")
                    count = int.from_bytes(frame[10:12], "big")
                    requests[tid] = (address, count)
                    continue
                address, count = requests[tid]
                assert frame[8] == 2 * count, "byte count must match the request"
                data = frame[9:]
                for i in range(count):
                    self.memory[address + i] = int.from_bytes(data[2 * i : 2 * i + 2])

    async def read_registers(
        self, unit: int, function: str, address: int, count: int
    ) -> list[int]:
        """Answer from captured registers; raise NotInTraceError for anything else."""
        self.asked.append((address, count))
        assert unit == self.unit and function == "holding"
        wanted = range(address, address + count)
        if not all(a in self.memory for a in wanted):
            raise NotInTraceError(
                f"{count} registers at {address} are not in the trace"
            )
        return [self.memory[a] for a in wanted]


def fc03_device() -> CapturedDevice:
    # FC-03: the response with transaction id 0x79 answers the read at 41184 (0xA0E0),
    # inferred in the field case from the next request (41218 = 41184 + 2 + 32).
    return CapturedDevice("FC-03.hex", "FC-02.hex", inferred={0x79: (41184, 2)})


# FC-02 table, values as the field case states them (model units: PF in percent).
FC02_VALUES = {
    "A": "10.3",
    "AphA": "4.8",
    "AphB": "0.8",
    "AphC": "4.6",
    "PhV": "235.49",
    "PhVphA": "235.49",
    "PhVphB": "236.31",
    "PhVphC": "231.45",
    "PPV": "0.00",
    "PhVphAB": "0.00",
    "PhVphBC": "0.00",
    "PhVphCA": "0.00",
    "Hz": "49.97",
    "W": "-58",
    "WphA": "1087",
    "WphB": "-123",
    "WphC": "-1022",
    "VA": "488",
    "VAphA": "1110",
    "VAphB": "148",
    "VAphC": "1037",
    "VAR": "-485",
    "VARphA": "-226",
    "VARphB": "-81",
    "VARphC": "-177",
    "PF": "20.63",
    "PFphA": "-94.99",
    "PFphB": "64.70",
    "PFphC": "92.19",
    "TotWhExp": "21267458",
    "TotWhExpPhA": "22962260",
    "TotWhImp": "18090016",
    "TotWhImpPhA": "2684392",
    "TotWhImpPhB": "5486114",
    "TotWhImpPhC": "11614311",
    "Evt": "0",
}


# --- FC-02 / FC-03 --------------------------------------------------------------------


async def test_fc03_walk_reads_header_after_header_from_suns() -> None:
    device = fc03_device()

    # The published walk stops after model 101; the next header must be asked at
    # 40069 + 2 + 50 = 40121, which the trace does not show.
    with pytest.raises(NotInTraceError):
        await discover(device, 1)
    assert device.asked == [(40000, 2), (40002, 2), (40069, 2), (40121, 2)]


async def test_fc03_walk_stops_at_end_marker_and_reads_nothing_after() -> None:
    device = fc03_device()

    models = await walk_models(device, 1, 41184)

    assert [(m.model_id, m.address, m.length) for m in models] == [
        (711, 41184, 32),
        (712, 41218, 44),
        (713, 41264, 7),
    ]
    assert device.asked == [(41184, 2), (41218, 2), (41264, 2), (41273, 2)]
    assert all(m.definition is not None for m in models)


async def test_fc03_meter_common_block_strings_are_trimmed() -> None:
    device = fc03_device()
    common = DiscoveredModel(1, 40121, 65, model_definition(1))

    values = await read_model(device, 1, common)

    assert device.asked == [(40123, 65)]
    assert {k: v.value for k, v in values.items()} == {
        "Mn": "SolarEdge",
        "Md": "SE-RGMTR-1D-240C-A",
        "Opt": "Export+Import",
        "Vr": "0",
        "SN": "0",
        "DA": "2",
    }
    # The 66th register of the captured read is the ID of the next model (FC-02's).
    assert device.memory[40188] == 203


async def test_fc02_model_203_block_decodes_to_the_field_case_table() -> None:
    device = fc03_device()
    meter = DiscoveredModel(203, 40188, 105, model_definition(203))

    values = await read_model(device, 1, meter)

    assert device.asked == [(40190, 105)]
    assert {k: values[k].value for k in FC02_VALUES} == FC02_VALUES
    assert all(values[k].state is OK for k in FC02_VALUES)
    # Scale factor 0x8000: every TotVAh* and TotVArh* point has no value, not 0.
    unscaled = [k for k in values if k.startswith(("TotVAh", "TotVArh"))]
    assert len(unscaled) == 8 + 1 + 16 + 1
    assert all(values[k].state is NOT_IMPLEMENTED for k in unscaled)
    assert all(values[k].value is None for k in unscaled)
    # acc32 0 is SunSpec's "not implemented" (issue 2 point 5, the SunSpec model
    # spec, pysunspec2): TotWhExpPhB/C hold 0 and get no value. The FC-02 table
    # writes them as 0 Wh; the sentinel rule wins, as for every accumulator.
    for name in ("TotWhExpPhB", "TotWhExpPhC"):
        assert device.memory[40190 + model_definition(203).point(name).offset - 2] == 0
        assert values[name] == PointValue(None, NOT_IMPLEMENTED, "sentinel")


async def test_fc02_plausibility_flags_without_changing_values() -> None:
    device = fc03_device()
    meter = DiscoveredModel(203, 40188, 105, model_definition(203))
    values = await read_model(device, 1, meter)

    flags = plausibility_flags(203, values)

    assert flags == [
        "TotWhImpPhA + TotWhImpPhB + TotWhImpPhC = 19784817 differs from "
        "TotWhImp = 18090016",
        "TotWhExpPhA = 22962260 is larger than TotWhExp = 21267458",
    ]
    assert values["TotWhExp"].value == "21267458"
    assert plausibility_flags(103, values) == []


def solaredge_chain() -> list[DiscoveredModel]:
    """The chain FC-03 shows up to the meter (model 203's L from FC-02's full read)."""
    return [
        DiscoveredModel(1, 40002, 65, model_definition(1)),
        DiscoveredModel(101, 40069, 50, model_definition(101)),
        DiscoveredModel(1, 40121, 65, model_definition(1), occurrence=2),
        DiscoveredModel(203, 40188, 105, model_definition(203)),
    ]


def decode_template(
    template: DeviceTemplate, memory: dict[int, int]
) -> dict[str, PointValue]:
    """Decode every template point from a register map, scale factors first."""

    def regs(address: int, count: int) -> list[int]:
        return [memory[a] for a in range(address, address + count)]

    factors = {
        p.name: decode_scale_factor(p, regs(p.address, p.count))
        for p in template.points
        if p.type is PointType.SUNSSF
    }
    return {
        p.name: decode_point(
            p, regs(p.address, p.count), sunspec=True, scale_factors=factors
        )
        for p in template.points
    }


async def test_meter_template_decodes_fc02_with_obis_units_and_cumulative() -> None:
    device = fc03_device()
    profile = load_profile(DEVICES / "sunspec-meter.toml")

    template = template_for(solaredge_chain(), profile=profile)
    # The trace holds the meter's registers, not the inverter's own common block.
    meter_points = tuple(
        p for p in template.points if p.name.startswith(("203.", "1#2."))
    )
    values = decode_template(
        DeviceTemplate("meter", "", "", "meter", meter_points, sunspec=True),
        device.memory,
    )

    assert template.id == "sunspec-meter" and template.sunspec
    assert not any(p.name.startswith("101.") for p in template.points)
    w = template.point("203.W")
    assert (w.address, w.scale_factor, w.obis, w.unit) == (
        40206,
        "203.W_SF",
        "1-0:16.7.0*255",
        "W",
    )
    assert values["203.W"].value == "-58"
    # OBIS 13.7.0 is a ratio: the map scales the model's percent by 0.01.
    pf = template.point("203.PF")
    assert (pf.obis, pf.unit) == ("1-0:13.7.0*255", "")
    assert values["203.PF"].value == "0.2063"
    assert values["203.PFphA"].value == "-0.9499"
    imp = template.point("203.TotWhImp")
    assert (imp.obis, imp.unit, imp.cumulative, imp.type) == (
        "1-0:1.8.0*255",
        "Wh",
        True,
        PointType.ACC32,
    )
    assert values["203.TotWhImp"].value == "18090016"
    assert template.point("203.TotWhExp").cumulative
    assert values["203.TotVAhImp"].state is NOT_IMPLEMENTED
    assert values["1#2.Md"].value == "SE-RGMTR-1D-240C-A"
    assert not template.point("203.VAR").obis  # signed reactive power: no OBIS


def test_inverter_template_addresses_match_solaredge_register_map() -> None:
    profile = load_profile(DEVICES / "sunspec-inverter.toml")

    template = template_for(solaredge_chain(), profile=profile)

    # SolarEdge "SunSpec implementation technical note", protocol addresses.
    addresses = {p.name: p.address for p in template.points}
    assert {
        k: addresses[k]
        for k in (
            "1.Mn",
            "1.Md",
            "1.Vr",
            "1.SN",
            "101.A",
            "101.A_SF",
            "101.W",
            "101.W_SF",
            "101.Hz",
            "101.WH",
            "101.WH_SF",
            "101.St",
        )
    } == {
        "1.Mn": 40004,
        "1.Md": 40020,
        "1.Vr": 40044,
        "1.SN": 40052,
        "101.A": 40071,
        "101.A_SF": 40075,
        "101.W": 40083,
        "101.W_SF": 40084,
        "101.Hz": 40085,
        "101.WH": 40093,
        "101.WH_SF": 40095,
        "101.St": 40107,
    }
    wh = template.point("101.WH")
    assert (wh.type, wh.cumulative, wh.obis) == (PointType.ACC32, True, "1-0:2.8.0*255")
    assert not any(p.name.startswith("203.") for p in template.points)
    # Model 1 of length 65 (older revision, no Pad) and its second occurrence.
    assert template.point("1#2.DA").address == 40187
    assert len({p.name for p in template.points}) == len(template.points)


def test_template_with_no_selected_model_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"offers models \[1, 101, 203\]"):
        template_for(solaredge_chain(), select=[201, 204])


# --- model definitions ----------------------------------------------------------------


def shipped_model_ids() -> list[int]:
    folder = resources.files("sunspec2").joinpath("models", "json")
    names = [p.name for p in folder.iterdir() if p.name.startswith("model_")]
    return sorted(int(n[len("model_") : -len(".json")]) for n in names)


def test_every_shipped_model_parses_with_consistent_offsets() -> None:
    ids = shipped_model_ids()
    assert len(ids) > 100

    for model_id in ids:
        model = model_definition(model_id)
        ends = [p.offset + p.size for p in model.points]
        assert model.id == model_id
        assert ends == sorted(ends) and (not ends or ends[-1] == 2 + model.length)

    assert (model_definition(1).length, model_definition(103).length) == (66, 50)
    assert model_definition(203).length == 105
    assert model_definition(705).undecoded == ("Crv",)


def test_repeating_group_instances_follow_the_fixed_block() -> None:
    mppt = model_definition(160)

    placed = {p.name: p for p in mppt.layout(8 + 2 * 20)}

    assert mppt.instances(48) == 2
    # header 2 + fixed 8, then per module: ID (1), IDStr (8), DCA ...
    assert placed["module[1].DCA"].offset == 10 + 9
    assert placed["module[2].DCA"].offset == 10 + 20 + 9
    assert placed["module[2].DCA"].scale_factor == "DCA_SF"
    assert placed["module[2].DCA"].key == "module.DCA"
    assert "module[3].DCA" not in placed


def test_fixed_sub_groups_are_flattened_with_parent_scale_factors() -> None:
    der = model_definition(704)

    point = der.point("PFWInj.PF")

    assert point.scale_factor == "PF_SF"
    assert der.length == 65


def test_unknown_and_malformed_models_raise_typed_errors() -> None:
    with pytest.raises(UnknownModelError, match="model 64999"):
        model_definition(64999)
    with pytest.raises(UnknownModelError):
        model_definition(0)
    header = [
        {"name": "ID", "type": "uint16", "size": 1},
        {"name": "L", "type": "uint16", "size": 1},
    ]
    cases: dict[str, dict[str, Any]] = {
        "ID/L header": {"id": 9, "group": {"name": "x", "points": header[1:]}},
        "unknown type": {
            "id": 9,
            "group": {"points": [*header, {"name": "W", "type": "int17", "size": 1}]},
        },
        "takes 2 registers, size says 1": {
            "id": 9,
            "group": {"points": [*header, {"name": "W", "type": "int32", "size": 1}]},
        },
        "names no point": {
            "id": 9,
            "group": {
                "points": [
                    *header,
                    {"name": "W", "type": "int16", "size": 1, "sf": "W_SF"},
                ]
            },
        },
        "integer 'id'": {"group": {}},
    }
    for what, document in cases.items():
        with pytest.raises(ModelDefinitionError, match=what):
            parse_model(document, source="bad.json")


# --- decoding and sentinels -----------------------------------------------------------


def payload(image: SunSpecImage, model_id: int, length: int) -> list[int]:
    start = image.model_address(model_id) - image.base_address + 2
    return image.registers()[start : start + length]


def test_unset_points_of_every_type_decode_as_not_implemented() -> None:
    # One model per family: strings, integers with scale factors, floats (NaN), a
    # repeating group (uint32, enum16, bitfield32), int32 controls.
    image = SunSpecImage()
    lengths = {1: 66, 103: 50, 113: 60, 160: 8 + 3 * 20, 203: 105, 704: 65}
    for model_id in lengths:
        image.add_model(model_id, repeats=3 if model_id == 160 else 0)

    for model_id, length in lengths.items():
        values = decode_model(
            model_definition(model_id),
            image.model_address(model_id),
            payload(image, model_id, length),
        )
        numbers = {k: v for k, v in values.items() if v.state is not NOT_IMPLEMENTED}
        assert numbers == ({"N": PointValue("3", OK)} if model_id == 160 else {})
        assert all(v.value is None for k, v in values.items() if k != "N")


def test_signed_scale_factors_and_values() -> None:
    image = SunSpecImage()
    address = image.add_model(
        103,
        {"W": -1234, "W_SF": -1, "A": 1432, "A_SF": -2, "WH": 7, "WH_SF": 3},
    )

    values = decode_model(model_definition(103), address, payload(image, 103, 50))

    assert (values["W"].value, values["A"].value) == ("-123.4", "14.32")
    assert values["WH"].value == "7000"
    assert values["W_SF"].value == "-1"


def test_float_model_values_and_nan_sentinel() -> None:
    image = SunSpecImage()
    address = image.add_model(113, {"W": 4321.5, "Hz": 50.02})

    values = decode_model(model_definition(113), address, payload(image, 113, 60))

    assert (values["W"].value, values["Hz"].value) == ("4321.5", "50.02")
    assert values["VA"] == PointValue(None, NOT_IMPLEMENTED, "sentinel")


def test_bad_scale_factor_marks_its_points_and_spares_the_rest() -> None:
    image = SunSpecImage()
    address = image.add_model(103, {"W": 100, "W_SF": 11, "Hz": 5000, "Hz_SF": -2})

    values = decode_model(model_definition(103), address, payload(image, 103, 50))

    assert values["W"].state is ReadingState.ERROR
    assert "outside -10..10" in (values["W"].note or "")
    assert values["W_SF"].state is ReadingState.ERROR
    assert values["Hz"] == PointValue("50.00", OK)


def test_decode_model_needs_registers_for_its_length() -> None:
    with pytest.raises(DecodeError, match="L = 105 but only 104"):
        decode_model(model_definition(203), 40188, [0] * 104, length=105)


def test_shorter_model_revision_leaves_out_missing_points() -> None:
    image = SunSpecImage()
    address = image.add_model(1, {"Mn": "X", "DA": 3}, length=65)

    values = decode_model(model_definition(1), address, payload(image, 1, 65))

    assert values["DA"].value == "3" and "Pad" not in values
    assert image.registers()[3] == 65


# --- maps and template files ----------------------------------------------------------


def test_obis_map_marks_energy_accumulators_cumulative() -> None:
    obis = load_obis_map()

    for model_id, point in ((103, "WH"), (203, "TotWhImp"), (203, "TotWhExp")):
        mapping = obis.get(model_id, point)
        assert mapping is not None and mapping.cumulative
    assert obis.get(160, "module.DCWH") is not None
    assert obis.unit_for("Pct") == "%"


def test_obis_map_errors_name_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "obis.toml"
    bad.write_text(
        '[units]\nPct = "%"\n\n[[models]]\nids = [203]\n[models.points]\n'
        'W = { obis = "16.7.0" }\n'
    )

    with pytest.raises(TemplateError) as caught:
        load_obis_map(bad)

    assert str(caught.value).startswith(f"{bad}:7: key models[0].points.W.obis")
    assert "expected an OBIS code" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[template]\nid = 'x'\n", ":1: key template.manufacturer"),
        (
            "[template]\nid='x'\nmanufacturer='m'\nmodel='m'\nkind='meter'\n"
            "sunspec=true\n[sunspec]\nmodels = []\n",
            ":8: key sunspec.models: expected a non-empty list",
        ),
        (
            "[template]\nid='x'\nmanufacturer='m'\nmodel='m'\nkind='meter'\n"
            "sunspec=true\n[sunspec]\nmodels = [203]\nbase = [0]\n",
            ":9: key sunspec.base: expected only models",
        ),
        ("[template\n", "not valid TOML"),
    ],
)
def test_profile_errors_name_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "sunspec-x.toml"
    path.write_text(text)

    with pytest.raises(TemplateError, match=expected.replace("[", r"\[")):
        load_profile(path)


def test_shipped_templates_load() -> None:
    inverter = load_profile(DEVICES / "sunspec-inverter.toml")
    meter = load_profile(DEVICES / "sunspec-meter.toml")

    assert (inverter.kind, meter.kind) == ("inverter", "meter")
    assert 103 in inverter.models and 203 in meter.models
    assert inverter.base_addresses == meter.base_addresses == (40000, 0, 50000)


# --- image builder --------------------------------------------------------------------


def test_image_layout_addresses_and_updates() -> None:
    image = SunSpecImage(50000)
    first = image.add_model(1, {"Mn": "IES"})
    second = image.add_model(203, {"W": -58})

    image.set(203, "W", 1200)
    registers = image.registers()

    assert registers[:2] == [0x5375, 0x6E53] and registers[-2:] == [0xFFFF, 0]
    assert (first, second) == (50002, 50002 + 2 + 66)
    assert image.address_of(203, "W") == second + 2 + 16
    assert registers[image.address_of(203, "W") - 50000] == 1200
    assert registers[image.address_of(1, "Mn") - 50000] == 0x4945  # "IE"


def test_image_refuses_what_a_device_could_not_hold() -> None:
    image = SunSpecImage()
    with pytest.raises(ValueError, match="no point Foo"):
        image.add_model(203, {"Foo": 1})
    with pytest.raises(ValueError, match="does not fit 16 bits"):
        image.add_model(203, {"W": 70000})
    with pytest.raises(ValueError, match="holds 32 characters"):
        image.add_model(1, {"Mn": "x" * 33})
    with pytest.raises(ValueError, match="no room"):
        SunSpecImage(65534)
    with pytest.raises(ValueError, match="no model 103"):
        image.address_of(103, "W")


# --- real pymodbus server over TCP ----------------------------------------------------


class PymodbusReader:
    """A real pymodbus TCP client as a RegisterReader; its errors mapped to ours."""

    def __init__(self, client: AsyncModbusTcpClient) -> None:
        self.client = client
        self.reads = 0

    async def read_registers(
        self, unit: int, function: str, address: int, count: int
    ) -> list[int]:
        self.reads += 1
        try:
            if function == "holding":
                answer = await self.client.read_holding_registers(
                    address, count=count, device_id=unit
                )
            else:
                answer = await self.client.read_input_registers(
                    address, count=count, device_id=unit
                )
        except ModbusIOException as exc:
            raise DeviceTimeout(f"unit {unit}: no answer at {address}") from exc
        except ConnectionException as exc:
            raise TransportError(str(exc)) from exc
        if answer.isError():
            raise ExceptionResponse(answer.exception_code, 3, unit, address)
        return list(answer.registers)


@contextlib.asynccontextmanager
async def modbus_server(
    blocks: Sequence[tuple[int, list[int]]], unit: int = 1
) -> AsyncIterator[int]:
    """Serve register ``blocks`` (address, registers) on a free loopback port."""
    port = free_port()
    device = SimDevice(
        id=unit,
        simdata=[
            SimData(address=a, values=regs, datatype=DataType.REGISTERS)
            for a, regs in blocks
        ],
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    try:
        yield port
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def tcp_reader(
    port: int, timeout_s: float = 1.0
) -> AsyncIterator[PymodbusReader]:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=timeout_s, retries=0, reconnect_delay=0
    )
    assert await client.connect()
    try:
        yield PymodbusReader(client)
    finally:
        client.close()


def inverter_site_image(base: int) -> SunSpecImage:
    """A three-phase inverter with a wye meter, as the demo serves one."""
    image = SunSpecImage(base)
    image.add_model(
        1,
        {"Mn": "IES Sim", "Md": "INV-3P-10K", "Vr": "1.2.3", "SN": "SIM0001", "DA": 1},
    )
    image.add_model(
        103,
        {
            "A": 1432,
            "AphA": 478,
            "AphB": 477,
            "AphC": 477,
            "A_SF": -2,
            "PhVphA": 2301,
            "PhVphB": 2298,
            "PhVphC": 2312,
            "V_SF": -1,
            "W": 9870,
            "W_SF": 0,
            "Hz": 5001,
            "Hz_SF": -2,
            "VA": 9990,  # its VA_SF stays 0x8000: VA is "not implemented"
            "PF": -987,
            "PF_SF": -1,
            "WH": 123456789,
            "WH_SF": 0,
            "St": 4,
        },
    )
    image.add_model(
        203,
        {
            "W": -2150,
            "WphA": -700,
            "WphB": -725,
            "WphC": -725,
            "W_SF": 0,
            "TotWhImp": 5000123,
            "TotWhExp": 912345,
            "TotWh_SF": 1,
            "Hz": 4999,
            "Hz_SF": -2,
        },
    )
    return image


EXPECTED_SITE = {
    "1.Mn": "IES Sim",
    "1.SN": "SIM0001",
    "103.A": "14.32",
    "103.PhVphC": "231.2",
    "103.W": "9870",
    "103.Hz": "50.01",
    "103.PF": "-98.7",
    "103.WH": "123456789",
    "103.St": "4",
    "203.W": "-2150",
    "203.TotWhImp": "50001230",
    "203.TotWhExp": "9123450",
    "203.Hz": "49.99",
}
NOT_IMPLEMENTED_SITE = ("1.Opt", "103.VA", "103.DCA", "103.TmpCab", "203.TotVAhImp")


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovery_over_tcp_finds_models_and_values_equal_the_image(
    base: int,
) -> None:
    image = inverter_site_image(base)

    async with (
        modbus_server([(base, image.registers())]) as port,
        tcp_reader(port) as reader,
    ):
        models = await discover(reader, 1)
        decoded = {
            f"{m.prefix}.{name}": value
            for m in models
            for name, value in (await read_model(reader, 1, m)).items()
        }

    assert [m.model_id for m in models] == [1, 103, 203]
    assert [m.address for m in models] == [
        image.model_address(1),
        image.model_address(103),
        image.model_address(203),
    ]
    assert {k: decoded[k].value for k in EXPECTED_SITE} == EXPECTED_SITE
    for name in NOT_IMPLEMENTED_SITE:
        assert decoded[name].state is NOT_IMPLEMENTED and decoded[name].value is None


async def test_template_points_read_over_tcp_equal_the_image() -> None:
    image = inverter_site_image(40000)

    async with (
        modbus_server([(40000, image.registers())]) as port,
        tcp_reader(port) as reader,
    ):
        template = template_for(await discover(reader, 1))
        memory: dict[int, int] = {}
        start, end = 40000, 40000 + len(image.registers())
        for address in range(start, end, 125):
            count = min(125, end - address)
            regs = await reader.read_registers(1, "holding", address, count)
            memory.update(zip(range(address, address + count), regs, strict=True))

    values = decode_template(template, memory)
    for name, point in ((p.name, p) for p in template.points):
        model, _, point_name = name.partition(".")
        assert point.address == image.address_of(int(model), point_name)
    expected = dict(EXPECTED_SITE, **{"103.PF": "-0.987"})  # OBIS ratio
    assert {k: values[k].value for k in expected} == expected
    assert values["103.VA"].state is NOT_IMPLEMENTED


async def test_device_without_suns_gives_a_clear_error() -> None:
    async with (
        modbus_server([(40000, [0] * 10)]) as port,
        tcp_reader(port) as reader,
    ):
        with pytest.raises(MarkerNotFoundError) as caught:
            await discover(reader, 1)

    message = str(caught.value)
    assert "unit 1 has no SunSpec marker 'SunS'" in message
    assert "40000: 0x0000 0x0000" in message
    assert "0: exception 2 (illegal data address)" in message
    assert "50000: exception 2" in message
    assert caught.value.attempts.keys() == {40000, 0, 50000}


async def test_silent_device_is_a_timeout_not_a_missing_marker() -> None:
    port = free_port()
    connections: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connections.append(writer)
        await reader.read()  # until the client hangs up

    listener = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", port)
    try:
        async with tcp_reader(port, timeout_s=0.2) as reader:
            with pytest.raises(DeviceTimeout):
                await discover(reader, 1, base_addresses=(40000, 0))
            assert reader.reads == 2
    finally:
        for writer in connections:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_broken_chain_and_walk_bounds_over_tcp() -> None:
    suns = [0x5375, 0x6E53]
    zero_id = [*suns, 1, 4, 0, 0, 0, 0, 0, 3, 0, 0, 0]
    loop = SunSpecImage(0)
    for _ in range(5):
        loop.add_raw_model(64999, [1, 2])
    async with (
        modbus_server(
            [(40000, zero_id), (0, loop.registers()), (65500, [*suns, 1, 40])]
        ) as port,
        tcp_reader(port) as reader,
    ):
        with pytest.raises(BrokenChainError, match="model id 0 at 40008") as caught:
            await discover(reader, 1)
        assert [m.address for m in caught.value.found] == [40002]

        with pytest.raises(BrokenChainError, match="no end marker after 3 models"):
            await discover(reader, 1, base_addresses=[0], max_models=3)
        vendor = await discover(reader, 1, base_addresses=[0])

        with pytest.raises(BrokenChainError, match="past register 65535"):
            await discover(reader, 1, base_addresses=[65500])

    assert [(m.model_id, m.occurrence, m.definition) for m in vendor][-1] == (
        64999,
        5,
        None,
    )
    assert vendor[1].prefix == "64999#2"


async def test_map_that_ends_without_end_marker_ends_the_walk() -> None:
    image = SunSpecImage()
    image.add_model(1, {"Mn": "X"})
    image.add_model(203, {"W": 5})
    registers = image.registers()[:-2]  # no 0xFFFF 0x0000: memory simply ends

    async with (
        modbus_server([(40000, registers)]) as port,
        tcp_reader(port) as reader,
    ):
        models = await discover(reader, 1)

    assert [m.model_id for m in models] == [1, 203]


def test_pysunspec2_reference_device_model_701() -> None:
    # The SunSpec Alliance's test device (pysunspec2 tests/test_data/device_1547.json):
    # its raw model 701 values, put into an image, decode to raw x 10^sf.
    text = (
        resources.files("sunspec2")
        .joinpath("tests", "test_data", "device_1547.json")
        .read_text()
    )
    raw = next(m for m in json.loads(text)["models"] if m["ID"] == 701)
    definition = model_definition(701)
    known = {p.name for p in definition.layout()}
    given = {k: v for k, v in raw.items() if k in known and v is not None}
    image = SunSpecImage()
    address = image.add_model(701, given)

    values = decode_model(definition, address, payload(image, 701, definition.length))

    assert values["W"].value == "9800"
    assert values["Hz"].value == "60.010"
    assert values["PF"].value == "0.985"
    assert values["TotWhInj"].value == "150000"
    assert values["TmpCab"].value == "55.0"
    assert Decimal(values["A"].value or "nan") == Decimal("41.1")
