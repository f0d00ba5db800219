"""Footprint: resident memory of ``ies-agent run`` with a 20-device Modbus site.

Starts 20 simulated meters (Eastron SDM630 register maps, one pymodbus TCP server per
device, in a separate process), writes a site file naming them, runs ``ies-agent run``
for ``--seconds`` (default 60) and prints its resident memory (VmRSS, peak VmHWM) next
to a bare Python interpreter's in the same run. Target: under 45 MiB.

    python bench/bench_footprint.py [--seconds 60] [--devices 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = r"""
import asyncio, sys
sys.path[:0] = [sys.argv[1] + "/agent", sys.argv[1] + "/drivers"]
from pymodbus.server import ModbusTcpServer
from ies_agent.demo.physics import SiteModel
from ies_agent.demo.simulator import TemplateMeter, Heartbeat, grid_meter, sim_device
from ies_drivers.templates import find_template
from pathlib import Path
from zoneinfo import ZoneInfo

async def main():
    n = int(sys.argv[2])
    model = SiteModel(Path(sys.argv[3]) / "sim.json", ZoneInfo("Asia/Kolkata"))
    template = find_template("eastron-sdm630")
    meters = [TemplateMeter(1, template, grid_meter) for _ in range(n)]
    beat = Heartbeat(model, meters)
    beat.tick()
    ports = []
    for meter in meters:
        server = ModbusTcpServer(sim_device(1, meter), address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        ports.append(server.transport.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    await beat.run(stop)

asyncio.run(main())
"""


def rss_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def site_toml(ports: list[int], data_dir: Path) -> str:
    """Return a site file with one TCP bus and one SDM630 per port."""
    parts = [f'[gateway]\nid = "bench-gw"\ninterval = "15m"\ndata_dir = "{data_dir}"\n']
    for i, port in enumerate(ports):
        parts.append(
            f'[[buses]]\nid = "bus{i}"\nkind = "tcp"\nhost = "127.0.0.1"\n'
            f"port = {port}\n\n"
            f'[[devices]]\nid = "meter{i}"\nbus = "bus{i}"\nunit = 1\n'
            'template = "eastron-sdm630"\npoll_s = 5\n'
        )
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(ROOT), str(args.devices), tmp],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            ports = [int(p) for p in server.stdout.readline().split()]
            site = work / "site.toml"
            site.write_text(site_toml(ports, work / "data"))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT / "agent"), str(ROOT / "drivers")]
            )
            agent = subprocess.Popen(
                [sys.executable, "-m", "ies_agent.cli", "run", "--config", str(site)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            baseline = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(60)"]
            )
            time.sleep(args.seconds)
            if agent.poll() is not None:
                print(
                    "agent exited early:", agent.stderr.read() if agent.stderr else ""
                )
                return 1
            rss, hwm = rss_kib(agent.pid)
            base_rss, _ = rss_kib(baseline.pid)
            baseline.kill()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=20)
        finally:
            server.kill()
            server.wait()
    print(
        f"footprint: ies-agent run, {args.devices} Modbus devices, "
        f"after {args.seconds:g} s: RSS {rss / 1024:.1f} MiB "
        f"(peak {hwm / 1024:.1f} MiB); "
        f"bare python {base_rss / 1024:.1f} MiB; target < 45 MiB -> "
        f"{'PASS' if rss < 45 * 1024 else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
