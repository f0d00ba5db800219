"""The offline verifier: the worked example, tampered logs, bundles, explained gaps.

Logs are written by ``evidence_fixtures.LogBuilder`` (primitives only) and, in the
last tests, by the real writer ``EvidenceLog``. The command line is run in-process
through ``ies_agent.cli.main``, so exit statuses and printed lines are what a user sees.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from evidence_fixtures import (
    EXAMPLE,
    LogBuilder,
    example_ed25519_signer,
    example_p256_signer,
    iso_ms,
    run_cli,
    standard_log,
)
from evidence_log_fixtures import cut_checkpoints, forge
from ies_agent.evidence import canonical, note, verify_command
from ies_agent.evidence.verify import Report, VerifyInputError, verify_path


def codes(report: Report, severity: str | None = None) -> set[tuple[int | None, str]]:
    return {
        (f.seq, f.code)
        for f in report.findings
        if severity is None or f.severity == severity
    }


def error_seqs(report: Report) -> set[int | None]:
    return {f.seq for f in report.errors}


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A writable copy of the worked example directory."""
    target = tmp_path / "example"
    shutil.copytree(EXAMPLE, target)
    return target


@pytest.fixture
def built(tmp_path: Path) -> LogBuilder:
    """A clean log of 4 intervals and 2 sources, with its vkey in ``tmp/key.vkey``."""
    builder = standard_log(tmp_path / "data")
    builder.vkey_file(tmp_path / "key.vkey")
    return builder


def verify_built(builder: LogBuilder, **kwargs: Any) -> Report:
    return verify_path(builder.dir, keys=[builder.dir.parent / "key.vkey"], **kwargs)


# --- the worked example -------------------------------------------------------------


def test_worked_example_verifies_with_either_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("log_key.vkey", "log_key_p256.vkey"):
        status, out, _ = run_cli(capsys, "verify", EXAMPLE, "--key", EXAMPLE / key)
        assert status == 0, out
        assert out.splitlines()[-1].startswith("OK: 0 errors, 0 warnings; 7 entries")


def test_worked_example_without_key_warns_not_pinned(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(capsys, "verify", EXAMPLE)
    assert status == 0
    assert out.splitlines()[0].startswith("log: warning: no --key given")
    assert "(not pinned)" in out


def _example_lines(directory: Path) -> list[bytes]:
    return (directory / "entries.jsonl").read_bytes().splitlines()


def _write_example(directory: Path, lines: list[bytes]) -> None:
    (directory / "entries.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))


@pytest.mark.parametrize(
    ("old", "new", "seq"),
    [
        (b'"type":"reading"', b'"type":"readinG"', 3),  # still canonical, bad field
        (b'"seq":3', b'"seq":9', 3),  # seq field
        (b'"sseq":1', b'"sseq":2', 3),  # per-source counter
        (b'"val":"12346.012"', b'"val":"12346.012 "', 3),  # not a decimal
        (b'"st":"G"', b'"st":"g"', 3),
        (b'"boot":17,"mono":1805', b'"boot":17, "mono":1805', 3),  # whitespace
    ],
)
def test_worked_example_altered_entry_is_named(
    example: Path, old: bytes, new: bytes, seq: int
) -> None:
    lines = _example_lines(example)
    assert old in lines[seq]
    lines[seq] = lines[seq].replace(old, new, 1)
    _write_example(example, lines)
    report = verify_path(example, keys=[example / "log_key.vkey"])
    assert not report.ok
    assert seq in error_seqs(report)
    assert (seq, "checkpoint_root") in codes(report, "error")


def test_worked_example_altered_value_is_placed_in_its_checkpoint(
    example: Path,
) -> None:
    # The example carries no 'prev': an edit that keeps the entry well-formed can
    # only be placed between checkpoints (here: the one checkpoint over all 7).
    lines = _example_lines(example)
    lines[3] = lines[3].replace(b'"val":"12346.012"', b'"val":"12346.013"')
    _write_example(example, lines)
    report = verify_path(example, keys=[example / "log_key.vkey"])
    assert [f.code for f in report.errors] == ["checkpoint_root"]
    assert "seq 0..6" in report.errors[0].message


@pytest.mark.parametrize(
    ("edit", "seq", "code"),
    [
        (lambda lines: lines.pop(3), 3, "missing"),
        (lambda lines: lines.insert(4, lines[3]), 3, "duplicate"),
        (lambda lines: lines.insert(3, lines.pop(4)), 3, "out_of_order"),
    ],
    ids=["delete", "duplicate", "swap"],
)
def test_worked_example_structural_tampering(
    example: Path, capsys: pytest.CaptureFixture[str], edit: Any, seq: int, code: str
) -> None:
    lines = _example_lines(example)
    edit(lines)
    _write_example(example, lines)
    status, out, _ = run_cli(
        capsys, "verify", example, "--key", example / "log_key.vkey"
    )
    assert status == 1
    assert f"seq {seq}: error: " in out
    report = verify_path(example, keys=[example / "log_key.vkey"])
    assert (seq, code) in codes(report, "error")


def test_worked_example_with_a_foreign_key_fails(tmp_path: Path) -> None:
    foreign = note.Ed25519NoteSigner(
        "evidence.example/agent/AGENT-0001/log-1",
        ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32)),
    )
    key_file = tmp_path / "foreign.vkey"
    key_file.write_text(foreign.vkey() + "\n")
    report = verify_path(EXAMPLE, keys=[key_file])
    assert (6, "checkpoint_untrusted") in codes(report, "error")
    assert report.signed_size == 0


# --- bundles ------------------------------------------------------------------------


def test_worked_example_bundle_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    bundle = EXAMPLE / "inclusion_bundle_seq3.json"
    status, out, _ = run_cli(
        capsys, "verify", bundle, "--key", EXAMPLE / "log_key.vkey"
    )
    assert status == 0, out
    assert "disclosure bundle" in out


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (
            lambda b: b.update(entry=b["entry"].replace("12346.012", "12346.013")),
            "proof",
        ),
        (lambda b: b.update(leaf_index=2), "seq_mismatch"),
        (lambda b: b.update(tree_size=8), "checkpoint_size_mismatch"),
        (lambda b: b["proof"].reverse(), "proof"),
        (lambda b: b["proof"].pop(), "proof"),
        (
            lambda b: b.update(checkpoint=b["checkpoint"].replace("\n7\n", "\n8\n")),
            "checkpoint_signature",
        ),
        (lambda b: b.update(proof="x"), "bundle_malformed"),
    ],
    ids=["entry", "index", "size", "order", "short", "note", "shape"],
)
def test_tampered_bundle_fails(tmp_path: Path, change: Any, code: str) -> None:
    bundle = json.loads((EXAMPLE / "inclusion_bundle_seq3.json").read_text())
    change(bundle)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    report = verify_path(path, keys=[EXAMPLE / "log_key.vkey"])
    assert not report.ok
    assert [f.code for f in report.errors] == [code]


def _without_entry(text: str) -> str:
    return json.dumps({k: v for k, v in json.loads(text).items() if k != "entry"})


@pytest.mark.parametrize(
    ("name", "damage", "what"),
    [
        ("inclusion_bundle_seq3.json", lambda text: "", "the file is empty"),
        (
            "inclusion_bundle_seq3.json",
            lambda text: text[: len(text) // 2],
            "not JSON: Expecting value at line 8 column 3 (the file ends early",
        ),
        ("inclusion_bundle_seq3.json", _without_entry, "no 'entry' (the disclosed"),
        ("bundle.txt", _without_entry, "no 'entry' (the disclosed"),
    ],
    ids=["emptied", "cut-in-half", "no-entry", "no-entry-no-suffix"],
)
def test_damaged_bundle_is_never_read_as_a_log(
    example: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    damage: Any,
    what: str,
) -> None:
    # The directory holds a log and a note: a damaged bundle must not fall back to
    # them (it did, and verified "OK").
    bundle = example / name
    published = (EXAMPLE / "inclusion_bundle_seq3.json").read_text()
    bundle.write_text(damage(published))
    for key in ([], ["--key", example / "log_key.vkey"]):
        status, out, err = run_cli(capsys, "verify", bundle, *key)
        assert status == 1, err
        first, last = out.splitlines()[0], out.splitlines()[-1]
        assert first.startswith(f"bundle: error: not a valid proof bundle: {what}")
        assert last.startswith("FAILED: 1 error") and "disclosure bundle" in last


def test_lone_log_file_takes_nothing_from_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lone = tmp_path / "copy.jsonl"
    shutil.copy(EXAMPLE / "entries.jsonl", lone)
    shutil.copy(EXAMPLE / "checkpoint.note", tmp_path / "stray.note")
    key = EXAMPLE / "log_key.vkey"
    status, _, err = run_cli(capsys, "verify", lone, "--key", key)
    assert status == 2 and "--checkpoint FILE" in err
    checkpoint = EXAMPLE / "checkpoint.note"
    status, out, _ = run_cli(
        capsys, "verify", lone, "--key", key, "--checkpoint", checkpoint
    )
    assert status == 0, out
    # The log file of a directory is verified as that directory.
    status, out, _ = run_cli(capsys, "verify", EXAMPLE / "entries.jsonl", "--key", key)
    assert status == 0 and "7 entries, 1 checkpoints" in out
    status, _, err = run_cli(capsys, "prove", lone, "--seq", 3)
    assert status == 2 and "not the log of a data directory" in err


def test_compact_bundle_is_recognised(tmp_path: Path) -> None:
    bundle = json.loads((EXAMPLE / "inclusion_bundle_seq3.json").read_text())
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle, separators=(",", ":")))
    report = verify_path(path, keys=[EXAMPLE / "log_key_p256.vkey"])
    assert report.kind == "bundle" and report.ok


def test_bundle_without_key_needs_one(tmp_path: Path) -> None:
    with pytest.raises(VerifyInputError, match="--key"):
        verify_path(EXAMPLE / "inclusion_bundle_seq3.json")


def test_prove_reproduces_the_published_bundle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(capsys, "prove", EXAMPLE, "--seq", 3)
    assert status == 0
    published = (EXAMPLE / "inclusion_bundle_seq3.json").read_text()
    assert out == published + "\n"


def test_prove_every_entry_of_a_log(
    built: LogBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = built.dir.parent / "key.vkey"
    sizes = sorted(
        json.loads(x)["size"]
        for x in built.dir.joinpath("checkpoints.jsonl").read_text().splitlines()
    )
    bundle_path = tmp_path / "bundle.json"
    for seq in range(len(built.lines)):
        status, _, err = run_cli(
            capsys, "prove", built.dir, "--seq", seq, "--out", bundle_path
        )
        assert status == 0, err
        bundle = json.loads(bundle_path.read_text())
        assert bundle["tree_size"] == min(s for s in sizes if s > seq)
        assert bundle["keys"] == [built.signers[0].vkey()]
        status, out, _ = run_cli(capsys, "verify", bundle_path, "--key", key)
        assert status == 0, out
    # Without --key the bundle's own key hint is used, with a warning.
    report = verify_path(bundle_path)
    assert report.ok and [f.code for f in report.findings] == ["key_not_pinned"]


def test_prove_refuses_what_it_cannot_prove(
    built: LogBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    tail = built.reading("m1", "300.000")
    status, _, err = run_cli(capsys, "prove", built.dir, "--seq", tail)
    assert status == 1
    assert "no checkpoint covers seq" in err
    status, _, err = run_cli(capsys, "prove", built.dir, "--seq", tail + 5)
    assert status == 1
    lines = list(built.lines)
    lines[2] = lines[2].replace(b'"src":"m2"', b'"src":"m3"')
    built.rewrite(lines)
    status, _, err = run_cli(capsys, "prove", built.dir, "--seq", 2)
    assert status == 1
    assert "it was altered" in err
    status, _, err = run_cli(capsys, "prove", built.dir / "nowhere", "--seq", 2)
    assert status == 2


# --- logs built from the primitives -------------------------------------------------


def test_clean_log_has_no_findings(built: LogBuilder) -> None:
    report = verify_built(built)
    assert report.findings == []
    assert report.signed_size == len(built.lines) == report.entries


def test_key_card_is_used_when_no_key_is_given(built: LogBuilder) -> None:
    report = verify_path(built.dir)
    assert report.ok and not report.pinned
    assert [f.code for f in report.findings] == ["key_not_pinned"]


def _flip(line: bytes, index: int) -> bytes:
    return line[:index] + bytes([line[index] ^ 0x01]) + line[index + 1 :]


def test_any_flipped_byte_names_its_entry(built: LogBuilder) -> None:
    rng = random.Random(3)
    lines = list(built.lines)
    for seq, line in enumerate(lines):
        for index in rng.sample(range(len(line)), 6):
            altered = list(lines)
            altered[seq] = _flip(line, index)
            built.rewrite(altered)
            report = verify_built(built)
            assert not report.ok
            assert seq in error_seqs(report), (seq, index, report.findings)
    built.rewrite(lines)
    assert verify_built(built).ok


def test_flip_in_the_last_entry_names_the_last_signed_seq(built: LogBuilder) -> None:
    lines = list(built.lines)
    last = len(lines) - 1
    lines[last] = lines[last].replace(b'"tq":"S"', b'"tq":"I"')
    built.rewrite(lines)
    report = verify_built(built)
    (finding,) = report.errors
    assert (finding.seq, finding.code) == (last, "checkpoint_root")
    assert f"seq {last}, was altered" in finding.message


def test_altered_prev_field_names_only_that_entry(built: LogBuilder) -> None:
    lines = list(built.lines)
    entry = json.loads(lines[7])
    entry["prev"] = entry["prev"][::-1]
    lines[7] = canonical.canonical_bytes(entry)
    built.rewrite(lines)
    report = verify_built(built)
    assert (7, "altered") in codes(report, "error")
    assert 6 not in error_seqs(report) and 8 not in error_seqs(report)


def test_deleted_line_is_named_as_a_gap(
    built: LogBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = list(built.lines)
    del lines[6]
    built.rewrite(lines)
    status, out, _ = run_cli(
        capsys, "verify", built.dir, "--key", built.dir.parent / "key.vkey"
    )
    assert status == 1
    assert "seq 6: error: entry seq 6 is missing (the log jumps to seq 7)" in out


def test_deleted_range_is_one_finding(built: LogBuilder) -> None:
    lines = list(built.lines)
    del lines[4:7]
    built.rewrite(lines)
    report = verify_built(built)
    assert (4, "missing") in codes(report, "error")
    assert "entries seq 4..6 are missing" in report.errors[0].message


def test_duplicated_and_swapped_lines_are_named(built: LogBuilder) -> None:
    lines = list(built.lines)
    built.rewrite([*lines[:9], lines[8], *lines[9:]])
    assert (8, "duplicate") in codes(verify_built(built), "error")
    swapped = list(lines)
    swapped[9], swapped[10] = swapped[10], swapped[9]
    built.rewrite(swapped)
    report = verify_built(built)
    assert {(9, "out_of_order"), (10, "out_of_order")} <= codes(report, "error")


def test_torn_unprotected_tail_is_a_warning(built: LogBuilder) -> None:
    built.reading("m1", "999.000")
    built.reading("m2", "999.000")
    data = (built.dir / "evidence.jsonl").read_bytes()
    (built.dir / "evidence.jsonl").write_bytes(data[:-40])
    report = verify_built(built)
    assert report.ok
    last = len(built.lines) - 1
    assert codes(report) == {(last, "torn_tail"), (last - 1, "unprotected")}


def test_truncated_signed_part_is_an_error(built: LogBuilder) -> None:
    data = (built.dir / "evidence.jsonl").read_bytes()
    cut = data.rfind(b"\n", 0, len(data) // 2)
    (built.dir / "evidence.jsonl").write_bytes(data[: cut + 20])
    report = verify_built(built)
    assert not report.ok
    assert any(f.code == "checkpoint_beyond_log" for f in report.errors)


def test_rollback_to_an_older_copy_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = standard_log(tmp_path / "data", intervals=2)
    key = builder.vkey_file(tmp_path / "key.vkey")
    older = tmp_path / "older"
    shutil.copytree(builder.dir, older)
    builder.interval_readings(["m1", "m2"], lambda s, k: f"{200 + k}.0", 2)
    upstream = tmp_path / "upstream.jsonl"
    shutil.copy(builder.dir / "checkpoints.jsonl", upstream)
    # The older copy is consistent in itself ...
    assert verify_path(older, keys=[key]).ok
    # ... but not with what upstream received earlier.
    status, out, _ = run_cli(
        capsys, "verify", older, "--key", key, "--checkpoint", upstream
    )
    assert status == 1
    assert "replaced by an older copy" in out
    # A single note works as reference too.
    last_note = tmp_path / "last.note"
    last_note.write_text(builder.notes[-1])
    report = verify_path(older, keys=[key], checkpoints=[last_note])
    assert any(f.code == "rollback" for f in report.errors)
    # Replacing only the log (checkpoints kept) is caught without a reference.
    shutil.copy(older / "evidence.jsonl", builder.dir / "evidence.jsonl")
    assert any(
        f.code == "checkpoint_beyond_log"
        for f in verify_path(builder.dir, keys=[key]).errors
    )


def test_rewritten_history_against_reference_is_a_fork(tmp_path: Path) -> None:
    builder = standard_log(tmp_path / "a", intervals=2)
    key = builder.vkey_file(tmp_path / "key.vkey")
    reference = tmp_path / "ref.note"
    reference.write_text(builder.notes[-1])
    # A different, longer history signed with the same key: a fork of the first.
    forged = LogBuilder(tmp_path / "c")
    forged.boot_event()
    forged.reading("m1", "1.000")
    for _ in range(20):
        forged.event("source", src="m9")
    forged.checkpoint()
    report = verify_path(forged.dir, keys=[key], checkpoints=[reference])
    assert any(f.code == "fork" for f in report.errors), report.findings


def test_checkpoint_with_wrong_root_is_an_error(built: LogBuilder) -> None:
    text = note.checkpoint_text(built.origin, 5, bytes(32))
    forged = note.sign_note(text, built.signers)
    record = canonical.canonical_bytes({"note": forged, "size": 5})
    with (built.dir / "checkpoints.jsonl").open("ab") as stream:
        stream.write(record + b"\n")
    report = verify_built(built)
    assert (4, "checkpoint_root") in codes(report, "error")
    assert (4, "checkpoint_shrinks") in codes(report, "error")


def test_checkpoint_with_bad_signature_is_an_error(built: LogBuilder) -> None:
    path = built.dir / "checkpoints.jsonl"
    records = path.read_bytes().splitlines()
    record = json.loads(records[1])
    sig_at = record["note"].rindex(" ") + 10
    old = record["note"][sig_at]
    record["note"] = (
        record["note"][:sig_at]
        + ("A" if old != "A" else "B")
        + record["note"][sig_at + 1 :]
    )
    records[1] = canonical.canonical_bytes(record)
    path.write_bytes(b"".join(r + b"\n" for r in records))
    report = verify_built(built)
    size = record["size"]
    assert (size - 1, "checkpoint_signature") in codes(report, "error")


def test_key_rotation_hands_trust_to_the_new_key(tmp_path: Path) -> None:
    old = example_p256_signer("ies-agent/GW-TEST/log-1")
    new = example_ed25519_signer("ies-agent/GW-TEST/log-1")
    builder = LogBuilder(tmp_path / "data", signers=[old])
    key = builder.vkey_file(tmp_path / "old.vkey")
    builder.boot_event()
    builder.interval_readings(["m1"], lambda s, k: f"{k}.0", 2)
    builder.event("key_rotation", old_vkey=old.vkey(), new_vkey=new.vkey())
    builder.checkpoint()  # under the old key
    builder.signers = [new, old]
    builder.interval_readings(["m1"], lambda s, k: f"{k + 2}.0", 1)  # both keys
    builder.signers = [new]
    builder.interval_readings(["m1"], lambda s, k: f"{k + 3}.0", 2)  # new key only
    report = verify_path(builder.dir, keys=[key])
    assert report.findings == [] and report.signed_size == len(builder.lines)
    assert len(report.trusted_keys) == 2
    # Without the rotation event the new key's checkpoints are not trusted.
    lines = list(builder.lines)
    rotation = next(i for i, x in enumerate(lines) if b"key_rotation" in x)
    entry = json.loads(lines[rotation])
    entry["new_vkey"] = old.vkey()
    lines[rotation] = canonical.canonical_bytes(entry)
    builder.rewrite(lines)
    assert not verify_path(builder.dir, keys=[key]).ok


def _rotated_log(tmp_path: Path) -> tuple[LogBuilder, Any, Any]:
    """A log whose key was rotated after 12 checkpoints; returns (builder, old,
    new signer)."""
    old = example_p256_signer("ies-agent/GW-TEST/log-1")
    new = example_ed25519_signer("ies-agent/GW-TEST/log-1")
    builder = LogBuilder(tmp_path / "data", signers=[old])
    builder.boot_event()
    builder.interval_readings(["m1"], lambda s, k: f"{k}.0", 12)
    builder.event("key_rotation", old_vkey=old.vkey(), new_vkey=new.vkey())
    builder.checkpoint()  # under the old key
    builder.signers = [new, old]
    builder.interval_readings(["m1"], lambda s, k: f"{k + 12}.0", 1)  # both keys
    builder.signers = [new]
    builder.interval_readings(["m1"], lambda s, k: f"{k + 13}.0", 2)
    return builder, old, new


def test_pinning_only_the_new_key_after_a_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder, old, new = _rotated_log(tmp_path)
    new_key = builder.vkey_file(tmp_path / "new.vkey", index=0)
    new_key.write_text(new.vkey() + "\n")
    report = verify_path(builder.dir, keys=[new_key])
    # The new key signed over the rotation event naming the old key: one warning.
    (finding,) = report.findings
    assert finding.code == "key_vouched" and finding.severity == "warning"
    assert "13 checkpoints (sizes" in finding.message
    assert "keys/key-card.json" in finding.message
    assert report.signed_size == len(builder.lines)
    # The old key proves nothing signed after the hand-over.
    builder.signers = [old]
    builder.interval_readings(["m1"], lambda s, k: f"{k + 20}.0", 1)
    report = verify_path(builder.dir, keys=[new_key])
    assert [f.code for f in report.errors] == ["checkpoint_untrusted"]
    # A key that signed nothing here: one error for all checkpoints, with a hint.
    foreign = tmp_path / "foreign.vkey"
    foreign.write_text(
        note.Ed25519NoteSigner(
            "ies-agent/GW-TEST/log-1",
            ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32)),
        ).vkey()
        + "\n"
    )
    status, out, _ = run_cli(capsys, "verify", builder.dir, "--key", foreign)
    assert status == 1
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert len(errors) == 1
    assert "17 checkpoints (checkpoints.jsonl lines 1..17" in errors[0]
    assert (
        "pass its key card (keys/key-card.json), which lists retired keys"
        in (errors[0])
    )


def test_unprotected_tail_is_a_warning(
    built: LogBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    first = built.reading("m1", "200.000")
    built.reading("m2", "200.000")
    status, out, _ = run_cli(
        capsys, "verify", built.dir, "--key", built.dir.parent / "key.vkey"
    )
    assert status == 0
    assert (
        f"seq {first}: warning: entries seq {first}..{first + 1} are not covered" in out
    )


def test_log_without_checkpoints_warns(tmp_path: Path) -> None:
    builder = LogBuilder(tmp_path / "data")
    builder.boot_event()
    builder.reading("m1", "1.0")
    report = verify_path(builder.dir, keys=[builder.vkey_file(tmp_path / "k.vkey")])
    assert report.ok and codes(report) == {(None, "no_checkpoint")}


# --- signatures gone: checkpoints.jsonl deleted, cut or edited ----------------------


def _checkpoint_events(builder: LogBuilder) -> list[int]:
    return [i for i, line in enumerate(builder.lines) if b'"ev":"checkpoint"' in line]


def test_forged_log_with_checkpoints_deleted_fails(
    built: LogBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rewrite a value, recompute every prev, delete the signatures: this passed.
    forge(built.dir, b'"val":"101.200"', b'"val":"101.900"')
    (built.dir / "checkpoints.jsonl").unlink()
    status, out, _ = run_cli(
        capsys, "verify", built.dir, "--key", built.dir.parent / "key.vkey"
    )
    assert status == 1
    assert "checkpoints.jsonl does not exist, but the log holds 5 checkpoint " in out
    report = verify_built(built)
    assert [f.code for f in report.findings] == ["checkpoints_missing"]


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_checkpoints_cut_by_lines(built: LogBuilder, cut: int) -> None:
    events = _checkpoint_events(built)
    cut_checkpoints(built.dir, cut)
    report = verify_built(built)
    # The last event ends the log: as after a crash before its note, a warning.
    *gone, last = events[-cut:]
    assert codes(report, "error") == {(s, "checkpoint_note_missing") for s in gone}
    assert (last, "checkpoint_unsigned") in codes(report, "warning")
    assert report.ok == (cut == 1)
    for finding in report.errors:
        assert finding.message == (
            f"checkpoint event at seq {finding.seq} has no signed note: "
            "checkpoints.jsonl was edited, cut or deleted"
        )


def test_many_missing_notes_are_summed_up(tmp_path: Path) -> None:
    builder = standard_log(tmp_path / "data", intervals=15)
    key = builder.vkey_file(tmp_path / "key.vkey")
    (builder.dir / "checkpoints.jsonl").write_bytes(b"")
    events = _checkpoint_events(builder)
    report = verify_path(builder.dir, keys=[key])
    missing = [f for f in report.errors if f.code == "checkpoint_note_missing"]
    assert [f.seq for f in missing] == events[:11]
    assert missing[-1].message.startswith(
        f"5 more checkpoint events (seq {events[10]}..{events[14]}) have no signed"
    )


@pytest.mark.parametrize("prev_shutdown", ["unclean", "clean"])
def test_unsigned_checkpoint_before_a_restart(
    tmp_path: Path, prev_shutdown: str
) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    unsigned = builder.event("checkpoint", step_ms=10)  # the agent died here
    builder.boot_event(prev_shutdown=prev_shutdown)
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 2), 1)
    report = verify_path(builder.dir, keys=[key])
    # Only a crash explains it, and a crash makes the next boot unclean.
    crashed = prev_shutdown == "unclean"
    assert report.ok is crashed
    code = "checkpoint_unsigned" if crashed else "checkpoint_note_missing"
    assert (unsigned, code) in codes(report)


@pytest.mark.parametrize(
    ("added", "what"),
    [(b"", "a blank line"), (b"%% garbage %%", "not JSON"), (b"[1,2]", "a JSON list")],
    ids=["blank", "garbage", "json-list"],
)
def test_line_that_is_no_entry_is_named_by_line(
    built: LogBuilder, capsys: pytest.CaptureFixture[str], added: bytes, what: str
) -> None:
    lines = list(built.lines)
    built.rewrite([*lines[:9], added, *lines[9:]])
    status, out, _ = run_cli(
        capsys, "verify", built.dir, "--key", built.dir.parent / "key.vkey"
    )
    assert status == 1
    assert f"log: error: line 10 (after seq 8): not an entry ({what}" in out
    report = verify_built(built)
    assert report.entries == len(lines)
    assert {f.code for f in report.findings} == {"not_an_entry", "checkpoint_root"}
    assert "see line 10 (not an entry)" in next(
        f.message for f in report.errors if f.code == "checkpoint_root"
    )
    # At the very end, after the last signed entry.
    built.rewrite([*lines, added])
    report = verify_built(built)
    assert [f.code for f in report.findings] == ["not_an_entry"]
    assert f"(at the end of the log, after seq {len(lines) - 1})" in (
        report.findings[0].message
    )


def test_entry_overwritten_by_garbage_keeps_its_seq(built: LogBuilder) -> None:
    lines = list(built.lines)
    lines[9] = b"%% garbage %%"
    built.rewrite(lines)
    report = verify_built(built)
    assert (9, "bad_line") in codes(report, "error")
    assert not any(f.code in ("not_an_entry", "missing") for f in report.findings)


def test_duplicated_line_adds_no_uncovered_entry(built: LogBuilder) -> None:
    lines = list(built.lines)
    built.rewrite([*lines[:9], lines[8], *lines[9:]])
    report = verify_built(built)
    assert {f.code for f in report.findings} == {"duplicate", "checkpoint_root"}


def test_garbage_in_checkpoints_file_is_named_and_not_counted(
    built: LogBuilder,
) -> None:
    path = built.dir / "checkpoints.jsonl"
    records = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([records[0], b"garbage\n", b"\n", *records[1:]]))
    report = verify_built(built)
    assert report.checkpoints == len(records)
    messages = [f.message for f in report.errors]
    assert messages == [
        "checkpoints.jsonl line 2: not a checkpoint record (not JSON); each line "
        "must be a JSON object with 'note' (the signed note) and 'size'",
        "checkpoints.jsonl line 3: not a checkpoint record (a blank line); each line "
        "must be a JSON object with 'note' (the signed note) and 'size'",
    ]
    # Blank lines at the end of the file are no records, and no finding.
    path.write_bytes(b"".join(records) + b"\n\n")
    assert verify_built(built).findings == []


def test_reference_checkpoint_file_may_end_in_blank_lines(
    built: LogBuilder, tmp_path: Path
) -> None:
    note_file = tmp_path / "last.note"
    note_file.write_text(built.notes[-1] + "\n\n")
    jsonl = tmp_path / "upstream.jsonl"
    jsonl.write_bytes((built.dir / "checkpoints.jsonl").read_bytes() + b"\n \n")
    report = verify_built(built, checkpoints=[note_file, jsonl])
    assert report.findings == []


# --- contents: counters, registers, slots, clocks -----------------------------------


def _values(src: str, k: int) -> str:
    return f"{1000 + k}.5"


def _two_sources(tmp_path: Path, **kwargs: Any) -> tuple[LogBuilder, Path]:
    builder = LogBuilder(tmp_path / "data", **kwargs)
    key = builder.vkey_file(tmp_path / "key.vkey")
    builder.boot_event()
    return builder, key


def test_sseq_gap_is_an_error(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 1)
    builder.sseq["m1"] += 1
    seq = builder.reading("m1", "1002.0", t_ms=builder.boundary())
    builder.checkpoint()
    report = verify_path(builder.dir, keys=[key])
    assert codes(report, "error") == {(seq, "sseq_gap")}


def test_cumulative_decrease_unexplained_and_explained(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    down = builder.reading("m1", "999.0", t_ms=builder.boundary())
    builder.event("source", src="m1", dev={"ser": "NEW-METER"})
    explained = builder.reading("m1", "5.0", t_ms=builder.boundary())
    builder.checkpoint()
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    assert codes(report) == {
        (down, "cumulative_decrease"),
        (explained, "cumulative_decrease_explained"),
    }


def test_missing_slots_explained_or_not(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    boundaries = builder.interval_readings(
        ["m1", "m2"], _values, 6, skip={1: ["m2"], 3: ["m2"], 4: ["m2"]}
    )
    # A read error (logged late, after the fact) names slot 1; 3 and 4 stay
    # unexplained.
    builder.event(
        "read_error",
        src="m2",
        slot=iso_ms(boundaries[1]),
        error="DeviceTimeout",
        msg="no answer",
    )
    builder.checkpoint()
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    found = [(f.code, f.message) for f in report.warnings]
    assert [c for c, _ in found] == ["slot_missing", "slot_explained"]
    assert f"2 interval slot(s) from {iso_ms(boundaries[3])[:19]}" in found[0][1]
    assert "m2" in found[1][1]


def test_event_cadence_source_has_no_missing_slots(tmp_path: Path) -> None:
    # A charger connector reads only during sessions: its source event says so and
    # the slots it skips are no finding; an interval meter (m2) beside it still is
    # checked, and a later source event without the marker makes m1 interval again.
    builder, key = _two_sources(tmp_path)
    builder.event("source", src="m1", cadence="event")
    builder.interval_readings(["m1", "m2"], _values, 4, skip={1: ["m1"], 2: ["m2"]})
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    missing = [f.message for f in report.warnings if f.code == "slot_missing"]
    assert len(missing) == 1 and missing[0].startswith("m2:")
    builder.event("source", src="m1", dev={"ser": "INTERVAL-NOW"})
    builder.interval_readings(
        ["m1", "m2"], lambda s, k: _values(s, k + 4), 3, skip={1: ["m1"]}
    )
    report = verify_path(builder.dir, keys=[key])
    missing = [f.message for f in report.warnings if f.code == "slot_missing"]
    assert any(m.startswith("m1:") for m in missing)


def test_outage_after_unclean_shutdown_is_a_warning(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    builder.t_ms += 3 * 900_000  # power cut: three boundaries pass unseen
    boot = builder.boot_event(
        prev_shutdown="unclean", recovered={"truncated_bytes": 57, "last_seq": 4}
    )
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 5), 2)
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    assert codes(report) == {(boot, "unclean_shutdown"), (boot, "recovered")}
    message = next(f.message for f in report.findings if f.code == "unclean_shutdown")
    assert "3 interval slot(s)" in message


def test_clean_outage_is_reported_once(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 1)
    builder.event("shutdown")
    builder.checkpoint()
    builder.t_ms += 2 * 900_000
    boot = builder.boot_event(prev_shutdown="clean")
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 5), 1)
    report = verify_path(builder.dir, keys=[key])
    assert report.ok and codes(report) == {(boot, "outage")}


def test_clock_step_backwards_explained_by_event(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    builder.clock_step(-3_600_000)
    step = builder.event("time_step", delta_ms=-3_600_000)
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 2), 2)
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    assert codes(report) == {(step, "time_step")}


def test_clock_step_without_event_is_flagged(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    builder.clock_step(-3_600_000)
    jumped = builder.reading("m1", "1001.9")
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 2), 2)
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    assert (jumped, "time_step_unexplained") in codes(report, "warning")


def test_forward_step_explains_the_slots_it_skips(tmp_path: Path) -> None:
    builder, key = _two_sources(tmp_path)
    builder.interval_readings(["m1"], _values, 2)
    builder.clock_step(2 * 3_600_000)
    step = builder.event("time_step", delta_ms=2 * 3_600_000)
    builder.interval_readings(["m1"], lambda s, k: _values(s, k + 2), 2)
    report = verify_path(builder.dir, keys=[key])
    assert report.ok
    assert {c for _, c in codes(report)} == {"time_step", "slot_explained"}
    assert all(f.seq == step for f in report.findings)


# --- output and usage ---------------------------------------------------------------


def test_json_report(built: LogBuilder, capsys: pytest.CaptureFixture[str]) -> None:
    lines = list(built.lines)
    del lines[5]
    built.rewrite(lines)
    status, out, _ = run_cli(
        capsys, "verify", built.dir, "--key", built.dir.parent / "key.vkey", "--json"
    )
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False and report["kind"] == "log"
    assert {k: report["findings"][0][k] for k in ("seq", "severity", "code")} == {
        "seq": 5,
        "severity": "error",
        "code": "missing",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "/nonexistent/evidence"],
        ["verify", "{tmp}"],
        ["verify", str(EXAMPLE), "--key", "{tmp}/missing.vkey"],
        ["verify", str(EXAMPLE), "--key", "{tmp}/bad.vkey"],
        ["verify", "{tmp}/bad.vkey", "--key", str(EXAMPLE / "log_key.vkey")],
    ],
    ids=["no-path", "empty-dir", "no-key-file", "bad-key", "not-a-log"],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    (tmp_path / "bad.vkey").write_text("not a key\n")
    parser = argparse.ArgumentParser()
    verify_command.configure(parser)
    args = parser.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv[1:]])
    assert verify_command.main(args) == 2
    assert "ies-agent verify: " in capsys.readouterr().err


# --- logs written by the real writer ------------------------------------------------


class _SteppingClock:
    """A virtual clock; ``step`` moves wall time without the monotonic clock."""

    def __init__(self) -> None:
        self.t_ms = 1_746_100_800_000
        self.mono_ns = 1_000_000_000

    def now(self) -> Any:
        from ies_agent.clock import Timestamp

        return Timestamp(self.t_ms, "S", self.mono_ns)

    def advance(self, ms: int) -> None:
        self.t_ms += ms
        self.mono_ns += ms * 1_000_000

    def step(self, ms: int) -> None:
        self.t_ms += ms


def _write_with_evidence_log(data_dir: Path, clock: _SteppingClock) -> None:
    from ies_agent.evidence.log import EvidenceLog
    from ies_drivers.reading import Reading, ReadingState

    log = EvidenceLog.open(data_dir, gateway_id="GW1", clock=clock, interval_s=900)
    log.append_event("source", {"dev": {"mfr": "ACME"}}, src="m1")
    for k in range(6):
        clock.advance(900_000 - clock.t_ms % 900_000)
        if k == 3:
            clock.step(-3_600_000)  # someone sets the clock back an hour
        clock.advance(40)
        log.append_reading(
            Reading(
                "m1",
                "import_energy",
                "1-0:1.8.0*255",
                f"{1000 + k}.125",
                "kWh",
                ReadingState.OK,
                f"modbus:fc03:0x5000:{k:016x}",
                clock.t_ms,
                "S",
                clock.mono_ns,
                cumulative=True,
            )
        )
        log.checkpoint()
    log.close()


def test_log_written_by_evidence_log_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_with_evidence_log(data, _SteppingClock())
    key = data / "keys" / "log.vkey"
    status, out, _ = run_cli(capsys, "verify", data, "--key", key)
    assert status == 0, out
    report = verify_path(data, keys=[key])
    assert {f.code for f in report.findings} <= {"time_step", "slot_explained"}
    assert any(f.code == "time_step" for f in report.findings)

    # Change one byte inside a reading: that entry is named.
    path = data / "evidence.jsonl"
    lines = path.read_bytes().splitlines()
    seq = next(i for i, x in enumerate(lines) if b'"val":"1002.125"' in x)
    altered = list(lines)
    altered[seq] = altered[seq].replace(b"1002.125", b"1002.126")
    path.write_bytes(b"".join(x + b"\n" for x in altered))
    status, out, _ = run_cli(capsys, "verify", data, "--key", key)
    assert status == 1
    assert f"seq {seq}: error: entry was altered" in out

    # Delete a line: the gap is named.
    path.write_bytes(b"".join(x + b"\n" for i, x in enumerate(lines) if i != seq))
    status, out, _ = run_cli(capsys, "verify", data, "--key", key)
    assert status == 1
    assert f"seq {seq}: error: entry seq {seq} is missing" in out


def test_torn_write_recovered_by_evidence_log_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ies_agent.evidence.log import EvidenceLog

    data = tmp_path / "data"
    clock = _SteppingClock()
    _write_with_evidence_log(data, clock)
    # A power cut in the middle of writing the next entry ...
    with (data / "evidence.jsonl").open("ab") as stream:
        stream.write(b'{"boot":1,"mono":99,"seq":')
    key = data / "keys" / "log.vkey"
    status, out, _ = run_cli(capsys, "verify", data, "--key", key)
    assert status == 0 and "warning: the log ends in an incomplete line" in out
    # ... and the next start cuts it and says so in its boot event.
    clock.advance(60_000)
    EvidenceLog.open(data, gateway_id="GW1", clock=clock, interval_s=900).close()
    report = verify_path(data, keys=[key])
    assert report.ok
    assert "recovered" in {f.code for f in report.warnings}


def test_key_rotation_by_evidence_log_verifies_with_the_old_key(
    tmp_path: Path,
) -> None:
    from ies_agent.evidence.log import EvidenceLog

    clock = _SteppingClock()
    data = tmp_path / "data"
    log = EvidenceLog.open(data, gateway_id="GW1", clock=clock, interval_s=900)
    clock.advance(1000)
    log.checkpoint()
    old_key = tmp_path / "registered.vkey"
    shutil.copy(data / "keys" / "log.vkey", old_key)
    log.rotate_key()
    for _ in range(2):
        clock.advance(1000)
        log.checkpoint()
    log.close()
    report = verify_path(data, keys=[old_key])
    assert report.findings == [] and len(report.trusted_keys) == 2
    assert report.signed_size == report.entries


def test_forged_evidence_log_without_checkpoints_fails_and_is_not_reopened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ies_agent.evidence.log import EvidenceLog, UnsignedHistoryError

    data = tmp_path / "data"
    _write_with_evidence_log(data, _SteppingClock())
    key = tmp_path / "registered.vkey"
    shutil.copy(data / "keys" / "log.vkey", key)
    forge(data, b'"val":"1002.125"', b'"val":"2.125"')
    (data / "checkpoints.jsonl").unlink()
    status, out, _ = run_cli(capsys, "verify", data, "--key", key)
    assert status == 1 and "checkpoints.jsonl does not exist" in out
    with pytest.raises(UnsignedHistoryError):
        EvidenceLog.open(data, gateway_id="GW1", clock=_SteppingClock())


def test_keys_rotate_then_pin_only_the_new_vkey(tmp_path: Path) -> None:
    from ies_agent.evidence import keys
    from ies_agent.evidence.log import EvidenceLog

    clock = _SteppingClock()
    data = tmp_path / "data"
    with EvidenceLog.open(data, gateway_id="GW1", clock=clock) as log:
        for _ in range(40):
            clock.advance(1000)
            log.checkpoint()
    keys.rotate(data)
    with EvidenceLog.open(data, gateway_id="GW1", clock=clock) as log:
        clock.advance(1000)
        log.checkpoint()
    report = verify_path(data, keys=[data / "keys" / "log.vkey"])
    # ('keys rotate' runs on the real clock: an outage in virtual time, a warning.)
    found = [f.code for f in report.findings if f.code != "outage"]
    assert report.ok and found == ["key_vouched"]
    assert report.signed_size == report.entries


def test_ies_agent_command_line_routes_to_verify(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ies_agent.cli import main as ies_agent

    status = ies_agent(["verify", str(EXAMPLE), "--key", str(EXAMPLE / "log_key.vkey")])
    assert status == 0
    assert capsys.readouterr().out.startswith("OK: 0 errors, 0 warnings; 7 entries")
