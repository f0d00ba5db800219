"""Device templates: the shipped ones decode published register images; broken ones
fail with the file, line and key; lookup order; the TOML key locator.

Register images come from vendor manuals and public traces (tests/data/templates,
sources cited per vector). No peer is needed: templates are pure data and the codec
is pure functions.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

import ies_drivers.templates as templates_module
from conftest import DATA
from ies_drivers.errors import TemplateError
from ies_drivers.modbus.codec import decode_point
from ies_drivers.modbus.model import PointType
from ies_drivers.reading import ReadingState
from ies_drivers.templates import (
    InvalidTemplateError,
    TemplateNotFoundError,
    find_template,
    find_template_file,
    list_templates,
    load_template,
    load_template_file,
    shipped_configs_dir,
    shipped_templates_dir,
)
from ies_drivers.tomlsource import (
    TomlSyntaxError,
    format_key_path,
    parse_key_path,
    parse_toml,
)

VECTORS = DATA / "templates"
FUNCTION_CODES = {"holding": 3, "input": 4}


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), as sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_frame(text: str) -> bytes:
    """Return the bytes of a hex frame and check its CRC."""
    frame = bytes.fromhex(text)
    assert int.from_bytes(frame[-2:], "little") == crc16_modbus(frame[:-2]), text
    return frame


def load_vectors() -> list[tuple[str, dict[str, object]]]:
    cases = []
    for path in sorted(VECTORS.glob("*.vectors.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for vector in data["vectors"]:
            cases.append((data["template"], vector))
    return cases


# --- shipped templates ---------------------------------------------------------------


def test_every_shipped_template_loads_with_a_source() -> None:
    names = list_templates()
    assert {"eastron-sdm630", "rish-master-3430"} <= set(names)
    for name in names:
        loaded = find_template_file(name)
        assert loaded.template.id == name
        assert loaded.template.source.strip()
        if loaded.template.sunspec:
            assert loaded.template.points == ()
            assert loaded.sunspec_models, f"{name}: no [sunspec] models"
        else:
            assert loaded.template.points, f"{name}: no points"


def test_every_plain_modbus_template_has_published_register_images() -> None:
    covered = {template for template, _ in load_vectors()}
    for name in list_templates():
        if not find_template(name).sunspec:
            assert name in covered, f"{name}: no tests/data/templates/*.vectors.toml"


@pytest.mark.parametrize(
    ("template_id", "vector"),
    load_vectors(),
    ids=lambda v: v if isinstance(v, str) else str(v.get("stated", ""))[:40],
)
def test_template_decodes_published_register_image(
    template_id: str, vector: dict[str, object]
) -> None:
    template = find_template(template_id)
    request = rtu_frame(str(vector["request"]))
    response = rtu_frame(str(vector["response"]))
    unit, function = request[0], request[1]
    start = int.from_bytes(request[2:4], "big")
    count = int.from_bytes(request[4:6], "big")

    # The response answers this request with `count` registers.
    assert response[:2] == bytes([unit, function])
    assert response[2] == 2 * count == len(response) - 5
    data = response[3:-2]
    registers = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]

    expect = vector["expect"]
    assert isinstance(expect, dict) and expect
    for name, stated in expect.items():
        spec = template.point(name)
        # The template asks for this quantity where the publisher did.
        assert FUNCTION_CODES[spec.function] == function
        assert start <= spec.address and spec.end <= start + count
        offset = spec.address - start
        value = decode_point(spec, registers[offset : offset + spec.count])
        assert value.state is ReadingState.OK
        assert value.value is not None
        stated_value = Decimal(stated)
        assert Decimal(value.value).quantize(stated_value) == stated_value


def test_sdm630_map_follows_the_vendor_register_numbers() -> None:
    # Eastron numbers input registers 30001, 30003, ...; the template holds protocol
    # addresses (number - 30001). Spot checks against the vendor table.
    template = find_template("eastron-sdm630")
    vendor = {
        "voltage_l1": 30001,
        "current_l1": 30007,
        "power_active_total": 30053,
        "frequency": 30071,
        "energy_active_import": 30073,
        "energy_active_export": 30075,
        "current_neutral": 30225,
    }
    for name, number in vendor.items():
        spec = template.point(name)
        assert spec.address == number - 30001
        assert (spec.function, spec.type, spec.order) == (
            "input",
            PointType.F32,
            "ABCD",
        )
    assert template.max_block == 80


def test_shipped_meters_mark_energy_cumulative_with_obis() -> None:
    for name in ("eastron-sdm630", "rish-master-3430"):
        template = find_template(name)
        cumulative = [p for p in template.points if p.cumulative]
        assert {p.obis for p in cumulative} >= {"1-0:1.8.0*255", "1-0:2.8.0*255"}
        for point in cumulative:
            assert point.obis is not None and point.obis.split(".")[1] == "8"
            assert point.unit.endswith("h")
        voltage = template.point("voltage_l1")
        assert (voltage.obis, voltage.unit) == ("1-0:32.7.0*255", "V")
        assert template.point("frequency").obis == "1-0:14.7.0*255"


# --- finding templates ---------------------------------------------------------------


def test_shipped_configs_dir_is_found_in_the_checkout() -> None:
    configs = shipped_configs_dir()
    assert (configs / "devices" / "eastron-sdm630.toml").is_file()
    assert shipped_templates_dir() == configs / "devices"


def test_shipped_configs_dir_is_found_in_a_wheel_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed wheel puts configs/ at site-packages/ies_agent/_configs, beside
    # ies_drivers. Copy the module into that layout and ask it.
    site = tmp_path / "site-packages"
    (site / "ies_drivers").mkdir(parents=True)
    module_file = site / "ies_drivers" / "templates.py"
    shutil.copy(Path(templates_module.__file__), module_file)
    (site / "ies_agent" / "_configs" / "devices").mkdir(parents=True)
    spec = importlib.util.spec_from_file_location("wheel_templates", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wheel_templates", module)
    spec.loader.exec_module(module)
    assert module.shipped_configs_dir() == site / "ies_agent" / "_configs"


def test_site_template_dir_is_searched_before_the_shipped_one(tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    text = (shipped_templates_dir() / "eastron-sdm630.toml").read_text()
    (own / "eastron-sdm630.toml").write_text(
        text.replace("max_block = 80", "max_block = 40")
    )
    assert find_template("eastron-sdm630", [own]).max_block == 40
    assert find_template("eastron-sdm630").max_block == 80
    assert find_template_file("rish-master-3430", [own]).path.parent == (
        shipped_templates_dir()
    )


def test_unknown_template_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(TemplateNotFoundError) as caught:
        find_template("sdm630", [tmp_path])
    message = str(caught.value)
    assert "no template 'sdm630'" in message
    assert "did you mean 'eastron-sdm630'?" in message
    assert "rish-master-3430" in message and "eastron-sdm630" in caught.value.known
    # A path instead of an id is refused, not opened.
    with pytest.raises(TemplateNotFoundError):
        find_template("../devices/eastron-sdm630")


# --- broken templates ----------------------------------------------------------------

HEADER = """\
[template]
id = "t"
manufacturer = "Acme"
model = "M1"
kind = "meter"
protocol = "modbus"
source = "Acme M1 manual v2"
"""

BLOCK = """
[[blocks]]
function = "holding"
order = "ABCD"
"""


def point(**fields: object) -> str:
    lines = ["", "[[blocks.points]]"]
    for key, value in fields.items():
        rendered = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


BROKEN = [
    pytest.param(
        HEADER + BLOCK + point(name="v", address=0, type="float"),
        16,
        "blocks[0].points[0].type",
        "unknown type 'float' (did you mean 'f32'?)",
        id="unknown-type",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="sn", address=0, type="string"),
        13,
        "blocks[0].points[0].length",
        "missing, expected an integer 1..125",
        id="string-without-length",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="v", address=0, type="u16", length=2),
        17,
        "blocks[0].points[0].length",
        "length applies to string points only",
        id="length-on-number",
    ),
    pytest.param(
        HEADER
        + BLOCK
        + point(name="a", address=10, type="u32")
        + point(name="b", address=11, type="u16"),
        20,
        "blocks[0].points[1].address",
        "'b' (registers 11-11) overlaps 'a' (registers 10-11) in the holding",
        id="overlap",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="e", address=0, type="u32", obis="1-0:1.8"),
        17,
        "blocks[0].points[0].obis",
        "bad OBIS code '1-0:1.8': expected A-B:C.D.E or A-B:C.D.E*F",
        id="obis-syntax",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="e", address=0, type="u32", obis="1-0:1.8.0*256"),
        17,
        "blocks[0].points[0].obis",
        "each group 0-255",
        id="obis-range",
    ),
    pytest.param(
        HEADER
        + BLOCK
        + point(name="W", address=0, type="s16", scale_factor="W_SF")
        + point(name="A_SF", address=1, type="sunssf"),
        17,
        "blocks[0].points[0].scale_factor",
        "'W_SF' names no sunssf point",
        id="scale-factor-without-sunssf",
    ),
    pytest.param(
        HEADER + BLOCK + '\n[[blocks.points]]\nname = "v"\naddress = 0\n'
        'type = "u16"\nscale = 0.1\n',
        17,
        "blocks[0].points[0].scale",
        'write the scale as a decimal string, e.g. scale = "0.1"',
        id="float-scale",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="v", adress=0, type="u16"),
        15,
        "blocks[0].points[0].adress",
        "unknown key (did you mean 'address'?)",
        id="misspelt-key",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="v", address=0, type="u16", not_implemented=70000),
        17,
        "blocks[0].points[0].not_implemented",
        "70000 does not fit a u16",
        id="sentinel-too-wide",
    ),
    pytest.param(
        HEADER
        + BLOCK
        + point(name="v", address=0, type="u16")
        + point(name="v", address=1, type="u16"),
        19,
        "blocks[0].points[1].name",
        "'v' is already the name of the point at line 14",
        id="duplicate-name",
    ),
    pytest.param(
        HEADER
        + BLOCK.replace('"holding"', '"coil"')
        + point(name="v", address=0, type="u16"),
        10,
        "blocks[0].function",
        "'coil' is not one of holding, input",
        id="bad-function",
    ),
    pytest.param(
        HEADER
        + BLOCK.replace('"ABCD"', '"ABDC"')
        + point(name="v", address=0, type="u32"),
        11,
        "blocks[0].order",
        "'ABDC' is not one of ABCD, CDAB, BADC, DCBA",
        id="bad-order",
    ),
    pytest.param(
        HEADER.replace('protocol = "modbus"', 'protocol = "dlms"')
        + BLOCK
        + point(name="v", address=0, type="u16"),
        6,
        "template.protocol",
        "'dlms' is not one of modbus",
        id="protocol",
    ),
    pytest.param(
        HEADER.replace('id = "t"', 'id = "other"')
        + BLOCK
        + point(name="v", address=0, type="u16"),
        2,
        "template.id",
        "'other' must equal the file name without .toml ('t')",
        id="id-not-file-name",
    ),
    pytest.param(
        HEADER.replace('kind = "meter"', 'kind = "meter"\nsunspec = true'),
        6,
        "template.sunspec",
        "needs a [sunspec] table",
        id="sunspec-without-table",
    ),
    pytest.param(
        HEADER + '\n[sunspec]\nmodels = [1, "103"]\n' + BLOCK,
        9,
        "sunspec",
        "[sunspec] needs sunspec = true in [template]",
        id="sunspec-table-on-modbus-template",
    ),
    pytest.param(
        HEADER + BLOCK + point(name="v", address=0, type="u16") + "\nbad = = 1\n",
        18,
        "",
        "not valid TOML",
        id="toml-syntax",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), BROKEN)
def test_broken_template_names_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, fragment: str
) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(InvalidTemplateError) as caught:
        load_template(path)
    found = [(p.line, p.key) for p in caught.value.problems]
    matching = [p for p in caught.value.problems if fragment in p.message]
    assert matching, f"no problem says {fragment!r}: {caught.value}"
    assert (matching[0].line, matching[0].key) == (line, key), found
    assert matching[0].file == str(path)
    # The message a person sees starts with file:line.
    assert str(caught.value).count(f"{path}:{line}:") >= 1


def test_every_problem_of_a_template_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        HEADER.replace('kind = "meter"', 'kind = "toaster"')
        + BLOCK
        + point(name="a", address=0, type="uint16")
        + point(name="b", address=1, type="u16", obis="x")
        + point(name="c", address=2, type="string")
    )
    with pytest.raises(InvalidTemplateError) as caught:
        load_template(path)
    keys = {p.key for p in caught.value.problems}
    assert keys == {
        "template.kind",
        "blocks[0].points[0].type",
        "blocks[0].points[1].obis",
        "blocks[0].points[2].length",
    }
    assert "did you mean 'u16'?" in str(caught.value)
    assert isinstance(caught.value, TemplateError)


def test_missing_template_file_is_a_template_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidTemplateError, match="no such file"):
        load_template(tmp_path / "nothing.toml")


def test_valid_template_with_every_feature(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        HEADER.replace(
            'protocol = "modbus"',
            'protocol = "modbus"\nmax_block = 60\nquirks = ["no_fc4"]',
        )
        + BLOCK
        + point(
            name="W",
            address=0,
            type="s16",
            scale_factor="W_SF",
            unit="W",
            obis="1-0:16.7.0",
        )
        + point(name="W_SF", address=1, type="sunssf")
        + point(
            name="E",
            address=2,
            type="u32",
            scale="0.01",
            unit="kWh",
            obis="1-0:1.8.0",
            cumulative=True,
            not_implemented=0xFFFFFFFF,
        )
        + point(name="T", address=4, type="s16", not_implemented=-32768)
        + point(name="SN", address=5, type="string", length=8)
    )
    loaded = load_template_file(path)
    template = loaded.template
    assert template.max_block == 60 and template.quirks == frozenset({"no_fc4"})
    energy = template.point("E")
    assert (energy.scale, energy.cumulative, energy.not_implemented) == (
        Decimal("0.01"),
        True,
        0xFFFFFFFF,
    )
    # A negative sentinel of a signed type is kept as the raw register content.
    assert template.point("T").not_implemented == 0x8000
    assert template.point("SN").count == 8
    assert decode_point(energy, [0x0001, 0x0000]).value == "655.36"
    watts = template.point("W")
    value = decode_point(watts, [0xFFC6], scale_factors={"W_SF": 1})
    assert value.value == "-580"


# --- the TOML key locator ------------------------------------------------------------

LOCATOR_TEXT = """\
# comment [not.a.table]
top = 1
[gateway]
id = "gw"  # trailing [comment]
name.first = 'a'
[[devices]]
id = "a"
tags = [
  "x",  # ]
  {k = 1, j = "]"},
]
[[devices]]
id = "b"
inline = { a = 1, b.c = 2 }
s = \"\"\"multi
[[devices]]
line\"\"\"
[[blocks]]
[[blocks.points]]
name = "x"
[[blocks.points]]
name = "y"
[[blocks]]
[[blocks.points]]
name = "z"
[blocks.meta]
note = 1
["quoted key".x]
"a.b" = 1
"""


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("top", 2),
        ("gateway", 3),
        ("gateway.id", 4),
        ("gateway.name.first", 5),
        ("devices[0]", 6),
        ("devices[0].tags[1].j", 10),
        ("devices[1].id", 13),
        ("devices[1].inline.b.c", 14),
        ("devices[1].s", 15),
        ("blocks[0].points[1].name", 22),
        ("blocks[1].points[0].name", 25),
        ("blocks[1].meta.note", 27),
        ('"quoted key".x."a.b"', 29),
        # Missing keys fall back to the nearest enclosing table.
        ("devices[1].template", 12),
        ("blocks[1].points[0].type", 24),
    ],
)
def test_locator_maps_key_paths_to_lines(path: str, line: int) -> None:
    document = parse_toml(LOCATOR_TEXT, "x.toml")
    assert document.line_of(path) == line
    # The multi-line string's "[[devices]]" did not start a third device.
    assert len(document.data["devices"]) == 2 and ("devices", 2) not in document.lines


def test_locator_knows_nothing_of_absent_top_level_keys() -> None:
    assert parse_toml("a = 1\n").line_of("gateway.id") is None


def test_key_paths_round_trip() -> None:
    for text in ("devices[2].template", 'blocks[0]."odd key".x', "a.b[3][4].c"):
        assert format_key_path(parse_key_path(text)) == text
    with pytest.raises(ValueError):
        parse_key_path("devices[x]")


def test_toml_syntax_error_carries_the_line() -> None:
    with pytest.raises(TomlSyntaxError) as caught:
        parse_toml("a = 1\n[b]\nc = \n", "bad.toml")
    assert caught.value.line == 3
    assert str(caught.value).startswith("bad.toml:3: not valid TOML")


def test_byte_order_mark_and_end_of_document() -> None:
    # Windows editors start UTF-8 files with a BOM; it is not a TOML error.
    assert parse_toml("\ufeffa = 1\n").data == {"a": 1}
    with pytest.raises(TomlSyntaxError) as caught:
        parse_toml("a = 1\nb = [1,\n", "cut.toml")
    assert caught.value.line == 2


def test_obis_without_f_group_is_written_with_255(tmp_path: Path) -> None:
    # One spelling project-wide, as in the evidence example: 1-0:1.8.0*255.
    template = find_template("eastron-sdm630")
    assert all(p.obis is None or p.obis.endswith("*255") for p in template.points)
