"""``ies-agent demo --csms URL``: the simulated chargers bridged to a real CSMS.

The demo runs as a child process exactly as a user would run it, against the test
CSMS (``tests/peers/ocpp_csms.py``, built on the ``ocpp`` package) in another child
process. The run ends while a session is open: the demo must end it and wait until
the CSMS has it.
"""

from __future__ import annotations

from pathlib import Path

from cli_helpers import entries, run_agent
from conftest import free_port
from ocpp_checks import check_2x, check_16
from peers.ocpp_csms import CsmsProcess


def test_demo_chargers_reach_the_csms_and_open_sessions_are_closed(
    tmp_path: Path,
) -> None:
    csms = CsmsProcess(free_port(), tmp_path / "csms.jsonl")
    csms.start()
    try:
        data = tmp_path / "demo"
        # The first sessions start 6 s in and last 12 s: at 14 s they are open.
        result = run_agent(
            "demo", "--data-dir", str(data), "--for", "14", "--csms", csms.url
        )
    finally:
        csms.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo-cp-16" in result.stdout and "ocpp2.0.1" in result.stdout

    frames = csms.frames()
    s16, s201 = check_16(frames, "demo-cp-16"), check_2x(frames, "demo-cp-201")
    assert len(s16.started) == len(s16.ended) == 1
    assert len(s201.started) == len(s201.ended) == 1
    # Each offered its own version, under its own id as the last path segment.
    protos = {(f.charger, f.proto) for f in frames}
    assert protos == {("demo-cp-16", "ocpp1.6"), ("demo-cp-201", "ocpp2.0.1")}
    receipts = [e for e in entries(data) if e.get("ev") == "session_receipt"]
    assert {r["charger"] for r in receipts} == {"demo-cp-16", "demo-cp-201"}
    assert run_agent("verify", str(data)).returncode == 0
