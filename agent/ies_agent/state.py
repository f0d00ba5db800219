"""Live state of a running agent: last values, fault counters, bus health.

The scheduler writes it, the status command and the local web page read it. It holds
only the latest value per quantity, so its size is bounded by the site's configuration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ies_drivers.reading import Reading


@dataclass
class DeviceState:
    """What the agent knows about one device right now."""

    id: str
    kind: str = ""
    protocol: str = ""
    identity: dict[str, str] = field(default_factory=dict)
    values: dict[str, Reading] = field(default_factory=dict)
    reads: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    last_read_ms: int | None = None
    last_latency_s: float | None = None
    online: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view (values as exact decimal strings)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "protocol": self.protocol,
            "identity": dict(self.identity),
            "online": self.online,
            "reads": self.reads,
            "faults": dict(self.faults),
            "last_error": self.last_error,
            "last_read_ms": self.last_read_ms,
            "last_latency_s": self.last_latency_s,
            "values": {
                name: {
                    "value": r.value,
                    "unit": r.unit,
                    "obis": r.obis,
                    "state": r.state.value,
                    "t_ms": r.t_ms,
                }
                for name, r in self.values.items()
            },
        }


@dataclass
class UpstreamState:
    """Where one upstream stands: link, cursors, what is still to send, last error.

    ``acked`` is the last ``seq`` the upstream acknowledged (-1: none), ``confirmed``
    the last one a collector confirmed end to end (-1: none or not used).
    ``backlog_entries`` / ``backlog_bytes`` are what the log holds beyond the cursor.
    """

    name: str
    kind: str
    target: str = ""
    connected: bool = False
    acked: int = -1
    confirmed: int = -1
    checkpoints: int = 0
    backlog_entries: int = 0
    backlog_bytes: int = 0
    last_error: str | None = None
    last_ack_ms: int | None = None
    outage_since_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view."""
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "connected": self.connected,
            "acked": self.acked,
            "confirmed": self.confirmed,
            "checkpoints": self.checkpoints,
            "backlog_entries": self.backlog_entries,
            "backlog_bytes": self.backlog_bytes,
            "last_error": self.last_error,
            "last_ack_ms": self.last_ack_ms,
            "outage_since_ms": self.outage_since_ms,
        }


@dataclass
class ChargerStatus:
    """What the agent knows about one OCPP charger right now.

    ``connectors`` maps connector (1.6) or EVSE (2.x) numbers to their last status;
    ``journal_backlog`` counts messages still to deliver to the CSMS.
    """

    id: str
    version: str | None = None
    connected: bool = False
    identity: dict[str, str] = field(default_factory=dict)
    connectors: dict[str, str] = field(default_factory=dict)
    open_transactions: int = 0
    journal_backlog: int = 0
    csms_connected: bool | None = None
    last_seen_ms: int | None = None
    warnings: int = 0
    last_warning: str | None = None
    dispatch: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view."""
        return {
            "id": self.id,
            "version": self.version,
            "connected": self.connected,
            "identity": dict(self.identity),
            "connectors": dict(self.connectors),
            "open_transactions": self.open_transactions,
            "journal_backlog": self.journal_backlog,
            "csms_connected": self.csms_connected,
            "last_seen_ms": self.last_seen_ms,
            "warnings": self.warnings,
            "last_warning": self.last_warning,
            "dispatch": self.dispatch,
        }


@dataclass
class AgentState:
    """Everything the status page shows, keyed by device id and upstream name.

    ``storage`` holds the disk guard's view (free bytes, alarm) when it runs.
    """

    gateway_id: str
    devices: dict[str, DeviceState] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    upstreams: dict[str, UpstreamState] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    chargers: dict[str, ChargerStatus] = field(default_factory=dict)
    dispatch_events: Iterable[dict[str, Any]] | None = None
    """Current and recent dispatch events, newest first, when ``[dispatch]`` runs."""

    def charger(self, charger_id: str) -> ChargerStatus:
        """Return the status of charger ``charger_id``, creating it on first use."""
        if charger_id not in self.chargers:
            self.chargers[charger_id] = ChargerStatus(charger_id)
        return self.chargers[charger_id]

    def device(self, device_id: str) -> DeviceState:
        """Return the state of ``device_id``, creating it on first use."""
        if device_id not in self.devices:
            self.devices[device_id] = DeviceState(device_id)
        return self.devices[device_id]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view of the whole state."""
        return {
            "gateway": self.gateway_id,
            "devices": {k: v.as_dict() for k, v in self.devices.items()},
            "evidence": dict(self.evidence),
            "upstreams": {k: v.as_dict() for k, v in self.upstreams.items()},
            "storage": dict(self.storage),
            "chargers": {k: v.as_dict() for k, v in self.chargers.items()},
        }
