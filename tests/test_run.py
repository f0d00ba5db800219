"""``ies-agent run`` on a site file: real simulator, real log, clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from cli_helpers import agent_cmd, agent_env, entries, run_agent
from ies_agent.demo.physics import SiteModel
from ies_agent.demo.simulator import Heartbeat, TemplateMeter, grid_meter, sim_device
from ies_drivers.templates import find_template
from test_cli_read import ServerThread


def test_run_keeps_reading_when_one_device_entry_is_broken(tmp_path: Path) -> None:
    meter = TemplateMeter(1, find_template("eastron-sdm630"), grid_meter)
    Heartbeat(
        SiteModel(tmp_path / "sim.json", ZoneInfo("Asia/Kolkata")), [meter]
    ).tick()
    with ServerThread([sim_device(1, meter)]) as server:
        site = tmp_path / "site.toml"
        site.write_text(
            f"""
[gateway]
id = "gw-run"
interval = "5s"
demo = true
data_dir = "data"

[[buses]]
id = "lan"
kind = "tcp"
host = "127.0.0.1"
port = {server.port}

[[devices]]
id = "good"
bus = "lan"
unit = 1
template = "eastron-sdm630"
poll_s = 1

[[devices]]
id = "typo"
bus = "lan"
unit = 2
template = "eastron-sdm603"
"""
        )
        # The checker refuses the file and names the line and key ...
        check = run_agent("config", "check", str(site))
        assert check.returncode == 1
        assert "site.toml:25: devices[1].template: no template 'eastron-sdm603'" in (
            check.stdout
        )

        # ... but the running agent leaves the broken entry out and reads the rest.
        agent = subprocess.Popen(
            agent_cmd("run", "--config", str(site)),
            env=agent_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(7)
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, out + err
    assert "device left out" in out + err

    log = entries(tmp_path / "data")
    errors = [e for e in log if e.get("ev") == "config_error"]
    assert errors and errors[0]["key"] == "devices[1].template"
    good = [e for e in log if e.get("src") == "good" and e["type"] == "reading"]
    assert good and all(e["st"] == "G" for e in good)
    assert log[-2]["ev"] == "shutdown" and log[-1]["ev"] == "checkpoint"
    assert run_agent("verify", str(tmp_path / "data")).returncode == 0
