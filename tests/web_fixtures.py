"""A running ``ies-agent demo --http`` for the web, metrics and status tests.

The demo is a real agent process with real simulated devices on loopback; the fixture
starts it on free ports, waits until every simulated device has a value in the status
file, and stops it by its own process id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port

DEMO_DEVICES = ("grid-meter", "inverter", "house-meter", "ev-meter", "smart-meter")


@dataclass
class RunningDemo:
    """Where the demo's page is, its token and data directory."""

    url: str
    token: str
    data_dir: Path
    process: subprocess.Popen[bytes]


def _wait_ready(data_dir: Path, process: subprocess.Popen[bytes]) -> None:
    """Wait until the status file shows every demo device with a value (≤ 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo exited with {process.returncode}")
        try:
            status = json.loads((data_dir / "status.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        with_values = {
            d["id"]
            for d in status["devices"]
            if any(v["value"] is not None for v in d["values"].values())
        }
        if set(DEMO_DEVICES) <= with_values:
            return
        time.sleep(0.2)
    raise RuntimeError("the demo's devices did not all answer within 30 s")


@pytest.fixture(scope="module")
def running_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    """Start ``ies-agent demo --http 127.0.0.1:PORT`` for one test module."""
    data_dir = tmp_path_factory.mktemp("web-demo")
    port = free_port()
    log = (data_dir.parent / f"{data_dir.name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ies_agent.cli",
            "demo",
            "--data-dir",
            str(data_dir),
            "--interval",
            "2",
            "--upstream-wait",
            "1",
            "--http",
            f"127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _wait_ready(data_dir, process)
        token = (data_dir / "web-token.txt").read_text().strip()
        yield RunningDemo(f"http://127.0.0.1:{port}", token, data_dir, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
