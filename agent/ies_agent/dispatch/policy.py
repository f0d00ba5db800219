"""Policy packs: the site's own signed rules that every dispatch must satisfy.

A pack is data, never code: a signed document (:mod:`ies_agent.dispatch.auth`, kind
``pack``, domain ``ies-policy-pack/1``) whose body is::

    {
      "format": "ies-policy-pack/1",
      "id": "site-default", "version": 3,
      "effective_from": "2025-01-01T00:00:00Z",
      "effective_until": "2026-01-01T00:00:00Z",
      "clauses": [
        {"id": "INST-EXPORT", "kind": "export_limit", "devices": ["inverter"],
         "max_pct": "70"},
        {"id": "EV-MIN", "kind": "device_minimum", "devices": ["*"], "min_a": "6",
         "on_violation": "clamp"},
        {"id": "PV-MIN", "kind": "device_minimum", "devices": ["inverter"],
         "min_pct": "20", "on_violation": "refuse"},
        {"id": "LEN", "kind": "max_event_length", "max_s": 14400},
        {"id": "FREQ", "kind": "max_events_per_day", "max": 2},
        {"id": "EVENING", "kind": "comfort_window", "devices": ["charger-1"],
         "from": "18:00", "to": "22:00", "tz": "Asia/Kolkata"},
        {"id": "OPT-OUT", "kind": "consumer_opt_out", "allowed": true}
      ]
    }

Clause kinds and what they do to a plan (``devices``: ids, or ``*`` for all):

- ``export_limit``: the installer's own inverter limit (percent of rated power). A
  dispatch may tighten it, never weaken it: setpoints above ``max_pct`` are lowered to
  it, and a revert never leaves the inverter above it.
- ``device_minimum``: never below ``min_a`` (chargers, A) or ``min_pct`` (inverters);
  ``on_violation`` is ``clamp`` (raise the setpoint to the minimum) or ``refuse``.
- ``max_event_length``: events longer than ``max_s`` seconds are refused.
- ``max_events_per_day``: at most ``max`` accepted events per site-local day.
- ``comfort_window``: the devices are left out of any event overlapping the daily
  window ``from``-``to`` (local time in ``tz``).
- ``consumer_opt_out``: whether the consumer may opt out (``allowed``, default true).

Every decision carries a trace: one entry per clause that applied, with its id, kind,
result (``pass``, ``clamp``, ``exclude``, ``refuse``) and a detail. Errors:
:class:`~ies_agent.dispatch.errors.PolicyPackError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ies_agent.dispatch.auth import DOMAIN_PACK, verify_document
from ies_agent.dispatch.errors import (
    AuthenticationError,
    EventFormatError,
    PolicyPackError,
)
from ies_agent.dispatch.model import DispatchEvent, format_utc, parse_decimal, parse_utc
from ies_agent.signing.manifest import TrustStore

FORMAT = "ies-policy-pack/1"
CLAUSE_KINDS = (
    "export_limit",
    "device_minimum",
    "max_event_length",
    "max_events_per_day",
    "comfort_window",
    "consumer_opt_out",
)
_CLAUSE_KEYS: dict[str, set[str]] = {
    "export_limit": {"devices", "max_pct"},
    "device_minimum": {"devices", "min_a", "min_pct", "on_violation"},
    "max_event_length": {"max_s"},
    "max_events_per_day": {"max", "tz"},
    "comfort_window": {"devices", "from", "to", "tz"},
    "consumer_opt_out": {"allowed"},
}
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Clause:
    """One rule of a pack: its id, kind and parameters (already checked)."""

    clause_id: str
    kind: str
    params: Mapping[str, Any]

    def covers(self, device_id: str) -> bool:
        """Whether this clause names ``device_id`` (or every device with ``*``)."""
        devices = self.params.get("devices", ["*"])
        return "*" in devices or device_id in devices


@dataclass(frozen=True)
class PolicyPack:
    """A verified pack; ``signed_by`` is the pinned key id that signed it."""

    pack_id: str
    version: int
    effective_from: datetime
    effective_until: datetime | None
    clauses: tuple[Clause, ...]
    signed_by: str = ""
    path: Path | None = None

    @property
    def label(self) -> str:
        """``id@version``, as recorded in every decision."""
        return f"{self.pack_id}@{self.version}"

    def in_effect(self, now: datetime) -> bool:
        """Whether ``now`` lies in the pack's effective period."""
        if now < self.effective_from:
            return False
        return self.effective_until is None or now < self.effective_until

    def export_limit_pct(self, device_id: str) -> Decimal | None:
        """The installer's limit for an inverter (tightest clause), or ``None``."""
        limits = [
            Decimal(c.params["max_pct"])
            for c in self.clauses
            if c.kind == "export_limit" and c.covers(device_id)
        ]
        return min(limits) if limits else None

    def opt_out_allowed(self) -> bool:
        """Whether the consumer may opt out of events (default: yes)."""
        for clause in self.clauses:
            if clause.kind == "consumer_opt_out":
                return bool(clause.params.get("allowed", True))
        return True


@dataclass
class DeviceSetpoints:
    """A device's planned setpoint per interval (``None``: not limited then).

    ``unit`` is ``pct`` (inverter, percent of rated power) or ``A`` (charger).
    """

    device_id: str
    kind: str
    unit: str
    values: list[Decimal | None]


@dataclass
class Decision:
    """Accepted or refused, the adjusted plan, and the trace of the clauses applied."""

    accepted: bool
    pack: str
    trace: list[dict[str, str]] = field(default_factory=list)
    plan: list[DeviceSetpoints] = field(default_factory=list)
    reason: str = ""
    refused_by: str = ""

    def refuse(self, clause: Clause, detail: str) -> None:
        """Record a refusal by ``clause``."""
        self.trace.append(_step(clause, "refuse", detail))
        if self.accepted:
            self.accepted = False
            self.refused_by = clause.clause_id
            self.reason = f"policy clause {clause.clause_id} ({clause.kind}): {detail}"


def _step(clause: Clause, result: str, detail: str) -> dict[str, str]:
    return {
        "clause": clause.clause_id,
        "kind": clause.kind,
        "result": result,
        "detail": detail,
    }


# --- reading packs --------------------------------------------------------------------


def load_pack(path: Path, trust: TrustStore) -> PolicyPack:
    """Read, verify and check the pack at ``path``.

    Raises :class:`PolicyPackError` naming the file and what is wrong: unreadable,
    malformed, or not signed by a pinned key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyPackError(
            f"cannot read policy pack {path}: {exc.strerror}"
        ) from None
    try:
        body, signer = verify_document(
            data, "pack", DOMAIN_PACK, trust, source=str(path)
        )
    except (EventFormatError, AuthenticationError) as exc:
        raise PolicyPackError(str(exc)) from None
    pack = parse_pack(body, source=str(path))
    return PolicyPack(
        pack.pack_id,
        pack.version,
        pack.effective_from,
        pack.effective_until,
        pack.clauses,
        signed_by=signer,
        path=Path(path),
    )


def parse_pack(body: Mapping[str, Any], *, source: str = "pack") -> PolicyPack:
    """Check a pack body's structure; raise :class:`PolicyPackError` if wrong."""
    if body.get("format") != FORMAT:
        raise PolicyPackError(f"{source}: format must be {FORMAT!r}")
    pack_id, version = body.get("id"), body.get("version")
    if not isinstance(pack_id, str) or not _ID.fullmatch(pack_id):
        raise PolicyPackError(f"{source}: id must be a short name, got {pack_id!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PolicyPackError(f"{source}: version must be a whole number from 1")
    try:
        start = parse_utc(body.get("effective_from"), "effective_from")
        until = (
            parse_utc(body["effective_until"], "effective_until")
            if "effective_until" in body
            else None
        )
    except EventFormatError as exc:
        raise PolicyPackError(f"{source}: {exc}") from None
    if until is not None and until <= start:
        raise PolicyPackError(f"{source}: effective_until is not after effective_from")
    raw = body.get("clauses")
    if not isinstance(raw, list):
        raise PolicyPackError(f"{source}: clauses must be a list")
    clauses = [
        _read_clause(item, f"{source}: clauses[{i}]") for i, item in enumerate(raw)
    ]
    ids = [c.clause_id for c in clauses]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise PolicyPackError(f"{source}: clause id {duplicate!r} is used twice")
    unknown = sorted(set(body) - {"format", "id", "version", "effective_from",
                                  "effective_until", "clauses", "note"})  # fmt: skip
    if unknown:
        raise PolicyPackError(f"{source}: unknown field {unknown[0]!r}")
    return PolicyPack(pack_id, version, start, until, tuple(clauses))


def _read_clause(item: object, where: str) -> Clause:
    if not isinstance(item, Mapping):
        raise PolicyPackError(f"{where}: expected an object")
    clause_id, kind = item.get("id"), item.get("kind")
    if not isinstance(clause_id, str) or not _ID.fullmatch(clause_id):
        raise PolicyPackError(f"{where}.id: expected a short clause id")
    if kind not in CLAUSE_KINDS:
        raise PolicyPackError(
            f"{where}.kind: {kind!r} is not one of {', '.join(CLAUSE_KINDS)}"
        )
    params = {k: v for k, v in item.items() if k not in ("id", "kind", "note")}
    extra = sorted(set(params) - _CLAUSE_KEYS[kind])
    if extra:
        raise PolicyPackError(
            f"{where}: {kind} takes {', '.join(sorted(_CLAUSE_KEYS[kind]))}, "
            f"not {extra[0]!r}"
        )
    try:
        _check_params(kind, params, where)
    except EventFormatError as exc:
        raise PolicyPackError(str(exc)) from None
    return Clause(clause_id, kind, params)


def _check_params(kind: str, params: dict[str, Any], where: str) -> None:
    devices = params.get("devices", ["*"])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise PolicyPackError(f"{where}.devices: expected a list of device ids or '*'")
    if kind == "export_limit":
        pct = parse_decimal(params.get("max_pct"), f"{where}.max_pct", low=Decimal(0))
        if pct > 100:
            raise PolicyPackError(f"{where}.max_pct: above 100 percent")
    elif kind == "device_minimum":
        if "min_a" not in params and "min_pct" not in params:
            raise PolicyPackError(f"{where}: give min_a (chargers) or min_pct")
        for name in ("min_a", "min_pct"):
            if name in params:
                parse_decimal(params[name], f"{where}.{name}", low=Decimal(0))
        if params.get("on_violation", "refuse") not in ("refuse", "clamp"):
            raise PolicyPackError(f"{where}.on_violation: 'refuse' or 'clamp'")
    elif kind in ("max_event_length", "max_events_per_day"):
        name = "max_s" if kind == "max_event_length" else "max"
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PolicyPackError(f"{where}.{name}: expected a whole number >= 0")
    elif kind == "comfort_window":
        for name in ("from", "to"):
            if not isinstance(params.get(name), str) or not _HHMM.fullmatch(
                params[name]
            ):
                raise PolicyPackError(f"{where}.{name}: expected HH:MM (24 h)")
    elif kind == "consumer_opt_out" and not isinstance(
        params.get("allowed", True), bool
    ):
        raise PolicyPackError(f"{where}.allowed: expected true or false")
    if "tz" in params:
        try:
            ZoneInfo(str(params["tz"]))
        except (ZoneInfoNotFoundError, ValueError):
            raise PolicyPackError(f"{where}.tz: unknown time zone") from None


def select_pack(packs: Iterable[PolicyPack], now: datetime) -> PolicyPack:
    """The pack in effect at ``now``: the highest version among those effective.

    Raises :class:`PolicyPackError` when none is in effect (dispatch is then refused:
    with no rules, the agent cannot tell what is safe).
    """
    effective = [p for p in packs if p.in_effect(now)]
    if not effective:
        raise PolicyPackError(
            f"no policy pack is in effect at {format_utc(now)}: install a signed pack "
            "whose effective period covers now"
        )
    return max(effective, key=lambda p: (p.version, p.effective_from))


# --- deciding -------------------------------------------------------------------------


def evaluate(
    pack: PolicyPack,
    event: DispatchEvent,
    plan: Sequence[DeviceSetpoints],
    *,
    events_today: int = 0,
    tz: str = "Asia/Kolkata",
) -> Decision:
    """Check ``event`` and its raw ``plan`` against ``pack``; return the decision.

    The returned plan has setpoints clamped and devices excluded as the clauses say;
    the decision is refused at the first ``refuse``, but every clause is still traced.
    ``events_today`` counts events accepted so far on the event's local day.
    """
    decision = Decision(accepted=True, pack=pack.label)
    adjusted = [
        DeviceSetpoints(p.device_id, p.kind, p.unit, list(p.values)) for p in plan
    ]
    for clause in pack.clauses:
        params = clause.params
        if clause.kind == "max_event_length":
            limit = int(params["max_s"])
            if event.duration_s > limit:
                decision.refuse(
                    clause, f"event lasts {event.duration_s} s, at most {limit} s"
                )
            else:
                decision.trace.append(
                    _step(clause, "pass", f"{event.duration_s} s <= {limit} s")
                )
        elif clause.kind == "max_events_per_day":
            most = int(params["max"])
            if events_today >= most:
                decision.refuse(
                    clause, f"{events_today} events already today, at most {most}"
                )
            else:
                decision.trace.append(
                    _step(clause, "pass", f"event {events_today + 1} of {most} today")
                )
        elif clause.kind == "comfort_window":
            zone = ZoneInfo(str(params.get("tz", tz)))
            for setpoints in adjusted:
                if not clause.covers(setpoints.device_id):
                    continue
                hit = [
                    i
                    for i, value in enumerate(setpoints.values)
                    if value is not None
                    and _in_window(event, i, zone, params["from"], params["to"])
                ]
                if hit:
                    for i in hit:
                        setpoints.values[i] = None
                    decision.trace.append(
                        _step(
                            clause,
                            "exclude",
                            f"{setpoints.device_id} left out of intervals "
                            f"{hit[0]}-{hit[-1]} ({params['from']}-{params['to']})",
                        )
                    )
        elif clause.kind == "export_limit":
            cap = Decimal(params["max_pct"])
            for setpoints in adjusted:
                if setpoints.unit != "pct" or not clause.covers(setpoints.device_id):
                    continue
                weaker = [v for v in setpoints.values if v is not None and v > cap]
                setpoints.values = [
                    None if v is None else min(v, cap) for v in setpoints.values
                ]
                result = "clamp" if weaker else "pass"
                detail = (
                    f"{setpoints.device_id}: installer limit {cap} % kept "
                    f"({len(weaker)} interval(s) lowered to it)"
                    if weaker
                    else f"{setpoints.device_id}: at or below installer limit {cap} %"
                )
                decision.trace.append(_step(clause, result, detail))
        elif clause.kind == "device_minimum":
            _apply_minimum(clause, adjusted, decision)
        elif clause.kind == "consumer_opt_out":
            decision.trace.append(
                _step(clause, "pass", f"opt-out allowed: {params.get('allowed', True)}")
            )
    if decision.accepted and not any(v is not None for p in adjusted for v in p.values):
        decision.accepted = False
        decision.reason = "no device is left to act on after the policy pack"
    decision.plan = adjusted
    return decision


def _apply_minimum(
    clause: Clause, adjusted: list[DeviceSetpoints], decision: Decision
) -> None:
    params = clause.params
    for setpoints in adjusted:
        if not clause.covers(setpoints.device_id):
            continue
        name = "min_a" if setpoints.unit == "A" else "min_pct"
        if name not in params:
            continue
        floor = Decimal(params[name])
        low = [v for v in setpoints.values if v is not None and v < floor]
        unit = "A" if name == "min_a" else "%"
        if not low:
            decision.trace.append(
                _step(clause, "pass", f"{setpoints.device_id}: >= {floor} {unit}")
            )
        elif params.get("on_violation", "refuse") == "clamp":
            setpoints.values = [
                None if v is None else max(v, floor) for v in setpoints.values
            ]
            decision.trace.append(
                _step(
                    clause,
                    "clamp",
                    f"{setpoints.device_id}: raised from {min(low)} to {floor} {unit}",
                )
            )
        else:
            decision.refuse(
                clause,
                f"{setpoints.device_id}: asked for {min(low)} {unit}, the minimum "
                f"is {floor} {unit}",
            )


def _in_window(
    event: DispatchEvent, index: int, zone: ZoneInfo, start: str, end: str
) -> bool:
    """Whether interval ``index`` of ``event`` overlaps the daily window (local)."""
    begin = event.start + timedelta(seconds=event.interval_s * index)
    finish = begin + timedelta(seconds=event.interval_s)
    w_from = time(int(start[:2]), int(start[3:]))
    w_to = time(int(end[:2]), int(end[3:]))
    local = begin.astimezone(zone)
    day = local.date() - timedelta(days=1)
    for _ in range(3):
        lo = datetime.combine(day, w_from, zone)
        hi = datetime.combine(
            day if w_to > w_from else day + timedelta(days=1), w_to, zone
        )
        if lo.astimezone(UTC) < finish and begin < hi.astimezone(UTC):
            return True
        day += timedelta(days=1)
    return False
