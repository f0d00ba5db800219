"""The one internal model every dispatch source is turned into.

A :class:`DispatchEvent` is an issuer's request on a regular interval grid: it starts
at ``start`` (UTC), has ``len(intervals)`` intervals of ``interval_s`` seconds each, and
each interval carries its targets. The document form (JSON, also the body of a signed
MQTT dispatch message, see :mod:`ies_agent.dispatch.auth`)::

    {
      "format": "ies-dispatch/1",
      "id": "evt-2025-0042",            # unique per issuer
      "issuer": "discom-north",          # who asks; its key must be pinned
      "modification": 0,                 # a newer number replaces the event
      "created": "2025-06-01T09:00:00Z",
      "start": "2025-06-01T10:00:00Z",
      "interval_s": 900,
      "intervals": [{"limit_pct": "50"}, {"limit_pct": "40", "charge_a": "8"}],
      "targets": ["inverter", "group:chargers"],
      "price": "4.50", "penalty": "1.00", "currency": "INR",   # optional
      "expires": "2025-06-01T09:55:00Z"                         # optional
    }

Interval targets (exact decimal strings, never floats): ``limit_pct`` — inverter
active-power limit in percent of its rated power; ``charge_a`` — charger current in A;
``capacity_kw`` — flexibility requested in kW (the site chooses how to deliver it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from ies_agent.dispatch.errors import EventFormatError

FORMAT = "ies-dispatch/1"
TARGET_KINDS = ("limit_pct", "charge_a", "capacity_kw")
"""What an interval may ask for; see the module docstring for units."""
MAX_INTERVALS = 96 * 2
"""At most two days of 15-minute intervals in one event."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class IntervalTarget:
    """What one interval asks for; ``None`` where it asks nothing of that kind."""

    limit_pct: Decimal | None = None
    charge_a: Decimal | None = None
    capacity_kw: Decimal | None = None

    def as_fields(self) -> dict[str, str]:
        """The targets as exact decimal strings, for the evidence log."""
        out: dict[str, str] = {}
        for kind in TARGET_KINDS:
            value = getattr(self, kind)
            if value is not None:
                out[kind] = str(value)
        return out


@dataclass(frozen=True)
class DispatchEvent:
    """One dispatch request, whatever source it came from.

    ``interval_s`` is the grid step in seconds; ``start`` is UTC; ``source`` names the
    channel (``mqtt``, ``beckn``, ``openadr``, ``local``); ``signed_by`` is the key id
    (or the authenticated channel) that vouched for it.
    """

    event_id: str
    issuer: str
    start: datetime
    interval_s: int
    intervals: tuple[IntervalTarget, ...]
    targets: tuple[str, ...]
    modification: int = 0
    created: datetime | None = None
    expires: datetime | None = None
    price: Decimal | None = None
    penalty: Decimal | None = None
    currency: str | None = None
    source: str = "local"
    signed_by: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> datetime:
        """When the last interval ends (UTC)."""
        return self.start + timedelta(seconds=self.interval_s * len(self.intervals))

    @property
    def duration_s(self) -> int:
        """Length of the whole event in seconds."""
        return self.interval_s * len(self.intervals)

    def interval_at(self, when: datetime) -> int | None:
        """Index of the interval holding ``when``, or ``None`` outside the event."""
        if when < self.start or when >= self.end:
            return None
        return int((when - self.start).total_seconds()) // self.interval_s

    def boundaries(self) -> list[datetime]:
        """The grid's ``len(intervals) + 1`` boundaries, start to end."""
        step = timedelta(seconds=self.interval_s)
        return [self.start + step * i for i in range(len(self.intervals) + 1)]

    def summary(self) -> dict[str, Any]:
        """The event as evidence fields (strings for decimals and times)."""
        out: dict[str, Any] = {
            "event": self.event_id,
            "issuer": self.issuer,
            "modification": self.modification,
            "source": self.source,
            "start": format_utc(self.start),
            "interval_s": self.interval_s,
            "intervals": [t.as_fields() for t in self.intervals],
            "targets": list(self.targets),
        }
        if self.signed_by:
            out["signed_by"] = self.signed_by
        for name in ("price", "penalty"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        if self.currency:
            out["currency"] = self.currency
        return out

    def to_document(self) -> dict[str, Any]:
        """The event in its JSON document form (:func:`parse_event` reads it back)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "id": self.event_id,
            "issuer": self.issuer,
            "modification": self.modification,
            "start": format_utc(self.start),
            "interval_s": self.interval_s,
            "intervals": [t.as_fields() for t in self.intervals],
            "targets": list(self.targets),
        }
        if self.created is not None:
            doc["created"] = format_utc(self.created)
        if self.expires is not None:
            doc["expires"] = format_utc(self.expires)
        for name in ("price", "penalty"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = str(value)
        if self.currency:
            doc["currency"] = self.currency
        return doc


def format_utc(when: datetime) -> str:
    """``2025-06-01T10:00:00Z`` (milliseconds when not whole seconds)."""
    when = when.astimezone(UTC)
    if when.microsecond:
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: object, where: str) -> datetime:
    """Read an RFC 3339 time with a zone; raise :class:`EventFormatError`."""
    if not isinstance(text, str):
        raise EventFormatError(f"{where}: expected an RFC 3339 time string")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EventFormatError(
            f"{where}: {text!r} is not an RFC 3339 time (2025-06-01T10:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise EventFormatError(f"{where}: {text!r} has no time zone; add Z or +05:30")
    return when.astimezone(UTC)


def parse_decimal(value: object, where: str, *, low: Decimal | None = None) -> Decimal:
    """Read an exact decimal string (floats are refused); raise EventFormatError."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventFormatError(f'{where}: expected a decimal string such as "12.5"')
    text = str(value)
    if not _DECIMAL.fullmatch(text):
        raise EventFormatError(f"{where}: {text!r} is not an exact decimal")
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern already checked
        raise EventFormatError(f"{where}: {text!r} is not a number") from None
    if low is not None and number < low:
        raise EventFormatError(f"{where}: {text} is below {low}")
    return number


def parse_event(
    doc: object, *, source: str = "local", signed_by: str = ""
) -> DispatchEvent:
    """Check a dispatch document and return the event.

    Raises :class:`EventFormatError` naming the field at fault.
    """
    if not isinstance(doc, Mapping):
        raise EventFormatError("a dispatch event must be a JSON object")
    if doc.get("format") != FORMAT:
        raise EventFormatError(
            f"format {doc.get('format')!r} is not {FORMAT!r}: not a dispatch event "
            "this gateway reads"
        )
    for name in ("id", "issuer"):
        value = doc.get(name)
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise EventFormatError(
                f"{name}: expected an id (letters, digits, . _ : @ / -), got {value!r}"
            )
    modification = doc.get("modification", 0)
    if isinstance(modification, bool) or not isinstance(modification, int):
        raise EventFormatError("modification: expected a whole number")
    interval_s = doc.get("interval_s")
    if (
        isinstance(interval_s, bool)
        or not isinstance(interval_s, int)
        or not 1 <= interval_s <= 86_400
    ):
        raise EventFormatError("interval_s: expected whole seconds, 1 to 86400")
    raw_intervals = doc.get("intervals")
    if not isinstance(raw_intervals, list) or not raw_intervals:
        raise EventFormatError("intervals: expected a non-empty list")
    if len(raw_intervals) > MAX_INTERVALS:
        raise EventFormatError(f"intervals: at most {MAX_INTERVALS} per event")
    intervals = tuple(
        _read_interval(item, f"intervals[{i}]") for i, item in enumerate(raw_intervals)
    )
    targets = doc.get("targets")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise EventFormatError(
            'targets: expected a non-empty list of device ids or "group:<name>"'
        )
    currency = doc.get("currency")
    if currency is not None and not isinstance(currency, str):
        raise EventFormatError("currency: expected a code such as INR")
    known = {
        "format", "id", "issuer", "modification", "created", "start", "interval_s",
        "intervals", "targets", "price", "penalty", "currency", "expires",
    }  # fmt: skip
    return DispatchEvent(
        event_id=str(doc["id"]),
        issuer=str(doc["issuer"]),
        start=parse_utc(doc.get("start"), "start"),
        interval_s=interval_s,
        intervals=intervals,
        targets=tuple(targets),
        modification=modification,
        created=parse_utc(doc["created"], "created") if "created" in doc else None,
        expires=parse_utc(doc["expires"], "expires") if "expires" in doc else None,
        price=parse_decimal(doc["price"], "price") if "price" in doc else None,
        penalty=parse_decimal(doc["penalty"], "penalty") if "penalty" in doc else None,
        currency=currency,
        source=source,
        signed_by=signed_by,
        extra={k: v for k, v in doc.items() if k not in known},
    )


def _read_interval(item: object, where: str) -> IntervalTarget:
    if not isinstance(item, Mapping) or not item:
        raise EventFormatError(
            f"{where}: expected an object with one or more of {', '.join(TARGET_KINDS)}"
        )
    unknown = sorted(set(item) - set(TARGET_KINDS))
    if unknown:
        raise EventFormatError(
            f"{where}: unknown target {unknown[0]!r}; known: {', '.join(TARGET_KINDS)}"
        )
    values = {
        k: parse_decimal(v, f"{where}.{k}", low=Decimal(0)) for k, v in item.items()
    }
    pct = values.get("limit_pct")
    if pct is not None and pct > 100:
        raise EventFormatError(f"{where}.limit_pct: {pct} is above 100 percent")
    return IntervalTarget(**values)
