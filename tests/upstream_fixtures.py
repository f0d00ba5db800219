"""Helpers for the upstream tests: a stepping clock and logs of metered intervals.

``write_site_log`` writes a real evidence log (through ``EvidenceLog``) the way the
scheduler does at interval boundaries: every register of two meters, then a
checkpoint, with gateway time stepping one interval per boundary, so MeterData and
delivery tests have known values without waiting for a wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ies_agent.clock import Timestamp
from ies_agent.evidence.log import EvidenceLog
from ies_drivers.reading import Reading, ReadingState

START_MS = 1_777_865_400_000  # 2026-05-04T03:30:00Z = 09:00 in Asia/Kolkata
GATEWAY = "gw-up-1"


@dataclass
class StepClock:
    """A clock at ``t_ms`` (moved by the test) with time quality ``tq``."""

    t_ms: int = START_MS
    tq: str = "S"
    mono_ns: int = 1_000_000_000

    def now(self) -> Timestamp:
        return Timestamp(self.t_ms, self.tq, self.mono_ns)

    def advance(self, ms: int) -> None:
        self.t_ms += ms
        self.mono_ns += ms * 1_000_000


def reading(
    clock: StepClock,
    src: str,
    obis: str,
    value: str | None,
    unit: str,
    *,
    cumulative: bool = False,
    state: ReadingState = ReadingState.OK,
) -> Reading:
    stamp = clock.now()
    return Reading(
        source=src,
        quantity=obis,
        obis=obis,
        value=value,
        unit=unit,
        state=state,
        raw="test:0000",
        t_ms=stamp.t_ms,
        tq=stamp.tq,
        mono_ns=stamp.mono_ns,
        cumulative=cumulative,
    )


def grid_import_kwh(boundary: int) -> Decimal:
    """The grid meter's import register at boundary ``k`` (kWh, rises each time)."""
    return (
        Decimal("18723.400")
        + Decimal("1.250") * boundary
        + Decimal("0.011") * (boundary % 3)
    )


def write_site_log(
    data_dir: Path,
    boundaries: int,
    *,
    interval_s: int = 900,
    tq: str = "S",
    gateway_id: str = GATEWAY,
    clock: StepClock | None = None,
) -> StepClock:
    """Write ``boundaries`` interval boundaries of two meters; close the log."""
    clock = clock or StepClock(tq=tq)
    log = EvidenceLog.open(
        data_dir,
        gateway_id=gateway_id,
        clock=clock,
        interval_s=interval_s,
        tz="Asia/Kolkata",
        fsync_interval_s=10,
    )
    log.append_event("source", {"dev": {"ser": "SM-0001", "kind": "meter"}}, src="grid")
    for k in range(boundaries):
        clock.advance(interval_s * 1000 if k else 20)  # read just after the boundary
        imp = grid_import_kwh(k)
        log.append_reading(
            reading(clock, "grid", "1-0:1.8.0*255", f"{imp}", "kWh", cumulative=True)
        )
        log.append_reading(
            reading(
                clock,
                "grid",
                "1-0:2.8.0*255",
                f"{Decimal(k) / 100}",
                "kWh",
                cumulative=True,
            )
        )
        log.append_reading(reading(clock, "grid", "1-0:32.7.0*255", "231.2", "V"))
        log.append_reading(
            reading(clock, "grid", "1-0:16.7.0*255", str(-1500 + 700 * k), "W")
        )
        log.append_reading(
            reading(
                clock,
                "pv",
                "1-0:2.8.0*255",
                str(5_000_000 + 1234 * k),
                "Wh",
                cumulative=True,
            )
        )
        log.checkpoint()
    log.close()
    return clock


def log_lines(data_dir: Path) -> list[bytes]:
    """The entry lines of the log in ``data_dir``."""
    return (data_dir / "evidence.jsonl").read_bytes().splitlines()
