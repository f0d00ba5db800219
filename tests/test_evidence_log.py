"""The evidence log writer: entries, chain, checkpoints, reopening, time, locking.

Every test writes a real data directory and checks the bytes on disk with the
primitives (canonical JSON, RFC 6962 hashing, signed notes), independently of the
writer's own state.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from evidence_log_fixtures import (
    b64_sha256,
    check_log,
    checkpoint_lines,
    cut_checkpoints,
    entries,
    forge,
    key_card,
    log_lines,
    make_reading,
    spawn_writer,
)
from ies_agent.clock import OffsetClock
from ies_agent.evidence import canonical, merkle, note
from ies_agent.evidence import log as evidence_log
from ies_agent.evidence.errors import (
    EvidenceError,
    EvidenceFormatError,
    LogLockedError,
    LogRollbackError,
)
from ies_agent.evidence.log import EvidenceLog, UnsignedHistoryError
from ies_drivers.reading import Reading, ReadingState


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock(tq="S")


def open_log(data_dir: Path, clock: OffsetClock, **kwargs: Any) -> EvidenceLog:
    kwargs.setdefault("gateway_id", "GW-1")
    return EvidenceLog.open(data_dir, clock=clock, **kwargs)


def crash(log: EvidenceLog) -> None:
    """Drop the log as a killed process would: files closed, no shutdown entry."""
    log._release()


def test_entries_are_canonical_with_the_contract_fields(
    tmp_path: Path, clock: OffsetClock
) -> None:
    log = open_log(tmp_path, clock, cfg_hash="sha256:ab", interval_s=300, tz="UTC")
    reading = make_reading(clock, device_time="2025-05-01T12:00:00", note="catch-up")
    seq = log.append_reading(reading)
    timeout = make_reading(clock, value=None, state=ReadingState.TIMEOUT, obis=None)
    log.append_reading(timeout)
    log.append_event("read_error", {"error": "timeout", "slots": 1}, src="m1")
    log.close()

    lines = log_lines(tmp_path)
    for line in lines:
        assert canonical.canonical_bytes(canonical.parse_entry(line)) == line
    boot, got, missing, error = (canonical.parse_entry(line) for line in lines[:4])

    assert boot["ev"] == "boot" and boot["seq"] == 0 and "prev" not in boot
    assert boot["agent"] == {"id": "GW-1", "sw": "0.1.0", "cfg": "sha256:ab"}
    assert boot["interval_s"] == 300 and boot["tz"] == "UTC" and boot["boot"] == 1
    assert boot["mono_unit"] == "us"
    assert boot["keys"] == [
        {"alg": "ECDSA-P256-SHA256", "vkey": key_card(tmp_path)["vkey"]}
    ]
    assert "prev_shutdown" not in boot and "recovered" not in boot

    assert seq == 1
    assert got == {
        "v": 1,
        "seq": 1,
        "type": "reading",
        "t": evidence_log.format_time(reading.t_ms),
        "tq": "S",
        "mono": reading.mono_ns // 1000,
        "boot": 1,
        "prev": b64_sha256(lines[0]),
        "src": "m1",
        "sseq": 0,
        "q": "import_energy",
        "obis": "1-0:1.8.0*255",
        "val": "12345.678",
        "unit": "kWh",
        "st": "G",
        "raw": "modbus:fc03:0x5000:0000000000bc614e",
        "cum": True,
        "dt": "2025-05-01T12:00:00",
        "note": "catch-up",
    }
    assert missing["st"] == "T" and "val" not in missing and "obis" not in missing
    assert missing["sseq"] == 1
    assert error["ev"] == "read_error" and error["src"] == "m1" and error["slots"] == 1
    assert [e["ev"] for e in entries(tmp_path)[4:]] == ["shutdown", "checkpoint"]


def test_time_is_formatted_as_utc_milliseconds() -> None:
    assert evidence_log.format_time(1_746_100_800_000) == "2025-05-01T12:00:00.000Z"
    assert evidence_log.format_time(1_746_102_600_007) == "2025-05-01T12:30:00.007Z"


def test_seq_prev_and_per_source_counters(tmp_path: Path, clock: OffsetClock) -> None:
    log = open_log(tmp_path, clock)
    for index in range(30):
        log.append_reading(make_reading(clock, src=f"m{index % 3}"))
        if index % 10 == 9:
            log.checkpoint()
    log.close()

    found = check_log(tmp_path)
    readings = [e for e in found.entries if e["type"] == "reading"]
    for src in ("m0", "m1", "m2"):
        assert [e["sseq"] for e in readings if e["src"] == src] == list(range(10))
    lines = log_lines(tmp_path)
    for before, after in zip(lines, found.entries[1:], strict=False):
        assert after["prev"] == b64_sha256(before)


def test_checkpoints_sign_the_root_over_their_own_event(
    tmp_path: Path, clock: OffsetClock
) -> None:
    log = open_log(tmp_path, clock)
    for _ in range(5):
        log.append_reading(make_reading(clock))
    signed = log.checkpoint()
    assert log.last_checkpoint == signed
    verifier = note.parse_vkey(key_card(tmp_path)["vkey"])
    opened = note.open_note(signed, [verifier])
    assert opened.verified_by == [verifier.label]
    body = note.parse_checkpoint(opened.text)
    assert body.origin == "ies-agent/GW-1/log-1"
    assert body.size == log.size == 7
    leaves = [merkle.leaf_hash(line) for line in log_lines(tmp_path)]
    assert body.root == merkle.root_from_leaves(leaves) == log.root()
    assert entries(tmp_path)[-1]["ev"] == "checkpoint"
    assert checkpoint_lines(tmp_path) == [{"note": signed, "size": 7}]
    assert log.durable_seq == 6

    # A later checkpoint is consistent with the earlier one.
    for _ in range(6):
        log.append_reading(make_reading(clock))
    later = note.parse_checkpoint(note.split_note(log.checkpoint())[0])
    leaves = [merkle.leaf_hash(line) for line in log_lines(tmp_path)]
    proof = merkle.consistency_proof(leaves, 7, later.size)
    assert merkle.verify_consistency(7, later.size, body.root, later.root, proof)
    log.close()
    check_log(tmp_path)


def test_checkpoint_lines_are_canonical(tmp_path: Path, clock: OffsetClock) -> None:
    with open_log(tmp_path, clock) as log:
        log.checkpoint()
    for line in (tmp_path / "checkpoints.jsonl").read_bytes().splitlines():
        assert canonical.parse_entry(line)["size"] >= 1


def test_origin_and_ed25519_key_are_used(tmp_path: Path, clock: OffsetClock) -> None:
    log = open_log(tmp_path, clock, origin="example.org/gw/7", key_alg="ed25519")
    signed = log.checkpoint()
    log.close()
    assert signed.startswith("example.org/gw/7\n")
    assert entries(tmp_path)[0]["keys"][0]["alg"] == "Ed25519"
    check_log(tmp_path)


def test_reopen_continues_the_log(tmp_path: Path, clock: OffsetClock) -> None:
    with open_log(tmp_path, clock) as log:
        for index in range(4):
            log.append_reading(make_reading(clock, src=f"m{index % 2}"))
        first_fp = log.key_fingerprint
    with open_log(tmp_path, clock) as log:
        assert log.boot == 2
        assert log.key_fingerprint == first_fp
        log.append_reading(make_reading(clock, src="m1"))
        log.append_reading(make_reading(clock, src="m3"))
    log = open_log(tmp_path, clock)
    crash(log)
    with open_log(tmp_path, clock) as log:
        assert log.boot == 4

    found = check_log(tmp_path)
    boots = [e for e in found.entries if e.get("ev") == "boot"]
    assert [b["boot"] for b in boots] == [1, 2, 3, 4]
    assert [b.get("prev_shutdown") for b in boots] == [
        None,
        "clean",
        "clean",
        "unclean",
    ]
    second = [e for e in found.entries if e["type"] == "reading" and e["boot"] == 2]
    assert [(e["src"], e["sseq"]) for e in second] == [("m1", 2), ("m3", 0)]


def test_events_cannot_forge_entry_fields(tmp_path: Path, clock: OffsetClock) -> None:
    with open_log(tmp_path, clock) as log:
        size = log.size
        for ev in ("boot", "checkpoint", "shutdown", "key_rotation", ""):
            with pytest.raises(EvidenceFormatError, match="reserved"):
                log.append_event(ev)
        with pytest.raises(EvidenceFormatError, match="replace entry fields"):
            log.append_event("config_change", {"seq": 3})
        with pytest.raises(EvidenceFormatError, match="float"):
            log.append_event("config_change", {"ratio": 0.5})
        with pytest.raises(EvidenceFormatError, match="decimal"):
            log.append_reading(make_reading(clock, value="1.5e3"))
        assert log.size == size
    check_log(tmp_path)


def test_closed_log_refuses_appends(tmp_path: Path, clock: OffsetClock) -> None:
    log = open_log(tmp_path, clock)
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(EvidenceError, match="closed"):
        log.append_event("config_change", {"old": "a", "new": "b"})


def test_clock_stepped_back_an_hour_is_logged(
    tmp_path: Path, clock: OffsetClock
) -> None:
    log = open_log(tmp_path, clock)
    log.append_reading(make_reading(clock))
    clock.offset_ms = -3_600_000
    seq = log.append_reading(make_reading(clock))
    log.append_reading(make_reading(clock))
    log.close()

    found = entries(tmp_path)
    step = found[seq - 1]
    assert step["ev"] == "time_step"
    assert -3_600_100 < step["delta_ms"] < -3_599_900
    assert found[seq]["type"] == "reading"
    assert [e.get("ev") for e in found].count("time_step") == 1
    check_log(tmp_path)


def test_time_quality_changes_are_logged(tmp_path: Path, clock: OffsetClock) -> None:
    log = open_log(tmp_path, clock)
    clock.tq = "U"
    log.append_reading(make_reading(clock))
    log.append_reading(make_reading(clock))
    clock.tq = "S"
    log.append_event("config_change", {"old": "a", "new": "b"})
    log.close()
    events = [(e.get("ev"), e.get("state"), e["tq"]) for e in entries(tmp_path)]
    assert events[1] == ("time_sync", "lost", "U")
    assert events[4] == ("time_sync", "gained", "S")
    assert [e[0] for e in events].count("time_sync") == 2


def test_reading_without_stamp_takes_the_clock(
    tmp_path: Path, clock: OffsetClock
) -> None:
    from ies_drivers.reading import Reading

    with open_log(tmp_path, clock) as log:
        before = clock.now()
        seq = log.append_reading(
            Reading("m1", "103.W", None, "1500", "W", ReadingState.OK, "sunspec:x")
        )
    entry = entries(tmp_path)[seq]
    assert entry["mono"] >= before.mono_ns // 1000 and entry["q"] == "103.W"
    assert "cum" not in entry and "obis" not in entry


def test_durability_policy(
    tmp_path: Path, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut cannot be simulated here, so a spy counts the real fdatasync calls.
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    log = open_log(tmp_path, clock, fsync_interval_s=3600)
    assert log.durable_seq == 0  # the boot event is fsynced at once
    calls = len(synced)
    seq = log.append_reading(make_reading(clock))
    assert log.durable_seq == 0 and len(synced) == calls
    # The entry is written (survives a process kill) before any fsync.
    assert canonical.parse_entry(log_lines(tmp_path)[seq])["seq"] == seq
    assert log.sync() == seq == log.durable_seq
    assert len(synced) == calls + 1
    assert log.sync() == seq and len(synced) == calls + 1  # nothing new to sync
    log.append_reading(make_reading(clock))
    log.checkpoint()
    assert log.durable_seq == log.size - 1
    log.close()
    assert log.durable_seq == log.size - 1

    every = open_log(tmp_path / "every", clock, fsync_interval_s=0)
    for _ in range(3):
        seq = every.append_reading(make_reading(clock))
        assert every.durable_seq == seq
    every.close()


def test_lock_held_by_another_process(tmp_path: Path, clock: OffsetClock) -> None:
    peer = spawn_writer(tmp_path, "hold")
    try:
        assert peer.stdout is not None
        assert peer.stdout.readline().strip() == "ready"
        with pytest.raises(LogLockedError) as raised:
            open_log(tmp_path, clock)
        assert str(tmp_path) in str(raised.value)
        assert f"pid {peer.pid}" in str(raised.value)
    finally:
        peer.communicate(timeout=10)
    assert peer.returncode == 0
    with open_log(tmp_path, clock, gateway_id="GW-PEER") as log:
        assert log.boot == 2
    check_log(tmp_path)


def test_lock_dies_with_its_process(tmp_path: Path, clock: OffsetClock) -> None:
    peer = spawn_writer(tmp_path, "hold")
    assert peer.stdout is not None
    assert peer.stdout.readline().strip() == "ready"
    os.kill(peer.pid, signal.SIGKILL)
    peer.communicate(timeout=10)
    with open_log(tmp_path, clock, gateway_id="GW-PEER") as log:
        assert log.boot == 2
    assert entries(tmp_path)[1]["prev_shutdown"] == "unclean"


def test_rollback_to_an_older_copy_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    log = open_log(tmp_path, clock)
    log.append_reading(make_reading(clock))
    log.checkpoint()
    older = (tmp_path / "evidence.jsonl").read_bytes()
    for _ in range(3):
        log.append_reading(make_reading(clock))
    log.close()
    newer = (tmp_path / "evidence.jsonl").read_bytes()

    (tmp_path / "evidence.jsonl").write_bytes(older)
    with pytest.raises(LogRollbackError, match=r"signs 8 entries but .* holds only 3"):
        open_log(tmp_path, clock)
    (tmp_path / "evidence.jsonl").unlink()
    with pytest.raises(LogRollbackError, match="holds only 0"):
        open_log(tmp_path, clock)
    # Nothing was written while refusing; the real log opens again.
    (tmp_path / "evidence.jsonl").write_bytes(newer)
    with open_log(tmp_path, clock):
        pass
    check_log(tmp_path)


def test_altered_checkpointed_entry_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    with open_log(tmp_path, clock) as log:
        log.append_reading(make_reading(clock, value="100.000"))
    data = (tmp_path / "evidence.jsonl").read_bytes()
    (tmp_path / "evidence.jsonl").write_bytes(data.replace(b"100.000", b"900.000"))
    with pytest.raises(LogRollbackError, match="do not match the root"):
        open_log(tmp_path, clock)


def _closed_log(data_dir: Path, clock: OffsetClock, checkpoints: int = 4) -> None:
    """A log of a clean run: readings, ``checkpoints`` interval checkpoints, close."""
    with open_log(data_dir, clock) as log:
        for index in range(checkpoints):
            log.append_reading(make_reading(clock, value=f"{100 + index}.000"))
            log.checkpoint()


def test_forged_log_with_checkpoints_deleted_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    # The newcomer's attack: rewrite a value, recompute every prev, delete the
    # signatures. The writer must not sign a checkpoint over that history.
    _closed_log(tmp_path, clock)
    forge(tmp_path, b'"val":"101.000"', b'"val":"901.000"')
    (tmp_path / "checkpoints.jsonl").unlink()
    before = (tmp_path / "evidence.jsonl").read_bytes()
    with pytest.raises(UnsignedHistoryError) as refused:
        open_log(tmp_path, clock)
    message = str(refused.value)
    assert "checkpoints.jsonl is missing" in message
    assert "5 checkpoint event(s) (the first at seq 2)" in message
    assert "Restore checkpoints.jsonl from a backup" in message
    assert "move" in message and "aside" in message
    assert isinstance(refused.value, LogRollbackError)
    assert (tmp_path / "evidence.jsonl").read_bytes() == before
    assert not (tmp_path / "checkpoints.jsonl").exists()


@pytest.mark.parametrize("cut", [2, 3])
def test_checkpoints_cut_by_lines_are_refused(
    tmp_path: Path, clock: OffsetClock, cut: int
) -> None:
    _closed_log(tmp_path, clock)
    events = [e["seq"] for e in entries(tmp_path) if e.get("ev") == "checkpoint"]
    cut_checkpoints(tmp_path, cut)
    with pytest.raises(UnsignedHistoryError) as refused:
        open_log(tmp_path, clock)
    first = events[-cut]
    assert f"checkpoint event at seq {first} of" in str(refused.value)
    assert f"signed note (size {first + 1})" in str(refused.value)
    if cut > 2:
        assert f"(and {cut - 2} more, up to seq {events[-2]})" in str(refused.value)


def test_forged_notes_are_refused(tmp_path: Path, clock: OffsetClock) -> None:
    _closed_log(tmp_path, clock)
    forge(tmp_path, b'"val":"101.000"', b'"val":"901.000"')
    # Roots recomputed for the forged log, signatures kept: only the key can sign.
    lines = log_lines(tmp_path)
    path = tmp_path / "checkpoints.jsonl"
    records = checkpoint_lines(tmp_path)
    for record in records:
        text, _ = note.split_note(record["note"])
        body = note.parse_checkpoint(text)
        root = merkle.root_from_leaves(
            [merkle.leaf_hash(line) for line in lines[: body.size]]
        )
        forged = note.checkpoint_text(body.origin, body.size, root)
        record["note"] = forged + record["note"][len(text) :]
    path.write_bytes(b"".join(canonical.canonical_bytes(r) + b"\n" for r in records))
    with pytest.raises(UnsignedHistoryError, match=r"newest checkpoint .* does not"):
        open_log(tmp_path, clock)


def test_checkpoint_record_that_is_no_note_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    _closed_log(tmp_path, clock)
    path = tmp_path / "checkpoints.jsonl"
    records = checkpoint_lines(tmp_path)
    records[1]["note"] = "a note that is not one"
    path.write_bytes(b"".join(canonical.canonical_bytes(r) + b"\n" for r in records))
    with pytest.raises(UnsignedHistoryError, match=r"record 2 of .* is not a signed"):
        open_log(tmp_path, clock)


def test_older_checkpoint_with_another_root_is_refused(
    tmp_path: Path, clock: OffsetClock
) -> None:
    # Not only the newest note: every note must match the log at its size.
    _closed_log(tmp_path, clock)
    path = tmp_path / "checkpoints.jsonl"
    records = checkpoint_lines(tmp_path)
    text, _ = note.split_note(records[1]["note"])
    body = note.parse_checkpoint(text)
    records[1]["note"] = records[1]["note"].replace(
        text, note.checkpoint_text(body.origin, body.size, bytes(32))
    )
    path.write_bytes(b"".join(canonical.canonical_bytes(r) + b"\n" for r in records))
    with pytest.raises(LogRollbackError, match="do not match the root"):
        open_log(tmp_path, clock)


def test_appending_stays_consistent_over_many_checkpoints(
    tmp_path: Path, clock: OffsetClock
) -> None:
    # Frontier root after every checkpoint equals the root recomputed from the file.
    log = open_log(tmp_path, clock)
    for index in range(200):
        log.append_reading(make_reading(clock, src=f"s{index % 5}"))
        if index % 17 == 0:
            log.checkpoint()
    log.close()
    reopened = open_log(tmp_path, clock)
    leaves = [merkle.leaf_hash(line) for line in log_lines(tmp_path)]
    assert reopened.root() == merkle.root_from_leaves(leaves)
    reopened.close()
    found = check_log(tmp_path)
    assert len(found.checkpoints) == 14


def test_data_dir_files_and_modes(tmp_path: Path, clock: OffsetClock) -> None:
    data_dir = tmp_path / "new" / "dir"
    with open_log(data_dir, clock):
        pass
    assert (data_dir / "keys").stat().st_mode & 0o777 == 0o700
    assert (data_dir / "keys" / "log-key.pem").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "lock").read_text().strip() == str(os.getpid())
    assert (data_dir / "keys" / "log-key.pem").read_bytes() not in (
        (data_dir / "evidence.jsonl").read_bytes()
    )


def test_mono_stays_below_2_pow_53_after_years_of_uptime(tmp_path: Path) -> None:
    # A gateway up for 10 years: nanoseconds would pass 2^53 after 104 days.
    ten_years_ns = 10 * 365 * 86_400 * 1_000_000_000
    log = EvidenceLog.open(tmp_path, gateway_id="GW-1", clock=OffsetClock())
    stamp = OffsetClock().now()
    reading = Reading(
        source="m1",
        quantity="import_energy",
        obis="1-0:1.8.0*255",
        value="1.5",
        unit="kWh",
        state=ReadingState.OK,
        raw="modbus:fc04:0x0048:3fc00000",
        t_ms=stamp.t_ms,
        tq="S",
        mono_ns=ten_years_ns,
    )
    log.append_reading(reading)
    log.close()
    entry = canonical.parse_entry(log_lines(tmp_path)[1])
    assert entry["mono"] == ten_years_ns // 1000 < 2**53
