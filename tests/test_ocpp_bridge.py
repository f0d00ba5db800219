"""The bridge to the CSMS: chargers → agent → a real CSMS built on the ``ocpp`` package.

The CSMS runs in a child process (killed with SIGKILL and started again for outages)
or in the test's loop when the test drives it. It records every frame it sees; the
checks in ``ocpp_checks`` read that record.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conftest import free_port
from ies_agent.evidence.verify import verify_path
from ies_agent.ocpp.simulator import SessionPlan, SimulatedCharger
from ies_drivers.ocpp.versions import OcppVersion
from ocpp_checks import check_2x, check_16
from ocpp_fixtures import RawCharger, ocpp_config, running_central
from peers.ocpp_csms import CsmsProcess, InProcessCsms, calls_in

V16, V201 = OcppVersion.V16, OcppVersion.V201
CHARGERS = ("CP16", "CP201")
PLAN = SessionPlan(session_s=2.5, pause_s=0.4, meter_interval_s=0.6)


async def _until(check, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def _outage_run(tmp_path: Path, outage_s: float) -> None:
    """1.6 + 2.0.1 chargers charge through the agent; the CSMS dies for
    ``outage_s`` seconds in the middle and comes back."""
    csms = CsmsProcess(free_port(), tmp_path / "csms.jsonl", call_during_start=True)
    csms.start()
    try:
        config = ocpp_config({"CP16": (V16,), "CP201": (V201,)}, csms_url=csms.url)
        async with running_central(config, tmp_path / "data") as run:
            stop = asyncio.Event()
            sims = [
                SimulatedCharger("CP16", V16, run.url, plan=PLAN),
                SimulatedCharger("CP201", V201, run.url, plan=PLAN),
            ]
            tasks = [asyncio.create_task(s.run(stop)) for s in sims]
            await _until(lambda: all(s.sessions >= 1 for s in sims))
            csms.kill()
            before = [s.sessions for s in sims]
            await asyncio.sleep(outage_s)
            # Sessions went on while the CSMS was away, answered by the agent.
            assert all(s.sessions > b for s, b in zip(sims, before, strict=True))
            assert run.state.chargers["CP16"].journal_backlog > 0
            assert run.state.chargers["CP16"].csms_connected is False
            seen_before = len(calls_in(csms.frames(), "CP201"))
            csms.start()
            # Both links come back together: the first one through wakes the other.
            await _until(
                lambda: any(run.state.chargers[c].csms_connected for c in CHARGERS)
            )
            back = asyncio.get_running_loop().time()
            await _until(
                lambda: all(run.state.chargers[c].csms_connected for c in CHARGERS)
            )
            assert asyncio.get_running_loop().time() - back < 3.0
            await _until(
                lambda: all(
                    s.sessions >= b + 2 for s, b in zip(sims, before, strict=True)
                )
            )
            stop.set()
            await asyncio.gather(*tasks)
            # The simulators end their open sessions at stop; the agent delivers them.
            assert await run.central.wait_delivered(20)
            mapped = run.events("ocpp_transaction_mapped")
        frames = csms.frames()
    finally:
        csms.kill()

    # Every session of each charger reached the CSMS, in order, ids consistent.
    s16 = check_16(frames, "CP16")
    assert len(s16.ended) == sims[0].sessions == len(s16.started)
    assert s16.meter_values > 0
    s201 = check_2x(frames, "CP201")
    assert len(s201.ended) == sims[1].sessions == len(s201.started)
    # 2.0.1 events that happened while the CSMS was away say so when replayed.
    after = calls_in(frames, "CP201")[seen_before:]
    replayed = [p for a, p in after if a == "TransactionEvent"]
    assert any(p.get("offline") is True for p in replayed)
    # Offline 1.6 transactions got local ids that were mapped to the CSMS's.
    assert mapped and all(m["local_id"] > 2_000_000_000 for m in mapped)
    assert {m["csms_id"] for m in mapped} <= set(s16.started)
    # The boot was replayed on reconnect before the queued messages.
    calls = [a for a, _ in calls_in(frames, "CP16")]
    assert calls.count("BootNotification") >= 2
    # The CSMS asked for the configuration during each start; the chargers answered.
    assert any(a == "GetConfiguration" for a, _ in sims[0].received)
    assert any(a == "GetVariables" for a, _ in sims[1].received)
    report = verify_path(tmp_path / "data")
    assert report.ok, report.summary()


async def test_sessions_survive_a_csms_outage_in_order_with_consistent_ids(
    tmp_path: Path,
) -> None:
    await _outage_run(tmp_path, outage_s=8.0)


@pytest.mark.soak
async def test_sessions_survive_a_two_minute_csms_outage(tmp_path: Path) -> None:
    await _outage_run(tmp_path, outage_s=120.0)


async def test_csms_calls_reach_the_charger_with_ids_mapped_back(
    tmp_path: Path,
) -> None:
    csms = InProcessCsms(free_port(), tmp_path / "csms.jsonl")
    await csms.start()
    config = ocpp_config({"CP16": (V16,)}, csms_url=csms.url, dispatch_stack_level=20)
    async with running_central(config, tmp_path / "data") as run:
        run.central.set_location_rewriter(
            lambda charger, action, location: f"http://gateway/{charger}/{action}"
        )
        stop = asyncio.Event()
        sim = SimulatedCharger("CP16", V16, run.url, plan=PLAN, auto_sessions=False)
        task = asyncio.create_task(sim.run(stop))
        await _until(
            lambda: "CP16" in csms.stations and run.central.hubs["CP16"].link.ready
        )

        # The CSMS goes away; a session starts under a local id.
        await csms.stop()
        sim.request_session()
        await _until(lambda: isinstance(sim.tx_id, int))
        local_id = sim.tx_id
        assert local_id > 2_000_000_000
        await asyncio.sleep(0.5)

        # The CSMS is back; the journal is replayed and the id mapped.
        seen_before = len(calls_in(csms.frames(), "CP16"))
        await csms.start()
        await _until(lambda: run.events("ocpp_transaction_mapped") != [])
        # The connector's state the charger reported meanwhile is repeated, after
        # the queue (the charger itself sent nothing since).
        status = run.state.chargers["CP16"].connectors["1"]
        await _until(
            lambda: (
                (
                    "StatusNotification",
                    status,
                )
                in [
                    (a, p.get("status"))
                    for a, p in calls_in(csms.frames(), "CP16")[seen_before:]
                ]
            )
        )
        csms_id = run.events("ocpp_transaction_mapped")[0]["csms_id"]
        await _until(lambda: "CP16" in csms.stations)
        station = csms.stations["CP16"]
        from ocpp.v16 import call

        # RemoteStop under the CSMS's id reaches the charger under its own.
        answer = await station.call(
            call.RemoteStopTransaction(transaction_id=csms_id), suppress=False
        )
        assert answer.status == "Accepted"
        assert ("RemoteStopTransaction", {"transactionId": local_id}) in sim.received
        await _until(lambda: sim.sessions == 1)

        # A CSMS profile at or above the dispatch level is kept below it.
        profile = {
            "chargingProfileId": 7,
            "stackLevel": 25,
            "chargingProfilePurpose": "ChargePointMaxProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20}],
            },
        }
        answer = await station.call(
            call.SetChargingProfile(connector_id=0, cs_charging_profiles=profile),
            suppress=False,
        )
        assert answer.status == "Accepted"
        got = next(p for a, p in sim.received if a == "SetChargingProfile")["profile"]
        assert got["stack_level"] == 19

        # Firmware locations go through the firmware bridge's rewriter.
        await station.call(
            call.UpdateFirmware(
                location="https://vendor.example/fw.bin",
                retrieve_date="2030-01-01T00:00:00Z",
            ),
            suppress=False,
        )
        assert (
            "UpdateFirmware",
            {"location": "http://gateway/CP16/UpdateFirmware"},
        ) in sim.received
        stop.set()
        await task
        # With the charger gone and nothing queued, its CSMS connection closes too
        # (the CSMS sees the charger offline); a call that still arrives for an
        # absent charger is answered with a CALLERROR, never left unanswered.
        await _until(lambda: not run.state.chargers["CP16"].connected)
        await _until(lambda: not run.central.hubs["CP16"].link.stats.connected)
        from ies_agent.ocpp.connection import Reject
        from ies_drivers.ocpp.rpc import Call

        with pytest.raises(Reject, match="not connected"):
            await run.central.hubs["CP16"].handle_csms_call(
                Call("x", "Reset", {"type": "Soft"}), V16
            )
    await csms.stop()
    log = (tmp_path / "data/evidence.jsonl").read_text().splitlines()
    receipt = next(
        entry for entry in map(json.loads, log) if entry.get("ev") == "session_receipt"
    )
    assert receipt["transaction_id"] == str(local_id)
    assert receipt["csms_transaction_id"] == csms_id
    assert receipt["offline_start"] is True


async def test_upstream_uses_the_version_negotiated_downstream(tmp_path: Path) -> None:
    csms = InProcessCsms(free_port(), tmp_path / "csms.jsonl")
    await csms.start()
    config = ocpp_config({"Charger01": (V201, V16)}, csms_url=csms.url)
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "Charger01", V16) as probe:
            boot = json.dumps(
                [
                    2,
                    "1",
                    "BootNotification",
                    {"chargePointVendor": "FoxESS", "chargePointModel": "A022KP1"},
                ]
            )
            assert (await probe.call(boot))[2]["status"] == "Accepted"
        async with RawCharger.connect(run.url, "Charger01", V201) as charger:
            boot = json.dumps(
                [
                    2,
                    "2",
                    "BootNotification",
                    {
                        "chargingStation": {"model": "A022KP1", "vendorName": "FoxESS"},
                        "reason": "PowerUp",
                    },
                ]
            )
            assert (await charger.call(boot))[2]["status"] == "Accepted"
            await _until(lambda: run.central.hubs["Charger01"].link.ready_for(V201))
            # The CSMS's SetVariables (FC-12) reaches the 2.0.1 charger and back.
            station = csms.stations["Charger01"]
            from ocpp.v201 import call

            request = asyncio.ensure_future(
                station.call(
                    call.SetVariables(
                        set_variable_data=[
                            {
                                "attributeValue": "60",
                                "component": {"name": "SampledDataCtrlr"},
                                "variable": {"name": "TxUpdatedInterval"},
                            }
                        ]
                    ),
                    suppress=False,
                )
            )
            forwarded = await charger.answer()
            assert forwarded[0] == 2 and forwarded[2] == "SetVariables"
            reply = {
                "setVariableResult": [
                    {
                        "attributeStatus": "Accepted",
                        "component": {"name": "SampledDataCtrlr"},
                        "variable": {"name": "TxUpdatedInterval"},
                    }
                ]
            }
            await charger.send(json.dumps([3, forwarded[1], reply]))
            result = await request
            assert result.set_variable_result[0]["attribute_status"] == "Accepted"
    await csms.stop()
    protos = [
        (f.proto, f.frame[2])
        for f in csms.frames()
        if f.direction == "in" and f.frame[0] == 2
    ]
    assert protos[0] == ("ocpp1.6", "BootNotification")
    assert ("ocpp2.0.1", "BootNotification") in protos


async def test_a_csms_that_refuses_a_message_does_not_block_the_queue(
    tmp_path: Path,
) -> None:
    csms = InProcessCsms(free_port(), tmp_path / "csms.jsonl")
    await csms.start()
    config = ocpp_config({"CP16": (V16,)}, csms_url=csms.url)
    async with (
        running_central(config, tmp_path / "data") as run,
        RawCharger.connect(run.url, "CP16") as charger,
    ):
        boot = '[2,"1","BootNotification",{"chargePointVendor":"V",'
        boot += '"chargePointModel":"M"}]'
        await charger.call(boot)
        await _until(lambda: run.central.hubs["CP16"].link.ready)
        # An unknown vendor field: tolerated by the agent, refused by the
        # CSMS (the ocpp package validates strictly). The next message still goes.
        odd = (
            '[2,"2","MeterValues",{"connectorId":1,"vendorField":1,"meterValue":'
            '[{"timestamp":"2025-01-01T00:00:00Z","sampledValue":[{"value":"5"}]}]}]'
        )
        assert (await charger.call(odd))[:2] == [3, "2"]
        good = odd.replace(',"vendorField":1', "").replace('"2"', '"3"', 1)
        assert (await charger.call(good))[:2] == [3, "3"]
        await _until(lambda: run.central.hubs["CP16"].store.backlog == 0)
        rejected = run.events("ocpp_upstream_rejected")
    await csms.stop()
    assert rejected and rejected[0]["action"] == "MeterValues"
    assert [a for a, _ in calls_in(csms.frames(), "CP16")].count("MeterValues") == 2


async def test_backoff_is_capped_jittered_reset_and_cut_short_by_a_peer() -> None:
    from ies_agent.ocpp.bridge import Backoff, CsmsReachability

    backoff = Backoff(0.5, 4.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, (0.5, 1, 2, 4, 4, 4), strict=True):
        assert base * 0.8 <= delay <= min(base * 1.2, 4.0)
    backoff.reset()
    assert backoff.next_delay() <= 0.6
    # A link backing off wakes as soon as another link to the CSMS gets through.
    reach = CsmsReachability()
    signal = reach.signal()
    waiting = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    reach.reached()
    await asyncio.wait_for(waiting, 0.5)
    assert not reach.signal().is_set()  # the next outage starts afresh
