"""The dispatch path end to end against the SunSpec simulator on a real Modbus server.

Signed event -> authentication -> policy pack -> plan -> SunSpec write with read-back
-> revert at the end -> acknowledgements -> evidence that verifies. The simulator's
own state (``limit_pct``) and its registers, read over Modbus, show what the device
really took. Faults: bad signature, unpinned key, past, replayed, overlapping and
beyond-policy events, a write refused, a write not applied, an agent restart
mid-event, an issuer gone silent, a consumer opt-out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymodbus.constants import ExcCodes

from dispatch_fixtures import (
    Issuer,
    event_body,
    events,
    issuer_keys,
    live_inverter,
    signed_event,
    signed_pack,
    soon,
    until,
)
from ies_agent.demo.simulator import SunSpecInverter
from ies_agent.dispatch.auth import load_trust
from ies_agent.dispatch.engine import DispatchEngine
from ies_agent.dispatch.executor import SunSpecLimit
from ies_agent.dispatch.planner import KIND_INVERTER, DispatchDevice
from ies_agent.dispatch.policy import load_pack
from ies_agent.evidence.log import EvidenceLog
from ies_agent.evidence.verify import verify_path
from ies_drivers.modbus.bus import ModbusBus


@dataclass
class Site:
    engine: DispatchEngine
    inverter: SunSpecInverter
    bus: ModbusBus
    evidence: EvidenceLog
    data_dir: Path
    issuer: Issuer
    acks: list[dict[str, Any]]


def make_engine(
    data_dir: Path, issuer: Issuer, bus: ModbusBus, evidence: EvidenceLog, **kw: Any
) -> DispatchEngine:
    trust = load_trust([issuer.trust_dir])
    pack = load_pack(signed_pack(data_dir / "pack.json", issuer.key), trust)
    return DispatchEngine(
        evidence=evidence,
        evidence_path=data_dir / "evidence.jsonl",
        data_dir=data_dir,
        trust=trust,
        packs=[pack],
        devices=[DispatchDevice("inverter", KIND_INVERTER)],
        actuators={"inverter": SunSpecLimit("inverter", bus, 1)},
        **kw,
    )


@asynccontextmanager
async def site(
    tmp_path: Path, inverter: SunSpecInverter | None = None, **kw: Any
) -> AsyncIterator[Site]:
    data_dir = tmp_path / "data"
    issuer = issuer_keys(tmp_path / "trust")
    async with live_inverter(inverter) as (device, bus):
        evidence = EvidenceLog.open(data_dir, gateway_id="gw-dispatch", interval_s=5)
        engine = make_engine(data_dir, issuer, bus, evidence, **kw)
        acks: list[dict[str, Any]] = []

        async def sink(event: Any, ack: dict[str, Any]) -> bool:
            acks.append(ack)
            return True

        engine.register_source("mqtt", sink)
        await engine.start()
        try:
            yield Site(engine, device, bus, evidence, data_dir, issuer, acks)
        finally:
            await engine.close()
            evidence.close()


async def registers_pct(bus: ModbusBus) -> tuple[int, int]:
    """Read model 123's WMaxLimPct and WMaxLim_Ena over Modbus (after SunS, 1, 103,
    120: the simulator's fixed layout is found by discovery in the actuator; here the
    actuator's own read is reused)."""
    state = await SunSpecLimit("probe", bus, 1).prior()
    return int(state["pct"]), int(state["enabled"])


async def test_signed_event_limits_the_inverter_and_lifts_it_at_the_end(
    tmp_path: Path,
) -> None:
    async with site(tmp_path) as s:
        start = soon(0.4)
        body = event_body("evt-1", start, [{"limit_pct": "50"}, {"limit_pct": "40"}])
        decision = await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        assert decision is not None and decision.accepted
        assert s.inverter.limit_pct is None  # not before the window
        await until(lambda: not (datetime.now(UTC) < start + timedelta(seconds=0.5)))
        assert s.inverter.limit_pct == 50
        assert await registers_pct(s.bus) == (50, 1)
        await until(lambda: not (datetime.now(UTC) < start + timedelta(seconds=1.6)))
        assert s.inverter.limit_pct == 40
        assert await s.engine.wait_finished("evt-1", 5) == "ended"
        # Lifted to the installer's own limit (INST-EXPORT, 80 %), never beyond it.
        assert s.inverter.limit_pct == 80
        assert await registers_pct(s.bus) == (80, 1)
        assert [a["status"] for a in s.acks] == [
            "received", "accepted", "started", "ended",
        ]  # fmt: skip
    assert verify_path(s.data_dir).ok
    decision_ev = events(s.data_dir, "dispatch_decision")[0]
    assert decision_ev["accepted"] is True
    assert {c["clause"] for c in decision_ev["clauses"]} >= {"INST-EXPORT", "PV-MIN"}
    readbacks = events(s.data_dir, "dispatch_readback")
    assert [(r["expected"], r["observed"]["pct"], r["ok"]) for r in readbacks] == [
        ("50", "50", True),
        ("40", "40", True),
    ]
    commands = events(s.data_dir, "dispatch_command")
    assert "RvrtTms" in commands[0]["command"]  # the inverter's own fail-safe timer
    revert = events(s.data_dir, "dispatch_revert")[0]
    assert revert["reason"] == "event_end"
    assert revert["restored"]["pct"] == "80" and revert["restored"]["enabled"] == "1"


async def test_installer_limit_is_never_weakened(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        body = event_body("evt-weak", soon(0.2), [{"limit_pct": "95"}])
        decision = await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        assert decision is not None and decision.accepted
        assert decision.plan[0].values == [80]
        step = next(c for c in decision.trace if c["clause"] == "INST-EXPORT")
        assert step["result"] == "clamp"
        await s.engine.wait_finished("evt-weak", 5)
        assert s.inverter.limit_pct == 80


async def test_an_event_beyond_the_pack_is_refused_with_the_clause(
    tmp_path: Path,
) -> None:
    async with site(tmp_path) as s:
        body = event_body("evt-deep", soon(0.2), [{"limit_pct": "10"}])
        decision = await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        assert decision is not None and not decision.accepted
        assert decision.refused_by == "PV-MIN"
        assert "PV-MIN" in decision.reason
        await asyncio.sleep(0.5)
        assert s.inverter.limit_pct is None
        assert s.acks[-1]["status"] == "rejected" and "PV-MIN" in s.acks[-1]["reason"]
    refused = events(s.data_dir, "dispatch_decision")[0]
    assert refused["accepted"] is False
    assert any(c["result"] == "refuse" for c in refused["clauses"])


async def test_bad_signatures_and_unpinned_keys_are_refused(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        body = event_body("evt-x", soon(5), [{"limit_pct": "50"}])
        stranger = Ed25519PrivateKey.generate()
        assert (
            await s.engine.submit_signed(signed_event(body, stranger), source="mqtt")
            is None
        )
        signed = signed_event(body, s.issuer.key).replace(b'"50"', b'"30"')
        assert await s.engine.submit_signed(signed, source="mqtt") is None
        assert await s.engine.submit_signed(b"{not json", source="mqtt") is None
    received = events(s.data_dir, "dispatch_received")
    assert [r["reason"] for r in received] == ["auth", "auth", "format"]
    assert "none of them pinned" in received[0]["error"]
    assert "does not verify" in received[1]["error"]


async def test_past_replayed_and_overlapping_events_are_rejected(
    tmp_path: Path,
) -> None:
    async with site(tmp_path) as s:
        key = s.issuer.key
        past = event_body(
            "evt-old", datetime.now(UTC) - timedelta(hours=1), [{"limit_pct": "50"}]
        )
        assert (
            await s.engine.submit_signed(signed_event(past, key), source="mqtt") is None
        )
        first = event_body("evt-a", soon(3), [{"limit_pct": "50"}] * 3)
        assert await s.engine.submit_signed(signed_event(first, key), source="mqtt")
        again = await s.engine.submit_signed(signed_event(first, key), source="mqtt")
        assert again is None
        other = event_body("evt-b", soon(4), [{"limit_pct": "60"}])
        assert (
            await s.engine.submit_signed(signed_event(other, key), source="mqtt")
            is None
        )
    reasons = [
        a.get("reason", "").split(":")[0] for a in s.acks if a["status"] == "rejected"
    ]
    assert reasons == ["past", "replayed", "overlapping"]


class RefusingInverter(SunSpecInverter):
    """Answers every write with Modbus exception 3 (illegal data value)."""

    def take_write(self, address: int, values: list[int]) -> Any:
        return ExcCodes.ILLEGAL_VALUE


class DeafInverter(SunSpecInverter):
    """Confirms writes but does not apply them (read-back shows the old value)."""

    def take_write(self, address: int, values: list[int]) -> Any:
        return None


@pytest.mark.parametrize(
    ("device", "failing_event"),
    [(RefusingInverter(1), "dispatch_command"), (DeafInverter(1), "dispatch_readback")],
)
async def test_a_device_that_does_not_take_the_limit_is_reverted(
    tmp_path: Path, device: SunSpecInverter, failing_event: str
) -> None:
    async with site(tmp_path, inverter=device) as s:
        body = event_body("evt-f", soon(0.2), [{"limit_pct": "50"}])
        assert await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        final = await s.engine.wait_finished("evt-f", 5)
        assert final == ("ended_revert_failed" if failing_event == "dispatch_command"
                         else "ended")  # fmt: skip
    failed = events(s.data_dir, failing_event)
    assert failed and failed[0]["ok"] is False
    reverts = events(s.data_dir, "dispatch_revert")
    assert reverts[0]["reason"] in ("command_refused", "readback_mismatch")


async def test_after_a_crash_mid_event_the_event_is_resumed_then_lifted(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    issuer = issuer_keys(tmp_path / "trust")
    async with live_inverter() as (device, bus):
        evidence = EvidenceLog.open(data_dir, gateway_id="gw-dispatch", interval_s=5)
        engine = make_engine(data_dir, issuer, bus, evidence)
        await engine.start()
        start = soon(0.2)
        body = event_body("evt-crash", start, [{"limit_pct": "30"}] * 3)
        assert await engine.submit_signed(signed_event(body, issuer.key), source="mqtt")
        await until(lambda: device.limit_pct == 30)
        await engine.close(revert=False)  # the agent dies: nothing reverted
        evidence.close()
        device.take_write(device._image.address_of(123, "WMaxLim_Ena"), [0])
        assert device.limit_pct is None  # e.g. the inverter's own timer ran out

        evidence = EvidenceLog.open(data_dir, gateway_id="gw-dispatch", interval_s=5)
        engine = make_engine(data_dir, issuer, bus, evidence)
        await engine.start()
        await until(lambda: device.limit_pct == 30)  # resumed: applied again
        assert await engine.wait_finished("evt-crash", 5) == "ended"
        assert device.limit_pct == 80  # the installer's own limit
        await engine.close()
        evidence.close()
    recovered = events(data_dir, "dispatch_recovered")
    assert recovered == [recovered[0]] and recovered[0]["action"] == "resume"
    assert verify_path(data_dir).ok


async def test_after_a_crash_past_the_end_the_device_is_reverted(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    issuer = issuer_keys(tmp_path / "trust")
    async with live_inverter() as (device, bus):
        evidence = EvidenceLog.open(data_dir, gateway_id="gw-dispatch", interval_s=5)
        engine = make_engine(data_dir, issuer, bus, evidence)
        await engine.start()
        body = event_body("evt-gone", soon(0.1), [{"limit_pct": "30"}])
        assert await engine.submit_signed(signed_event(body, issuer.key), source="mqtt")
        await until(lambda: device.limit_pct == 30)
        await engine.close(revert=False)
        evidence.close()
        await asyncio.sleep(1.2)  # the event ends while the agent is down
        assert device.limit_pct == 30

        evidence = EvidenceLog.open(data_dir, gateway_id="gw-dispatch", interval_s=5)
        engine = make_engine(data_dir, issuer, bus, evidence)
        await engine.start()
        assert device.limit_pct == 80  # back to the installer's own limit
        assert engine.finished["evt-gone"] == "reverted"
        await engine.close()
        evidence.close()
    assert events(data_dir, "dispatch_revert")[-1]["reason"] == "ended_while_stopped"


async def test_an_issuer_gone_silent_makes_the_site_fail_safe(tmp_path: Path) -> None:
    async with site(tmp_path, contact_timeout_s=0.6) as s:
        body = event_body("evt-quiet", soon(0.1), [{"limit_pct": "50"}] * 10)
        assert await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        await until(lambda: s.inverter.limit_pct == 50)
        assert await s.engine.wait_finished("evt-quiet", 5) == "reverted"
        assert s.inverter.limit_pct == 80
        assert s.acks[-1]["status"] == "failsafe"
    assert events(s.data_dir, "dispatch_contact_lost")
    assert events(s.data_dir, "dispatch_revert")[0]["reason"] == "contact_lost"


async def test_the_consumer_opts_out(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        body = event_body("evt-opt", soon(0.1), [{"limit_pct": "50"}] * 10)
        assert await s.engine.submit_signed(
            signed_event(body, s.issuer.key), source="mqtt"
        )
        await until(lambda: s.inverter.limit_pct == 50)
        assert await s.engine.opt_out("evt-opt", "too hot today")
        assert s.inverter.limit_pct == 80
        assert s.acks[-1] == {
            "event": "evt-opt", "modification": 0, "status": "opted_out",
            "channel": "mqtt", "reason": "too hot today",
        }  # fmt: skip
        assert not await s.engine.opt_out("evt-none")
