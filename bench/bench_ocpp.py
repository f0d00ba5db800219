"""OCPP bridge: added latency against a direct connection, and 200 chargers' footprint.

Everything runs on loopback in separate processes: the test CSMS (built on the
``ocpp`` package, ``tests/peers/ocpp_csms.py``), the agent as ``ies-agent run`` with
an ``[ocpp]`` table bridged to that CSMS, and the chargers (raw WebSocket clients) in
this process.

1. Latency: one OCPP 1.6 charger sends ``--samples`` calls one after the other, first
   straight to the CSMS, then through the agent, in the same run; the round trip
   (charger → CSMS → charger) is timed per call. Two kinds: ``Heartbeat`` (forwarded
   as is) and ``MeterValues`` (journaled and fsynced before it is forwarded). The
   report gives p50 / p99 of each and what the bridge adds. Target: p99 added < 5 ms.
2. Load: ``--chargers`` chargers (default 200) connect at once, boot, and send meter
   values every ``--period`` seconds (default 10) for ``--seconds`` (default 120).
   The agent's CPU time over the steady window (after every charger is connected) and
   its resident memory (VmRSS, peak VmHWM) are read from ``/proc``. Targets: under
   20 % of one core and under 80 MiB.

    python bench/bench_ocpp.py [--samples 2000] [--chargers 200] [--seconds 120]
    python bench/bench_ocpp.py --quick      # a short smoke run (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

ROOT = Path(__file__).resolve().parents[1]
CSMS = ROOT / "tests" / "peers" / "ocpp_csms.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def env() -> dict[str, str]:
    environment = dict(os.environ)
    roots = [str(ROOT / "agent"), str(ROOT / "drivers")]
    environment["PYTHONPATH"] = os.pathsep.join(
        [*roots, environment.get("PYTHONPATH", "")]
    )
    return environment


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_kib(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Processes:
    """The CSMS and the agent as child processes, stopped by their own pids."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.csms_port = free_port()
        self.agent_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        log = (self.work / "processes.log").open("ab")
        csms = subprocess.Popen(
            [
                sys.executable,
                str(CSMS),
                "--port",
                str(self.csms_port),
                "--record",
                str(self.work / "csms.jsonl"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        self.procs.append(csms)
        wait_port(self.csms_port)
        site = self.work / "site.toml"
        site.write_text(
            f"""[gateway]
id = "bench-gw"
data_dir = "data"

[ocpp]
listen_port = {self.agent_port}
security_profile = 0
accept_unknown = true
versions = ["1.6"]
answer_wait_s = 5

[ocpp.csms]
url = "ws://127.0.0.1:{self.csms_port}/ocpp"
"""
        )
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ies_agent.cli",
                "--log-level",
                "WARNING",
                "run",
                "--config",
                str(site),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        self.procs.append(agent)
        wait_port(self.agent_port)

    @property
    def agent_pid(self) -> int:
        return self.procs[1].pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)


async def open_charger(url: str) -> ClientConnection:
    return await connect(
        url,
        subprotocols=[Subprotocol("ocpp1.6")],
        open_timeout=30,
        compression=None,
        proxy=None,
    )


def meter_values(index: int, value: int) -> dict[str, Any]:
    return {
        "connectorId": 1,
        "meterValue": [
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "sampledValue": [
                    {
                        "value": str(value),
                        "measurand": "Energy.Active.Import.Register",
                        "unit": "Wh",
                    },
                    {"value": "7.4", "measurand": "Power.Active.Import", "unit": "kW"},
                ],
            }
        ],
    }


async def round_trips(url: str, action: str, samples: int) -> list[float]:
    """Time ``samples`` calls of ``action`` one after the other (ms each)."""
    websocket = await open_charger(url)
    try:
        boot = {"chargePointVendor": "Bench", "chargePointModel": "B"}
        await websocket.send(json.dumps([2, "boot", "BootNotification", boot]))
        await websocket.recv()
        times = []
        for index in range(samples + 20):
            payload = {} if action == "Heartbeat" else meter_values(index, 1000 + index)
            text = json.dumps([2, f"m{index}", action, payload])
            started = time.perf_counter()
            await websocket.send(text)
            answer = json.loads(await websocket.recv())
            elapsed = (time.perf_counter() - started) * 1000
            if answer[0] != 3:
                raise RuntimeError(f"{action} failed: {answer}")
            if index >= 20:  # warm-up excluded
                times.append(elapsed)
        return times
    finally:
        await websocket.close()


async def latency(procs: Processes, samples: int) -> dict[str, Any]:
    direct_url = f"ws://127.0.0.1:{procs.csms_port}/ocpp/LAT-DIRECT"
    bridged_url = f"ws://127.0.0.1:{procs.agent_port}/ocpp/LAT-BRIDGED"
    results: dict[str, Any] = {}
    for action in ("Heartbeat", "MeterValues"):
        direct = await round_trips(direct_url, action, samples)
        await asyncio.sleep(0.5)
        bridged = await round_trips(bridged_url, action, samples)
        row = {}
        for name, values in (("direct", direct), ("bridged", bridged)):
            row[name] = {
                "p50_ms": round(statistics.median(values), 3),
                "p99_ms": round(percentile(values, 99), 3),
            }
        row["added_p50_ms"] = round(
            row["bridged"]["p50_ms"] - row["direct"]["p50_ms"], 3
        )
        row["added_p99_ms"] = round(
            row["bridged"]["p99_ms"] - row["direct"]["p99_ms"], 3
        )
        results[action] = row
    return results


async def load(
    procs: Processes, chargers: int, period_s: float, seconds: float
) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{procs.agent_port}/ocpp"
    ready = asyncio.Event()
    connected = 0
    sent = 0
    answered = 0
    slowest = 0.0
    stop = asyncio.Event()

    async def charger(index: int) -> None:
        nonlocal connected, sent, answered, slowest
        websocket = await open_charger(f"{url}/LOAD-{index:04d}")
        try:
            boot = {"chargePointVendor": "Bench", "chargePointModel": "Load"}
            await websocket.send(json.dumps([2, "b", "BootNotification", boot]))
            await websocket.recv()
            connected += 1
            if connected == chargers:
                ready.set()
            await ready.wait()
            # Spread the chargers over the period, as real ones drift apart.
            await asyncio.sleep(period_s * index / chargers)
            value = 1000
            while not stop.is_set():
                value += 20
                started = time.perf_counter()
                await websocket.send(
                    json.dumps(
                        [2, f"m{value}", "MeterValues", meter_values(index, value)]
                    )
                )
                sent += 1
                await websocket.recv()
                answered += 1
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(period_s)
        finally:
            await websocket.close()

    tasks = [asyncio.create_task(charger(i)) for i in range(chargers)]
    connect_started = time.monotonic()
    await asyncio.wait_for(ready.wait(), 120)
    connect_s = time.monotonic() - connect_started
    await asyncio.sleep(min(period_s, seconds / 4))  # settle
    cpu_before, wall_before = proc_cpu_s(procs.agent_pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu_after, wall_after = proc_cpu_s(procs.agent_pid), time.monotonic()
    rss, hwm = proc_rss_kib(procs.agent_pid)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "chargers": chargers,
        "period_s": period_s,
        "window_s": round(wall_after - wall_before, 1),
        "connect_all_s": round(connect_s, 2),
        "meter_values_sent": sent,
        "meter_values_answered": answered,
        "slowest_answer_ms": round(slowest * 1000, 1),
        "agent_cpu_percent_of_one_core": round(
            100 * (cpu_after - cpu_before) / (wall_after - wall_before), 2
        ),
        "agent_rss_mib": round(rss / 1024, 1),
        "agent_peak_rss_mib": round(hwm / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--chargers", type=int, default=200)
    parser.add_argument("--period", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.chargers, args.seconds, args.period = 200, 50, 6.0, 2.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    with tempfile.TemporaryDirectory(prefix="bench-ocpp-") as tmp:
        procs = Processes(Path(tmp))
        procs.start()
        try:
            lat = asyncio.run(latency(procs, args.samples))
            footprint = asyncio.run(
                load(procs, args.chargers, args.period, args.seconds)
            )
        finally:
            procs.stop()
    for action, row in lat.items():
        direct, bridged = row["direct"], row["bridged"]
        print(
            f"{action:<12} direct p50 {direct['p50_ms']:.3f} ms  "
            f"p99 {direct['p99_ms']:.3f} ms | bridged p50 "
            f"{bridged['p50_ms']:.3f} ms  p99 {bridged['p99_ms']:.3f} ms | "
            f"added p50 {row['added_p50_ms']:.3f} ms  p99 {row['added_p99_ms']:.3f} ms"
        )
    load_ = footprint
    print(
        f"{load_['chargers']} chargers, meter values every {load_['period_s']:g} s "
        f"for {load_['window_s']:g} s: agent CPU "
        f"{load_['agent_cpu_percent_of_one_core']} % of one core, RSS "
        f"{load_['agent_rss_mib']} MiB (peak {load_['agent_peak_rss_mib']} MiB), "
        f"{load_['meter_values_answered']}/{load_['meter_values_sent']} answered, "
        f"slowest {load_['slowest_answer_ms']} ms"
    )
    print(json.dumps({"latency": lat, "load": footprint, "samples": args.samples}))


if __name__ == "__main__":
    main()
