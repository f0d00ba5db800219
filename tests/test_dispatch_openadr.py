"""Acceptance: an OpenADR VTN event curtails the simulated SunSpec inverter.

The VTN is openleadr's own server (a real peer on loopback, plain HTTP without XML
signatures: TLS and signing are openleadr's and are not what is under test here); the
VEN is the agent's (:class:`ies_agent.dispatch.openadr.OpenAdrVen`); the inverter is
the SunSpec simulator on a real Modbus TCP server. The limit must hold within the
event window and be lifted at its end; the evidence log must verify and hold the
decision trace and the read-back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import free_port
from dispatch_fixtures import events, issuer_keys, live_inverter, signed_pack
from ies_agent.dispatch.auth import load_trust
from ies_agent.dispatch.engine import DispatchEngine
from ies_agent.dispatch.executor import SunSpecLimit
from ies_agent.dispatch.openadr import OpenAdrVen
from ies_agent.dispatch.planner import KIND_INVERTER, DispatchDevice
from ies_agent.dispatch.policy import load_pack
from ies_agent.evidence.log import EvidenceLog
from ies_agent.evidence.verify import verify_path
from peers.openadr_vtn import Vtn

NO_INSTALLER_LIMIT = [
    {"id": "PV-MIN", "kind": "device_minimum", "devices": ["inverter"],
     "min_pct": "10", "on_violation": "refuse"},
    {"id": "LEN", "kind": "max_event_length", "max_s": 3600},
]  # fmt: skip


async def test_an_openadr_event_curtails_the_inverter_within_its_window(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    issuer = issuer_keys(tmp_path / "trust", "policy-signer")
    trust = load_trust([issuer.trust_dir])
    pack = load_pack(
        signed_pack(tmp_path / "pack.json", issuer.key, clauses=NO_INSTALLER_LIMIT),
        trust,
    )
    vtn = Vtn(free_port())
    await vtn.start()
    async with live_inverter() as (device, bus):
        evidence = EvidenceLog.open(data_dir, gateway_id="gw-adr", interval_s=5)
        engine = DispatchEngine(
            evidence=evidence,
            evidence_path=data_dir / "evidence.jsonl",
            data_dir=data_dir,
            trust=trust,
            packs=[pack],
            devices=[DispatchDevice("inverter", KIND_INVERTER)],
            actuators={"inverter": SunSpecLimit("inverter", bus, 1)},
        )
        await engine.start()
        ven = OpenAdrVen(
            engine,
            vtn_url=vtn.url,
            ven_name="gw-adr",
            issuer="vtn-test",
            targets=("inverter",),
        )
        start = datetime.now(UTC) + timedelta(seconds=2)
        vtn.add_capacity_event(
            "ven-gw-adr", "adr-1", start, [0.4, 0.4], timedelta(seconds=1)
        )
        await ven.start()
        try:
            seen: list[tuple[float, int | None]] = []
            end = start + timedelta(seconds=2)
            while datetime.now(UTC) < end + timedelta(seconds=1.0):
                offset = (datetime.now(UTC) - start).total_seconds()
                seen.append((offset, device.limit_pct))
                await asyncio.sleep(0.05)
            assert await engine.wait_finished("adr-1", 5) == "ended"
        finally:
            await ven.stop()
            await vtn.stop()
            await engine.close()
            evidence.close()
    # Limited only inside the window (with 0.3 s of slack for polling and the bus).
    before = [p for t, p in seen if t < -0.05]
    inside = [p for t, p in seen if 0.3 < t < 1.9]
    after = [p for t, p in seen if t > 2.4]
    assert before and set(before) == {None}
    assert inside and set(inside) == {40}
    assert after and set(after) == {None}
    assert vtn.answers.get("adr-1") == "optIn"
    assert verify_path(data_dir).ok
    decision = events(data_dir, "dispatch_decision")[0]
    assert decision["accepted"] and decision["clauses"][0]["clause"] == "PV-MIN"
    readback = events(data_dir, "dispatch_readback")[0]
    assert readback["ok"] and readback["observed"]["pct"] == "40"
    assert events(data_dir, "dispatch_revert")[0]["reason"] == "event_end"
