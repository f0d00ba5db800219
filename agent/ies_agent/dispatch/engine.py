"""The dispatch engine: one event's life from receipt to M&V, every step on record.

An event moves through a table of states; any move not listed is refused::

    received ──▶ rejected                      (format, signature, past, policy ...)
        └──────▶ accepted ──▶ active ──▶ ended     (end of the event: reverted)
                     │           ├─────▶ reverted  (opt-out, lost contact, superseded)
                     └───────────┴─────▶ reverted

Active events are persisted (``dispatch-state.json`` in the data directory) with what
each device showed before the event, so after an agent restart an event still running
is resumed and one that ended meanwhile is reverted: a device is never left limited.
The SunSpec write also sets the inverter's own revert timer for the same reason.

Acknowledgements (``received``, ``accepted``, ``rejected``, ``started``, ``ended``,
``opted_out``, ``failsafe``) go back on the channel the event came from, through the
:data:`AckSink` its source registered, and each is a ``dispatch_ack`` evidence event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from ies_agent.dispatch import mv
from ies_agent.dispatch.auth import DOMAIN_EVENT, verify_document
from ies_agent.dispatch.errors import (
    AuthenticationError,
    DeviceCommandError,
    DispatchError,
    EventFormatError,
    EventRejectedError,
    PolicyPackError,
)
from ies_agent.dispatch.executor import Actuator, quantize
from ies_agent.dispatch.model import DispatchEvent, format_utc, parse_event
from ies_agent.dispatch.planner import DispatchDevice, plan
from ies_agent.dispatch.policy import (
    Decision,
    DeviceSetpoints,
    PolicyPack,
    evaluate,
    select_pack,
)
from ies_agent.signing.manifest import TrustStore

log = logging.getLogger(__name__)

STATE_FILE = "dispatch-state.json"
OPT_OUT_DIR = "dispatch-optout"
"""Opt-out requests from ``ies-agent dispatch optout`` wait here for the engine."""
AckSink = Callable[[DispatchEvent, dict[str, Any]], Awaitable[bool]]
"""Sends one acknowledgement to the issuer; returns whether it was delivered."""

TRANSITIONS: dict[str, set[str]] = {
    "received": {"rejected", "accepted"},
    "accepted": {"active", "reverted", "ended"},
    "active": {"ended", "reverted"},
}


class EventRecorder(Protocol):
    """What the engine needs of the evidence log."""

    def append_event(
        self,
        ev: str,
        fields: Mapping[str, Any] | None = None,
        *,
        src: str | None = None,
    ) -> int:
        """Append one event; return its seq."""
        ...


@dataclass
class MvSettings:
    """Which meters M&V measures, and how; ``settle_s`` waits for boundary readings."""

    meters: tuple[str, ...] = ()
    quantity: str = "1-0:1.8.0*255"
    method: str = mv.DEFAULT_METHOD
    settle_s: float = 20.0


@dataclass
class _Active:
    event: DispatchEvent
    decision: Decision
    state: str = "accepted"
    prior: dict[str, dict[str, str]] = field(default_factory=dict)
    applied: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    stop_reason: str = ""

    def move(self, new: str) -> None:
        if new not in TRANSITIONS.get(self.state, set()):
            raise DispatchError(f"event {self.event.event_id}: {self.state} -> {new}")
        self.state = new


def utc_now() -> datetime:
    """Now, in UTC (the engine's default clock)."""
    return datetime.now(UTC)


class DispatchEngine:
    """Receives events, decides, acts, reverts, acknowledges and measures."""

    def __init__(
        self,
        *,
        evidence: EventRecorder,
        evidence_path: Path | None,
        data_dir: Path,
        trust: TrustStore | None,
        packs: Sequence[PolicyPack],
        devices: Sequence[DispatchDevice],
        actuators: Mapping[str, Actuator],
        tz: str = "Asia/Kolkata",
        contact_timeout_s: float | None = None,
        mv_settings: MvSettings | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.evidence = evidence
        self.evidence_path = evidence_path
        self.state_path = Path(data_dir) / STATE_FILE
        self.trust = trust
        self.packs = list(packs)
        self.devices = list(devices)
        self.actuators = dict(actuators)
        self.tz = tz
        self.contact_timeout_s = contact_timeout_s
        self.mv_settings = mv_settings or MvSettings()
        self.clock = clock
        self.active: dict[str, _Active] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        """M&V results by event id (also in the evidence log)."""
        self.finished: dict[str, str] = {}
        """Final state by event id: ``ended`` or ``reverted``."""
        self._sinks: dict[str, AckSink] = {}
        self._seen: dict[str, int] = {}
        self._days: dict[str, int] = {}
        self._contact: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._mv_tasks: set[asyncio.Task[None]] = set()
        self._load_state()

    # --- sources ----------------------------------------------------------------------

    def register_source(self, name: str, sink: AckSink | None) -> None:
        """Route acknowledgements of events from source ``name`` to ``sink``."""
        if sink is None:
            self._sinks.pop(name, None)
        else:
            self._sinks[name] = sink

    def issuer_seen(self, issuer: str) -> None:
        """Note that ``issuer`` was heard from just now (for the contact watchdog)."""
        self._contact[issuer] = time.monotonic()

    async def submit_signed(self, data: bytes, *, source: str) -> Decision | None:
        """Authenticate a signed dispatch message and handle its event.

        Returns the decision, or ``None`` when the message was refused before a
        decision (malformed, not authentic, replayed ...); the refusal is recorded.
        """
        if self.trust is None:
            self._refused_message(source, "auth", "no trust store: pin issuer keys")
            return None
        try:
            body, key = verify_document(
                data, "event", DOMAIN_EVENT, self.trust, source=source
            )
            event = parse_event(body, source=source, signed_by=key)
        except (EventFormatError, AuthenticationError) as exc:
            reason = "auth" if isinstance(exc, AuthenticationError) else "format"
            self._refused_message(source, reason, str(exc))
            return None
        return await self.submit(event)

    async def submit(self, event: DispatchEvent) -> Decision | None:
        """Handle an authenticated event: validate, decide, schedule; acknowledge."""
        async with self._lock:
            return await self._submit(event)

    async def _submit(self, event: DispatchEvent) -> Decision | None:
        self.issuer_seen(event.issuer)
        self.evidence.append_event("dispatch_received", event.summary())
        await self._ack(event, "received")
        now = self.clock()
        try:
            replaced = self._validate(event, now)
            raw = plan(event, self.devices)
            pack = select_pack(self.packs, now)
        except EventRejectedError as exc:
            await self._reject(event, exc.reason, str(exc))
            return None
        except PolicyPackError as exc:
            await self._reject(event, "policy", str(exc))
            return None
        raw = [
            DeviceSetpoints(
                s.device_id,
                s.kind,
                s.unit,
                [None if v is None else quantize(v, s.unit) for v in s.values],
            )
            for s in raw
        ]
        decision = evaluate(
            pack, event, raw, events_today=self._events_on(event.start), tz=self.tz
        )
        self.evidence.append_event(
            "dispatch_decision",
            {
                "event": event.event_id,
                "modification": event.modification,
                "accepted": decision.accepted,
                "pack": decision.pack,
                "clauses": decision.trace,
                "plan": {
                    p.device_id: {
                        "unit": p.unit,
                        "values": [None if v is None else str(v) for v in p.values],
                    }
                    for p in decision.plan
                },
                **({"reason": decision.reason} if decision.reason else {}),
            },
        )
        self._seen[self._key(event)] = event.modification
        if not decision.accepted:
            await self._ack(event, "rejected", decision.reason)
            self._save_state()
            return decision
        prior: dict[str, dict[str, str]] = {}
        if replaced is not None:
            prior = replaced.prior
            await self._stop(replaced, "superseded", revert=False)
            self.active.pop(replaced.event.event_id, None)
        day = self._day(event.start)
        self._days[day] = self._days.get(day, 0) + 1
        active = _Active(event, decision, prior=prior)
        self.active[event.event_id] = active
        self._save_state()
        await self._ack(event, "accepted")
        self._start(active)
        return decision

    def _validate(self, event: DispatchEvent, now: datetime) -> _Active | None:
        """Refuse past, expired, replayed and overlapping events; return the event
        this one replaces (a newer modification of an active event)."""
        key = self._key(event)
        if key in self._seen and event.modification <= self._seen[key]:
            raise EventRejectedError(
                "replayed",
                f"event {event.event_id} modification {event.modification} was "
                f"already handled (last {self._seen[key]})",
            )
        if event.end <= now:
            raise EventRejectedError(
                "past", f"event {event.event_id} ended at {format_utc(event.end)}"
            )
        if event.expires is not None and event.expires <= now:
            raise EventRejectedError(
                "expired",
                f"event {event.event_id} expired at {format_utc(event.expires)}",
            )
        replaced = None
        for other in self.active.values():
            if other.event.event_id == event.event_id:
                replaced = other
                continue
            if other.event.start < event.end and event.start < other.event.end:
                mine = {p.device_id for p in plan(event, self.devices)}
                theirs = {p.device_id for p in other.decision.plan}
                if mine & theirs:
                    raise EventRejectedError(
                        "overlapping",
                        f"event {event.event_id} overlaps active event "
                        f"{other.event.event_id} on {', '.join(sorted(mine & theirs))}",
                    )
        return replaced

    async def _reject(self, event: DispatchEvent, reason: str, detail: str) -> None:
        self.evidence.append_event(
            "dispatch_decision",
            {
                "event": event.event_id,
                "modification": event.modification,
                "accepted": False,
                "clauses": [],
                "reason": f"{reason}: {detail}"[:500],
            },
        )
        await self._ack(event, "rejected", f"{reason}: {detail}")

    def _refused_message(self, source: str, reason: str, detail: str) -> None:
        log.warning(
            "dispatch message refused",
            extra={"kv": {"source": source, "reason": reason, "error": detail}},
        )
        self.evidence.append_event(
            "dispatch_received",
            {"source": source, "accepted": False, "reason": reason,
             "error": detail[:500]},
        )  # fmt: skip

    # --- consumer control -------------------------------------------------------------

    async def opt_out(self, event_id: str, reason: str = "consumer") -> bool:
        """Opt the site out of ``event_id``: revert now, tell the issuer.

        Returns ``False`` when no such event is active or scheduled. Raises
        :class:`PolicyPackError` when the pack in effect does not allow opt-out.
        """
        async with self._lock:
            active = self.active.get(event_id)
            if active is None:
                return False
            pack = select_pack(self.packs, self.clock())
            if not pack.opt_out_allowed():
                raise PolicyPackError(
                    f"policy pack {pack.label} does not allow consumer opt-out"
                )
            self.evidence.append_event(
                "dispatch_opt_out", {"event": event_id, "reason": reason[:200]}
            )
            await self._stop(active, "opted_out")
            await self._ack(active.event, "opted_out", reason)
            return True

    # --- running ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover persisted events (resume or revert) and start the watchdog."""
        now = self.clock()
        for active in list(self.active.values()):
            if active.event.end <= now:
                self.evidence.append_event(
                    "dispatch_recovered",
                    {"event": active.event.event_id, "action": "revert"},
                )
                await self._revert_all(active, "ended_while_stopped")
                await self._finish(active, "reverted")
            else:
                self.evidence.append_event(
                    "dispatch_recovered",
                    {"event": active.event.event_id, "action": "resume"},
                )
                self.issuer_seen(active.event.issuer)
                self._start(active)
        self._watch = asyncio.create_task(self._watchdog(), name="dispatch:watchdog")

    async def close(self, *, revert: bool = True) -> None:
        """Stop every event task. With ``revert`` (a clean shutdown) devices are put
        back now; without it (simulating a crash) they stay for recovery."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for active in list(self.active.values()):
            if revert and active.state in ("ended", "reverted"):
                await self._revert_all(active, "agent_stopping")
            elif revert:
                await self._stop(active, "agent_stopping")
            elif active.task is not None:
                active.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await active.task
        for task in list(self._mv_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_finished(self, event_id: str, timeout_s: float) -> str:
        """Wait until ``event_id`` has ended or been reverted (tests, demo)."""
        deadline = time.monotonic() + timeout_s
        while event_id not in self.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"event {event_id} still {self._state_of(event_id)}")
            await asyncio.sleep(0.05)
        return self.finished[event_id]

    async def wait_mv(self, event_id: str, timeout_s: float) -> list[dict[str, Any]]:
        """Wait for the M&V results of ``event_id``."""
        deadline = time.monotonic() + timeout_s
        while event_id not in self.results:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no M&V result for {event_id} yet")
            await asyncio.sleep(0.05)
        return self.results[event_id]

    def _state_of(self, event_id: str) -> str:
        active = self.active.get(event_id)
        return active.state if active else "unknown"

    def _start(self, active: _Active) -> None:
        active.task = asyncio.create_task(
            self._run(active), name=f"dispatch:{active.event.event_id}"
        )

    async def _run(self, active: _Active) -> None:
        event = active.event
        setpoints = {p.device_id: p for p in active.decision.plan}
        while True:
            now = self.clock()
            index = event.interval_at(now)
            if now >= event.end:
                break
            if index is None:  # not started yet
                await asyncio.sleep(min(1.0, (event.start - now).total_seconds()))
                continue
            if active.state == "accepted":
                active.move("active")
                self._save_state()
                await self._ack(event, "started")
            for device_id, item in setpoints.items():
                await self._drive(active, device_id, item, index, now)
            boundary = event.start + timedelta(seconds=event.interval_s * (index + 1))
            await asyncio.sleep(max(0.01, (boundary - self.clock()).total_seconds()))
        async with self._lock:
            await self._revert_all(active, "event_end")
            await self._finish(active, "ended")
            await self._ack(event, "ended")

    async def _drive(
        self,
        active: _Active,
        device_id: str,
        item: DeviceSetpoints,
        index: int,
        now: datetime,
    ) -> None:
        """Apply interval ``index``'s setpoint when it differs from what is applied."""
        value = item.values[index]
        actuator = self.actuators.get(device_id)
        current = active.applied.get(device_id)
        wanted = None if value is None else str(value)
        if actuator is None or wanted == current:
            return
        event = active.event
        if value is None:
            await self._revert_device(active, device_id, "interval_without_target")
            return
        try:
            if device_id not in active.prior:
                active.prior[device_id] = await actuator.prior()
                self._save_state()
            command = await actuator.apply(value, until=event.end, now=now)
        except DeviceCommandError as exc:
            self.evidence.append_event(
                "dispatch_command",
                {"event": event.event_id, "device": device_id, "interval": index,
                 "value": str(value), "unit": item.unit, "ok": False,
                 "error": str(exc)[:300]},
            )  # fmt: skip
            await self._revert_device(active, device_id, "command_refused")
            active.applied[device_id] = str(value)  # do not retry every interval
            return
        self.evidence.append_event(
            "dispatch_command",
            {"event": event.event_id, "device": device_id, "interval": index,
             "value": str(value), "unit": item.unit, "ok": True, "command": command},
        )  # fmt: skip
        active.applied[device_id] = str(value)
        self._save_state()
        try:
            ok, observed = await actuator.readback(value)
        except DeviceCommandError as exc:
            ok, observed = False, {"error": str(exc)[:300]}
        self.evidence.append_event(
            "dispatch_readback",
            {"event": event.event_id, "device": device_id, "interval": index,
             "expected": str(value), "unit": item.unit, "ok": ok,
             "observed": observed},
        )  # fmt: skip
        if not ok:
            # The device did not take what was asked: never leave it half-set.
            await self._revert_device(active, device_id, "readback_mismatch")

    async def _revert_device(
        self, active: _Active, device_id: str, reason: str
    ) -> None:
        actuator = self.actuators.get(device_id)
        if actuator is None or device_id not in active.prior:
            active.applied.pop(device_id, None)
            return
        pack = self._pack_or_none()
        floor = pack.export_limit_pct(device_id) if pack is not None else None
        fields: dict[str, Any] = {
            "event": active.event.event_id,
            "device": device_id,
            "reason": reason,
            "prior": active.prior[device_id],
        }
        try:
            fields["restored"] = await actuator.restore(active.prior[device_id], floor)
            fields["ok"] = True
        except DeviceCommandError as exc:
            fields["ok"], fields["error"] = False, str(exc)[:300]
        self.evidence.append_event("dispatch_revert", fields)
        if fields["ok"]:
            active.prior.pop(device_id, None)
            active.applied.pop(device_id, None)
        self._save_state()

    async def _revert_all(self, active: _Active, reason: str) -> None:
        for device_id in list(active.prior):
            await self._revert_device(active, device_id, reason)

    async def _stop(self, active: _Active, reason: str, *, revert: bool = True) -> None:
        task = active.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if revert:
            await self._revert_all(active, reason)
            await self._finish(active, "reverted", mv_too=reason != "agent_stopping")

    async def _finish(
        self, active: _Active, final: str, *, mv_too: bool = True
    ) -> None:
        if active.state != final:
            active.move(final)
        event_id = active.event.event_id
        if active.prior:
            # A revert failed: keep the event persisted; close() and the next start
            # try again, so the device is not left limited.
            self.finished[event_id] = f"{final}_revert_failed"
            self._save_state()
            return
        self.active.pop(event_id, None)
        self.finished[event_id] = final
        self._save_state()
        if mv_too and self.mv_settings.meters and self.evidence_path is not None:
            task = asyncio.create_task(
                self._measure(active.event), name=f"mv:{event_id}"
            )
            self._mv_tasks.add(task)
            task.add_done_callback(self._mv_tasks.discard)

    async def _measure(self, event: DispatchEvent) -> None:
        """Wait for the readings at the last boundary, then record M&V per meter."""
        wait = (event.end - self.clock()).total_seconds() + self.mv_settings.settle_s
        await asyncio.sleep(max(0.0, wait))
        assert self.evidence_path is not None
        method = mv.parse_method(self.mv_settings.method)
        entries = list(mv.read_entries(self.evidence_path))
        results = []
        for meter in self.mv_settings.meters:
            result = mv.measure(
                entries,
                event_id=event.event_id,
                meter=meter,
                quantity=self.mv_settings.quantity,
                start=event.start,
                interval_s=event.interval_s,
                intervals=len(event.intervals),
                method=method,
            )
            self.evidence.append_event("mv_result", result)
            results.append(result)
        self.results[event.event_id] = results

    async def _take_opt_outs(self) -> None:
        """Act on opt-out requests left in the data directory by the CLI."""
        inbox = self.state_path.parent / OPT_OUT_DIR
        if not inbox.is_dir():
            return
        for path in sorted(inbox.glob("*.json")):
            try:
                request = json.loads(path.read_text(encoding="utf-8"))
                event_id = str(request["event"])
                reason = str(request.get("reason", "consumer"))
            except (OSError, ValueError, KeyError, TypeError):
                event_id, reason = "", ""
            path.unlink(missing_ok=True)
            if event_id:
                try:
                    await self.opt_out(event_id, reason)
                except PolicyPackError as exc:
                    log.warning("opt-out refused", extra={"kv": {"error": str(exc)}})

    async def _watchdog(self) -> None:
        """Take opt-out requests; revert the events of issuers not heard from for
        ``contact_timeout_s``."""
        while True:
            timeout = self.contact_timeout_s
            await asyncio.sleep(min(1.0, timeout / 4) if timeout else 0.5)
            await self._take_opt_outs()
            if timeout is None:
                continue
            now = time.monotonic()
            for active in list(self.active.values()):
                heard = self._contact.get(active.event.issuer, now)
                if now - heard > timeout and active.state == "active":
                    async with self._lock:
                        self.evidence.append_event(
                            "dispatch_contact_lost",
                            {"event": active.event.event_id,
                             "issuer": active.event.issuer,
                             "silent_s": str(int(now - heard))},
                        )  # fmt: skip
                        await self._stop(active, "contact_lost")
                        await self._ack(active.event, "failsafe", "contact lost")

    # --- acknowledgements -------------------------------------------------------------

    async def _ack(self, event: DispatchEvent, status: str, reason: str = "") -> None:
        fields: dict[str, Any] = {
            "event": event.event_id,
            "modification": event.modification,
            "status": status,
            "channel": event.source,
        }
        if reason:
            fields["reason"] = reason[:300]
        sink = self._sinks.get(event.source)
        delivered = False
        if sink is not None:
            try:
                delivered = await sink(event, dict(fields))
            except Exception as exc:  # a source's failure must not stop dispatch
                log.warning(
                    "acknowledgement not delivered",
                    extra={"kv": {"event": event.event_id, "error": str(exc)}},
                )
        fields["delivered"] = delivered
        self.evidence.append_event("dispatch_ack", fields)

    # --- persistence ------------------------------------------------------------------

    def _pack_or_none(self) -> PolicyPack | None:
        try:
            return select_pack(self.packs, self.clock())
        except PolicyPackError:
            return None

    def _key(self, event: DispatchEvent) -> str:
        return f"{event.issuer}/{event.event_id}"

    def _day(self, when: datetime) -> str:
        return when.astimezone(ZoneInfo(self.tz)).date().isoformat()

    def _events_on(self, when: datetime) -> int:
        return self._days.get(self._day(when), 0)

    def _save_state(self) -> None:
        """Write the active events atomically (temporary file, fsync, rename)."""
        data = {
            "version": 1,
            "seen": self._seen,
            "days": self._days,
            "active": {
                event_id: {
                    "event": a.event.to_document(),
                    "source": a.event.source,
                    "signed_by": a.event.signed_by,
                    "state": a.state,
                    "pack": a.decision.pack,
                    "plan": [
                        {
                            "device": p.device_id,
                            "kind": p.kind,
                            "unit": p.unit,
                            "values": [None if v is None else str(v) for v in p.values],
                        }
                        for p in a.decision.plan
                    ],
                    "prior": a.prior,
                    "applied": a.applied,
                }
                for event_id, a in self.active.items()
            },
        }
        tmp = self.state_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise DispatchError(
                f"{self.state_path}: unreadable dispatch state ({exc}); devices may "
                "still be limited: check them, then remove the file"
            ) from None
        self._seen = {str(k): int(v) for k, v in data.get("seen", {}).items()}
        self._days = {str(k): int(v) for k, v in data.get("days", {}).items()}
        for event_id, item in data.get("active", {}).items():
            event = parse_event(
                item["event"], source=item["source"], signed_by=item["signed_by"]
            )
            decision = Decision(
                accepted=True,
                pack=item["pack"],
                plan=[
                    DeviceSetpoints(
                        p["device"],
                        p["kind"],
                        p["unit"],
                        [None if v is None else Decimal(v) for v in p["values"]],
                    )
                    for p in item["plan"]
                ],
            )
            state = "active"  # resumed or reverted by start(), whatever it was
            self.active[event_id] = _Active(
                event,
                decision,
                state=state,
                prior=item["prior"],
                applied={},  # re-apply on resume: the device may have reverted itself
            )


def request_opt_out(data_dir: Path, event_id: str, reason: str = "consumer") -> Path:
    """Ask the running agent to opt out of ``event_id`` (CLI, local web page).

    Writes a request into the data directory, which the engine takes within a second;
    returns the request's path. Raises ``OSError`` when it cannot be written.
    """
    inbox = Path(data_dir) / OPT_OUT_DIR
    inbox.mkdir(mode=0o750, parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in event_id)[:100]
    path = inbox / f"{int(time.time() * 1000)}-{safe}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"event": event_id, "reason": reason}), encoding="utf-8")
    os.replace(tmp, path)
    return path


def mqtt_command_handler(
    engine: DispatchEngine,
) -> Callable[[str, bytes], Awaitable[None]]:
    """A handler for the MQTT command registry (``{prefix}/{gw}/cmd/dispatch``):
    register it with ``CommandRegistry.register("dispatch", handler)``. Each payload
    is a signed dispatch message (:mod:`ies_agent.dispatch.auth`)."""

    async def handle(name: str, payload: bytes) -> None:
        await engine.submit_signed(payload, source="mqtt")

    return handle
