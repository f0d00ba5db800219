"""Assemble the demo site: simulators on loopback, a site file, the real agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ies_agent.demo.physics import SiteModel, Snapshot, meter_quantities
from ies_agent.demo.simulator import (
    Heartbeat,
    SerialLine,
    SunSpecInverter,
    TemplateMeter,
    grid_meter,
    house_meter,
    open_serial_line,
    sim_device,
)

TZ = "Asia/Kolkata"
GATEWAY_ID = "demo-gw-0001"


class DemoError(Exception):
    """Raised when the demo cannot start (data directory in use, key problem, …)."""


def ev_meter(snap: Snapshot) -> dict[str, Any]:
    """Quantities of the EV charger sub-meter: it charges while the house load peaks.

    Its energy register is a fixed share of the house's, so it only ever rises.
    """
    charging_w = 3300.0 if snap.load_w > 1400 else 0.0
    return meter_quantities(charging_w, snap.counters.house_wh * 0.31, 0.0, snap)


@dataclass
class DemoPorts:
    """Where the simulators listen in this run."""

    grid_meter: int
    inverter: int
    serial_port: str | None
    rtu_over_tcp: int | None
    dlms_meter: int = 0
    """TCP wrapper port of the simulated IS 15959 smart meter."""


@asynccontextmanager
async def simulators(data_dir: Path, stop: asyncio.Event) -> AsyncIterator[DemoPorts]:
    """Start the simulated devices on free loopback ports; stop them on exit."""
    from pymodbus import FramerType
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    from ies_drivers.templates import find_template

    sim_dir = data_dir / "simulator"
    sim_dir.mkdir(parents=True, exist_ok=True)
    model = SiteModel(sim_dir / "site-state.json", ZoneInfo(TZ))
    sdm630 = find_template("eastron-sdm630", ())
    rish = find_template("rish-master-3430", ())
    grid = TemplateMeter(1, sdm630, grid_meter)
    inverter = SunSpecInverter(1)
    house = TemplateMeter(5, rish, house_meter)
    charger = TemplateMeter(6, sdm630, ev_meter)
    heartbeat = Heartbeat(model, [grid, inverter, house, charger])
    heartbeat.tick()

    servers: list[Any] = []
    line: SerialLine | None = None
    dlms: Any = None
    _write_secret(sim_dir / "meter-password", b"ABCDEFGH")  # the simulator's LLS secret
    try:
        grid_server = ModbusTcpServer(sim_device(1, grid), address=("127.0.0.1", 0))
        inverter_server = ModbusTcpServer(
            sim_device(1, inverter), address=("127.0.0.1", 0)
        )
        servers += [grid_server, inverter_server]
        line_devices = [sim_device(5, house), sim_device(6, charger)]
        line = open_serial_line(sim_dir)
        if line is not None:
            servers.append(
                ModbusSerialServer(
                    line_devices, port=line.device_port, baudrate=19200, timeout=1
                )
            )
        else:
            servers.append(
                ModbusTcpServer(
                    line_devices, framer=FramerType.RTU, address=("127.0.0.1", 0)
                )
            )
        for server in servers:
            await server.serve_forever(background=True)

        # An Indian smart meter: our IS 15959 meter server on the DLMS TCP wrapper,
        # read with low-level security (a password, as a meter reader would).
        from ies_drivers.dlms.server import MeterServer, SimulatedMeter

        dlms = MeterServer(SimulatedMeter(serial="IES0000417"))
        dlms_port = await dlms.start_tcp("127.0.0.1", 0)
        ports = DemoPorts(
            grid_meter=_port(grid_server),
            inverter=_port(inverter_server),
            serial_port=line.agent_port if line else None,
            rtu_over_tcp=None if line else _port(servers[2]),
            dlms_meter=dlms_port,
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(heartbeat.run(stop), name="demo:heartbeat")
            try:
                yield ports
            finally:
                stop.set()
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.shutdown()
        if dlms is not None:
            with contextlib.suppress(Exception):
                await dlms.close()
        if line is not None:
            line.close()


def _lock_holder(data_dir: Path) -> str | None:
    """Describe the process holding ``data_dir``'s evidence lock, or ``None``."""
    import fcntl

    from ies_agent.evidence.log import LOCK_FILE

    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = path.read_text().strip() or "?"
        return f"pid {pid}"
    finally:
        os.close(fd)  # closing releases a lock we took
    return None


def _write_secret(path: Path, secret: bytes) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)


def _port(server: Any) -> int:
    """Return the TCP port a started pymodbus server listens on."""
    port: int = server.transport.sockets[0].getsockname()[1]
    return port


def upstream_tables(mqtt_url: str | None, ies_endpoint: str | None) -> str:
    """Return ``[[upstreams]]`` tables for ``--mqtt`` / ``--ies-endpoint`` (or "").

    The demo reconnects quickly (back-off capped at 3 s) so an outage is short.
    """
    text = ""
    if mqtt_url:
        text += (
            "\n[[upstreams]]\n"
            'name = "demo-mqtt"\n'
            'kind = "mqtt"\n'
            f"url = {_toml_string(mqtt_url)}\n"
            "backoff_max_s = 3\n"
            "telemetry_s = 5\n"
        )
    if ies_endpoint:
        text += (
            "\n[[upstreams]]\n"
            'name = "demo-ies"\n'
            'kind = "ies-https"\n'
            f"url = {_toml_string(ies_endpoint)}\n"
            'mode = "adapter"\n'
            "backoff_max_s = 3\n"
        )
    return text


def _toml_string(text: str) -> str:
    """Return ``text`` as a TOML basic string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def site_file(data_dir: Path, ports: DemoPorts, interval_s: int) -> str:
    """Return the site configuration (TOML) describing this run's simulators."""
    if ports.serial_port is not None:
        line = (
            'kind = "rtu"\n'
            f'serial_port = "{ports.serial_port}"\n'
            "baudrate = 19200\n"
            "gap_ms = 5\n"
        )
    else:
        line = (
            f'kind = "rtu-over-tcp"\nhost = "127.0.0.1"\nport = {ports.rtu_over_tcp}\n'
        )
    return f"""\
# Written by `ies-agent demo` for this run: simulated devices on loopback ports.
# Check it with: ies-agent config check {data_dir / "site.toml"}

[gateway]
id = "{GATEWAY_ID}"
timezone = "{TZ}"
interval = "{interval_s}s"
data_dir = "."
demo = true

[[buses]]
id = "lan-grid-meter"
kind = "tcp"
host = "127.0.0.1"
port = {ports.grid_meter}
timeout_s = 1.0

[[buses]]
id = "lan-inverter"
kind = "tcp"
host = "127.0.0.1"
port = {ports.inverter}
timeout_s = 1.0

[[buses]]
id = "rs485"
{line}timeout_s = 0.5

[[devices]]
id = "grid-meter"
bus = "lan-grid-meter"
unit = 1
template = "eastron-sdm630"
poll_s = 2

[[devices]]
id = "inverter"
bus = "lan-inverter"
unit = 1
template = "sunspec-inverter"
poll_s = 2

[[devices]]
id = "house-meter"
bus = "rs485"
unit = 5
template = "rish-master-3430"
poll_s = 3

[[devices]]
id = "ev-meter"
bus = "rs485"
unit = 6
template = "eastron-sdm630"
poll_s = 3

[[buses]]
id = "dlms-lan"
kind = "dlms-wrapper"
host = "127.0.0.1"
port = {ports.dlms_meter}
timeout_s = 3.0

[[devices]]
id = "smart-meter"
bus = "dlms-lan"
template = "is15959"
auth = "low"
password_file = "simulator/meter-password"
poll_s = 5
"""


async def run_demo(
    data_dir: Path,
    *,
    duration_s: float | None,
    interval_s: int,
    mqtt_url: str | None = None,
    ies_endpoint: str | None = None,
    upstream_wait_s: float = 30.0,
    csms_url: str | None = None,
    http: str | None = None,
) -> int:
    """Run the demo site for ``duration_s`` seconds (None: until a signal).

    Two simulated OCPP chargers (1.6J and 2.0.1) charge through the agent's central
    system, bridged to ``csms_url`` when given. At the end their open sessions are
    ended and delivered (bounded) before the agent stops.

    ``mqtt_url`` / ``ies_endpoint`` add upstreams; when the run ends the agent waits
    up to ``upstream_wait_s`` seconds for them to take what is left.
    """
    from ies_agent.config import ConfigError, load_site
    from ies_agent.evidence.errors import EvidenceError
    from ies_agent.ocpp.server import OcppSetupError
    from ies_agent.ocpp.simulator import DemoChargers, demo_ocpp_table
    from ies_agent.runtime import run_site
    from ies_agent.web.errors import WebSetupError

    stop = asyncio.Event()
    # --for or a signal ends the chargers' sessions first, then stops the agent.
    finish = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, finish.set)
    if duration_s is not None:
        loop.call_later(duration_s, finish.set)
    ocpp_port = _free_port()
    chargers = DemoChargers(ocpp_port)

    async def wind_down() -> None:
        await finish.wait()
        await chargers.finish()
        stop.set()

    # Another agent on this directory? Say so before touching anything in it.
    holder = _lock_holder(data_dir)
    if holder is not None:
        raise DemoError(
            f"{data_dir} is in use by another agent ({holder}); stop it first or "
            "give this demo its own --data-dir"
        )
    failure: str | None = None
    async with simulators(data_dir, stop) as ports:
        site_path = data_dir / "site.toml"
        text = site_file(data_dir, ports, interval_s)
        text += demo_ocpp_table(ocpp_port, csms_url)
        # A scripted dispatch: demo keys and a signed pack made here, now.
        from ies_agent.demo.dispatch import DemoDispatch

        scripted = DemoDispatch(
            data_dir, interval_s, tuple(c.charger_id for c in chargers.chargers)
        )
        try:
            text += scripted.prepare()
        except OSError as exc:
            raise DemoError(f"cannot write the demo's dispatch keys: {exc}") from None
        if http is not None:
            from ies_agent.web.demo import demo_http_table

            text += demo_http_table(data_dir, http)
        site_path.write_text(text + upstream_tables(mqtt_url, ies_endpoint))
        try:
            site = load_site(site_path)
        except ConfigError as exc:
            raise DemoError(f"the generated site file is invalid:\n{exc}") from None
        _banner(data_dir, ports, interval_s, duration_s)
        print(
            f"  chargers     OCPP on ws://127.0.0.1:{ocpp_port}/ocpp/<id>: "
            + ", ".join(
                f"{c.charger_id} ({c.version.subprotocol})" for c in chargers.chargers
            )
            + (f"; bridged to {csms_url}" if csms_url else ""),
            flush=True,
        )
        print(scripted.banner(), flush=True)
        chargers.start()
        ending = asyncio.create_task(wind_down(), name="demo:wind-down")
        try:
            result = await run_site(
                site,
                stop,
                data_dir=data_dir,
                upstream_wait_s=upstream_wait_s,
                on_dispatch=scripted.started,
            )
        except (EvidenceError, OcppSetupError, WebSetupError) as exc:
            failure = str(exc)
        finally:
            finish.set()
            await ending
            await scripted.close()
        if failure is None:
            print("\nchargers:\n" + chargers.summary())
            print("\n" + scripted.summary())
    if failure is not None:
        # Raised here, outside the simulators' task group, so it reads as a message.
        raise DemoError(failure)

    print(
        f"\ndemo stopped: {result.entries} evidence entries in {data_dir}, "
        f"{result.intervals} intervals this run.\n"
        "What to run next:\n"
        f"  ies-agent verify {data_dir}                # check the signed log offline\n"
        f"  ies-agent keys show --data-dir {data_dir}  # the key card for the utility\n"
        f"  ies-agent prove {data_dir} --seq 3         # one entry with its proof\n"
        f"  ies-agent export {data_dir} --format ocmf  # signed OCMF records\n"
        f"  ies-agent demo --data-dir {data_dir}       # continue this site's log"
    )
    return 0


def _free_port() -> int:
    """A loopback TCP port that was free a moment ago (for the OCPP listener)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _banner(
    data_dir: Path, ports: DemoPorts, interval_s: int, duration_s: float | None
) -> None:
    """Tell the user what runs where, and how to look at it."""
    line = (
        f"RTU on {ports.serial_port} (socat pseudo-terminal pair)"
        if ports.serial_port
        else f"RTU over TCP on 127.0.0.1:{ports.rtu_over_tcp} (socat not installed)"
    )
    until = f"for {duration_s:g} s" if duration_s else "until Ctrl-C"
    print(
        f"IES edge agent demo — simulated site, "
        f"evidence every {interval_s} s, {until}\n"
        f"  grid meter   Modbus TCP 127.0.0.1:{ports.grid_meter} (Eastron SDM630 map)\n"
        f"  inverter     Modbus TCP 127.0.0.1:{ports.inverter} "
        "(SunSpec 1/103/120/123)\n"
        f"  house meter  {line}, unit 5 (Rishabh Master 3430 map)\n"
        f"  EV meter     same RS-485 line, unit 6 (Eastron SDM630 map)\n"
        f"  smart meter  DLMS/COSEM TCP wrapper 127.0.0.1:{ports.dlms_meter} "
        "(IS 15959, low-level security)\n"
        f"  evidence log {data_dir / 'evidence.jsonl'}\n"
        f"  site file    {data_dir / 'site.toml'}\n"
        f"While it runs: ies-agent read --config {data_dir / 'site.toml'} inverter",
        flush=True,
    )
