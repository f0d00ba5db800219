"""Simulated devices served by real pymodbus servers on loopback.

Each simulated device is a pymodbus ``SimDevice`` whose registers are refreshed from the
site model on every request, so what the agent reads is what the site is doing at that
moment. Register images come from the shipped templates (meters) and from a SunSpec
image (the inverter): the simulator encodes with the same codec the agent decodes
with, and the
agent's read path is the real one — TCP sockets and a serial line on a pseudo-terminal
pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ies_agent.demo.physics import SiteModel, Snapshot, meter_quantities
from ies_drivers.modbus.codec import encode_point
from ies_drivers.modbus.model import DeviceTemplate, PointSpec, PointType

if TYPE_CHECKING:
    from pymodbus.simulator import SimDevice

    from ies_drivers.sunspec.image import SunSpecImage

log = logging.getLogger(__name__)

QuantityFn = Callable[[Snapshot], dict[str, Decimal]]
"""Returns a device's quantities keyed by OBIS ``C.D`` (``"1.8"``) or point name."""


def obis_key(obis: str | None) -> str | None:
    """Return the ``C.D`` part of an OBIS code (``1-0:1.8.0*255`` → ``"1.8"``)."""
    if not obis:
        return None
    try:
        cde = obis.split(":", 1)[1].split("*", 1)[0]
        c, d = cde.split(".")[:2]
    except (IndexError, ValueError):
        return None
    return f"{int(c)}.{int(d)}"


def _unit_factor(unit: str) -> Decimal:
    """Return the divisor from the base unit (W, Wh, var, VA) to the point's unit."""
    return Decimal(1000) if unit[:1] == "k" and len(unit) > 1 else Decimal(1)


class TemplateMeter:
    """A meter whose registers follow a plain (non-SunSpec) template."""

    def __init__(self, unit: int, template: DeviceTemplate, quantities: QuantityFn):
        self.unit = unit
        self.template = template
        self.quantities = quantities
        self.snapshot: Snapshot | None = None

    def blocks(self) -> dict[str, tuple[int, int]]:
        """Return ``{function: (first address, count)}`` covering all points."""
        spans: dict[str, tuple[int, int]] = {}
        for p in self.template.points:
            lo, hi = spans.get(p.function, (p.address, p.end))
            spans[p.function] = (min(lo, p.address), max(hi, p.end))
        return {fn: (lo, hi - lo) for fn, (lo, hi) in spans.items()}

    def value_of(self, point: PointSpec, values: dict[str, Decimal]) -> Any:
        """Return what ``point`` shows now, in the point's own unit."""
        if point.type is PointType.STRING:
            return f"SIM{self.unit:05d}" if "serial" in point.name.lower() else "SIM"
        key = obis_key(point.obis)
        value = values.get(point.name)
        if value is None and key is not None:
            value = values.get(key)
        if value is None:
            return 0
        return value / _unit_factor(point.unit)

    def fill(self, function: str, start: int, registers: list[int]) -> None:
        """Write the current values of ``function``'s points into ``registers``."""
        if self.snapshot is None:
            return
        values = self.quantities(self.snapshot)
        for p in self.template.points:
            if p.function != function or p.scale_factor is not None:
                continue
            offset = p.address - start
            if offset >= 0 and offset + p.count <= len(registers):
                registers[offset : offset + p.count] = encode_point(
                    p, self.value_of(p, values)
                )


@dataclass
class SerialLine:
    """Two pseudo-terminals joined by socat: the device end and the agent end."""

    device_port: str
    agent_port: str
    process: subprocess.Popen[bytes]

    def close(self) -> None:
        """Stop socat by its process id."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _die_with_parent() -> None:
    """In the child: ask the kernel to kill us when the demo dies (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def open_serial_line(workdir: Path, timeout_s: float = 5.0) -> SerialLine | None:
    """Start ``socat`` with a linked pair of pseudo-terminals (``None``: no socat)."""
    socat = shutil.which("socat")
    if socat is None:
        return None
    device_port = workdir / "tty-device"
    agent_port = workdir / "tty-agent"
    for link in (device_port, agent_port):
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    process = subprocess.Popen(
        [
            socat,
            f"pty,raw,echo=0,link={device_port}",
            f"pty,raw,echo=0,link={agent_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if device_port.exists() and agent_port.exists():
            return SerialLine(str(device_port), str(agent_port), process)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    return None


def grid_meter(snap: Snapshot) -> dict[str, Decimal]:
    """Quantities of the meter at the grid connection point."""
    c = snap.counters
    return meter_quantities(snap.grid_w, c.grid_import_wh, c.grid_export_wh, snap)


def house_meter(snap: Snapshot) -> dict[str, Decimal]:
    """Quantities of the sub-meter on the house circuits."""
    return meter_quantities(snap.load_w, snap.counters.house_wh, 0.0, snap)


class Heartbeat:
    """Advances the site model once a second and hands snapshots to the devices."""

    def __init__(self, model: SiteModel, devices: list[Any]) -> None:
        self.model = model
        self.devices = devices

    def tick(self) -> Snapshot:
        """Advance the site by one step and share the snapshot."""
        snap = self.model.step()
        for device in self.devices:
            device.snapshot = snap
        return snap

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every second until ``stop`` is set."""
        while not stop.is_set():
            self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


class SunSpecInverter:
    """A three-phase SunSpec inverter (models 1, 103, 120, 123) following the sun."""

    BASE = 40000

    def __init__(self, unit: int, serial: str = "SIMINV0001") -> None:
        self.unit = unit
        self.serial = serial
        self.snapshot: Snapshot | None = None
        self.limit_pct: int | None = None
        """Active-power limit written into model 123 (percent of WMax), if enabled."""
        self.set_pct = 100
        """``WMaxLimPct`` as last written (applies only while ``WMaxLim_Ena`` = 1)."""
        self.revert_s = 0
        """``WMaxLimPct_RvrtTms`` as last written: the limit lapses after it."""
        self._revert_at: float | None = None
        self._image = self._build(None)

    def take_write(self, address: int, values: list[int]) -> Any:
        """Take a write into model 123 (``WMaxLimPct``, ``WMaxLimPct_RvrtTms``,
        ``WMaxLim_Ena``) so it sticks and limits the output; other registers are
        read-only here. Returns ``None`` (accepted) as a device would."""
        for offset, value in enumerate(values):
            name = self._controls.get(address + offset)
            if name == "WMaxLimPct":
                self.set_pct = min(value, 100)
            elif name == "WMaxLimPct_RvrtTms":
                self.revert_s = value
            elif name == "WMaxLim_Ena":
                self.limit_pct = self.set_pct if value == 1 else None
        if self.limit_pct is not None:
            self.limit_pct = self.set_pct
        self._revert_at = (
            time.monotonic() + self.revert_s
            if self.limit_pct is not None and self.revert_s
            else None
        )
        return None

    @property
    def _controls(self) -> dict[int, str]:
        """Protocol address of each writable point of model 123."""
        points = ("WMaxLimPct", "WMaxLimPct_RvrtTms", "WMaxLim_Ena")
        return {self._image.address_of(123, p): p for p in points}

    def _build(self, snap: Snapshot | None) -> SunSpecImage:
        """Return the register image for ``snap`` (raw values with scale factors)."""
        from ies_drivers.sunspec.image import SunSpecImage

        image = SunSpecImage(self.BASE)
        image.add_model(
            1,
            {
                "Mn": "IES Demo Solar",
                "Md": "SIM-INV-5K3P",
                "Vr": "1.4.2",
                "SN": self.serial,
                "DA": self.unit,
            },
        )
        solar = snap.solar_w if snap else 0.0
        if self._revert_at is not None and time.monotonic() >= self._revert_at:
            self.limit_pct, self._revert_at = None, None  # the device's own revert
        if self.limit_pct is not None:
            solar = min(solar, 5000 * self.limit_pct / 100)  # WRtg is 5000 W
        volts = snap.voltage_v if snap else (230.0, 230.0, 230.0)
        hz = snap.frequency_hz if snap else 50.0
        wh = int(snap.counters.solar_wh) if snap else 0
        amps = [solar / 3 / v for v in volts]
        image.add_model(
            103,
            {
                "A": round(sum(amps) * 100),
                "AphA": round(amps[0] * 100),
                "AphB": round(amps[1] * 100),
                "AphC": round(amps[2] * 100),
                "A_SF": -2,
                "PhVphA": round(volts[0] * 10),
                "PhVphB": round(volts[1] * 10),
                "PhVphC": round(volts[2] * 10),
                "V_SF": -1,
                "W": round(solar),
                "W_SF": 0,
                "Hz": round(hz * 100),
                "Hz_SF": -2,
                "VA": round(solar),
                "VA_SF": 0,
                "PF": 100,
                "PF_SF": 0,
                "WH": max(wh, 1),
                "WH_SF": 0,
                "DCW": round(solar * 1.03),
                "DCW_SF": 0,
                "TmpCab": 352,
                "Tmp_SF": -1,
                "St": 4 if solar > 0 else 2,  # 4 MPPT, 2 sleeping
            },
        )
        image.add_model(
            120,
            {"DERTyp": 4, "WRtg": 5000, "WRtg_SF": 0, "VARtg": 5000, "VARtg_SF": 0},
        )
        controls: dict[str, int | float | str] = {
            "Conn": 1,
            "WMaxLim_Ena": 0,
            "WMaxLimPct": 100,
            "WMaxLimPct_SF": 0,
        }
        if self.limit_pct is not None:
            controls.update(WMaxLim_Ena=1, WMaxLimPct=self.limit_pct)
        else:
            controls.update(WMaxLimPct=self.set_pct)
        controls["WMaxLimPct_RvrtTms"] = self.revert_s
        image.add_model(123, controls)
        return image

    def blocks(self) -> dict[str, tuple[int, int]]:
        """Return the holding-register span of the whole SunSpec image."""
        return {"holding": (self.BASE, len(self._image.registers()))}

    def fill(self, function: str, start: int, registers: list[int]) -> None:
        """Write the current image into ``registers`` (a copy of the whole map)."""
        if function != "holding" or self.snapshot is None:
            return
        image = self._build(self.snapshot).registers()
        offset = self.BASE - start
        registers[offset : offset + len(image)] = image


def sim_device(unit: int, device: TemplateMeter | SunSpecInverter) -> SimDevice:
    """Return a pymodbus ``SimDevice`` serving ``device``, fresh on every request."""
    from pymodbus.simulator import DataType, SimData, SimDevice

    spans = device.blocks()

    def block(function: str) -> list[SimData]:
        if function not in spans:
            return [SimData(0, 1, 0, DataType.REGISTERS)]
        first, count = spans[function]
        return [SimData(first, count=count, values=0, datatype=DataType.REGISTERS)]

    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> Any:
        del count
        if values:  # a write: the device takes what it understands, if it can
            take = getattr(device, "take_write", None)
            if take is not None:
                result: Any = take(address, [int(v) for v in values])
                return result
            return None
        function = "input" if function_code == 4 else "holding"
        device.fill(function, start_address, registers)
        return None

    bits = [SimData(0, 1, False, DataType.BITS)]
    return SimDevice(
        unit, simdata=(bits, bits, block("holding"), block("input")), action=action
    )


def env_flag(name: str) -> bool:
    """Tell whether environment variable ``name`` is set to a true value."""
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
