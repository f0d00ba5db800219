"""Acceptance: a Beckn DemandFlexNeed on a 15-minute grid yields M&V on the same grid.

The log is pre-built in virtual time: a real :class:`EvidenceLog` on a clock the test
moves, holding the grid meter's cumulative register at every 15-minute boundary of the
event window on the 10 days before and on the event day. The need is signed the Beckn
way (:class:`BecknSigner`) and verified against a pinned key. The M&V result is
appended to the log, the log verifies, and the test recomputes baseline and actual
from the log entries on its own.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dispatch_fixtures import entries, iso
from ies_agent.clock import Timestamp
from ies_agent.dispatch import mv
from ies_agent.dispatch.auth import load_trust
from ies_agent.dispatch.beckn_flex import commitment, pinned_lookup, read_need
from ies_agent.dispatch.errors import AuthenticationError
from ies_agent.dispatch.planner import KIND_CHARGER, DispatchDevice, offered_kw, plan
from ies_agent.evidence.log import EvidenceLog
from ies_agent.evidence.verify import verify_path
from ies_drivers.reading import Reading, ReadingState

EVENT_START = datetime(2025, 6, 11, 4, 30, tzinfo=UTC)  # 10:00 in Asia/Kolkata
STEP = timedelta(minutes=15)
INTERVALS = 4


class VirtualClock:
    """Gateway time the test sets; monotonic time moves with it (no time steps)."""

    def __init__(self, start: datetime) -> None:
        self.t_ms = int(start.timestamp() * 1000)
        self.base = self.t_ms

    def now(self) -> Timestamp:
        return Timestamp(self.t_ms, "S", (self.t_ms - self.base + 1) * 1_000_000)


def usage_wh(day: int, interval: int) -> int:
    """Energy per interval: day 0 is the event day (curtailed), 1-10 the past."""
    if day == 0:
        return 300 + 10 * interval
    return 500 + 37 * ((day * 7 + interval * 3) % 11)


def build_log(data_dir: Path) -> EvidenceLog:
    clock = VirtualClock(EVENT_START - timedelta(days=10, minutes=30))
    log = EvidenceLog.open(data_dir, gateway_id="gw-mv", clock=clock, interval_s=900)
    register = Decimal("1000.000")
    for day in range(10, -1, -1):
        day_start = EVENT_START - timedelta(days=day)
        for i in range(INTERVALS + 1):
            when = day_start + STEP * i
            clock.t_ms = int(when.timestamp() * 1000)
            log.append_reading(
                Reading(
                    "grid-meter", "energy_active_import", "1-0:1.8.0*255",
                    format(register, "f"), "kWh", ReadingState.OK,
                    "test:virtual", t_ms=clock.t_ms, tq="S",
                    mono_ns=clock.now().mono_ns,
                )
            )  # fmt: skip
            if i < INTERVALS:
                register += Decimal(usage_wh(day, i)) / 1000
    clock.t_ms = int((EVENT_START + STEP * INTERVALS + STEP).timestamp() * 1000)
    return log


def beckn_need(key: Ed25519PrivateKey, now: int) -> tuple[dict[str, str], bytes]:
    from ies_agent.upstream.beckn import BecknSigner

    message = {
        "context": {"action": "confirm", "bap_id": "discom.example",
                    "transaction_id": "t-1", "message_id": "m-1"},
        "message": {"order": {"demandFlexNeed": {
            "id": "dfn-77",
            "intervalPeriod": {"start": iso(EVENT_START), "duration": "PT15M"},
            "payloadDescriptors": [
                {"payloadType": "REQUESTED_CAPACITY", "units": "KW"},
                {"payloadType": "PRICE", "currency": "INR"}],
            "intervals": [
                {"id": i, "payloads": [
                    {"type": "REQUESTED_CAPACITY", "values": ["1.5"]},
                    {"type": "PRICE", "values": ["6.00"]}]}
                for i in range(INTERVALS)],
            "targets": ["group:chargers"],
        }}},
    }  # fmt: skip
    body = json.dumps(message).encode()
    signer = BecknSigner("discom.example", "k1", key)
    return {"Authorization": signer.authorization(
        body, created=now - 5, expires=now + 300)}, body  # fmt: skip


def test_a_demand_flex_need_gets_a_commitment_and_mv_on_its_grid(
    tmp_path: Path,
) -> None:
    # A pinned Beckn key for discom.example|k1.
    key = Ed25519PrivateKey.generate()
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "discom.example.k1.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    lookup = pinned_lookup(load_trust([trust_dir]))
    now = int(EVENT_START.timestamp()) - 600
    headers, body = beckn_need(key, now)
    event, context = read_need(headers, body, lookup, now=now)
    assert (event.interval_s, len(event.intervals), event.issuer) == (
        900, 4, "discom.example",
    )  # fmt: skip
    assert event.price == Decimal("6.00") and event.currency == "INR"

    # The commitment: two 32 A chargers can each give 0.75 kW, on the same grid.
    chargers = [
        DispatchDevice("cp-1", KIND_CHARGER, groups=("chargers",)),
        DispatchDevice("cp-2", KIND_CHARGER, groups=("chargers",)),
    ]
    setpoints = plan(event, chargers)
    offered = [offered_kw(setpoints, chargers, i) for i in range(INTERVALS)]
    answer = commitment(event, context, offered, accepted=True, bpp_id="gw-mv")
    committed = answer["message"]["order"]["demandFlexCommitment"]
    assert committed["intervalPeriod"]["duration"] == "PT900S"
    assert [i["payloads"][0]["values"][0] for i in committed["intervals"]] == [
        "1.518"
    ] * 4  # limit 32 - 3.26 A rounded down to 28.7 A: 3.3 A x 230 V, twice

    # M&V on exactly the event's grid, recorded in the log.
    data_dir = tmp_path / "data"
    log = build_log(data_dir)
    result = mv.measure(
        list(mv.read_entries(data_dir / "evidence.jsonl")),
        event_id=event.event_id,
        meter="grid-meter",
        quantity="1-0:1.8.0*255",
        start=event.start,
        interval_s=event.interval_s,
        intervals=len(event.intervals),
        method=mv.parse_method("high-5-of-10"),
    )
    log.append_event("mv_result", result)
    log.close()
    assert verify_path(data_dir).ok
    recorded = next(e for e in entries(data_dir) if e.get("ev") == "mv_result")
    assert recorded["grid"] == {
        "start": "2025-06-11T04:30:00Z", "interval_s": 900, "intervals": 4,
    }  # fmt: skip
    assert recorded["interval_start"][1] == "2025-06-11T04:45:00Z"
    assert recorded["actual"] == ["0.300", "0.310", "0.320", "0.330"]

    # Recompute from the log alone: actual from the named seqs, baseline by hand.
    by_seq = {e["seq"]: e for e in entries(data_dir)}
    for (first, last), value in zip(
        recorded["actual_seqs"], recorded["actual"], strict=True
    ):
        diff = Decimal(by_seq[last]["val"]) - Decimal(by_seq[first]["val"])
        assert diff == Decimal(value)
    past = {d: [Decimal(usage_wh(d, i)) / 1000 for i in range(4)] for d in range(1, 11)}
    best = sorted(past, key=lambda d: (-sum(past[d]), d))[:5]
    expected = [sum(past[d][i] for d in best) / 5 for i in range(4)]
    assert [Decimal(b) for b in recorded["baseline"]] == expected
    assert recorded["baseline_days"] == [
        (EVENT_START - timedelta(days=d)).date().isoformat() for d in best
    ]
    assert recorded["method"] == "high-5-of-10/1"
    assert recorded["simulated_history"] is False


def test_a_need_signed_by_an_unpinned_key_is_refused(tmp_path: Path) -> None:
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    other = Ed25519PrivateKey.generate()
    (trust_dir / "discom.example.k1.pem").write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    now = int(EVENT_START.timestamp())
    headers, body = beckn_need(Ed25519PrivateKey.generate(), now)
    with pytest.raises(AuthenticationError, match="does not verify"):
        read_need(headers, body, pinned_lookup(load_trust([trust_dir])), now=now)
