"""IES MeterData v0.6 from evidence: schema-valid, rule-valid, exact numbers.

The rules checker (``peers.ies_endpoint.meterdata_problems``) is written in the test
peer from the IES validation cases and code list, independently of the builder; it is
first shown to reject each invalid case and accept the valid one, then applied to what
the agent emits. Pure computation over logs written by the real ``EvidenceLog``.
"""

from __future__ import annotations

import argparse
import io
import json
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import pytest

from conftest import DATA
from ies_agent.evidence.errors import EvidenceError
from ies_agent.upstream.errors import MeterDataError
from ies_agent.upstream.meterdata import (
    MeterDataBuilder,
    dumps,
    profiles_from_lines,
    write_export,
)
from peers.ies_endpoint import load_codes, load_schema_validator, meterdata_problems
from upstream_fixtures import (
    GATEWAY,
    MixedSite,
    expected_blocks,
    grid_import_kwh,
    instant_snapshots,
    interval_blocks,
    log_lines,
    write_site_log,
)

CASES = DATA / "ies" / "validation"


def parse(text: str) -> list[dict[str, object]]:
    document: list[dict[str, object]] = json.loads(text, parse_float=Decimal)
    return document


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("valid_interval_profile.json", None),
        ("invalid_cumulative_decrease.json", "decreases"),
        ("invalid_math_consistency.json", "closing - opening"),
        ("invalid_missing_descriptor.json", "payloadDescriptorSetRef"),
        ("invalid_missing_descriptor_ref.json", "payloadDescriptorSetRef"),
        ("invalid_profile_type_mismatch.json", "not allowed in INTERVAL"),
    ],
)
def test_rules_checker_agrees_with_the_ies_validation_cases(
    case: str, expected: str | None
) -> None:
    problems = meterdata_problems(parse((CASES / case).read_text()), load_codes())
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_the_ies_examples_pass_schema_and_rules() -> None:
    validator = load_schema_validator()
    for name in ("IntervalProfile.json", "InstantaneousProfile.json"):
        document = parse((DATA / "ies" / name).read_text())
        assert list(validator.iter_errors(document)) == []
        assert meterdata_problems(document, load_codes()) == []


def test_profiles_of_a_metered_log_validate_and_hold_exact_values(
    tmp_path: Path,
) -> None:
    write_site_log(tmp_path, 5)
    text = dumps(profiles_from_lines(log_lines(tmp_path), gateway_id=GATEWAY))
    document = parse(text)
    assert list(load_schema_validator().iter_errors(document)) == []
    assert meterdata_problems(document, load_codes()) == []

    kinds = [p["profileType"] for p in document]
    assert kinds == ["DESCRIPTOR", "INTERVAL", "INTERVAL"] + ["INSTANTANEOUS"] * 10
    grid = next(
        p for p in document if p.get("compactSequenceRef") == "IntervalSeq-grid"
    )
    assert grid["meterRefs"] == [{"scheme": "METER_SERIAL", "value": "SM-0001"}]
    assert grid["intervalPeriod"] == {
        "start": "2026-05-04T09:00:00+05:30",
        "duration": "PT15M",
    }
    rows = grid["intervals"]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    # kWh import block: value, opening, closing, exactly as decimals.
    first = rows[0]["payloads"][:3]
    assert first == [
        grid_import_kwh(1) - grid_import_kwh(0),
        grid_import_kwh(0),
        grid_import_kwh(1),
    ]
    assert '"payloads":[1.261,18723.400,18724.661,' in text
    # The PV meter counts Wh; IES wants kWh, shifted exactly.
    pv = next(p for p in document if p.get("compactSequenceRef") == "IntervalSeq-pv")
    assert pv["intervals"][0]["payloads"] == [
        Decimal("1.234"),
        Decimal("5000.000"),
        Decimal("5001.234"),
    ]
    instant = document[3]
    assert instant["timestamp"] == "2026-05-04T09:00:00+05:30"
    values = {r["readingType"]: r["value"] for r in instant["readings"]}
    # Signed total power -1500 W is an export of 1.5 kW.
    assert values == {
        "kWh imp": Decimal("18723.400"),
        "kWh exp": Decimal("0.00"),
        "V_R": Decimal("231.2"),
        "P_Import": Decimal("0"),
        "P_Export": Decimal("1.500"),
    }


def test_unsynchronised_clock_marks_rows_suspect(tmp_path: Path) -> None:
    write_site_log(tmp_path, 3, tq="U")
    document = parse(dumps(profiles_from_lines(log_lines(tmp_path), gateway_id="g")))
    assert meterdata_problems(document, load_codes()) == []
    grid = next(
        p for p in document if p.get("compactSequenceRef") == "IntervalSeq-grid"
    )
    overrides = grid["intervals"][0]["overrides"]
    assert {"descriptorIndex": 0, "validationStatus": "SUSPECT"}.items() <= overrides[
        0
    ].items()
    assert overrides[0]["failCode"] == "TIME-UNSYNCED"
    instant = next(p for p in document if p["profileType"] == "INSTANTANEOUS")
    assert all(r["validationStatus"] == "SUSPECT" for r in instant["readings"])


def test_a_missing_boundary_gives_one_flagged_row_over_the_gap(tmp_path: Path) -> None:
    write_site_log(tmp_path, 5)
    lines = log_lines(tmp_path)
    # Drop every reading of boundary 2 (as if the meter did not answer).
    entries = [json.loads(line) for line in lines]
    boundary_times = sorted({e["t"] for e in entries if e["type"] == "reading"})
    kept = [e for e in entries if e.get("t") != boundary_times[2]]
    builder = MeterDataBuilder(gateway_id="g", meter_refs={"grid": "did:web:x:m1"})
    builder.feed(kept)
    document = parse(dumps(builder.profiles(final=True)))
    assert list(load_schema_validator().iter_errors(document)) == []
    assert meterdata_problems(document, load_codes()) == []
    grid = next(
        p for p in document if p.get("compactSequenceRef") == "IntervalSeq-grid"
    )
    assert grid["meterRefs"] == [{"scheme": "DID", "value": "did:web:x:m1"}]
    rows = grid["intervals"]
    assert [r["id"] for r in rows] == [0, 1, 3]
    spanning = rows[1]
    assert spanning["intervalPeriod"] == {
        "start": "2026-05-04T09:15:00+05:30",
        "duration": "PT30M",
    }
    assert spanning["payloads"][:3] == [
        grid_import_kwh(3) - grid_import_kwh(1),
        grid_import_kwh(1),
        grid_import_kwh(3),
    ]
    assert spanning["overrides"][0] == {
        "descriptorIndex": 0,
        "validationStatus": "SUSPECT",
        "failCode": "VEE-MISSING-INTERVAL",
    }
    # Nothing is lost: the blocks add up to the register's rise.
    assert sum(r["payloads"][0] for r in rows) == grid_import_kwh(4) - grid_import_kwh(
        0
    )


def test_readings_between_boundaries_and_gaps_keep_rows_on_their_boundaries(
    tmp_path: Path,
) -> None:
    """The demo's case: a charger's meter values between boundaries (one 10 ms before
    a boundary), a meter that times out at one boundary, a charger that misses its
    clock-aligned value at another, a meter replaced. Every row opens and closes on
    the register's boundary readings, rows chain, and the blocks add up."""
    site = MixedSite(tmp_path)
    site.run(9, grid_missing=[3], charger_missing=[5], smart_reset_at=7)
    text = dumps(profiles_from_lines(log_lines(tmp_path), gateway_id=GATEWAY))
    document = parse(text)
    assert list(load_schema_validator().iter_errors(document)) == []
    assert meterdata_problems(document, load_codes()) == []

    refs = {
        "grid": "SM-0001",
        "smart": f"{GATEWAY}/smart",
        "cp-1/1": f"{GATEWAY}/cp-1/1",
    }
    blocks = interval_blocks([document])
    assert blocks == expected_blocks(site, refs)
    for key, rows in blocks.items():
        # Consecutive rows chain; the blocks add up to the register's rise.
        assert all(a.closing == b.opening for a, b in pairwise(rows)), key
        assert sum(r.value for r in rows) == rows[-1].closing - rows[0].opening
    grid_import = blocks[("SM-0001", "kWh imp block")]
    assert [r.end_ms - r.start_ms for r in grid_import] == [300_000] * 2 + [600_000] + [
        300_000
    ] * 4
    assert grid_import[2].status == "SUSPECT"
    # The export register of the same meter did not miss a boundary.
    assert all(r.status == "VALID" for r in blocks[("SM-0001", "kWh exp block")])

    # Snapshots: a meter's boundary readings are stamped with their boundary, the
    # charger's meter values between boundaries with their own time.
    snapshots = instant_snapshots([document])
    grid_times = [t for meter, t, _ in snapshots if meter == "SM-0001"]
    assert grid_times[:2] == ["2026-05-04T09:00:00+05:30", "2026-05-04T09:05:00+05:30"]
    assert len(grid_times) == 9
    charger = [(t, r) for meter, t, r in snapshots if meter == f"{GATEWAY}/cp-1/1"]
    assert charger[:3] == [
        (
            "2026-05-04T09:00:00+05:30",
            (("kWh imp", Decimal("1000.000")), ("P_Import", Decimal("7.200"))),
        ),
        (
            "2026-05-04T09:01:39.987+05:30",
            (("kWh imp", Decimal("1000.198")), ("P_Import", Decimal("7.200"))),
        ),
        (
            "2026-05-04T09:03:19.987+05:30",
            (("kWh imp", Decimal("1000.398")), ("P_Import", Decimal("7.200"))),
        ),
    ]
    assert charger[3][0] == "2026-05-04T09:04:59.990+05:30"


def test_a_catch_up_value_belongs_to_its_device_time() -> None:
    """A meter's own profile read after an outage (state ``L``) fills the boundaries
    of the outage by their device time, not by the time they were read."""
    entry = {"type": "reading", "src": "m", "obis": "1-0:1.8.0*255", "unit": "kWh"}

    def at(
        t: str, value: str, state: str = "G", dt: str | None = None
    ) -> dict[str, object]:
        extra = {"dt": dt} if dt else {}
        return {**entry, "t": t, "val": value, "st": state, "tq": "S", **extra}

    builder = MeterDataBuilder(gateway_id="g", interval_s=900)
    builder.feed(
        [
            at("2026-05-04T03:30:00.050Z", "10.000"),
            # The gateway was off from 09:05 to 09:50 (site time); at 09:50:10 it
            # reads the load profile of the meter, stamped 09:15 and 09:30.
            at("2026-05-04T04:20:10.000Z", "11.000", "L", "2026-05-04T09:15:00+05:30"),
            at("2026-05-04T04:20:10.000Z", "12.000", "L", "2026-05-04T09:30:00+05:30"),
            at("2026-05-04T04:30:00.050Z", "13.500"),
        ]
    )
    document = parse(dumps(builder.profiles(final=True)))
    blocks = interval_blocks([document])[("g/m", "kWh imp block")]
    assert [(b.value, b.end_ms - b.start_ms) for b in blocks] == [
        (Decimal("1.000"), 900_000),
        (Decimal("1.000"), 900_000),
        (Decimal("1.500"), 1_800_000),
    ]


def test_exact_json_writer_refuses_floats() -> None:
    assert dumps({"a": [Decimal("1.10"), 2, "x", None, True]}) == (
        '{"a":[1.10,2,"x",null,true]}'
    )
    with pytest.raises(MeterDataError):
        dumps({"a": 1.5})


def test_export_handler_writes_one_document_of_a_verified_log(tmp_path: Path) -> None:
    write_site_log(tmp_path, 3)
    out = io.StringIO()
    count = write_export(tmp_path, out, argparse.Namespace())
    document = parse(out.getvalue())
    assert count == len(document) > 3
    assert list(load_schema_validator().iter_errors(document)) == []
    assert meterdata_problems(document, load_codes()) == []

    # A tampered log is refused, not exported.
    path = tmp_path / "evidence.jsonl"
    path.write_bytes(path.read_bytes().replace(b"231.2", b"239.9", 1))
    with pytest.raises(EvidenceError, match="does not verify"):
        write_export(tmp_path, io.StringIO(), argparse.Namespace())
