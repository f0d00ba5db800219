"""Checks of what a CSMS received: every transaction message, in order, ids consistent.

Used by the bridge and fault tests on the record of the test CSMS
(``tests/peers/ocpp_csms.py``). A message the CSMS received twice (sent again after the
connection died before its answer) is allowed — duplicates are recognisable — but a
missing one, one out of order, or one under the wrong transaction id is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peers.ocpp_csms import Frame


@dataclass
class Sessions:
    """The sessions one charger's messages describe, as the CSMS saw them."""

    started: list[Any] = field(default_factory=list)
    ended: list[Any] = field(default_factory=list)
    meter_values: int = 0


def _answers(frames: list[Frame], charger: str) -> dict[str, dict[str, Any]]:
    return {
        f.frame[1]: f.frame[2]
        for f in frames
        if f.charger == charger and f.direction == "out" and f.frame[0] == 3
    }


def check_16(frames: list[Frame], charger: str) -> Sessions:
    """Check a 1.6 charger's StartTransaction / MeterValues / StopTransaction."""
    answers = _answers(frames, charger)
    sessions = Sessions()
    current: int | None = None
    last_start: dict[str, Any] | None = None
    last_energy = -1
    stopped: set[int] = set()
    for frame in frames:
        if frame.charger != charger or frame.direction != "in" or frame.frame[0] != 2:
            continue
        action, payload = frame.frame[2], frame.frame[3]
        if action == "StartTransaction":
            answer = answers.get(frame.frame[1])
            if payload == last_start and current is not None:
                # The same start again (its first answer was lost): new id, same start.
                sessions.started.pop()
            assert answer is not None or frame is frames[-1], (
                "a start was never answered"
            )
            current = answer["transactionId"] if answer else None
            last_start = payload
            sessions.started.append(current)
            assert payload["meterStart"] >= last_energy, "meter went back at a start"
            last_energy = payload["meterStart"]
        elif action == "MeterValues":
            assert current is not None, "meter values before any start"
            assert payload["transactionId"] == current, (
                f"meter values under {payload['transactionId']}, expected {current}"
            )
            value = int(payload["meterValue"][0]["sampledValue"][0]["value"])
            assert value >= last_energy, "meter values out of order"
            last_energy = value
            sessions.meter_values += 1
        elif action == "StopTransaction":
            assert payload["transactionId"] == current, (
                f"stop under {payload['transactionId']}, expected {current}"
            )
            assert payload["meterStop"] >= last_energy
            last_energy = payload["meterStop"]
            if current not in stopped:
                sessions.ended.append(current)
                stopped.add(current)
            last_start = None
    return sessions


def check_2x(frames: list[Frame], charger: str) -> Sessions:
    """Check a 2.x charger's TransactionEvents: seqNo order, Started…Ended."""
    sessions = Sessions()
    last_seq = 0
    open_tx: str | None = None
    for frame in frames:
        if frame.charger != charger or frame.direction != "in" or frame.frame[0] != 2:
            continue
        if frame.frame[2] != "TransactionEvent":
            continue
        payload = frame.frame[3]
        seq = payload["seqNo"]
        assert seq >= last_seq, f"seqNo {seq} after {last_seq}: out of order"
        if seq == last_seq:
            continue  # the same event sent again
        assert seq == last_seq + 1 or last_seq == 0, (
            f"seqNo {last_seq} → {seq}: missing"
        )
        last_seq = seq
        tx = payload["transactionInfo"]["transactionId"]
        kind = payload["eventType"]
        if kind == "Started":
            assert open_tx is None, "a start inside an open transaction"
            open_tx = tx
            sessions.started.append(tx)
        else:
            assert tx == open_tx, f"{kind} for {tx}, open is {open_tx}"
            if kind == "Ended":
                sessions.ended.append(tx)
                open_tx = None
            else:
                sessions.meter_values += 1
    return sessions
