"""OCMF: our verifier against published records, and the export checked by pyocmf.

Vectors (copies in ``tests/data/vectors/ocmf``, sources in SOURCES.md): Transparenz-
software records, pyocmf examples, ocmf-js curve cases and the hupe1980 conformance
cases. Exports are verified by the independent ``pyocmf`` 0.6.0.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pyocmf import OCMF

from evidence_fixtures import (
    EXAMPLE,
    VECTORS,
    LogBuilder,
    example_ed25519_key,
    example_ed25519_signer,
    example_p256_key,
    example_p256_signer,
    run_cli,
    standard_log,
)
from ies_agent.evidence import ocmf

OCMF_DIR = VECTORS / "ocmf"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


TPS = _jsonl(OCMF_DIR / "tps_records.jsonl")
PYOCMF = _jsonl(OCMF_DIR / "pyocmf_examples.jsonl")
JS_CASES = json.loads((OCMF_DIR / "ocmf_js_cases.json").read_text())["cases"]
HUPE = json.loads((OCMF_DIR / "hupe1980_curves_conformance.json").read_text())["cases"]


def _pyocmf_verifies(record: str, spki: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = OCMF.from_string(record)
        return bool(parsed.verify_signature(spki.hex()))


# --- verification -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    TPS,
    ids=[f"{c['source'].rsplit('/', 1)[-1]}#{c['value_index']}" for c in TPS],
)
def test_transparenzsoftware_records(case: dict[str, Any]) -> None:
    assert (
        ocmf.verify_ocmf(case["record"], case["public_key_as_given"])
        is (case["verifies"])
    )


def test_lenient_der_case_behaves_as_sources_md_says() -> None:
    # test.xml#1: a real eBZ meter signature with a non-minimal DER INTEGER. Strict
    # DER (OpenSSL, cryptography) rejects it; decoded leniently it verifies, as in
    # the Transparenzsoftware.
    (case,) = [c for c in TPS if c["verifies"] and not c["verifies_strict_der"]]
    record = ocmf.parse_ocmf(case["record"])
    signature = bytes.fromhex(record.signature["SD"])
    with pytest.raises(ValueError):
        decode_dss_signature(signature)
    r, s = ocmf.decode_signature(signature, 24)
    assert r > 0 and s > 0
    assert ocmf.verify_ocmf(case["record"], case["public_key_as_given"])


@pytest.mark.parametrize("case", PYOCMF, ids=lambda c: str(c["value_index"]))
def test_pyocmf_examples(case: dict[str, Any]) -> None:
    assert (
        ocmf.verify_ocmf(case["record"], case["public_key_as_given"])
        is (case["verifies"])
    )


@pytest.mark.parametrize("case", JS_CASES, ids=lambda c: c["name"])
def test_ocmf_js_cases(case: dict[str, Any]) -> None:
    assert ocmf.verify_ocmf(case["ocmf"], case["spki_der_hex"]) is case["expected"]


@pytest.mark.parametrize("case", HUPE, ids=lambda c: c["id"])
def test_hupe1980_cases(case: dict[str, Any]) -> None:
    if case["expect_verifies"]:
        ocmf.check_ocmf(case["record"], case["key"])
    else:
        with pytest.raises(ocmf.OcmfError, match=r"SD|SA"):
            ocmf.check_ocmf(case["record"], case["key"])


def _fc14() -> tuple[str, str]:
    root = ET.parse(VECTORS / "field-cases" / "FC-14.xml").getroot()
    value = root.find("value")
    assert value is not None
    signed, key = value.find("signedData"), value.find("publicKey")
    assert signed is not None and key is not None
    assert signed.text is not None and key.text is not None
    return signed.text, key.text


def test_field_case_fc14_verifies_and_tampering_fails() -> None:
    record, key = _fc14()
    parsed = ocmf.parse_ocmf(record)
    assert "SA" not in parsed.signature  # the OCMF default algorithm applies
    readings = parsed.payload["RD"]
    assert [r["RV"] for r in readings] == [0.2596, 0.2597]
    ocmf.check_ocmf(record, key)
    tampered = record.replace('"RV":0.2596', '"RV":999.9999')
    with pytest.raises(ocmf.OcmfError, match="does not match"):
        ocmf.check_ocmf(tampered, key)
    start = record.index("{")
    for index in range(start, record.index("|", start + 200), 37):
        flipped = record[:index] + chr(ord(record[index]) ^ 1) + record[index + 1 :]
        assert not ocmf.verify_ocmf(flipped, key)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ("OCMX|{}|{}", "starts with"),
        ("OCMF|{nope|{}", "not JSON"),
        ('OCMF|{"FV":"1.0"}', "followed by"),
        ('OCMF|{"FV":"1.0"}|[]', "not a JSON object"),
        ('OCMF|{"FV":"1.0"}|{"SD":"00"} x', "unexpected text"),
    ],
)
def test_malformed_records_raise(record: str, words: str) -> None:
    with pytest.raises(ocmf.OcmfError, match=words):
        ocmf.parse_ocmf(record)


# --- export -------------------------------------------------------------------------


def test_worked_example_export_is_reproduced_byte_for_byte() -> None:
    meta = json.loads((EXAMPLE / "ocmf_export_and_meta.json").read_text())
    lines = (EXAMPLE / "entries.jsonl").read_bytes().splitlines()
    records = dict(
        ocmf.ocmf_records(
            lines, example_p256_key(), gateway_identification="example-agent"
        )
    )
    assert sorted(records) == [2, 3, 4, 5]
    assert records[3] == meta["ocmf"]
    spki = ocmf.public_key_spki(example_p256_key())
    assert spki.hex().upper() == meta["public_key_spki_hex"]
    for record in records.values():
        assert _pyocmf_verifies(record, spki)
        assert ocmf.verify_ocmf(record, spki)


def _install_key(directory: Path, key: Any) -> None:
    """Put ``key`` where the agent keeps it: keys/log-key.pem, mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / "keys" / "log-key.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(pem)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A log built from the primitives, signed with the P-256 test key."""
    builder = standard_log(
        tmp_path / "data", signers=[example_p256_signer("ies-agent/GW-TEST/log-1")]
    )
    _install_key(builder.dir, example_p256_key())
    return builder.dir


def test_export_verifies_with_pyocmf(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export.ocmf"
    status, stdout, err = run_cli(
        capsys, "export", data_dir, "--format", "ocmf", "--out", out
    )
    assert status == 0, err
    assert stdout == ""
    records = out.read_text().splitlines()
    assert len(records) == 8  # 4 intervals x 2 sources, all cumulative
    spki = ocmf.public_key_spki(example_p256_key())
    pages = []
    for record in records:
        assert len(record.encode()) < ocmf.MAX_RECORD_BYTES
        assert _pyocmf_verifies(record, spki)
        payload = ocmf.parse_ocmf(record).payload
        assert payload["FV"] in {"1.0", "1.1", "1.2", "1.3"}
        assert payload["GS"] == "GW-TEST"
        pages.append(payload["PG"])
    assert pages == [f"F{n}" for n in range(1, 9)]
    status, stdout, _ = run_cli(capsys, "export", data_dir, "--format", "ocmf")
    assert status == 0 and stdout.splitlines() == records


def test_export_passes_device_signed_ocmf_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device_record, key = _fc14()
    builder = LogBuilder(
        tmp_path / "data", signers=[example_p256_signer("ies-agent/GW-TEST/log-1")]
    )
    builder.boot_event()
    builder.reading("cp1", "0.2597", obis="1-b:1.8.0*255", signed=device_record)
    builder.checkpoint()
    _install_key(builder.dir, example_p256_key())
    status, stdout, _ = run_cli(capsys, "export", builder.dir, "--format", "ocmf")
    assert status == 0
    assert stdout.splitlines() == [device_record]
    assert ocmf.verify_ocmf(stdout.splitlines()[0], key)


def test_export_skips_the_unprotected_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = standard_log(
        tmp_path / "data", signers=[example_p256_signer("ies-agent/GW-TEST/log-1")]
    )
    _install_key(builder.dir, example_p256_key())
    builder.reading("m1", "500.000")  # after the last checkpoint
    status, stdout, err = run_cli(capsys, "export", builder.dir, "--format", "ocmf")
    assert status == 0
    assert len(stdout.splitlines()) == 8
    assert "1 entries after the last checkpoint are not exported" in err


def test_export_refuses_an_altered_log(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = data_dir / "evidence.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"val":"101.200"', b'"val":"901.200"'))
    status, stdout, err = run_cli(capsys, "export", data_dir, "--format", "ocmf")
    assert status == 1 and stdout == ""
    assert "refusing to sign" in err


def test_export_needs_an_ecdsa_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = standard_log(
        tmp_path / "data", signers=[example_ed25519_signer("ies-agent/GW-TEST/log-1")]
    )
    _install_key(builder.dir, example_ed25519_key())
    status, _, err = run_cli(capsys, "export", builder.dir, "--format", "ocmf")
    assert status == 1
    assert "Ed25519" in err and "ECDSA" in err


def test_export_of_a_log_written_by_evidence_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ies_agent.clock import Timestamp
    from ies_agent.evidence.log import EvidenceLog
    from ies_drivers.reading import Reading, ReadingState

    class Clock:
        t_ms, mono_ns = 1_746_100_800_000, 1_000_000_000

        def now(self) -> Timestamp:
            return Timestamp(self.t_ms, "S", self.mono_ns)

    clock = Clock()
    data = tmp_path / "data"
    log = EvidenceLog.open(data, gateway_id="GW7", clock=clock, interval_s=900)
    log.append_event("source", {"dev": {"mfr": "ACME", "ser": "S-1"}}, src="m1")
    for k in range(3):
        clock.t_ms += 900_000
        clock.mono_ns += 900_000_000_000
        log.append_reading(
            Reading(
                "m1",
                "import_energy",
                "1-0:1.8.0*255",
                f"{5000 + k}.25",
                "kWh",
                ReadingState.OK,
                "modbus:fc03:0x5000:00",
                clock.t_ms,
                "S",
                clock.mono_ns,
                cumulative=True,
            )
        )
        log.checkpoint()
    log.close()
    status, stdout, err = run_cli(capsys, "export", data, "--format", "ocmf")
    assert status == 0, err
    records = stdout.splitlines()
    assert len(records) == 3
    key = serialization.load_pem_private_key(
        (data / "keys" / "log-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    spki = ocmf.public_key_spki(key)
    for k, record in enumerate(records):
        assert _pyocmf_verifies(record, spki)
        payload = ocmf.parse_ocmf(record).payload
        assert payload["MS"] == "S-1" and payload["RD"][0]["RV"] == 5000 + k + 0.25
