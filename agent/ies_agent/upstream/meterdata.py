"""IES MeterData v0.6 profiles from evidence entries, with exact decimal numbers.

The evidence log holds, at every interval boundary, every register of every polled
device, and in between whatever devices push on their own (OCPP meter values, for
instance). The builder places each reading on the site's **interval grid**: the
boundaries are the multiples of ``interval_s`` counted from local midnight in ``tz``
(both from the latest ``boot`` event; the defaults below until one is seen).

**Boundary rule.** A reading taken at ``t`` is the *boundary reading* of boundary
``B`` when ``B`` is the latest boundary at or before ``t``, ``t - B`` is less than
``interval_s / BOUNDARY_TOLERANCE_DIVISOR`` (a fifth of the interval: 1 s at 5 s,
3 min at 15 min) and it is the first usable reading of that source and quantity for
``B``. Every other reading lies *between* boundaries. The rule is applied per source
and per quantity, so a reading of one device never moves another's boundary. The
time of a reading is the gateway's ``t``, except for a catch-up reading from a
meter's own profile (state ``L``), whose value belongs to its device time ``dt``.
Readings without a usable value (read errors, timeouts) are skipped.

From that the builder makes:

- **INTERVAL** profiles: for each cumulative energy register with an IES block code
  (``1-0:1.8.0`` -> ``1.0.1.29.0.255`` "kWh imp block", 2.8.0, 9.8.0, 10.8.0, 5.8.0,
  8.8.0), one row from each boundary reading to the next boundary reading of the same
  register, with the block value (closing minus opening) and the opening and closing
  register values, in ``USAGE`` mode. Rows chain: the opening of a row is the closing
  of the row before, so the block values of a register add up to its rise. Row
  ``id`` counts intervals from the profile's ``intervalPeriod.start``, the start of
  its first row. Between-boundary readings never open or close a row.
- **gaps**: when a boundary has no boundary reading (the meter did not answer, the
  gateway was off, a charger sent nothing near it), the row runs from the last
  boundary reading to the next one and says so: its own ``intervalPeriod`` gives the
  true start and duration, and every block value of it is ``SUSPECT`` with failCode
  ``VEE-MISSING-INTERVAL`` (the energy is exact; only its split over the intervals
  is unknown). The ids it covers beyond its own are absent. No delta is dropped.
- **register resets**: a register that went backwards (meter reset or replaced) ends
  its chain. The row of that step is written alone in a profile of its own, with the
  negative block value ``REJECTED`` (failCode ``REGISTER-DECREASED``), and a new chain
  starts from the new value, so opening and closing values never decrease within a
  profile.
- Registers of one meter share a profile when their rows cover the same boundaries,
  which is the normal case; a register whose rows differ (a gap in one register
  only) gets its own profile and compact sequence.
- Readings taken while the gateway's clock was not synchronised are flagged
  ``SUSPECT`` (failCode ``TIME-UNSYNCED``), substitutes ``ESTIMATED``.
- **INSTANTANEOUS** profiles, one per meter and snapshot, with the values that have an
  IES instantaneous code (voltages, currents, power factors, frequency, active,
  reactive and apparent power, cumulative import/export energy). The boundary
  readings of a meter form the snapshot of that boundary, stamped with the boundary
  time; readings between boundaries form snapshots stamped with the time of their
  first reading (a snapshot takes a meter's readings within ``SNAPSHOT_S`` of it).
  Signed total active power (``1-0:16.7.0``) is split into ``P_Import`` /
  ``P_Export``. A snapshot is written once the log's time has passed it.
- one **DESCRIPTOR** profile declaring the reading types used and, per meter, the
  compact sequences of its interval rows.

Units are converted to those of IES (Wh -> kWh, W -> kW, var -> kvar, ...) by moving
the decimal point: values stay exact decimals from the log to the JSON text, never
passing through a float (:func:`dumps`). Meter references come from the
configuration (a ``did:`` value is a DID, anything else a serial number), else from
the serial number a device reported, else ``<gateway>/<device>`` (scheme ``OTHER``).

The builder is incremental: the IES HTTPS upstream feeds it batch by batch and takes
the rows and snapshots completed by each batch (:meth:`MeterDataBuilder.profiles`,
:meth:`MeterDataBuilder.forget_output`). :func:`write_export` is the handler of
``ies-agent export PATH --format ies-meterdata``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ies_agent.upstream.errors import MeterDataError

DEFAULT_TZ = "Asia/Kolkata"
DEFAULT_INTERVAL_S = 900


@dataclass(frozen=True)
class Code:
    """One IES reading type: label, OBIS in IES form, unit, flow, category, name."""

    label: str
    obis: str
    unit: str
    flow: str
    category: str
    name: str


# Cumulative register (OBIS C.D.E of the log) -> its IES block reading type.
BLOCK_CODES: dict[str, Code] = {
    "1.8.0": Code(
        "kWh imp block",
        "1.0.1.29.0.255",
        "kWh",
        "IMPORT",
        "energyIncremental",
        "Active energy import - block incremental (kWh)",
    ),
    "2.8.0": Code(
        "kWh exp block",
        "1.0.2.29.0.255",
        "kWh",
        "EXPORT",
        "energyIncremental",
        "Active energy export - block incremental (kWh)",
    ),
    "9.8.0": Code(
        "kVAh imp block",
        "1.0.9.29.0.255",
        "kVAh",
        "IMPORT",
        "energyIncremental",
        "Apparent energy import - block incremental (kVAh)",
    ),
    "10.8.0": Code(
        "kVAh exp block",
        "1.0.10.29.0.255",
        "kVAh",
        "EXPORT",
        "energyIncremental",
        "Apparent energy export - block incremental (kVAh)",
    ),
    "5.8.0": Code(
        "kvarh lag block",
        "1.0.5.29.0.255",
        "kvarh",
        "NONE",
        "energyIncremental",
        "Reactive energy lag - block incremental (kvarh)",
    ),
    "8.8.0": Code(
        "kvarh lead block",
        "1.0.8.29.0.255",
        "kvarh",
        "NONE",
        "energyIncremental",
        "Reactive energy lead - block incremental (kvarh)",
    ),
}


def _instant(label: str, cde: str, unit: str, category: str, name: str) -> Code:
    flow = "IMPORT" if cde == "1.8.0" else "EXPORT" if cde == "2.8.0" else "NONE"
    return Code(label, f"1.0.{cde}.255", unit, flow, category, name)


# Register (OBIS C.D.E of the log) -> IES instantaneous reading type.
INSTANT_CODES: dict[str, Code] = {
    "32.7.0": _instant("V_R", "32.7.0", "V", "voltage", "Voltage R-phase"),
    "52.7.0": _instant("V_Y", "52.7.0", "V", "voltage", "Voltage Y-phase"),
    "72.7.0": _instant("V_B", "72.7.0", "V", "voltage", "Voltage B-phase"),
    "12.7.0": _instant("V_1P", "12.7.0", "V", "voltage", "Voltage single-phase"),
    "31.7.0": _instant("I_R", "31.7.0", "A", "current", "Current R-phase"),
    "51.7.0": _instant("I_Y", "51.7.0", "A", "current", "Current Y-phase"),
    "71.7.0": _instant("I_B", "71.7.0", "A", "current", "Current B-phase"),
    "11.7.0": _instant("I_Phase", "11.7.0", "A", "current", "Current single-phase"),
    "91.7.0": _instant("I_Neutral", "91.7.0", "A", "current", "Current neutral"),
    "1.7.0": _instant("P_Import", "1.7.0", "kW", "power", "Active power import"),
    "2.7.0": _instant("P_Export", "2.7.0", "kW", "power", "Active power export"),
    "3.7.0": _instant("Q_Lag", "3.7.0", "kvar", "power", "Reactive power lag"),
    "9.7.0": _instant("S_Total", "9.7.0", "kVA", "power", "Apparent power"),
    "13.7.0": _instant("PF_3P", "13.7.0", "PF", "power", "Power factor 3-phase"),
    "33.7.0": _instant("PF_R", "33.7.0", "PF", "power", "Power factor R-phase"),
    "53.7.0": _instant("PF_Y", "53.7.0", "PF", "power", "Power factor Y-phase"),
    "73.7.0": _instant("PF_B", "73.7.0", "PF", "power", "Power factor B-phase"),
    "14.7.0": _instant("Freq", "14.7.0", "Hz", "power", "Frequency"),
    "1.8.0": _instant(
        "kWh imp", "1.8.0", "kWh", "energyCumulative", "Active energy import (kWh)"
    ),
    "2.8.0": _instant(
        "kWh exp", "2.8.0", "kWh", "energyCumulative", "Active energy export (kWh)"
    ),
}
SIGNED_ACTIVE_POWER = "16.7.0"

# Unit in the log -> (IES unit, power of ten to apply).
UNITS: dict[str, tuple[str, int]] = {
    "Wh": ("kWh", -3),
    "kWh": ("kWh", 0),
    "MWh": ("kWh", 3),
    "W": ("kW", -3),
    "kW": ("kW", 0),
    "var": ("kvar", -3),
    "kvar": ("kvar", 0),
    "VA": ("kVA", -3),
    "kVA": ("kVA", 0),
    "varh": ("kvarh", -3),
    "kvarh": ("kvarh", 0),
    "VAh": ("kVAh", -3),
    "kVAh": ("kVAh", 0),
    "V": ("V", 0),
    "A": ("A", 0),
    "Hz": ("Hz", 0),
    "": ("PF", 0),
}

_OBIS = re.compile(r"1-[0-9]+:([0-9]+\.[0-9]+\.[0-9]+)(?:\*[0-9]+)?")

BOUNDARY_TOLERANCE_DIVISOR = 5
"""A boundary reading lies less than ``interval_s / 5`` after its boundary."""
SNAPSHOT_MS = 1000
"""Between boundaries, a meter's readings within this many ms of a snapshot's first
reading join that snapshot."""

MISSING_INTERVAL = "VEE-MISSING-INTERVAL"
TIME_UNSYNCED = "TIME-UNSYNCED"
REGISTER_DECREASED = "REGISTER-DECREASED"
_STATUS_RANK = {"VALID": 0, "ESTIMATED": 1, "SUSPECT": 2, "REJECTED": 3}

Key = tuple[str, str]
"""A source and a register (OBIS C.D.E), e.g. ``("grid-meter", "1.8.0")``."""


@dataclass(frozen=True)
class _Boundary:
    """A register's boundary reading: the boundary (UTC ms) and the value (IES unit)."""

    t_ms: int
    value: Decimal
    status: str  # VALID, SUSPECT, ESTIMATED


@dataclass(frozen=True)
class _Row:
    """One block of a register, from one boundary reading to the next one."""

    start_ms: int
    end_ms: int
    interval_s: int
    opening: Decimal
    closing: Decimal
    status: str
    fail_code: str | None

    @property
    def value(self) -> Decimal:
        """The block value: closing minus opening."""
        return self.closing - self.opening


@dataclass
class _Snapshot:
    """Instantaneous values of one meter at one moment (``t_ms``, UTC ms)."""

    t_ms: int
    boundary: bool
    until_ms: int
    values: list[tuple[Code, Decimal, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class MeterDataBuilder:
    """Turns evidence entries, fed in ``seq`` order, into MeterData profiles.

    ``meter_refs`` maps device ids to meter references; ``interval_s`` and ``tz``
    are taken from ``boot`` events when they come, these are defaults (or what the
    caller knows from the last ``boot`` before the first entry it feeds).
    """

    def __init__(
        self,
        *,
        gateway_id: str,
        meter_refs: Mapping[str, str] | None = None,
        interval_s: int = DEFAULT_INTERVAL_S,
        tz: str = DEFAULT_TZ,
    ) -> None:
        self.gateway_id = gateway_id
        self.meter_refs = dict(meter_refs or {})
        self.interval_s = interval_s
        self.tz = _zone(tz)
        self.serials: dict[str, str] = {}
        self.chains_started: set[Key] = set()
        """Registers whose first boundary reading seen here had no predecessor, so
        the row that ends there (if any) needs entries older than those fed."""
        self._claimed: dict[Key, int] = {}  # the last boundary given a reading
        self._last: dict[Key, _Boundary] = {}
        self._rows: dict[Key, list[_Row]] = {}
        self._open: dict[str, _Snapshot] = {}
        self._done: list[tuple[str, _Snapshot]] = []

    # --- input ------------------------------------------------------------------------

    def feed(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Take entries (parsed log lines) in ``seq`` order."""
        for entry in entries:
            t_ms = _time_ms(entry.get("t"))
            if t_ms is not None and self._open:
                self._close_snapshots(before_ms=t_ms)
            kind = entry.get("type")
            if kind == "reading":
                self._reading(entry, t_ms)
                continue
            ev = entry.get("ev")
            if ev == "boot":
                self._close_snapshots()
                interval = entry.get("interval_s")
                if isinstance(interval, int) and interval > 0:
                    self.interval_s = interval
                tz = entry.get("tz")
                if isinstance(tz, str):
                    self.tz = _zone(tz)
            elif ev == "shutdown":
                self._close_snapshots()
            elif ev == "source":
                dev = entry.get("dev")
                src = entry.get("src")
                if isinstance(dev, dict) and isinstance(src, str):
                    serial = dev.get("ser") or dev.get("serial")
                    if isinstance(serial, str) and serial:
                        self.serials[src] = serial

    def forget_output(self) -> None:
        """Drop the rows and snapshots made so far, keeping what later ones need."""
        self._rows.clear()
        self._done.clear()

    def _reading(self, entry: Mapping[str, Any], t_ms: int | None) -> None:
        src, obis = entry.get("src"), entry.get("obis")
        if not isinstance(src, str) or not isinstance(obis, str):
            return
        match = _OBIS.fullmatch(obis)
        if match is None:
            return
        if entry.get("st") == "L":  # a catch-up value belongs to its device time
            t_ms = _device_time_ms(entry.get("dt"), self.tz)
        value = _ies_value(entry)
        if t_ms is None or value is None:
            return
        number, status = value
        cde = match.group(1)

        # Is it the first reading of this register for the boundary just before it?
        key = (src, cde)
        slot = self._slot(t_ms)
        boundary: int | None = None
        if t_ms - slot < self._tolerance_ms() and slot > self._claimed.get(key, -1):
            boundary = self._claimed[key] = slot
            if cde in BLOCK_CODES:
                self._register(key, _Boundary(slot, number, status))
        self._snapshot(src, cde, number, status, t_ms, boundary)

    def _register(self, key: Key, now: _Boundary) -> None:
        """Close the row ending at boundary reading ``now`` of register ``key``."""
        previous = self._last.get(key)
        self._last[key] = now
        if previous is None:
            self.chains_started.add(key)
            return
        status = max(previous.status, now.status, key=_STATUS_RANK.__getitem__)
        fail_code = TIME_UNSYNCED if status == "SUSPECT" else None
        if now.value < previous.value:
            status, fail_code = "REJECTED", REGISTER_DECREASED
        elif now.t_ms - previous.t_ms != self.interval_s * 1000:
            status, fail_code = "SUSPECT", MISSING_INTERVAL
        row = _Row(
            previous.t_ms,
            now.t_ms,
            self.interval_s,
            previous.value,
            now.value,
            status,
            fail_code,
        )
        self._rows.setdefault(key, []).append(row)

    def _snapshot(
        self,
        src: str,
        cde: str,
        number: Decimal,
        status: str,
        t_ms: int,
        boundary: int | None,
    ) -> None:
        """Add an instantaneous value to the meter's open snapshot, or start one."""
        if cde in INSTANT_CODES:
            values = [(INSTANT_CODES[cde], number, status)]
        elif cde == SIGNED_ACTIVE_POWER:
            zero = Decimal(0)
            imp, exp = max(number, zero), max(-number, zero)
            values = [
                (INSTANT_CODES["1.7.0"], imp + zero, status),
                (INSTANT_CODES["2.7.0"], exp + zero, status),
            ]
        else:
            return
        snapshot = self._open.get(src)
        if boundary is not None:
            fits = (
                snapshot is not None
                and snapshot.boundary
                and snapshot.t_ms == boundary
                and cde not in snapshot.seen
            )
            start, until = boundary, boundary + self._tolerance_ms()
        else:
            fits = (
                snapshot is not None
                and not snapshot.boundary
                and 0 <= t_ms - snapshot.t_ms < SNAPSHOT_MS
                and cde not in snapshot.seen
            )
            start, until = t_ms, t_ms + SNAPSHOT_MS
        if snapshot is None or not fits:
            if snapshot is not None:
                self._done.append((src, snapshot))
            snapshot = _Snapshot(start, boundary is not None, until)
            self._open[src] = snapshot
        snapshot.seen.add(cde)
        snapshot.values.extend(values)

    def _close_snapshots(self, *, before_ms: int | None = None) -> None:
        """Finish the snapshots the log's time passed (all, without ``before_ms``)."""
        for src in [
            s
            for s, snapshot in self._open.items()
            if before_ms is None or snapshot.until_ms < before_ms
        ]:
            self._done.append((src, self._open.pop(src)))

    def _tolerance_ms(self) -> int:
        return self.interval_s * 1000 // BOUNDARY_TOLERANCE_DIVISOR

    def _slot(self, t_ms: int) -> int:
        """Return the latest boundary of the site's grid at or before ``t_ms`` (ms)."""
        local = datetime.fromtimestamp(t_ms / 1000, UTC).astimezone(self.tz)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        seconds = int((local - midnight).total_seconds())
        start = midnight + timedelta(seconds=seconds - seconds % self.interval_s)
        return int(start.timestamp()) * 1000

    # --- output -----------------------------------------------------------------------

    def profiles(self, *, final: bool = False) -> list[dict[str, Any]]:
        """Return DESCRIPTOR + INTERVAL + INSTANTANEOUS profiles of what was fed.

        Rows are those completed so far; snapshots those the log's time has passed,
        or, with ``final`` (the log ends here), all of them. Empty when there is
        nothing to say.
        """
        if final:
            self._close_snapshots()
        interval_descriptors: dict[str, Code] = {}
        instant_descriptors: dict[str, Code] = {}
        sequences: dict[str, list[dict[str, str]]] = {}
        profiles: list[dict[str, Any]] = []

        # INTERVAL: per meter, one profile per set of registers with the same rows.
        for src, groups in self._interval_groups():
            every = {cde for _, runs in groups for cde in runs}
            for _, runs in groups:
                registers = sorted(runs, key=_register_order)
                sequence = f"IntervalSeq-{src}"
                if set(registers) != every:
                    sequence += "-" + "+".join(registers)
                items = []
                for cde in registers:
                    code = BLOCK_CODES[cde]
                    interval_descriptors[cde] = code
                    for attribute in ("value", "openingValue", "closingValue"):
                        items.append(
                            {"readingType": code.label, "attribute": attribute}
                        )
                sequences[sequence] = items
                profiles.append(self._interval_profile(src, sequence, registers, runs))

        # INSTANTANEOUS: one profile per meter and snapshot.
        for src, snapshot in sorted(
            self._done, key=lambda item: (item[0], item[1].t_ms)
        ):
            readings = []
            for code, number, status in snapshot.values:
                instant_descriptors[code.label] = code
                reading: dict[str, Any] = {"readingType": code.label, "value": number}
                if status != "VALID":
                    reading["validationStatus"] = status
                readings.append(reading)
            profiles.append(
                {
                    "@type": "InstantaneousProfile",
                    "profileType": "INSTANTANEOUS",
                    "meterRefs": [self._meter_ref(src)],
                    "payloadDescriptorSetRef": "InstantaneousSet",
                    "timestamp": self._iso(snapshot.t_ms, exact=not snapshot.boundary),
                    "readings": readings,
                }
            )
        if not profiles:
            return []

        sets = []
        if interval_descriptors:
            sets.append(
                {
                    "name": "IntervalSet",
                    "payloadDescriptors": [
                        _descriptor(code, "USAGE")
                        for _, code in sorted(
                            interval_descriptors.items(),
                            key=lambda kv: _register_order(kv[0]),
                        )
                    ],
                    "compactSequences": [
                        {"name": name, "sequenceItems": items}
                        for name, items in sequences.items()
                    ],
                }
            )
        if instant_descriptors:
            sets.append(
                {
                    "name": "InstantaneousSet",
                    "payloadDescriptors": [
                        _descriptor(code, "READING")
                        for code in instant_descriptors.values()
                    ],
                }
            )
        descriptor = {
            "@type": "PayloadDescriptorProfile",
            "profileType": "DESCRIPTOR",
            "id": f"DESC-{self.gateway_id}",
            "payloadDescriptorSets": sets,
        }
        return [descriptor, *profiles]

    def _interval_groups(
        self,
    ) -> list[tuple[str, list[tuple[tuple[int, ...], dict[str, list[_Row]]]]]]:
        """Group each meter's runs of rows by the boundaries they cover.

        A run is a chain of rows of one register that may share a profile: a reset
        row stands alone, and a change of interval starts a new run. Returns, per
        source, ``(spans, {register: run})`` in time order, where ``spans`` is the
        interval length followed by the start and end of every row.
        """
        by_source: dict[str, dict[tuple[int, ...], dict[str, list[_Row]]]] = {}
        for (src, cde), rows in self._rows.items():
            for run in _runs(rows):
                ends = [t for row in run for t in (row.start_ms, row.end_ms)]
                spans = (run[0].interval_s, *ends)
                by_source.setdefault(src, {}).setdefault(spans, {})[cde] = run
        return [
            (src, sorted(by_source[src].items(), key=lambda item: item[0][1:]))
            for src in sorted(by_source)
        ]

    def _interval_profile(
        self,
        src: str,
        sequence: str,
        registers: Sequence[str],
        runs: Mapping[str, list[_Row]],
    ) -> dict[str, Any]:
        first = runs[registers[0]]
        interval_ms = first[0].interval_s * 1000
        start = first[0].start_ms
        intervals = []
        for index, row in enumerate(first):
            payloads: list[Any] = []
            overrides = []
            for column, cde in enumerate(registers):
                cell = runs[cde][index]
                payloads += [cell.value, cell.opening, cell.closing]
                if cell.status != "VALID":
                    overrides.append(_override(column * 3, cell.status, cell.fail_code))
            interval: dict[str, Any] = {
                "id": (row.start_ms - start) // interval_ms,
                "payloads": payloads,
            }
            if row.end_ms - row.start_ms != interval_ms:
                interval["intervalPeriod"] = {
                    "start": self._iso(row.start_ms),
                    "duration": _duration((row.end_ms - row.start_ms) // 1000),
                }
            if overrides:
                interval["overrides"] = overrides
            intervals.append(interval)
        return {
            "@type": "IntervalProfile",
            "profileType": "INTERVAL",
            "meterRefs": [self._meter_ref(src)],
            "payloadDescriptorSetRef": "IntervalSet",
            "compactSequenceRef": sequence,
            "intervalPeriod": {
                "start": self._iso(start),
                "duration": _duration(first[0].interval_s),
            },
            "intervals": intervals,
        }

    def _meter_ref(self, src: str) -> dict[str, str]:
        ref = self.meter_refs.get(src)
        if ref:
            scheme = "DID" if ref.startswith("did:") else "METER_SERIAL"
            return {"scheme": scheme, "value": ref}
        serial = self.serials.get(src)
        if serial:
            return {"scheme": "METER_SERIAL", "value": serial}
        return {"scheme": "OTHER", "value": f"{self.gateway_id}/{src}"}

    def _iso(self, t_ms: int, *, exact: bool = False) -> str:
        """Site-time RFC 3339 text of ``t_ms``: whole seconds, or ms when ``exact``."""
        moment = datetime.fromtimestamp(t_ms / 1000, UTC).astimezone(self.tz)
        return moment.isoformat(timespec="milliseconds" if exact else "seconds")


def _runs(rows: Sequence[_Row]) -> Iterable[list[_Row]]:
    """Split a register's rows where they may not share a profile (see above)."""
    run: list[_Row] = []
    for row in rows:
        alone = row.status == "REJECTED"
        if run and (
            alone
            or run[-1].status == "REJECTED"
            or row.interval_s != run[-1].interval_s
            or row.start_ms != run[-1].end_ms
        ):
            yield run
            run = []
        run.append(row)
    if run:
        yield run


def profiles_from_lines(
    lines: Sequence[bytes],
    *,
    gateway_id: str,
    meter_refs: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Return the MeterData profiles of whole log lines (a convenience for exports)."""
    builder = MeterDataBuilder(gateway_id=gateway_id, meter_refs=meter_refs)
    builder.feed(json.loads(line) for line in lines)
    return builder.profiles(final=True)


# --- exact JSON ----------------------------------------------------------------------


def dumps(document: Any) -> str:
    """Return ``document`` as compact JSON with :class:`~decimal.Decimal` numbers
    written exactly (``4.620`` stays ``4.620``), never through a float.

    Raises :class:`MeterDataError` for floats and values JSON cannot hold.
    """
    parts: list[str] = []
    _emit(document, parts)
    return "".join(parts)


def _emit(value: Any, out: list[str]) -> None:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MeterDataError(f"{value} is not a JSON number")
        text = format(value, "f")
        out.append("0" if text in ("-0", "0") else text)
    elif isinstance(value, str) or value is None or isinstance(value, bool | int):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Mapping):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _emit(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise MeterDataError(f"cannot write {type(value).__name__} as exact JSON")


# --- export ---------------------------------------------------------------------------


def write_export(path: Path, out: TextIO, args: argparse.Namespace) -> int:
    """Export handler of ``ies-agent export PATH --format ies-meterdata``.

    Writes one JSON document — an array of MeterData v0.6 profiles — for the log in
    data directory ``path``, after verifying it with the gateway's key card; only
    entries a valid checkpoint covers are exported. Returns the number of profiles.
    Raises ``EvidenceError`` when the log does not verify, ``VerifyInputError`` when
    ``path`` holds no log.
    """
    from ies_agent.evidence.errors import EvidenceError
    from ies_agent.evidence.verify import (
        directory_checkpoints,
        find_log,
        load_verifiers,
        verify_log,
    )

    log_path, directory = find_log(path)
    card = directory / "keys" / "key-card.json"
    verifiers = load_verifiers(card) if card.exists() else []
    data = log_path.read_bytes()
    report = verify_log(
        data, directory_checkpoints(directory), verifiers, path=str(log_path)
    )
    if not report.ok:
        first = report.errors[0]
        raise EvidenceError(
            f"the log does not verify ({len(report.errors)} error(s); first: "
            f"{first.line()}); refusing to export it. Run 'ies-agent verify {path}'"
        )
    lines = data.split(b"\n")[: report.signed_size]
    gateway_id = _gateway_id(lines) or directory.name
    refs = dict(_meter_ref_args(getattr(args, "meter_ref", None) or []))
    profiles = profiles_from_lines(lines, gateway_id=gateway_id, meter_refs=refs)
    out.write(dumps(profiles) + "\n")
    return len(profiles)


def _gateway_id(lines: Sequence[bytes]) -> str | None:
    for line in lines[:1]:
        agent = json.loads(line).get("agent")
        if isinstance(agent, dict) and isinstance(agent.get("id"), str):
            return str(agent["id"])
    return None


def _meter_ref_args(items: Sequence[str]) -> Iterable[tuple[str, str]]:
    for item in items:
        device, _, ref = item.partition("=")
        if device and ref:
            yield device, ref


# --- helpers --------------------------------------------------------------------------


def _ies_value(reading: Mapping[str, Any]) -> tuple[Decimal, str] | None:
    """Return the value in IES units and its validation status, or None if unusable."""
    state, text = reading.get("st"), reading.get("val")
    if state not in ("G", "S", "L") or not isinstance(text, str):
        return None
    unit = UNITS.get(str(reading.get("unit", "")))
    if unit is None:
        return None
    try:
        number = Decimal(text).scaleb(unit[1])
    except InvalidOperation:
        return None
    if state == "S":
        return number, "ESTIMATED"
    return number, "VALID" if reading.get("tq") == "S" else "SUSPECT"


def _override(index: int, status: str, fail_code: str | None) -> dict[str, Any]:
    override: dict[str, Any] = {"descriptorIndex": index, "validationStatus": status}
    if fail_code:
        override["failCode"] = fail_code
    if status == "ESTIMATED":
        override["source"] = "ESTIMATED"
    return override


def _descriptor(code: Code, mode: str) -> dict[str, Any]:
    descriptor: dict[str, Any] = {
        "readingType": code.label,
        "name": code.name,
        "obis": code.obis,
        "flowDirection": code.flow,
        "reportedMode": mode,
        "category": code.category,
    }
    if code.unit != "PF":
        descriptor["unit"] = code.unit
    return descriptor


def _register_order(cde: str) -> tuple[int, ...]:
    return tuple(int(part) for part in cde.split("."))


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"PT{seconds // 3600}H"
    if seconds % 60 == 0:
        return f"PT{seconds // 60}M"
    return f"PT{seconds}S"


def _time_ms(text: object) -> int | None:
    """UTC ms of an entry's gateway time (``2026-05-04T03:30:00.020Z``), or None."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    whole = moment.replace(microsecond=0)
    return int(whole.timestamp()) * 1000 + moment.microsecond // 1000


def _device_time_ms(text: object, tz: ZoneInfo) -> int | None:
    """UTC ms of a device time (ISO 8601; site time when it has no offset), or None."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return int(moment.timestamp() * 1000)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(DEFAULT_TZ)
