"""DLMS meters through the command line: read, config check, run with a bad secret.

The meter is our own IS 15959 meter server on the DLMS TCP wrapper, in its own thread
and event loop, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import agent_cmd, agent_env, entries, run_agent
from ies_drivers.dlms.server import MeterServer, SimulatedMeter


class MeterThread:
    """Our meter server on the TCP wrapper, in a thread with its own loop."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.server = MeterServer(SimulatedMeter(serial="IES0000099"))
        self.port = self._loop.run_until_complete(self.server.start_tcp())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> MeterThread:
        self._thread.start()
        assert self._ready.wait(10), "meter server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a secret file with ``mode``."""
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def meter_site(tmp_path: Path) -> Iterator[Path]:
    with MeterThread() as meter:
        secret(tmp_path / "meter.pass", "ABCDEFGH")
        site = tmp_path / "site.toml"
        site.write_text(
            f"""
[gateway]
id = "gw-dlms"
interval = "5s"
demo = true
data_dir = "data"

[[buses]]
id = "wrapper"
kind = "dlms-wrapper"
host = "127.0.0.1"
port = {meter.port}

[[devices]]
id = "smart"
bus = "wrapper"
template = "is15959"
auth = "low"
password_file = "meter.pass"
poll_s = 1
"""
        )
        yield site


def test_read_a_dlms_meter(meter_site: Path) -> None:
    result = run_agent("read", "--config", str(meter_site), "smart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ser=IES0000099" in result.stdout and "protocol=dlms" in result.stdout
    voltage = next(line for line in result.stdout.splitlines() if "1-0:12.7.0" in line)
    _quantity, value, unit, obis, state = voltage.split()
    assert (unit, obis, state) == ("V", "1-0:12.7.0*255", "ok")
    assert 180 < float(value) < 260


def test_wrong_password_and_open_secret_file(meter_site: Path) -> None:
    # A wrong password: the meter refuses the association; one clear line, exit 1.
    secret(meter_site.parent / "meter.pass", "WRONGPWD")
    wrong = run_agent("read", "--config", str(meter_site), "smart")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stdout + wrong.stderr

    # A password file others can read: config check warns, read refuses, run goes on.
    secret(meter_site.parent / "meter.pass", "ABCDEFGH", 0o644)
    check = run_agent("config", "check", str(meter_site))
    assert check.returncode == 0
    assert "readable by group or others" in check.stdout
    assert "chmod 600" in check.stdout
    refused = run_agent("read", "--config", str(meter_site), "smart")
    assert refused.returncode == 1 and "chmod 600" in refused.stdout

    agent = subprocess.Popen(
        agent_cmd("run", "--config", str(meter_site)),
        env=agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    agent.send_signal(signal.SIGTERM)
    out, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, out + err
    log = entries(meter_site.parent / "data")
    left_out = [e for e in log if e.get("ev") == "config_error"]
    assert left_out and left_out[0]["src"] == "smart"
    assert "chmod 600" in left_out[0]["msg"]


def test_config_check_accepts_inline_secrets_of_a_boot_file(tmp_path: Path) -> None:
    boot = tmp_path / "ies-agent.toml"
    boot.write_text(
        '[gateway]\nid = "gw-1"\n\n[[buses]]\nid = "dlms"\nkind = "dlms-wrapper"\n'
        'host = "10.0.0.9"\n\n[[devices]]\nid = "m"\nbus = "dlms"\n'
        'template = "is15959"\nauth = "low"\npassword = "ABCDEFGH"\n'
    )
    result = run_agent("config", "check", str(boot))
    assert result.returncode == 0, result.stdout
    assert "1 inline secret will be moved" in result.stdout
    assert "ABCDEFGH" not in result.stdout  # never echo a secret


def test_dlms_profile_on_a_modbus_bus_says_what_to_do(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(
        '[gateway]\nid = "gw"\n\n[[buses]]\nid = "lan"\nkind = "tcp"\nhost = "h"\n\n'
        '[[devices]]\nid = "m"\nbus = "lan"\nunit = 1\ntemplate = "is15959"\n'
    )
    result = run_agent("config", "check", str(site))
    assert result.returncode == 1
    assert "is a DLMS/COSEM meter profile" in result.stdout
