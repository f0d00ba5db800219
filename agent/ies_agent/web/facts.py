"""The facts an installer needs, gathered from a running agent in one JSON-ready dict.

:class:`SiteFacts` reads the agent state, the evidence log and the Modbus bus owners
when asked (nothing is copied on the hot path) and keeps, per device, a bounded ring
of recent power and energy samples for the page's charts. The web page, the status
file and the metrics all read from it, so they never disagree.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ies_agent.evidence.log import EvidenceLog
    from ies_agent.state import AgentState, DeviceState
    from ies_drivers.modbus.bus import ModbusBus

HISTORY_POINTS = 720
"""Samples kept per device: 6 hours at the default 30 s step, then the oldest go."""

# Total active power and imported energy under the names our templates use: Modbus
# maps, SunSpec (``103.W``, ``103.WH``) and DLMS profiles (``active_power``).
_POWER_NAMES = ("power_active_total", "active_power", "power_active", "103.W", "101.W")
_ENERGY_NAMES = ("energy_active_import", "energy_import", "103.WH", "101.WH")
_SCALE = {"W": 1, "kW": 1000, "MW": 1_000_000, "Wh": 1, "kWh": 1000, "MWh": 1_000_000}


class SiteFacts:
    """A read-only view of a running site, plus a short history per device.

    ``buses`` are the Modbus bus owners by bus id; ``history_step_s`` is the time
    between chart samples in seconds.
    """

    def __init__(
        self,
        state: AgentState,
        evidence: EvidenceLog,
        buses: Mapping[str, ModbusBus],
        *,
        data_dir: Path,
        interval_s: int,
        history_step_s: float = 30.0,
    ) -> None:
        self.state = state
        self.evidence = evidence
        self.buses = dict(buses)
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.history_step_s = history_step_s
        self.started_ms = _now_ms()
        self.history: dict[str, deque[tuple[int, float | None, float | None]]] = {}
        self.last_checkpoint_ms: int | None = None
        self.last_checkpoint_size: int | None = None
        evidence.add_listener(self._on_evidence)

    def close(self) -> None:
        """Stop listening to the evidence log."""
        self.evidence.remove_listener(self._on_evidence)

    def _on_evidence(self, kind: str, n: int) -> None:
        # Runs inside the log's append: only take note.
        if kind == "checkpoint":
            self.last_checkpoint_ms = _now_ms()
            self.last_checkpoint_size = n

    # -- history -----------------------------------------------------------------------

    def sample(self) -> None:
        """Add one power / cumulative-energy sample per device to its history ring.

        Power is in W and energy in Wh (kW and kWh are scaled); a device without
        such quantities gets ``None`` values, drawn as gaps.
        """
        now = _now_ms()
        for device_id, ds in self.state.devices.items():
            ring = self.history.setdefault(device_id, deque(maxlen=HISTORY_POINTS))
            power = _pick(ds, _POWER_NAMES, ".W")
            energy = _pick(ds, _ENERGY_NAMES, ".WH")
            ring.append((now, power, energy))

    # -- views -------------------------------------------------------------------------

    def evidence_facts(self) -> dict[str, Any]:
        """Log size, last checkpoint and its age, key fingerprint, data directory."""
        log_path = self.data_dir / "evidence.jsonl"
        try:
            size_bytes: int | None = log_path.stat().st_size
        except OSError:
            size_bytes = None
        age = (
            None
            if self.last_checkpoint_ms is None
            else (_now_ms() - self.last_checkpoint_ms) / 1000
        )
        facts = {
            "entries": self.evidence.size,
            "bytes": size_bytes,
            "last_checkpoint_size": self.last_checkpoint_size,
            "last_checkpoint_ms": self.last_checkpoint_ms,
            "checkpoint_age_s": age,
            "has_checkpoint": self.evidence.last_checkpoint is not None,
            "key_fingerprint": self.evidence.key_fingerprint,
            "data_dir": str(self.data_dir),
            "interval_s": self.interval_s,
        }
        self.state.evidence.update(facts)
        return facts

    def bus_facts(self) -> list[dict[str, Any]]:
        """Link state and per-unit counters of every Modbus bus."""
        out: list[dict[str, Any]] = []
        for bus_id, bus in self.buses.items():
            status = bus.status
            units = [
                {
                    "unit": s.unit,
                    "requests": s.requests,
                    "answers": s.answers,
                    "errors": dict(s.errors),
                    "latency_s": s.last_latency_s,
                    "backoff_s": s.backoff_remaining_s,
                    "last_error": s.last_error,
                }
                for s in bus.stats.values()
            ]
            out.append(
                {
                    "id": bus_id,
                    "endpoint": status.endpoint,
                    "connected": status.connected,
                    "down_for_s": status.down_for_s,
                    "last_error": status.last_error,
                    "queue_depth": status.queue_depth,
                    "reconnects": status.reconnects,
                    "units": units,
                }
            )
        return out

    def device_facts(self) -> list[dict[str, Any]]:
        """Every device with its values, state, last read, errors and latency."""
        return [ds.as_dict() for ds in self.state.devices.values()]

    def upstream_facts(self) -> list[dict[str, Any]]:
        """Every upstream: connected, backlog, last error."""
        return [u.as_dict() for u in self.state.upstreams.values()]

    def charger_facts(self) -> list[dict[str, Any]]:
        """Every OCPP charger the central system knows."""
        return [c.as_dict() for c in self.state.chargers.values()]

    def dispatch_facts(self) -> dict[str, Any]:
        """Current and recent dispatch events (none when dispatch is not set up)."""
        events = self.state.dispatch_events
        if events is None:
            return {
                "available": False,
                "events": [],
                "note": "dispatch is not configured on this site ([dispatch] in the "
                "site file)",
            }
        return {"available": True, "events": list(events)}

    def history_facts(self) -> dict[str, Any]:
        """The chart rings: per device a list of ``[t_ms, power_w, energy_wh]``."""
        return {
            "step_s": self.history_step_s,
            "interval_s": self.interval_s,
            "devices": {k: [list(p) for p in v] for k, v in self.history.items()},
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything at once, as written to the status file (no history)."""
        return {
            "gateway": self.state.gateway_id,
            "pid": os.getpid(),
            "written_ms": _now_ms(),
            "started_ms": self.started_ms,
            "devices": self.device_facts(),
            "buses": self.bus_facts(),
            "evidence": self.evidence_facts(),
            "upstreams": self.upstream_facts(),
            "chargers": self.charger_facts(),
            "storage": dict(self.state.storage),
            "dispatch": self.dispatch_facts(),
        }


def _pick(ds: DeviceState, names: tuple[str, ...], suffix: str) -> float | None:
    """Return the first of ``names`` (or else a SunSpec point ending in ``suffix``)
    that has a value, scaled to W or Wh."""
    candidates = [n for n in names if n in ds.values]
    candidates += [n for n in ds.values if n.endswith(suffix) and n not in names]
    for name in candidates:
        reading = ds.values[name]
        if reading.value is None or reading.unit not in _SCALE:
            continue
        try:
            return float(Decimal(reading.value) * _SCALE[reading.unit])
        except (InvalidOperation, ValueError):
            continue
    return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
