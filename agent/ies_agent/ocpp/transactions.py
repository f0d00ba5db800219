"""Transactions of one charger and the session receipts they end in.

A :class:`TransactionBook` keeps the open transactions of a charger in its persistent
state (so a receipt survives an agent restart mid-session) and turns the end of each
into the fields of a ``session_receipt`` evidence event: ids, connector, id tag,
start and stop as the charger stated them, meter start and stop, energy in Wh as an
exact decimal, duration in whole seconds, and flags for whatever did not add up.

Rules (field case FC-10):

- a StopTransaction naming no open transaction (``transactionId`` -1) is recorded as
  *unmatched*; it never closes another transaction;
- a stop time before the start time is flagged ``time_inverted`` and the duration is
  left out: no duration is ever negative;
- energy is ``meter stop - meter start``; a negative difference is flagged
  ``meter_decreased`` and left out.

One transaction per connector: a new start on a connector whose transaction never
ended closes the old one as ``superseded`` (its receipt says so), so the state stays
bounded by the number of connectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import (
    Context,
    Decimal,
    DecimalException,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
)
from typing import Any

from ies_agent.ocpp.journal import ChargerState
from ies_drivers.ocpp.versions import OcppVersion

RECEIPT_EVENT = "session_receipt"
UNMATCHED_EVENT = "session_stop_unmatched"
EVENT_UNMATCHED_EVENT = "transaction_event_unmatched"
_EXACT = Context(prec=60, traps=[InvalidOperation, Overflow, Inexact, Rounded])
"""Energy arithmetic: exact or ``energy_unknown``, never rounded, never raising."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """An evidence event a transaction step produced: ``ev`` and its fields."""

    ev: str
    fields: dict[str, Any]


class TransactionBook:
    """The open transactions of one charger, kept in its :class:`ChargerState`."""

    def __init__(self, charger_id: str, state: ChargerState) -> None:
        self.charger_id = charger_id
        self.state = state

    @property
    def open_count(self) -> int:
        """Transactions started and not yet ended."""
        return len(self.state.open_tx)

    def is_open(self, tx_id: str) -> bool:
        """Whether ``tx_id`` (as the charger knows it) is open."""
        return tx_id in self.state.open_tx

    def start(
        self,
        version: OcppVersion,
        tx_id: str,
        *,
        connector: int,
        id_tag: str | None,
        timestamp: str | None,
        meter_start_wh: str | None,
        local: bool = False,
    ) -> list[Outcome]:
        """Open ``tx_id``; return receipts of transactions it supersedes."""
        outcomes: list[Outcome] = []
        for other_id, other in list(self.state.open_tx.items()):
            if other.get("connector") == connector and other_id != tx_id:
                record = self.state.open_tx.pop(other_id)
                outcomes.append(
                    self._receipt(other_id, record, None, None, "superseded")
                )
        if tx_id in self.state.open_tx:
            return outcomes
        self.state.open_tx[tx_id] = {
            "version": version.value,
            "connector": connector,
            "id_tag": id_tag,
            "start": timestamp,
            "meter_start_wh": meter_start_wh,
            "meter_last_wh": meter_start_wh,
            "local": local,
            "signed": [],
        }
        return outcomes

    def note_energy(
        self, tx_id: str, energy_wh: str, signed: dict[str, str] | None = None
    ) -> None:
        """Record a register reading of ``tx_id`` (first one is the start if unset)."""
        record = self.state.open_tx.get(tx_id)
        if record is None:
            return
        if record.get("meter_start_wh") is None:
            record["meter_start_wh"] = energy_wh
        record["meter_last_wh"] = energy_wh
        if signed is not None and len(record["signed"]) < 8:
            record["signed"].append(signed)

    def note_signed(self, tx_id: str, signed: dict[str, str]) -> None:
        """Keep a charger-signed value of ``tx_id`` for its receipt (at most 8)."""
        record = self.state.open_tx.get(tx_id)
        if record is not None and len(record["signed"]) < 8:
            record["signed"].append(signed)

    def stop(
        self,
        tx_id: str,
        *,
        timestamp: str | None,
        meter_stop_wh: str | None,
        reason: str | None,
        csms_id: int | None = None,
    ) -> Outcome:
        """End ``tx_id``: a receipt, or an unmatched-stop record when it is not open."""
        record = self.state.open_tx.pop(tx_id, None)
        if record is not None:
            if meter_stop_wh is None:
                meter_stop_wh = record.get("meter_last_wh")
            outcome = self._receipt(tx_id, record, timestamp, meter_stop_wh, reason)
            if csms_id is not None:
                outcome.fields["csms_transaction_id"] = csms_id
            return outcome
        return self._unmatched(tx_id, timestamp, meter_stop_wh, reason)

    def unmatched_event(
        self,
        tx_id: str,
        *,
        event_type: Any,
        seq_no: Any,
        timestamp: str | None,
        flags: list[str],
    ) -> Outcome:
        """Record a 2.x TransactionEvent that fits no transaction (FC-10's kind).

        Nothing is opened or closed: ``flags`` say what was wrong (``seq_no_invalid``,
        ``unknown_transaction``), the open transaction it may have meant is named.
        """
        fields: dict[str, Any] = {
            "charger": self.charger_id,
            "transaction_id": tx_id,
            "event_type": event_type if isinstance(event_type, str) else None,
            "seq_no": seq_no
            if isinstance(seq_no, int)
            and not isinstance(seq_no, bool)
            and abs(seq_no) < 2**63
            else None,
            "timestamp": timestamp,
            "flags": list(flags),
        }
        if len(self.state.open_tx) == 1:
            other_id, other = next(iter(self.state.open_tx.items()))
            fields["candidate"] = {
                "transaction_id": other_id,
                "connector": other.get("connector"),
                "start": other.get("start"),
            }
        return Outcome(
            EVENT_UNMATCHED_EVENT, {k: v for k, v in fields.items() if v is not None}
        )

    # --- receipts ---------------------------------------------------------------------

    def _receipt(
        self,
        tx_id: str,
        record: dict[str, Any],
        stop: str | None,
        meter_stop_wh: str | None,
        reason: str | None,
    ) -> Outcome:
        flags: list[str] = []
        if reason == "superseded":
            flags.append("superseded")
        fields: dict[str, Any] = {
            "charger": self.charger_id,
            "version": record.get("version"),
            "connector": record.get("connector"),
            "transaction_id": tx_id,
            "id_tag": record.get("id_tag"),
            "start": record.get("start"),
            "stop": stop,
            "meter_start_wh": record.get("meter_start_wh"),
            "meter_stop_wh": meter_stop_wh,
            "reason": reason,
            "offline_start": bool(record.get("local")),
        }
        energy = _energy(record.get("meter_start_wh"), meter_stop_wh, flags)
        if energy is not None:
            fields["energy_wh"] = energy
        duration = _duration(record.get("start"), stop, flags)
        if duration is not None:
            fields["duration_s"] = duration
        if record.get("signed"):
            fields["signed"] = list(record["signed"])
        fields["flags"] = flags
        return Outcome(
            RECEIPT_EVENT, {k: v for k, v in fields.items() if v is not None}
        )

    def _unmatched(
        self,
        tx_id: str,
        stop: str | None,
        meter_stop_wh: str | None,
        reason: str | None,
    ) -> Outcome:
        flags = ["unmatched"]
        fields: dict[str, Any] = {
            "charger": self.charger_id,
            "transaction_id": tx_id,
            "stop": stop,
            "meter_stop_wh": meter_stop_wh,
            "reason": reason,
        }
        # The open transaction it most likely meant, named but never closed.
        if len(self.state.open_tx) == 1:
            other_id, other = next(iter(self.state.open_tx.items()))
            fields["candidate"] = {
                "transaction_id": other_id,
                "connector": other.get("connector"),
                "start": other.get("start"),
                "meter_start_wh": other.get("meter_start_wh"),
            }
            energy = _energy(other.get("meter_start_wh"), meter_stop_wh, flags)
            if energy is not None:
                fields["energy_wh"] = energy
            duration = _duration(other.get("start"), stop, flags)
            if duration is not None:
                fields["duration_s"] = duration
        fields["flags"] = flags
        return Outcome(
            UNMATCHED_EVENT, {k: v for k, v in fields.items() if v is not None}
        )


def _energy(start: str | None, stop: str | None, flags: list[str]) -> str | None:
    """``stop - start`` in Wh as an exact decimal string, or ``None``."""
    if start is None or stop is None:
        flags.append("energy_unknown")
        return None
    try:
        energy = _EXACT.subtract(Decimal(stop), Decimal(start))
    except DecimalException:
        flags.append("energy_unknown")
        return None
    if energy < 0:
        flags.append("meter_decreased")
        return None
    text = format(energy, "f")
    return "0" if text == "-0" else text


def _duration(start: str | None, stop: str | None, flags: list[str]) -> int | None:
    """Whole seconds from ``start`` to ``stop``; ``None`` when unknown or inverted."""
    begin, end = parse_time(start), parse_time(stop)
    if begin is None or end is None:
        if start is not None or stop is not None:
            flags.append("time_unknown")
        return None
    seconds = (end - begin).total_seconds()
    if seconds < 0:
        flags.append("time_inverted")
        return None
    return int(seconds)


def parse_time(text: str | None) -> datetime | None:
    """Parse an OCPP timestamp (RFC 3339, ``Z`` or offset); ``None`` if unusable.

    A time without an offset is read as UTC, as chargers that omit it mean.
    """
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment
