"""Faults and independent peers: a killed agent, 200 chargers, a charger on ocpp-rpc.

- The agent runs as ``ies-agent run`` in a child process and is killed with SIGKILL
  in the middle of sessions, then started again on the same data directory.
- An independent charger built on the npm package ``ocpp-rpc`` (strict mode: it checks
  the agent's answers against its own schemas) charges through the agent.
- 200 chargers connect at once and send meter values (the long version, every 10 s for
  minutes, is ``bench/bench_ocpp.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from conftest import ROOT, free_port
from ies_agent.evidence.verify import verify_path
from ies_agent.ocpp.simulator import SessionPlan, SimulatedCharger
from ies_drivers.ocpp.versions import OcppVersion
from ocpp_checks import check_2x, check_16
from ocpp_fixtures import ocpp_config, running_central
from peers.ocpp_csms import CsmsProcess, InProcessCsms, calls_in

V16, V201 = OcppVersion.V16, OcppVersion.V201
NODE_DIR = ROOT / "tests" / "peers" / "node"


async def _until(check, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _site(path: Path, port: int, csms_url: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    site = path / "site.toml"
    site.write_text(
        f"""\
[gateway]
id = "gw-kill"
data_dir = "data"

[ocpp]
listen_port = {port}
security_profile = 0
answer_wait_s = 2
call_timeout_s = 5
drain_timeout_s = 10

[[ocpp.chargers]]
id = "K16"
versions = ["1.6"]

[[ocpp.chargers]]
id = "K201"
versions = ["2.0.1"]

[ocpp.csms]
url = "{csms_url}"
"""
    )
    return site


class Agent:
    """``ies-agent run`` in a child process, stopped by its own pid."""

    def __init__(self, site: Path, log: Path) -> None:
        self.site = site
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "agent"), str(ROOT / "drivers"), env.get("PYTHONPATH", "")]
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ies_agent.cli",
                    "run",
                    "--config",
                    str(self.site),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)


async def test_agent_killed_with_sigkill_mid_session_loses_nothing(
    tmp_path: Path,
) -> None:
    csms = CsmsProcess(free_port(), tmp_path / "csms.jsonl")
    csms.start()
    port = free_port()
    agent = Agent(_site(tmp_path / "site", port, csms.url), tmp_path / "agent.log")
    agent.start()
    plan = SessionPlan(session_s=2.5, pause_s=0.3, meter_interval_s=0.5)
    url = f"ws://127.0.0.1:{port}/ocpp"
    sims = [
        SimulatedCharger("K16", V16, url, plan=plan, call_timeout_s=3),
        SimulatedCharger("K201", V201, url, plan=plan, call_timeout_s=3),
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in sims]
    try:
        await _until(lambda: all(s.sessions >= 1 and s.in_session for s in sims))
        await asyncio.sleep(0.7)  # mid-session: started, some meter values sent
        assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
        await asyncio.sleep(1.0)
        agent.start()
        before = [s.sessions for s in sims]
        await _until(
            lambda: all(s.sessions >= b + 2 for s, b in zip(sims, before, strict=True))
        )
        stop.set()
        await asyncio.gather(*tasks)

        def delivered() -> bool:
            frames = csms.frames()
            return (
                len(check_16(frames, "K16").ended) == sims[0].sessions
                and len(check_2x(frames, "K201").ended) == sims[1].sessions
            )

        await _until(delivered, timeout_s=30)
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        stop.set()
        agent.kill()
        csms.kill()
    frames = csms.frames()
    s16, s201 = check_16(frames, "K16"), check_2x(frames, "K201")
    assert len(s16.started) == len(s16.ended) == sims[0].sessions
    assert len(s201.started) == len(s201.ended) == sims[1].sessions
    # The restarted agent recovered the log; it verifies (the kill shows as unclean).
    report = verify_path(tmp_path / "site" / "data")
    assert report.ok, report.summary()
    entries = [
        json.loads(line)
        for line in (tmp_path / "site/data/evidence.jsonl").read_text().splitlines()
    ]
    boots = [e for e in entries if e.get("ev") == "boot"]
    assert boots[-1]["prev_shutdown"] == "unclean"
    receipts = [e for e in entries if e.get("ev") == "session_receipt"]
    # Every session has a receipt; the one cut by the kill has it too (its open
    # transaction was kept on disk), with the energy of the whole session.
    assert len([r for r in receipts if r["charger"] == "K16"]) == sims[0].sessions
    assert len([r for r in receipts if r["charger"] == "K201"]) == sims[1].sessions
    assert all("energy_wh" in r for r in receipts if not r["flags"])


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_ocpp_rpc_charger_completes_a_session_through_the_agent(
    tmp_path: Path,
) -> None:
    if not (NODE_DIR / "node_modules" / "ocpp-rpc").is_dir():
        pytest.fail(f"ocpp-rpc is not installed: run `npm ci` in {NODE_DIR}")
    csms = InProcessCsms(free_port(), tmp_path / "csms.jsonl", call_during_start=True)
    await csms.start()
    config = ocpp_config({"NODE-1": (V16,)}, csms_url=csms.url)
    async with running_central(config, tmp_path / "data") as run:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(NODE_DIR / "charger.js"),
            run.url,
            "NODE-1",
            "NODE-TAG-1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        result = json.loads(output.decode().strip().splitlines()[-1])
        assert proc.returncode == 0, result
        receipt = run.events("session_receipt")[0]
    await csms.stop()
    assert result["ok"] and result["boot"]["status"] == "Accepted"
    assert result["auth"]["idTagInfo"]["status"] == "Accepted"
    # Online, the charger got the CSMS's own transaction id.
    calls = calls_in(csms.frames(), "NODE-1")
    assert [a for a, _ in calls] == [
        "BootNotification",
        "StatusNotification",
        "Authorize",
        "StartTransaction",
        "MeterValues",
        "MeterValues",
        "StopTransaction",
        "Heartbeat",
    ]
    tx_id = result["start"]["transactionId"]
    assert [
        p["transactionId"] for a, p in calls if a in ("MeterValues", "StopTransaction")
    ] == [tx_id] * 3
    assert "GetConfiguration" in result["received"]  # asked while its start waited
    assert receipt["transaction_id"] == str(tx_id)
    assert receipt["energy_wh"] == "600"


async def test_200_chargers_at_once_send_meter_values(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    csms = CsmsProcess(free_port(), tmp_path / "csms.jsonl")
    csms.start()
    count = 200
    try:
        config = ocpp_config({}, csms_url=csms.url, accept_unknown=True)
        async with running_central(config, tmp_path / "data") as run:

            async def charger(index: int) -> int:
                charger_id = f"LOAD-{index:03d}"
                async with connect(
                    f"{run.url}/{charger_id}",
                    subprotocols=[Subprotocol("ocpp1.6")],
                    open_timeout=20,
                    proxy=None,
                ) as websocket:
                    boot = {"chargePointVendor": "Load", "chargePointModel": "L"}
                    await websocket.send(json.dumps([2, "b", "BootNotification", boot]))
                    answers = [json.loads(await websocket.recv())]
                    for round_ in range(2):
                        sampled = {"value": str(1000 + round_), "unit": "Wh"}
                        payload = {
                            "connectorId": 1,
                            "meterValue": [
                                {
                                    "timestamp": "2026-01-01T00:00:00Z",
                                    "sampledValue": [sampled],
                                }
                            ],
                        }
                        await websocket.send(
                            json.dumps([2, f"m{round_}", "MeterValues", payload])
                        )
                        answers.append(json.loads(await websocket.recv()))
                    return sum(1 for a in answers if a[0] == 3)

            started = time.monotonic()
            results = await asyncio.gather(*(charger(i) for i in range(count)))
            elapsed = time.monotonic() - started
            assert results == [3] * count
            assert len(run.state.chargers) == count
            assert await run.central.wait_delivered(60)
    finally:
        csms.kill()
    frames = csms.frames()
    meter_values = [
        f for f in frames if f.direction == "in" and f.action == "MeterValues"
    ]
    assert len(meter_values) == 2 * count
    assert elapsed < 60
    report = verify_path(tmp_path / "data")
    assert report.ok, report.summary()
