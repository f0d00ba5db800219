"""``ies-agent status`` against a running demo, and without one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from web_fixtures import DEMO_DEVICES, RunningDemo, running_demo

__all__ = ["running_demo"]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ies_agent.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_status_of_a_running_agent(running_demo: RunningDemo) -> None:
    text = status("--data-dir", str(running_demo.data_dir))
    assert text.returncode == 0, text.stdout
    for device in DEMO_DEVICES:
        assert f"{device} " in text.stdout
    assert "online" in text.stdout
    assert "evidence:" in text.stdout

    as_json = status("--data-dir", str(running_demo.data_dir), "--json")
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["running"] is True
    ids = {d["id"] for d in report["status"]["devices"]}
    assert set(DEMO_DEVICES) <= ids
    assert report["status"]["pid"] == running_demo.process.pid
    assert report["status"]["evidence"]["entries"] > 0
    mode = (running_demo.data_dir / "status.json").stat().st_mode & 0o777
    assert mode == 0o640
    secret = running_demo.token
    assert secret not in (running_demo.data_dir / "status.json").read_text()


def test_status_without_an_agent(tmp_path: Path) -> None:
    result = status("--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no agent is running" in result.stdout

    # A status file left behind by an agent that stopped is not taken for a live one.
    (tmp_path / "status.json").write_text('{"gateway": "gw", "written_ms": 1}')
    (tmp_path / "lock").write_text("12345\n")
    stale = status("--data-dir", str(tmp_path), "--json")
    assert stale.returncode == 1
    assert json.loads(stale.stdout)["running"] is False
