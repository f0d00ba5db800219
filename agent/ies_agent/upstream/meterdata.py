"""IES MeterData v0.6 profiles from evidence entries, with exact decimal numbers.

The evidence log records, at every interval boundary, every register of every device,
then a ``checkpoint`` event. From that the builder makes:

- **INTERVAL** profiles, one per meter: for each cumulative energy register with an
  IES block code (``1-0:1.8.0`` -> ``1.0.1.29.0.255`` "kWh imp block", 2.8.0, 9.8.0,
  10.8.0, 5.8.0, 8.8.0), one row per interval with the block value (closing minus
  opening), the opening and the closing register values, in ``USAGE`` mode. A row
  needs both boundary readings good and exactly one interval apart (a gap, a read
  error or a register that went backwards leaves the row out rather than guessing);
  row ``id`` counts intervals from ``intervalPeriod.start``, so ids increase and a
  missing interval is a missing id. Readings taken while the gateway's clock was not
  synchronised are flagged ``SUSPECT`` (failCode ``TIME-UNSYNCED``), substitutes
  ``ESTIMATED``.
- **INSTANTANEOUS** profiles, one per meter and boundary, with the values that have
  an IES instantaneous code (voltages, currents, power factors, frequency, active,
  reactive and apparent power, cumulative import/export energy). Signed total active
  power (``1-0:16.7.0``) is split into ``P_Import`` / ``P_Export``.
- one **DESCRIPTOR** profile declaring the reading types used and, per meter, the
  compact sequence of its interval rows.

Units are converted to those of IES (Wh -> kWh, W -> kW, var -> kvar, ...) by moving
the decimal point: values stay exact decimals from the log to the JSON text, never
passing through a float (:func:`dumps`). Meter references come from the
configuration (a ``did:`` value is a DID, anything else a serial number), else from
the serial number a device reported, else ``<gateway>/<device>`` (scheme ``OTHER``).

:func:`write_export` is the handler of ``ies-agent export PATH --format ies-meterdata``.
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


@dataclass
class _Value:
    """One register value at one boundary, already in IES units."""

    value: Decimal
    slot_ms: int
    status: str  # VALID, SUSPECT, ESTIMATED


@dataclass
class _Group:
    """The readings of one boundary: ``src -> [(cde, unit, value, tq, st)]``."""

    t_min: int | None = None
    readings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class _Row:
    slot_ms: int  # start of the interval
    values: dict[str, tuple[Decimal, Decimal, Decimal, str]]  # cde -> v, open, close


class MeterDataBuilder:
    """Turns evidence entries, fed in ``seq`` order, into MeterData profiles.

    ``meter_refs`` maps device ids to meter references; ``interval_s`` and ``tz``
    are taken from ``boot`` events when they come, these are defaults.
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
        self._group = _Group()
        self._last: dict[tuple[str, str], _Value] = {}
        self._rows: dict[str, dict[int, _Row]] = {}
        self._instant: dict[str, dict[int, list[tuple[Code, Decimal, str]]]] = {}

    # --- input ------------------------------------------------------------------------

    def feed(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Take entries (parsed log lines) in ``seq`` order."""
        for entry in entries:
            kind = entry.get("type")
            if kind == "reading":
                self._reading(entry)
                continue
            ev = entry.get("ev")
            if ev == "boot":
                self._close_group()
                interval = entry.get("interval_s")
                if isinstance(interval, int) and interval > 0:
                    self.interval_s = interval
                tz = entry.get("tz")
                if isinstance(tz, str):
                    self.tz = _zone(tz)
            elif ev in ("checkpoint", "shutdown"):
                self._close_group()
            elif ev == "source":
                dev = entry.get("dev")
                src = entry.get("src")
                if isinstance(dev, dict) and isinstance(src, str):
                    serial = dev.get("ser") or dev.get("serial")
                    if isinstance(serial, str) and serial:
                        self.serials[src] = serial

    def forget_output(self) -> None:
        """Drop the profiles made so far, keeping what the next rows need."""
        self._rows.clear()
        self._instant.clear()

    def _reading(self, entry: Mapping[str, Any]) -> None:
        src, obis, t = entry.get("src"), entry.get("obis"), entry.get("t")
        if not isinstance(src, str) or not isinstance(obis, str):
            return
        match = _OBIS.fullmatch(obis)
        if match is None or not isinstance(t, str):
            return
        group = self._group
        t_ms = _parse_time(t)
        group.t_min = t_ms if group.t_min is None else min(group.t_min, t_ms)
        group.readings.setdefault(src, []).append(
            {
                "cde": match.group(1),
                "unit": entry.get("unit", ""),
                "val": entry.get("val"),
                "st": entry.get("st"),
                "tq": entry.get("tq"),
            }
        )

    def _close_group(self) -> None:
        group, self._group = self._group, _Group()
        if group.t_min is None:
            return
        slot = self._slot(group.t_min)
        for src, readings in group.readings.items():
            instant: list[tuple[Code, Decimal, str]] = []
            for reading in readings:
                value = _ies_value(reading)
                if value is None:
                    continue
                number, status = value
                cde = reading["cde"]
                if cde in BLOCK_CODES:
                    self._boundary(src, cde, _Value(number, slot, status))
                if cde in INSTANT_CODES:
                    instant.append((INSTANT_CODES[cde], number, status))
                elif cde == SIGNED_ACTIVE_POWER:
                    zero = Decimal(0)
                    imp, exp = max(number, zero), max(-number, zero)
                    instant.append((INSTANT_CODES["1.7.0"], imp + zero, status))
                    instant.append((INSTANT_CODES["2.7.0"], exp + zero, status))
            if instant:
                self._instant.setdefault(src, {}).setdefault(slot, instant)

    def _boundary(self, src: str, cde: str, now: _Value) -> None:
        previous = self._last.get((src, cde))
        self._last[(src, cde)] = now
        if previous is None or now.slot_ms - previous.slot_ms != self.interval_s * 1000:
            return
        if now.value < previous.value:
            return  # register went backwards (meter reset or replaced): no block
        status = "VALID"
        for candidate in ("ESTIMATED", "SUSPECT"):
            if candidate in (previous.status, now.status):
                status = candidate
        rows = self._rows.setdefault(src, {})
        row = rows.setdefault(previous.slot_ms, _Row(previous.slot_ms, {}))
        delta = now.value - previous.value
        row.values[cde] = (delta, previous.value, now.value, status)

    def _slot(self, t_ms: int) -> int:
        """Return the start (UTC ms) of the site-time interval holding ``t_ms``."""
        local = datetime.fromtimestamp(t_ms / 1000, UTC).astimezone(self.tz)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        seconds = int((local - midnight).total_seconds())
        start = midnight + timedelta(seconds=seconds - seconds % self.interval_s)
        return int(start.timestamp()) * 1000

    # --- output -----------------------------------------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        """Return DESCRIPTOR + INTERVAL + INSTANTANEOUS profiles of what was fed.

        Empty when nothing (no complete interval, no instantaneous value) was seen.
        """
        interval_descriptors: dict[str, Code] = {}
        instant_descriptors: dict[str, Code] = {}
        sequences: list[dict[str, Any]] = []
        profiles: list[dict[str, Any]] = []

        # INTERVAL: one profile per meter; its sequence is every register it has.
        for src in sorted(self._rows):
            rows = [r for _, r in sorted(self._rows[src].items())]
            registers = sorted(
                {cde for row in rows for cde in row.values}, key=_register_order
            )
            rows = [r for r in rows if all(cde in r.values for cde in registers)]
            if not rows:
                continue
            items = []
            for cde in registers:
                code = BLOCK_CODES[cde]
                interval_descriptors[cde] = code
                for attribute in ("value", "openingValue", "closingValue"):
                    items.append({"readingType": code.label, "attribute": attribute})
            sequence = f"IntervalSeq-{src}"
            sequences.append({"name": sequence, "sequenceItems": items})
            start = rows[0].slot_ms
            intervals = []
            for row in rows:
                payloads: list[Any] = []
                overrides = []
                for index, cde in enumerate(registers):
                    value, opening, closing, status = row.values[cde]
                    payloads += [value, opening, closing]
                    if status != "VALID":
                        overrides.append(_override(index * 3, status))
                interval: dict[str, Any] = {
                    "id": (row.slot_ms - start) // (self.interval_s * 1000),
                    "payloads": payloads,
                }
                if overrides:
                    interval["overrides"] = overrides
                intervals.append(interval)
            profiles.append(
                {
                    "@type": "IntervalProfile",
                    "profileType": "INTERVAL",
                    "meterRefs": [self._meter_ref(src)],
                    "payloadDescriptorSetRef": "IntervalSet",
                    "compactSequenceRef": sequence,
                    "intervalPeriod": {
                        "start": self._iso(start),
                        "duration": _duration(self.interval_s),
                    },
                    "intervals": intervals,
                }
            )

        # INSTANTANEOUS: one profile per meter and boundary.
        for src in sorted(self._instant):
            for slot, values in sorted(self._instant[src].items()):
                readings = []
                for code, number, status in values:
                    instant_descriptors[code.label] = code
                    reading: dict[str, Any] = {
                        "readingType": code.label,
                        "value": number,
                    }
                    if status != "VALID":
                        reading["validationStatus"] = status
                    readings.append(reading)
                profiles.append(
                    {
                        "@type": "InstantaneousProfile",
                        "profileType": "INSTANTANEOUS",
                        "meterRefs": [self._meter_ref(src)],
                        "payloadDescriptorSetRef": "InstantaneousSet",
                        "timestamp": self._iso(slot),
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
                    "compactSequences": sequences,
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

    def _meter_ref(self, src: str) -> dict[str, str]:
        ref = self.meter_refs.get(src)
        if ref:
            scheme = "DID" if ref.startswith("did:") else "METER_SERIAL"
            return {"scheme": scheme, "value": ref}
        serial = self.serials.get(src)
        if serial:
            return {"scheme": "METER_SERIAL", "value": serial}
        return {"scheme": "OTHER", "value": f"{self.gateway_id}/{src}"}

    def _iso(self, t_ms: int) -> str:
        moment = datetime.fromtimestamp(t_ms / 1000, UTC).astimezone(self.tz)
        return moment.isoformat(timespec="seconds")


def profiles_from_lines(
    lines: Sequence[bytes],
    *,
    gateway_id: str,
    meter_refs: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Return the MeterData profiles of whole log lines (a convenience for exports)."""
    builder = MeterDataBuilder(gateway_id=gateway_id, meter_refs=meter_refs)
    builder.feed(json.loads(line) for line in lines)
    return builder.profiles()


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


def _override(index: int, status: str) -> dict[str, Any]:
    override: dict[str, Any] = {"descriptorIndex": index, "validationStatus": status}
    if status == "SUSPECT":
        override["failCode"] = "TIME-UNSYNCED"
    elif status == "ESTIMATED":
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


def _parse_time(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    whole = moment.replace(microsecond=0)
    return int(whole.timestamp()) * 1000 + moment.microsecond // 1000


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(DEFAULT_TZ)
