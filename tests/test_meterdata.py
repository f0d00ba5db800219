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
from upstream_fixtures import GATEWAY, grid_import_kwh, log_lines, write_site_log

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


def test_a_missing_boundary_leaves_a_gap_in_ids_not_a_wrong_block(
    tmp_path: Path,
) -> None:
    write_site_log(tmp_path, 5)
    lines = log_lines(tmp_path)
    # Drop every reading of boundary 2 (as if the meter did not answer).
    entries = [json.loads(line) for line in lines]
    boundary_times = sorted({e["t"] for e in entries if e["type"] == "reading"})
    kept = [e for e in entries if e.get("t") != boundary_times[2]]
    builder = MeterDataBuilder(gateway_id="g", meter_refs={"grid": "did:web:x:m1"})
    builder.feed(kept)
    document = parse(dumps(builder.profiles()))
    assert meterdata_problems(document, load_codes()) == []
    grid = next(
        p for p in document if p.get("compactSequenceRef") == "IntervalSeq-grid"
    )
    assert grid["meterRefs"] == [{"scheme": "DID", "value": "did:web:x:m1"}]
    assert [r["id"] for r in grid["intervals"]] == [0, 3]


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
