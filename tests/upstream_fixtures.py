"""Helpers for the upstream tests: a stepping clock and logs of metered intervals.

``write_site_log`` writes a real evidence log (through ``EvidenceLog``) the way the
scheduler does at interval boundaries: every register of two meters, then a
checkpoint, with gateway time stepping one interval per boundary, so MeterData and
delivery tests have known values without waiting for a wall clock. ``MixedSite``
adds what the demo has: a charger pushing meter values between boundaries, meters
that miss a boundary, a meter replaced. ``interval_blocks`` reads INTERVAL profiles
back as a collector would, to compare them with what the log says.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

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


@dataclass
class MixedSite:
    """A site log in virtual time, like the demo's: polled meters and a charger.

    At each interval boundary ``B`` the scheduler polls: the ``smart`` meter (Wh) is
    read at ``B + 35 ms`` but logged after the ``grid`` meter (kWh, read at
    ``B + 40 ms``), then a checkpoint. The charger ``cp-1/1`` pushes its own meter
    values like OCPP: a clock-aligned one at ``B + 900 ms`` and three sampled ones,
    at ``B + 99.987 s``, ``B + 199.987 s`` and ``B + 299.990 s`` (10 ms before the
    next boundary). The grid meter has an import and an export register. Registers
    rise with time, 1 Wh/s on the grid, 2 Wh/s on the charger and 3 Wh/s on the
    smart meter, so every value is known exactly.

    ``truth[(source, register)]`` maps each boundary (UTC ms) to the register's
    boundary reading in kWh: the values INTERVAL rows must open and close on.
    """

    data_dir: Path
    interval_s: int = 300
    boundary: int = 0
    truth: dict[tuple[str, str], dict[int, Decimal]] = field(default_factory=dict)
    mono_base_ns: int = 1_000_000_000

    def run(
        self,
        boundaries: int,
        *,
        grid_missing: Iterable[int] = (),
        charger_missing: Iterable[int] = (),
        smart_reset_at: int | None = None,
        skip_before: int = 0,
    ) -> None:
        """Open the log, write ``boundaries`` boundaries, close it.

        ``skip_before`` boundaries pass first with the gateway off. The grid meter
        times out at boundaries (numbers counted from the log's start) in
        ``grid_missing``, the charger sends no clock-aligned value at those in
        ``charger_missing``, and the smart meter is replaced before
        ``smart_reset_at`` (its register starts again from 0).
        """
        grid_missing, charger_missing = set(grid_missing), set(charger_missing)
        self.boundary += skip_before
        clock = _FixedClock(START_MS + self.boundary * self.interval_s * 1000)
        log = EvidenceLog.open(
            self.data_dir,
            gateway_id=GATEWAY,
            clock=clock,  # type: ignore[arg-type]
            interval_s=self.interval_s,
            tz="Asia/Kolkata",
            fsync_interval_s=10,
        )
        log.append_event(
            "source", {"dev": {"ser": "SM-0001", "kind": "meter"}}, src="grid"
        )
        for _ in range(boundaries):
            k = self.boundary
            b_ms = START_MS + k * self.interval_s * 1000
            clock.t_ms = b_ms + 40
            grid_wh = 18_723_400 + (b_ms + 40 - START_MS) // 1000
            if k in grid_missing:
                log.append_reading(
                    self._at(b_ms + 40, "grid", "1-0:1.8.0*255", None, "kWh")
                )
            else:
                self._truth("grid", "1.8.0", b_ms, Decimal(grid_wh).scaleb(-3))
                log.append_reading(
                    self._at(
                        b_ms + 40,
                        "grid",
                        "1-0:1.8.0*255",
                        Decimal(grid_wh).scaleb(-3),
                        "kWh",
                    )
                )
            export = Decimal(5_000 + k).scaleb(-3)
            self._truth("grid", "2.8.0", b_ms, export)
            log.append_reading(
                self._at(b_ms + 40, "grid", "1-0:2.8.0*255", export, "kWh")
            )
            log.append_reading(
                self._at(b_ms + 40, "grid", "1-0:32.7.0*255", Decimal("231.2"), "V")
            )
            log.append_reading(
                self._at(b_ms + 40, "grid", "1-0:16.7.0*255", Decimal(-1500), "W")
            )
            base = (
                0 if smart_reset_at is not None and k >= smart_reset_at else 40_000_000
            )
            smart_wh = base + 3 * ((b_ms + 35 - START_MS) // 1000)
            self._truth("smart", "1.8.0", b_ms, Decimal(smart_wh).scaleb(-3))
            log.append_reading(
                self._at(b_ms + 35, "smart", "1-0:1.8.0*255", Decimal(smart_wh), "Wh")
            )
            log.checkpoint()
            for offset in (900, 99_987, 199_987, 299_990):
                if offset == 900 and k in charger_missing:
                    continue
                t_ms = b_ms + offset
                clock.t_ms = t_ms
                wh = Decimal(1_000_000 + 2 * ((t_ms - START_MS) // 1000))
                if offset == 900:
                    self._truth("cp-1/1", "1.8.0", b_ms, wh.scaleb(-3))
                log.append_reading(self._at(t_ms, "cp-1/1", "1-0:1.8.0*255", wh, "Wh"))
                log.append_reading(
                    self._at(t_ms, "cp-1/1", "1-0:1.7.0*255", Decimal(7200), "W")
                )
            self.boundary += 1
        clock.t_ms = START_MS + self.boundary * self.interval_s * 1000 - 5
        log.close()

    def _truth(self, src: str, cde: str, b_ms: int, kwh: Decimal) -> None:
        self.truth.setdefault((src, cde), {})[b_ms] = kwh

    def _at(
        self, t_ms: int, src: str, obis: str, value: Decimal | None, unit: str
    ) -> Reading:
        return Reading(
            source=src,
            quantity=obis,
            obis=obis,
            value=None if value is None else str(value),
            unit=unit,
            state=ReadingState.OK if value is not None else ReadingState.TIMEOUT,
            raw="test:0000",
            t_ms=t_ms,
            tq="S",
            mono_ns=self.mono_base_ns + (t_ms - START_MS) * 1_000_000,
            cumulative=".8." in obis,
        )


@dataclass
class _FixedClock:
    """A synchronised clock standing at ``t_ms`` until the test moves it."""

    t_ms: int
    mono_base_ns: int = 1_000_000_000

    def now(self) -> Timestamp:
        return Timestamp(
            self.t_ms, "S", self.mono_base_ns + (self.t_ms - START_MS) * 1_000_000
        )


# --- reading MeterData back, independently of the builder ----------------------------

_DURATION = re.compile(r"PT(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+)S)?")
BLOCK_TYPES = {"1.8.0": "kWh imp block", "2.8.0": "kWh exp block"}


@dataclass(frozen=True)
class Block:
    """One INTERVAL cell of a register: its period (UTC ms) and values (kWh)."""

    start_ms: int
    end_ms: int
    value: Decimal
    opening: Decimal
    closing: Decimal
    status: str = "VALID"
    fail_code: str | None = None


def time_ms(text: str) -> int:
    """UTC ms of an RFC 3339 time with an offset."""
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def duration_ms(text: str) -> int:
    """ms of an ISO 8601 duration of hours, minutes and seconds (``PT15M``)."""
    match = _DURATION.fullmatch(text)
    assert match is not None and text != "PT", text
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((hours * 60 + minutes) * 60 + seconds) * 1000


def interval_blocks(
    documents: Iterable[list[dict[str, Any]]],
) -> dict[tuple[str, str], list[Block]]:
    """Every block of every INTERVAL profile, by (meter reference, reading type).

    Reads the profiles the way a collector would: descriptor set and compact
    sequence by name, each row at ``intervalPeriod.start + id * duration`` unless it
    carries its own ``intervalPeriod``, overrides by descriptor index.
    """
    blocks: dict[tuple[str, str], list[Block]] = {}
    for document in documents:
        sets = {
            item["name"]: item
            for profile in document
            if profile["profileType"] == "DESCRIPTOR"
            for item in profile["payloadDescriptorSets"]
        }
        for profile in document:
            if profile["profileType"] != "INTERVAL":
                continue
            sequence = next(
                s["sequenceItems"]
                for s in sets[profile["payloadDescriptorSetRef"]]["compactSequences"]
                if s["name"] == profile["compactSequenceRef"]
            )
            start = time_ms(profile["intervalPeriod"]["start"])
            step = duration_ms(profile["intervalPeriod"]["duration"])
            meter = profile["meterRefs"][0]["value"]
            for row in profile["intervals"]:
                row_start = start + row["id"] * step
                row_end = row_start + step
                period = row.get("intervalPeriod")
                if period is not None:
                    assert time_ms(period["start"]) == row_start, row
                    row_end = row_start + duration_ms(period["duration"])
                cells = {
                    (item["readingType"], item["attribute"]): value
                    for item, value in zip(sequence, row["payloads"], strict=True)
                }
                overrides = {o["descriptorIndex"]: o for o in row.get("overrides", [])}
                for index, item in enumerate(sequence):
                    if item["attribute"] != "value":
                        continue
                    kind = item["readingType"]
                    override = overrides.get(index, {})
                    blocks.setdefault((meter, kind), []).append(
                        Block(
                            row_start,
                            row_end,
                            cells[(kind, "value")],
                            cells[(kind, "openingValue")],
                            cells[(kind, "closingValue")],
                            override.get("validationStatus", "VALID"),
                            override.get("failCode"),
                        )
                    )
    return {key: sorted(rows, key=lambda b: b.start_ms) for key, rows in blocks.items()}


def instant_snapshots(
    documents: Iterable[list[dict[str, Any]]],
) -> list[tuple[str, str, tuple[tuple[str, Decimal], ...]]]:
    """Every INSTANTANEOUS profile as (meter reference, timestamp, readings), sorted."""
    return sorted(
        (
            profile["meterRefs"][0]["value"],
            profile["timestamp"],
            tuple((r["readingType"], r["value"]) for r in profile["readings"]),
        )
        for document in documents
        for profile in document
        if profile["profileType"] == "INSTANTANEOUS"
    )


def expected_blocks(
    site: MixedSite, refs: dict[str, str]
) -> dict[tuple[str, str], list[Block]]:
    """The blocks a correct builder makes of ``site``: boundary to boundary reading.

    A row longer than an interval spans missing boundaries (``SUSPECT``,
    ``VEE-MISSING-INTERVAL``); a register that went down is ``REJECTED``.
    """
    interval_ms = site.interval_s * 1000
    expected: dict[tuple[str, str], list[Block]] = {}
    for (src, cde), values in site.truth.items():
        boundaries = sorted(values)
        rows = []
        for opened, closed in itertools.pairwise(boundaries):
            opening, closing = values[opened], values[closed]
            status, fail = "VALID", None
            if closing < opening:
                status, fail = "REJECTED", "REGISTER-DECREASED"
            elif closed - opened != interval_ms:
                status, fail = "SUSPECT", "VEE-MISSING-INTERVAL"
            rows.append(
                Block(opened, closed, closing - opening, opening, closing, status, fail)
            )
        expected[(refs[src], BLOCK_TYPES[cde])] = rows
    return expected
