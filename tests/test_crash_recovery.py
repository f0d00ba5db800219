"""Crash safety: torn tails at every byte, power-cut holes, SIGKILL at random moments.

A power cut cannot be produced here; what it leaves behind can: a log cut at any byte,
a tail of zeros where blocks were never written, a torn checkpoint line. Process kills
are real: a writer process (``tests/peers/evidence_writer.py``) is killed with SIGKILL.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from evidence_log_fixtures import (
    check_log,
    checkpoint_lines,
    entries,
    log_lines,
    make_reading,
    spawn_writer,
)
from ies_agent.clock import OffsetClock
from ies_agent.evidence import log as evidence_log
from ies_agent.evidence.errors import EvidenceError
from ies_agent.evidence.log import EvidenceLog
from ies_agent.evidence.verify import Finding, verify_path


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock(tq="S")


def open_log(data_dir: Path, clock: OffsetClock) -> EvidenceLog:
    return EvidenceLog.open(data_dir, gateway_id="GW-CRASH", clock=clock)


@pytest.fixture
def crashed_log(tmp_path: Path, clock: OffsetClock) -> Path:
    """A data directory whose writer died (no shutdown) after a checkpoint and more."""
    source = tmp_path / "source"
    log = open_log(source, clock)
    for index in range(6):
        log.append_reading(make_reading(clock, src=f"m{index % 2}"))
    log.checkpoint()
    for index in range(3):
        log.append_reading(make_reading(clock, src=f"m{index % 2}"))
    log.sync()
    log._release()  # the process dies: no shutdown, no closing checkpoint
    return source


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def boot_event(data_dir: Path, boot: int) -> dict[str, object]:
    return next(
        e for e in entries(data_dir) if e.get("ev") == "boot" and e["boot"] == boot
    )


def test_torn_tail_at_every_byte_recovers_to_the_last_entry(
    tmp_path: Path, crashed_log: Path, clock: OffsetClock
) -> None:
    data = (crashed_log / "evidence.jsonl").read_bytes()
    lines = log_lines(crashed_log)
    start = len(data) - len(lines[-1]) - 1
    last_complete = len(lines) - 2
    for cut_at in range(start + 1, len(data)):
        work = copy_dir(crashed_log, tmp_path / f"cut{cut_at}")
        (work / "evidence.jsonl").write_bytes(data[:cut_at])
        with open_log(work, clock) as log:
            assert log.size == last_complete + 2  # + the new boot event
        boot = boot_event(work, 2)
        assert boot["seq"] == last_complete + 1
        assert boot["recovered"] == {
            "truncated_bytes": cut_at - start,
            "last_seq": last_complete,
        }
        assert boot["prev_shutdown"] == "unclean"
        assert (work / "evidence.jsonl.cut-boot2").read_bytes() == data[start:cut_at]
        check_log(work, run_verifier=cut_at % 16 == 0)
        shutil.rmtree(work)


def test_recovery_survives_a_crash_before_the_boot_event(
    crashed_log: Path, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the agent dies after cutting the torn tail but before its
    # boot event is written; the next start still reports what was cut.
    lines = log_lines(crashed_log)
    data = (crashed_log / "evidence.jsonl").read_bytes()
    (crashed_log / "evidence.jsonl").write_bytes(data[:-25])
    torn = len(lines[-1]) + 1 - 25

    def die(*args: object, **kwargs: object) -> int:
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(EvidenceLog, "_append_event_entry", die)
        with pytest.raises(SystemExit):
            open_log(crashed_log, clock)
    assert (crashed_log / "evidence.jsonl").stat().st_size == len(data) - torn - 25
    with open_log(crashed_log, clock):
        pass
    boot = boot_event(crashed_log, 2)
    assert boot["recovered"] == {"truncated_bytes": torn, "last_seq": len(lines) - 2}
    check_log(crashed_log)


def test_clean_cut_at_an_entry_boundary_needs_no_recovery(
    tmp_path: Path, crashed_log: Path, clock: OffsetClock
) -> None:
    with open_log(crashed_log, clock):
        pass
    boot = boot_event(crashed_log, 2)
    assert "recovered" not in boot and boot["prev_shutdown"] == "unclean"
    check_log(crashed_log)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda line: b"\0" * len(line), id="zeros-with-newline"),
        pytest.param(lambda line: b"\0" * 700, id="zeros-no-newline"),
        pytest.param(lambda line: line.replace(b":", b": ", 1), id="not-canonical"),
        pytest.param(lambda line: line[:-40] + b"\n" + line[-40:], id="split-line"),
    ],
)
def test_power_cut_garbage_after_the_checkpoint_is_cut(
    tmp_path: Path, crashed_log: Path, clock: OffsetClock, damage: object
) -> None:
    # Blocks written out of order leave a hole (zeros) before later, complete lines:
    # everything from the first bad line on is cut, never the checkpointed entries.
    assert callable(damage)
    lines = log_lines(crashed_log)
    keep = b"".join(line + b"\n" for line in lines[:-2])
    bad = damage(lines[-2] + b"\n")
    (crashed_log / "evidence.jsonl").write_bytes(keep + bad + lines[-1] + b"\n")
    with open_log(crashed_log, clock):
        pass
    boot = boot_event(crashed_log, 2)
    recovered = boot["recovered"]
    assert isinstance(recovered, dict)
    assert recovered["last_seq"] == len(lines) - 3
    assert recovered["truncated_bytes"] == len(bad) + len(lines[-1]) + 1
    check_log(crashed_log)


def test_torn_checkpoint_line_is_cut(
    tmp_path: Path, crashed_log: Path, clock: OffsetClock
) -> None:
    with open_log(crashed_log, clock) as log:
        log.append_reading(make_reading(clock))
        log.checkpoint()
        log._release()  # crash, leaving two checkpoints
    data = (crashed_log / "checkpoints.jsonl").read_bytes()
    last = data.splitlines(keepends=True)[-1]
    start = len(data) - len(last)
    for cut_at in range(start + 1, len(data), 7):
        work = copy_dir(crashed_log, tmp_path / f"cp{cut_at}")
        (work / "checkpoints.jsonl").write_bytes(data[:cut_at])
        with open_log(work, clock):
            pass
        boot = boot_event(work, 3)
        assert boot["recovered"] == {
            "truncated_bytes": 0,
            "last_seq": int(str(boot["seq"])) - 1,
            "checkpoints_truncated_bytes": cut_at - start,
        }
        assert len(checkpoint_lines(work)) == 2  # the one kept + the closing one
        check_log(work, run_verifier=False)
        shutil.rmtree(work)


def die(*args: object, **kwargs: object) -> str:
    raise SystemExit("killed")


def verify_findings(data_dir: Path) -> dict[str, list[Finding]]:
    """Run the verifier with the key card; fail on errors; return warnings by code."""
    report = verify_path(data_dir, keys=[data_dir / "keys" / "key-card.json"])
    assert report.ok, [f.line() for f in report.errors]
    found: dict[str, list[Finding]] = {}
    for finding in report.warnings:
        found.setdefault(finding.code, []).append(finding)
    return found


@pytest.mark.parametrize("closing", [False, True], ids=["interval", "at-close"])
def test_crash_between_checkpoint_event_and_note(
    crashed_log: Path,
    clock: OffsetClock,
    monkeypatch: pytest.MonkeyPatch,
    closing: bool,
) -> None:
    # Fault injection: the agent dies after appending (and fsyncing) the checkpoint
    # event, before its note is signed and stored.
    log = open_log(crashed_log, clock)
    log.append_reading(make_reading(clock))
    with monkeypatch.context() as patch:
        patch.setattr(evidence_log, "sign_note", die)
        with pytest.raises(SystemExit):
            log.close() if closing else log.checkpoint()
    log._release()
    unsigned = len(log_lines(crashed_log)) - 1
    assert entries(crashed_log)[unsigned]["ev"] == "checkpoint"
    assert checkpoint_lines(crashed_log)[-1]["size"] < unsigned + 1
    # The verifier sees a crash, not an edit: a warning at the end of the log.
    assert verify_findings(crashed_log)["checkpoint_unsigned"][0].seq == unsigned

    # The next start accepts it, leaves it unsigned and says so in its boot event.
    with open_log(crashed_log, clock) as log:
        log.append_reading(make_reading(clock))
    boot = boot_event(crashed_log, 3)
    assert boot["seq"] == unsigned + 1
    assert boot["prev_shutdown"] == "unclean"  # even after a shutdown entry
    assert boot["unsigned_checkpoint"] == unsigned
    check_log(crashed_log, run_verifier=False)
    warned = verify_findings(crashed_log)
    assert [f.seq for f in warned["checkpoint_unsigned"]] == [unsigned]
    assert "next boot reports an unclean shutdown" in (
        warned["checkpoint_unsigned"][0].message
    )

    # Later starts still accept it, and record it only once.
    with open_log(crashed_log, clock):
        pass
    assert "unsigned_checkpoint" not in boot_event(crashed_log, 4)
    verify_findings(crashed_log)


def test_checkpoint_that_cannot_be_stored_stops_the_log(
    crashed_log: Path, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A note that cannot be written (disk full) must stay the last checkpoint event
    # without a note: the log takes nothing more until a restart.
    log = open_log(crashed_log, clock)
    write_all = evidence_log._write_all

    def full(fd: int, data: bytes) -> None:
        if fd == log._checkpoints_fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_all(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(evidence_log, "_write_all", full)
        with pytest.raises(EvidenceError, match="No space left"):
            log.checkpoint()
    with pytest.raises(EvidenceError, match="restart the agent"):
        log.append_reading(make_reading(clock))
    log.close()  # releases only
    with open_log(crashed_log, clock):
        pass
    assert "unsigned_checkpoint" in boot_event(crashed_log, 3)
    verify_findings(crashed_log)


def kill_writer_at_random(data_dir: Path, rng: random.Random) -> int:
    """SIGKILL the writer peer at a random moment; return its last durable seq."""
    peer = spawn_writer(data_dir, "append")
    durable = -1
    assert peer.stdout is not None
    stdout = peer.stdout

    def read_stdout() -> None:
        nonlocal durable
        for line in stdout:
            if line.startswith("durable "):
                durable = int(line.split()[1])

    reader = threading.Thread(target=read_stdout, name="writer-stdout")
    reader.start()
    # Sometimes during start-up and recovery, mostly while appending.
    time.sleep(rng.uniform(0.02, 0.4))
    os.kill(peer.pid, signal.SIGKILL)
    peer.wait(timeout=10)
    reader.join(timeout=10)
    assert peer.stderr is not None
    errors = peer.stderr.read()
    peer.stderr.close()
    assert peer.returncode == -signal.SIGKILL, errors
    return durable


def sigkill_loop(data_dir: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    clock = OffsetClock(tq="S")
    highest_durable = -1
    for _ in range(rounds):
        durable = kill_writer_at_random(data_dir, rng)
        highest_durable = max(highest_durable, durable)
        if not (data_dir / "evidence.jsonl").exists():
            continue
        with EvidenceLog.open(data_dir, gateway_id="GW-PEER", clock=clock) as log:
            assert log.size > highest_durable + 1
        found = check_log(data_dir)
        # Every seq ever reported durable is there, in order, with its content.
        assert [e["seq"] for e in found.entries[: highest_durable + 1]] == list(
            range(highest_durable + 1)
        )
    assert highest_durable > 0, "the writer never reported a durable entry"


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    sigkill_loop(tmp_path / "data", rounds=10, seed=1)
    boots = [e for e in entries(tmp_path / "data") if e.get("ev") == "boot"]
    assert any(e.get("prev_shutdown") == "unclean" for e in boots)


@pytest.mark.soak
def test_sigkill_soak(tmp_path: Path) -> None:
    # 200 kills; a fresh directory every 25 keeps each full check of the log short.
    for part in range(8):
        sigkill_loop(tmp_path / f"data{part}", rounds=25, seed=100 + part)
