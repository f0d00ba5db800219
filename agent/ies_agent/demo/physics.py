"""How the simulated site behaves: house load, solar by time of day, energy counters.

All powers are in W, energies in Wh, voltages in V. The grid connection point sees
``load − solar`` (negative means export). Energy counters integrate power over real
time and are kept in a state file in the data directory, so they only ever rise — also
across runs of the demo and after it was killed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

SOLAR_PEAK_W = 4200.0
BASE_LOAD_W = 450.0


@dataclass
class Counters:
    """Cumulative energy registers of the simulated devices, in Wh."""

    grid_import_wh: float = 1_254_300.0
    grid_export_wh: float = 388_120.0
    house_wh: float = 2_049_900.0
    solar_wh: float = 5_412_000.0
    updated_s: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The site's physical state at one moment."""

    load_w: float
    solar_w: float
    grid_w: float
    voltage_v: tuple[float, float, float]
    frequency_hz: float
    counters: Counters


class SiteModel:
    """A household with rooftop solar, moving in real time."""

    def __init__(self, state_file: Path, tz: ZoneInfo, seed: int = 7) -> None:
        self.state_file = state_file
        self.tz = tz
        self.rng = random.Random(seed)
        self.counters = self._load()
        self._cloud = 1.0

    def _load(self) -> Counters:
        """Read the counters left by an earlier run, or start fresh."""
        try:
            data = json.loads(self.state_file.read_text())
            return Counters(**{k: float(v) for k, v in data.items()})
        except (OSError, ValueError, TypeError):
            return Counters(updated_s=time.time())

    def _save(self) -> None:
        """Write the counters atomically (rename), so a kill never tears them."""
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.counters)))
        os.replace(tmp, self.state_file)

    def load_w(self, hour: float) -> float:
        """House consumption: a base load with a morning and an evening peak."""
        morning = 900 * math.exp(-(((hour - 7.5) / 1.2) ** 2))
        evening = 1500 * math.exp(-(((hour - 20.0) / 1.8) ** 2))
        return BASE_LOAD_W + morning + evening + self.rng.uniform(-60, 60)

    def solar_w(self, hour: float) -> float:
        """Solar output: a half sine from 06:00 to 18:00 local, with passing clouds."""
        if not 6.0 < hour < 18.0:
            return 0.0
        self._cloud = min(1.0, max(0.35, self._cloud + self.rng.uniform(-0.08, 0.08)))
        return SOLAR_PEAK_W * math.sin(math.pi * (hour - 6.0) / 12.0) * self._cloud

    def step(self, now_s: float | None = None) -> Snapshot:
        """Advance the site to ``now_s`` (UNIX seconds) and return its state."""
        now_s = time.time() if now_s is None else now_s
        local = datetime.fromtimestamp(now_s, self.tz)
        hour = local.hour + local.minute / 60 + local.second / 3600
        load, solar = self.load_w(hour), self.solar_w(hour)
        grid = load - solar

        # Integrate over the time since the last step (at most an hour of catch-up).
        c = self.counters
        dt_h = min(max(now_s - c.updated_s, 0.0), 3600.0) / 3600.0
        c.house_wh += load * dt_h
        c.solar_wh += solar * dt_h
        if grid >= 0:
            c.grid_import_wh += grid * dt_h
        else:
            c.grid_export_wh += -grid * dt_h
        c.updated_s = now_s
        self._save()

        volts = tuple(230.0 + self.rng.uniform(-3.5, 3.5) for _ in range(3))
        return Snapshot(
            load_w=load,
            solar_w=solar,
            grid_w=grid,
            voltage_v=(volts[0], volts[1], volts[2]),
            frequency_hz=50.0 + self.rng.uniform(-0.06, 0.06),
            counters=Counters(**asdict(c)),
        )


def meter_quantities(
    power_w: float, import_wh: float, export_wh: float, snap: Snapshot
) -> dict[str, Decimal]:
    """Return a meter's quantities keyed by OBIS ``C.D`` (e.g. ``"1.8"``).

    ``power_w`` is the net active power through the meter (positive = import).
    """
    pf = 0.96
    v1, v2, v3 = snap.voltage_v
    phase_w = power_w / 3
    values = {
        "32.7": v1,
        "52.7": v2,
        "72.7": v3,
        "12.7": v1,
        "31.7": abs(phase_w) / v1 / pf,
        "51.7": abs(phase_w) / v2 / pf,
        "71.7": abs(phase_w) / v3 / pf,
        "11.7": abs(power_w) / v1 / pf,
        "91.7": 0.05,
        "21.7": phase_w,
        "41.7": phase_w,
        "61.7": phase_w,
        "36.7": phase_w,
        "56.7": phase_w,
        "76.7": phase_w,
        "16.7": power_w,
        "1.7": max(power_w, 0.0),
        "2.7": max(-power_w, 0.0),
        "9.7": abs(power_w) / pf,
        "3.7": abs(power_w) * 0.29,
        "13.7": pf,
        "33.7": pf,
        "53.7": pf,
        "73.7": pf,
        "14.7": snap.frequency_hz,
        "1.8": import_wh,
        "2.8": export_wh,
        "15.8": import_wh + export_wh,
        "3.8": import_wh * 0.29,
        "4.8": export_wh * 0.08,
        "9.8": (import_wh + export_wh) * 1.04,
    }
    return {k: Decimal(f"{v:.3f}") for k, v in values.items()}
