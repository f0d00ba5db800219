"""Dispatch to OCPP chargers: the agent's central system and simulated chargers.

The chargers are the ``ocpp`` package's charge points (the demo's simulator), so the
profile they received is what a real station would have been sent. Also: a charger
that refuses the profile (a charge point of the ``ocpp`` package answering
``Rejected``) is left without a limit and the refusal is on record.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16

from dispatch_fixtures import (
    event_body,
    events,
    issuer_keys,
    signed_event,
    signed_pack,
    soon,
)
from ies_agent.dispatch.auth import load_trust
from ies_agent.dispatch.engine import DispatchEngine
from ies_agent.dispatch.executor import ChargerLimit
from ies_agent.dispatch.planner import KIND_CHARGER, DispatchDevice
from ies_agent.dispatch.policy import load_pack
from ies_agent.ocpp.simulator import SessionPlan, SimulatedCharger
from ies_drivers.ocpp.versions import OcppVersion
from ocpp_fixtures import ocpp_config, running_central

V16 = OcppVersion.V16
MANUAL = SessionPlan(session_s=60, pause_s=60, meter_interval_s=30)


async def until(check: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)


class RefusingStation(ChargePoint16):
    """A 1.6 charge point that refuses every charging profile."""

    @on("SetChargingProfile")
    def set_profile(self, **_: Any) -> Any:
        return result16.SetChargingProfile(status="Rejected")

    @on("ClearChargingProfile")
    def clear_profile(self, **_: Any) -> Any:
        return result16.ClearChargingProfile(status="Unknown")


async def test_a_charger_gets_a_clamped_profile_that_is_removed_at_the_end(
    tmp_path: Path,
) -> None:
    issuer = issuer_keys(tmp_path / "trust")
    trust = load_trust([issuer.trust_dir])
    pack = load_pack(signed_pack(tmp_path / "pack.json", issuer.key), trust)
    config = ocpp_config({"cp-ok": (V16,), "cp-no": (V16,)}, dispatch_stack_level=40)
    async with running_central(config, tmp_path / "data") as run:
        stop = asyncio.Event()
        sim = SimulatedCharger("cp-ok", V16, run.url, plan=MANUAL, auto_sessions=False)
        task = asyncio.create_task(sim.run(stop))
        ws = await websockets.connect(f"{run.url}/cp-no", subprotocols=["ocpp1.6"])
        refusing = RefusingStation("cp-no", ws)
        station_task = asyncio.create_task(refusing.start())
        await refusing.call(
            call16.BootNotification(charge_point_model="R", charge_point_vendor="T")
        )
        await until(lambda: sim.connected.is_set())
        engine = DispatchEngine(
            evidence=run.evidence,
            evidence_path=run.data_dir / "evidence.jsonl",
            data_dir=run.data_dir,
            trust=trust,
            packs=[pack],
            devices=[
                DispatchDevice("cp-ok", KIND_CHARGER, groups=("ev",)),
                DispatchDevice("cp-no", KIND_CHARGER, groups=("ev",)),
            ],
            actuators={
                "cp-ok": ChargerLimit("cp-ok", run.central),
                "cp-no": ChargerLimit("cp-no", run.central),
            },
        )
        await engine.start()
        body = event_body(
            "evt-ev", soon(0.2), [{"charge_a": "4"}, {"charge_a": "10"}],
            targets=("group:ev",),
        )  # fmt: skip
        decision = await engine.submit_signed(
            signed_event(body, issuer.key), source="mqtt"
        )
        assert decision is not None and decision.accepted
        clamp = next(c for c in decision.trace if c["clause"] == "EV-MIN")
        assert clamp["result"] == "clamp"
        assert await engine.wait_finished("evt-ev", 6) == "ended"
        await until(lambda: any(a == "ClearChargingProfile" for a, _ in sim.received))
        await engine.close()
        stop.set()
        await task
        station_task.cancel()
        await ws.close()
    limits = [
        p["profile"]["charging_schedule"]["charging_schedule_period"][0]["limit"]
        for a, p in sim.received
        if a == "SetChargingProfile"
    ]
    assert limits[:2] == [6, 10]  # 4 A asked, raised to the 6 A minimum
    refused = [c for c in events(run.data_dir, "dispatch_command") if not c["ok"]]
    assert refused and refused[0]["device"] == "cp-no"
    assert "Rejected" in refused[0]["error"]
    readbacks = events(run.data_dir, "dispatch_readback")
    assert {r["observed"]["status"] for r in readbacks} == {"Accepted"}
