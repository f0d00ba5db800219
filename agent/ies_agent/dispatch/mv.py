"""Measurement and verification: metered interval energy against a versioned baseline.

Everything is computed from the evidence log alone, so anyone holding the log can
recompute an ``mv_result``:

- **Register at a boundary**: the last good reading (``st`` = ``G``) of the meter's
  cumulative quantity (matched by ``q`` or ``obis``) at or before the boundary and not
  older than one interval. Simulated history (``mv_history`` events, ``simulated:
  true``, as the demo writes for past days) counts as readings at their stated times.
- **Actual energy** of interval *i*: register at its end minus register at its start,
  on exactly the event's grid; ``null`` when either register is missing.
- **Baseline** ``high-X-of-Y`` (method id ``high-X-of-Y/1``): the same grid shifted
  back by 1..Y whole days; days with every interval present are eligible; the X
  eligible days with the highest total energy are chosen (the more recent first on a
  tie) and the baseline of interval *i* is their mean. Decimals are exact; the mean is
  rounded half-even to the meter's resolution plus three digits.

The result names the seqs of the readings used for each actual interval and the days
chosen, so a verifier can recompute it entry by entry.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from ies_agent.dispatch.errors import DispatchError
from ies_agent.dispatch.model import format_utc
from ies_agent.evidence.log import parse_time_ms

_METHOD = re.compile(r"high-([1-9][0-9]?)-of-([1-9][0-9]?)")
DEFAULT_METHOD = "high-5-of-10"


@dataclass(frozen=True)
class BaselineMethod:
    """A best-``of``/``out_of`` baseline; ``label`` is the versioned method id."""

    best: int
    out_of: int

    @property
    def label(self) -> str:
        """``high-5-of-10/1``: the method and its version."""
        return f"high-{self.best}-of-{self.out_of}/1"


def parse_method(text: str) -> BaselineMethod:
    """Read ``high-X-of-Y`` (X <= Y); raise :class:`DispatchError` otherwise."""
    match = _METHOD.fullmatch(text.split("/", 1)[0])
    if match is None or int(match.group(1)) > int(match.group(2)):
        raise DispatchError(
            f"baseline method {text!r}: expected high-X-of-Y with X <= Y, "
            f"e.g. {DEFAULT_METHOD}"
        )
    return BaselineMethod(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class Sample:
    """One cumulative register value at ``t_ms`` (UTC ms) from entry ``seq``."""

    t_ms: int
    value: Decimal
    seq: int
    simulated: bool = False


def samples(
    entries: Iterable[Mapping[str, Any]], meter: str, quantity: str
) -> tuple[list[Sample], str]:
    """The meter's good cumulative samples in time order, and their unit."""
    found: list[Sample] = []
    unit = ""
    for entry in entries:
        if entry.get("src") != meter:
            continue
        if entry.get("type") == "reading":
            if quantity not in (entry.get("q"), entry.get("obis")):
                continue
            if entry.get("st") != "G" or "val" not in entry:
                continue
            t_ms = parse_time_ms(str(entry.get("t", "")))
            if t_ms is not None:
                found.append(Sample(t_ms, Decimal(entry["val"]), int(entry["seq"])))
                unit = str(entry.get("unit", unit))
        elif entry.get("ev") == "mv_history" and entry.get("q") == quantity:
            unit = str(entry.get("unit", unit))
            for t_text, value in entry.get("readings", []):
                t_ms = parse_time_ms(str(t_text))
                if t_ms is not None:
                    found.append(
                        Sample(t_ms, Decimal(value), int(entry["seq"]), simulated=True)
                    )
    found.sort(key=lambda s: (s.t_ms, s.seq))
    return found, unit


def register_at(series: Sequence[Sample], t_ms: int, max_age_ms: int) -> Sample | None:
    """The last sample at or before ``t_ms`` and at most ``max_age_ms`` older."""
    lo, hi = 0, len(series)
    while lo < hi:
        mid = (lo + hi) // 2
        if series[mid].t_ms <= t_ms:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return None
    best = series[lo - 1]
    return best if t_ms - best.t_ms <= max_age_ms else None


def interval_energy(
    series: Sequence[Sample], boundaries: Sequence[datetime], interval_s: int
) -> list[tuple[Decimal | None, Sample | None, Sample | None]]:
    """Energy per interval of the grid ``boundaries`` and the samples it used."""
    max_age = interval_s * 1000
    marks = [
        register_at(series, int(b.timestamp() * 1000), max_age) for b in boundaries
    ]
    out: list[tuple[Decimal | None, Sample | None, Sample | None]] = []
    for first, last in itertools.pairwise(marks):
        if first is None or last is None:
            out.append((None, first, last))
        else:
            out.append((last.value - first.value, first, last))
    return out


def measure(
    entries: Sequence[Mapping[str, Any]],
    *,
    event_id: str,
    meter: str,
    quantity: str,
    start: datetime,
    interval_s: int,
    intervals: int,
    method: BaselineMethod,
) -> dict[str, Any]:
    """Compute the ``mv_result`` fields of one meter for one event's grid."""
    series, unit = samples(entries, meter, quantity)
    step = timedelta(seconds=interval_s)
    grid = [start + step * i for i in range(intervals + 1)]
    actual = interval_energy(series, grid, interval_s)

    # Baseline: the same grid on each of the past `out_of` days.
    days: list[tuple[Decimal, int, list[Decimal], bool]] = []
    for back in range(1, method.out_of + 1):
        shifted = [b - timedelta(days=back) for b in grid]
        energy = interval_energy(series, shifted, interval_s)
        values = [e for e, _, _ in energy]
        if any(v is None for v in values):
            continue
        exact = [v for v in values if v is not None]
        simulated = any(
            s is not None and s.simulated for _, a, b in energy for s in (a, b)
        )
        days.append((sum(exact, Decimal(0)), back, exact, simulated))
    chosen = sorted(days, key=lambda d: (-d[0], d[1]))[: method.best]
    baseline: list[str | None] = [None] * intervals
    if chosen:
        exponent = min(
            (v.as_tuple().exponent for _, _, vals, _ in chosen for v in vals),
            default=0,
        )
        quantum = Decimal(1).scaleb(int(exponent) - 3)
        for i in range(intervals):
            mean = sum((d[2][i] for d in chosen), Decimal(0)) / len(chosen)
            baseline[i] = _text(mean.quantize(quantum, rounding=ROUND_HALF_EVEN))
    actual_text = [None if e is None else _text(e) for e, _, _ in actual]
    reduction = [
        None if b is None or a is None else _text(Decimal(b) - Decimal(a))
        for b, a in zip(baseline, actual_text, strict=True)
    ]
    return {
        "event": event_id,
        "meter": meter,
        "quantity": quantity,
        "unit": unit,
        "method": method.label,
        "grid": {
            "start": format_utc(start),
            "interval_s": interval_s,
            "intervals": intervals,
        },
        "interval_start": [format_utc(b) for b in grid[:-1]],
        "baseline": baseline,
        "actual": actual_text,
        "reduction": reduction,
        "actual_seqs": [
            [a.seq, b.seq] if a is not None and b is not None else None
            for _, a, b in actual
        ],
        "baseline_days": [
            (start - timedelta(days=d[1])).date().isoformat() for d in chosen
        ],
        "eligible_days": len(days),
        "simulated_history": any(d[3] for d in chosen),
    }


def read_entries(path: Path) -> Iterator[dict[str, Any]]:
    """Every entry of an evidence log file (``evidence.jsonl``), in order."""
    with Path(path).open("rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                yield json.loads(line)


def _text(value: Decimal) -> str:
    return format(value, "f")
