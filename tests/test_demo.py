"""Acceptance tests of ``ies-agent demo``: simulated site, real read path, real log.

Each test runs the agent as a child process exactly as a user would, against the
simulators the demo starts itself (pymodbus servers on loopback, an RS-485 line on a
socat pseudo-terminal pair).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from cli_helpers import agent_cmd, agent_env, entries, run_agent

DEVICES = {"grid-meter", "inverter", "house-meter", "ev-meter", "smart-meter"}


def _readings_by_source(data_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries(data_dir):
        if entry["type"] == "reading" and entry["st"] == "G":
            counts[entry["src"]] = counts.get(entry["src"], 0) + 1
    return counts


def test_demo_leaves_verifiable_readings_for_every_device(tmp_path: Path) -> None:
    data = tmp_path / "site"
    result = run_agent(
        "demo", "--data-dir", str(data), "--for", "20", "--interval", "5"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ies-agent verify" in result.stdout  # it says what to run next

    # Every simulated device has good readings; the SunSpec inverter was identified.
    counts = _readings_by_source(data)
    assert set(counts) >= DEVICES, counts
    log = entries(data)
    sources = {e["src"]: e["dev"] for e in log if e.get("ev") == "source"}
    assert sources["inverter"]["models"] == "1,103,120,123"
    assert sources["house-meter"]["bus"].startswith("modbus-rtu:")
    assert sources["smart-meter"]["protocol"] == "dlms"  # IS 15959 over the wrapper
    assert sources["smart-meter"]["ser"] == "IES0000417"
    dlms = [e for e in log if e.get("src") == "smart-meter" and e["type"] == "reading"]
    assert all(e["raw"].startswith("dlms:") for e in dlms)
    assert {"1-0:1.8.0*255", "1-0:12.7.0*255"} <= {e.get("obis") for e in dlms}

    # Energy registers are cumulative and never fall.
    energy = [e for e in log if e.get("q") == "103.WH"]
    assert energy and all(e["obis"] == "1-0:2.8.0*255" for e in energy)
    values = [int(e["val"]) for e in energy]
    assert values == sorted(values)

    # The log verifies offline, and says the key was not pinned.
    verify = run_agent("verify", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # One byte changed inside a reading: exit 1, naming that entry's seq.
    lines = (data / "evidence.jsonl").read_bytes().splitlines(keepends=True)
    target = next(i for i, e in enumerate(log) if e["type"] == "reading" and i > 10)
    lines[target] = lines[target].replace(b'"st":"G"', b'"st":"E"', 1)
    (data / "evidence.jsonl").write_bytes(b"".join(lines))
    tampered = run_agent("verify", str(data))
    assert tampered.returncode == 1
    assert f"seq {target}" in tampered.stdout

    # A deleted line: exit 1, naming the gap.
    lines = (data / "evidence.jsonl").read_bytes().splitlines(keepends=True)
    gone = target + 5
    del lines[gone]
    (data / "evidence.jsonl").write_bytes(b"".join(lines))
    deleted = run_agent("verify", str(data))
    assert deleted.returncode == 1
    assert str(gone) in deleted.stdout


def _socat_children(data: Path) -> list[int]:
    """Return pids of socat processes serving ``data``'s simulated RS-485 line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"socat")
            and str(data).encode() in b" ".join(cmdline)
        ):
            pids.append(int(proc.name))
    return pids


def test_demo_killed_and_restarted_continues_the_same_log(tmp_path: Path) -> None:
    data = tmp_path / "site"
    child = subprocess.Popen(
        agent_cmd("demo", "--data-dir", str(data), "--interval", "5"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=agent_env(),
    )
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            log_file = data / "evidence.jsonl"
            if log_file.exists() and log_file.read_bytes().count(b'"ev":"checkpoint"'):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the demo wrote no checkpoint in 40 s")
        time.sleep(1.3)  # kill it somewhere in the middle of its work
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    killed_size = len(entries(data))

    # No orphans: the simulated line's socat died with the demo.
    deadline = time.monotonic() + 5
    while _socat_children(data) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _socat_children(data) == []

    # Started again on the same directory: no stale lock, the log continues.
    again = run_agent("demo", "--data-dir", str(data), "--for", "8", "--interval", "5")
    assert again.returncode == 0, again.stdout + again.stderr
    log = entries(data)
    boots = [e for e in log if e.get("ev") == "boot"]
    assert len(boots) == 2 and boots[1]["boot"] == boots[0]["boot"] + 1
    assert boots[1]["prev_shutdown"] == "unclean"
    assert boots[1]["seq"] >= killed_size - 1  # at most a torn last line was cut
    assert [e["seq"] for e in log] == list(range(len(log)))

    verify = run_agent("verify", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
