"""The agent as the local central system, without a CSMS: real WebSocket peers.

Chargers are the simulated chargers built on the ``ocpp`` package and raw WebSocket
clients that replay the field cases and malformed input byte for byte. The evidence
log is real and is verified with the product's verifier.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from websockets.exceptions import InvalidHandshake, InvalidStatus

from conftest import DATA
from ies_agent.evidence.verify import verify_path
from ies_agent.ocpp.config import ChargerConfig
from ies_agent.ocpp.simulator import SessionPlan, SimulatedCharger
from ies_drivers.ocpp.validation import Quirks
from ies_drivers.ocpp.versions import OcppVersion
from ocpp_fixtures import BOOT_16, RawCharger, make_pki, ocpp_config, running_central

V16, V201 = OcppVersion.V16, OcppVersion.V201
OCPP = DATA / "ocpp"
FAST = SessionPlan(session_s=1.6, pause_s=0.2, meter_interval_s=0.5)


async def _until(check, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _fc10() -> tuple[str, str]:
    lines = [
        line.split(":", 1)[1].strip()
        for line in (OCPP / "FC-10.log").read_text().splitlines()
        if line.startswith("receive:")
        and ('"StartTransaction"' in line or '"StopTransaction"' in line)
    ]
    return lines[0], lines[1]


async def test_16_and_201_chargers_charge_with_evidence_and_receipts(
    tmp_path: Path,
) -> None:
    config = ocpp_config({"CP16": (V16,), "CP201": (V201,)})
    async with running_central(config, tmp_path / "data") as run:
        stop = asyncio.Event()
        sims = [
            SimulatedCharger("CP16", V16, run.url, plan=FAST),
            SimulatedCharger("CP201", V201, run.url, plan=FAST),
        ]
        tasks = [asyncio.create_task(s.run(stop)) for s in sims]
        await _until(lambda: all(s.sessions >= 2 for s in sims))
        stop.set()
        await asyncio.gather(*tasks)
        status = run.state.chargers["CP201"]
        assert (
            status.version == "2.0.1" and status.identity["model"] == "SimCharger-201"
        )
        receipts = run.events("session_receipt")

    # Every session of both chargers has a receipt with exact energy and ids.
    by_charger = {
        cid: [r for r in receipts if r["charger"] == cid] for cid in ("CP16", "CP201")
    }
    assert len(by_charger["CP16"]) == sims[0].sessions
    assert len(by_charger["CP201"]) == sims[1].sessions
    for receipt in receipts:
        assert int(receipt["energy_wh"]) > 0
        assert receipt["duration_s"] >= 1
        assert receipt["flags"] == []
        assert receipt["id_tag"] == "DEMO-TAG-0001"
    assert {r["version"] for r in receipts} == {"1.6", "2.0.1"}
    # Standalone 1.6 transaction ids are the agent's own, counted from 1.
    assert sorted(int(r["transaction_id"]) for r in by_charger["CP16"])[0] == 1

    # Meter values became readings with OBIS codes; kW was turned into W.
    entries = [
        json.loads(x)
        for x in (tmp_path / "data/evidence.jsonl").read_text().splitlines()
    ]
    power = [e for e in entries if e.get("q") == "Power.Active.Import"]
    assert power and all(e["val"] == "7400" and e["unit"] == "W" for e in power)
    energy = [e for e in entries if e.get("obis") == "1-0:1.8.0*255"]
    assert {e["src"] for e in energy} == {"CP16/1", "CP201/1"}
    assert all(e.get("cum") is True for e in energy)

    # A checkpoint follows each receipt; the log verifies.
    for index, entry in enumerate(entries):
        if entry.get("ev") == "session_receipt":
            assert entries[index + 1]["ev"] == "checkpoint"
    report = verify_path(tmp_path / "data")
    assert report.ok, report.summary()


async def test_fc10_stop_with_id_minus_one_is_answered_and_recorded_unmatched(
    tmp_path: Path,
) -> None:
    start, stop = _fc10()
    config = ocpp_config({"goe": (V16,)})
    async with (
        running_central(config, tmp_path / "data") as run,
        RawCharger.connect(run.url, "goe") as charger,
    ):
        await charger.call(BOOT_16)
        started = await charger.call(start)
        assert started[:2] == [3, "531531541"]
        tx_id = started[2]["transactionId"]
        assert isinstance(tx_id, int)
        answer = await charger.call(stop)
        # A proper, three-element CALLRESULT with the charger's string id.
        assert answer == [3, "531531582", {}]
        unmatched = run.events("session_stop_unmatched")
        assert len(unmatched) == 1
        record = unmatched[0]
        assert record["transaction_id"] == "-1"
        assert "unmatched" in record["flags"] and "time_inverted" in record["flags"]
        assert record["energy_wh"] == "0"
        assert "duration_s" not in record  # never a negative duration
        assert record["candidate"]["transaction_id"] == str(tx_id)
        # The real transaction stays open; no receipt was made for it.
        assert run.events("session_receipt") == []
        assert run.state.chargers["goe"].open_transactions == 1
        proper = stop.replace('"transactionId":-1', f'"transactionId":{tx_id}')
        proper = proper.replace("20:17:05", "20:40:05")
        assert (await charger.call(proper))[0] == 3
        receipt = run.events("session_receipt")[0]
        assert receipt["duration_s"] == 725 and receipt["energy_wh"] == "0"


async def test_fc09_long_serials_boot_accepted_and_strict_mode_refuses(
    tmp_path: Path,
) -> None:
    frame = json.loads((OCPP / "FC-09.json").read_text())["message"]
    text = json.dumps(frame)
    config = ocpp_config(
        chargers={"evlink": (V16,)},
    )
    strict = ChargerConfig("strict-one", versions=(V16,), quirks=Quirks.strict())
    config.chargers["strict-one"] = strict
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "evlink") as charger:
            answer = await charger.call(text)
            assert answer[0] == 3 and answer[2]["status"] == "Accepted"
            assert run.state.chargers["evlink"].warnings == 2
            source = run.events("source")[0]
            assert source["dev"]["box_serial"] == frame[3]["chargeBoxSerialNumber"]
        async with RawCharger.connect(run.url, "strict-one") as charger:
            answer = await charger.call(text)
            assert answer[:3] == [4, "2", "PropertyConstraintViolation"]
            # Still connected: the next, valid boot is accepted.
            assert (await charger.call(BOOT_16))[2]["status"] == "Accepted"


async def test_fc12_probe_in_16_then_201_gives_a_clean_201_session(
    tmp_path: Path,
) -> None:
    config = ocpp_config({"Charger01": (V201, V16)})
    boot_201 = json.dumps(
        [
            2,
            "1",
            "BootNotification",
            {
                "chargingStation": {"model": "A022KP1", "vendorName": "FoxESS"},
                "reason": "PowerUp",
            },
        ]
    )
    status_line = next(
        line
        for line in (OCPP / "FC-12.log").read_text().splitlines()
        if "StatusNotification" in line
    )
    status = json.loads(status_line.split("receive message ", 1)[1])
    status[1] = "2"
    status[3]["timestamp"] = "2026-07-28T10:00:00Z"
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "Charger01", V16) as probe:
            assert probe.subprotocol == "ocpp1.6"
            assert (await probe.call(BOOT_16))[2]["status"] == "Accepted"
        async with RawCharger.connect(run.url, "Charger01", V201) as charger:
            assert charger.subprotocol == "ocpp2.0.1"
            answer = await charger.call(boot_201)
            assert answer[0] == 3 and answer[2]["status"] == "Accepted"
            assert await charger.call(json.dumps(status)) == [3, "2", {}]
            # A 1.6 message is now refused as not being 2.0.1 (no cached 1.6 state).
            wrong = await charger.call('[2,"3","StartTransaction",{}]')
            assert wrong[:3] == [4, "3", "NotSupported"]
        assert run.state.chargers["Charger01"].version == "2.0.1"
        assert run.state.chargers["Charger01"].connectors == {"1/1": "Occupied"}


async def test_malformed_input_gets_callerrors_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    config = ocpp_config({"bad": (V16,), "bad2": (V201,)})
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "bad") as charger:
            assert (await charger.call("{not json"))[:3] == [4, "-1", "ProtocolError"]
            assert (await charger.call('[2,"u1","MakeCoffee",{}]'))[:3] == [
                4,
                "u1",
                "NotSupported",
            ]
            wrong_type = '[2,"t1","StatusNotification",{"connectorId":"1",'
            wrong_type += '"errorCode":"NoError","status":"Available"}]'
            assert (await charger.call(wrong_type))[:3] == [
                4,
                "t1",
                "TypeConstraintViolation",
            ]
            missing = '[2,"m1","StartTransaction",{"connectorId":1}]'
            answer = await charger.call(missing)
            assert answer[:3] == [
                4,
                "m1",
                "OccurenceConstraintViolation",
            ]  # 1.6 spelling
            assert (await charger.call('[2,"x1","Heartbeat"]'))[:2] == [4, "x1"]
            assert (await charger.call('[7,"x2",{}]'))[:3] == [4, "x2", "ProtocolError"]
            # A stray answer and a binary frame are ignored, not fatal.
            await charger.send('[3,"nobody-asked",{}]')
            await charger.websocket.send(b"\x00\x01binary")
            assert (await charger.answer())[:2] == [4, "-1"]
            heartbeat = await charger.call('[2,"h1","Heartbeat",{}]')
            assert heartbeat[:2] == [3, "h1"] and "currentTime" in heartbeat[2]
        async with RawCharger.connect(run.url, "bad2", V201) as charger:
            assert (await charger.call("[[[["))[:3] == [4, "-1", "RpcFrameworkError"]
            heartbeat = await charger.call('[2,"h2","Heartbeat",{}]')
            assert heartbeat[:2] == [3, "h2"]
        assert run.state.chargers["bad"].warnings >= 6


async def test_unknown_chargers_are_refused_unless_configured(tmp_path: Path) -> None:
    async with running_central(ocpp_config({"known": (V16,)}), tmp_path / "a") as run:
        with pytest.raises(InvalidStatus) as refused:
            async with RawCharger.connect(run.url, "stranger"):
                pass
        assert refused.value.response.status_code == 404
    open_config = ocpp_config({}, accept_unknown=True)
    async with (
        running_central(open_config, tmp_path / "b") as run,
        RawCharger.connect(run.url, "stranger") as charger,
    ):
        assert (await charger.call(BOOT_16))[2]["status"] == "Accepted"


async def test_no_common_version_closes_and_no_subprotocol_means_16(
    tmp_path: Path,
) -> None:
    config = ocpp_config({"only201": (V201,), "legacy": (V16,)})
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "only201", V16) as charger:
            with pytest.raises(Exception, match=r"1002|no common"):
                await charger.answer(timeout_s=3)
        async with RawCharger.connect(run.url, "legacy", None) as charger:
            assert charger.subprotocol is None
            assert (await charger.call(BOOT_16))[2]["status"] == "Accepted"


async def test_offline_authorisation_uses_the_configured_default(
    tmp_path: Path,
) -> None:
    authorize = '[2,"a1","Authorize",{"idTag":"NEW-TAG"}]'
    async with (
        running_central(ocpp_config({"c": (V16,)}), tmp_path / "a") as run,
        RawCharger.connect(run.url, "c") as charger,
    ):
        answer = await charger.call(authorize)
        assert answer[2] == {"idTagInfo": {"status": "Invalid"}}
    config = ocpp_config({"c": (V16,)}, offline_unknown_id_tag="Accepted")
    async with (
        running_central(config, tmp_path / "b") as run,
        RawCharger.connect(run.url, "c") as charger,
    ):
        answer = await charger.call(authorize)
        assert answer[2] == {"idTagInfo": {"status": "Accepted"}}


async def test_signed_meter_values_are_kept_byte_exact(tmp_path: Path) -> None:
    examples = json.loads((OCPP / "signed_meter_value_examples.json").read_text())
    config = ocpp_config({"s16": (V16,), "s201": (V201,)})
    v16_frame = [
        2,
        "m1",
        "MeterValues",
        {
            "connectorId": 1,
            "meterValue": [
                {
                    "timestamp": "2025-05-01T12:30:00Z",
                    "sampledValue": [examples["ocpp16_sampledValue"]],
                }
            ],
        },
    ]
    v201_frame = [
        2,
        "m2",
        "MeterValues",
        {
            "evseId": 1,
            "meterValue": [
                {
                    "timestamp": "2025-05-01T12:30:00Z",
                    "sampledValue": [examples["ocpp201_sampledValue"]],
                }
            ],
        },
    ]
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(run.url, "s16") as charger:
            assert (await charger.call(json.dumps(v16_frame)))[:2] == [3, "m1"]
        async with RawCharger.connect(run.url, "s201", V201) as charger:
            assert (await charger.call(json.dumps(v201_frame)))[:2] == [3, "m2"]
        signed = {e["src"]: e for e in run.events("signed_meter_value")}
    assert signed["s16/1"]["signed"]["data"] == examples["ocpp16_sampledValue"]["value"]
    assert signed["s16/1"]["signed"]["encoding"] == "OCMF"
    assert (
        "reading_seq" not in signed["s16/1"]
    )  # a 1.6 signed value has no plain number
    raw201 = examples["ocpp201_sampledValue"]["signedMeterValue"]
    assert signed["s201/1"]["signed"]["data"] == raw201["signedMeterData"]
    assert signed["s201/1"]["signed"]["public_key"] == raw201["publicKey"]
    entries = [
        json.loads(x)
        for x in (tmp_path / "data/evidence.jsonl").read_text().splitlines()
    ]
    reading = entries[signed["s201/1"]["reading_seq"]]
    assert reading["val"] == "12346012" and reading["obis"] == "1-0:1.8.0*255"


async def test_dispatch_limit_sits_above_and_is_removed_at_the_end(
    tmp_path: Path,
) -> None:
    config = ocpp_config({"d16": (V16,), "d201": (V201,)}, dispatch_stack_level=50)
    async with running_central(config, tmp_path / "data") as run:
        stop = asyncio.Event()
        manual = SessionPlan(session_s=60, pause_s=60, meter_interval_s=30)
        sims = [
            SimulatedCharger("d16", V16, run.url, plan=manual, auto_sessions=False),
            SimulatedCharger("d201", V201, run.url, plan=manual, auto_sessions=False),
        ]
        tasks = [asyncio.create_task(s.run(stop)) for s in sims]
        await _until(lambda: all(s.connected.is_set() for s in sims))
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
        assert await run.central.set_dispatch_limit(
            "d16", 16, unit="A", until=until
        ) == ("Accepted")
        assert await run.central.set_dispatch_limit(
            "d201", "7400", unit="W", until=until
        ) == ("Accepted")
        assert run.state.chargers["d16"].dispatch == {
            "limit": "16",
            "unit": "A",
            "until": until.strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{until.microsecond // 1000:03d}Z",
        }
        await _until(
            lambda: all(
                any(a == "ClearChargingProfile" for a, _ in s.received) for s in sims
            )
        )
        stop.set()
        await asyncio.gather(*tasks)
        applied = run.events("dispatch_limit_applied")
        cleared = run.events("dispatch_limit_cleared")
    profile16 = next(p for a, p in sims[0].received if a == "SetChargingProfile")[
        "profile"
    ]
    assert profile16["stack_level"] == 50
    assert profile16["charging_profile_purpose"] == "ChargePointMaxProfile"
    assert profile16["charging_schedule"]["charging_schedule_period"][0]["limit"] == 16
    profile201 = next(p for a, p in sims[1].received if a == "SetChargingProfile")[
        "profile"
    ]
    assert profile201["charging_profile_purpose"] == "ChargingStationMaxProfile"
    assert {e["status"] for e in applied} == {"Accepted"}
    assert {e["status"] for e in cleared} == {"Accepted"}
    assert run.state.chargers["d16"].dispatch is None


async def test_dispatch_for_an_absent_charger_waits_for_it(tmp_path: Path) -> None:
    config = ocpp_config({"late": (V16,)})
    async with running_central(config, tmp_path / "data") as run:
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
        status = await run.central.set_dispatch_limit("late", 10, unit="A", until=until)
        assert status == "Pending"
        stop = asyncio.Event()
        sim = SimulatedCharger("late", V16, run.url, plan=FAST, auto_sessions=False)
        task = asyncio.create_task(sim.run(stop))
        await _until(lambda: any(a == "SetChargingProfile" for a, _ in sim.received))
        assert await run.central.clear_dispatch_limit("late") == "Accepted"
        stop.set()
        await task
        with pytest.raises(KeyError):
            await run.central.set_dispatch_limit("nobody", 1, unit="A", until=until)
        with pytest.raises(ValueError, match="time zone"):
            await run.central.set_dispatch_limit(
                "late", 1, unit="A", until=until.replace(tzinfo=None)
            )


# --- security profiles --------------------------------------------------------------


def _password(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.pass"
    path.write_text(text + "\n")
    return path


async def test_profile_1_basic_auth(tmp_path: Path) -> None:
    password = _password(tmp_path, "p1", "s3cret-0123456789")
    charger = ChargerConfig("p1", versions=(V16,), password_file=password)
    config = ocpp_config({}, security_profile=1)
    config.chargers["p1"] = charger
    async with running_central(config, tmp_path / "data") as run:
        for wrong in (None, "guess"):
            with pytest.raises(InvalidStatus) as refused:
                async with RawCharger.connect(run.url, "p1", password=wrong):
                    pass
            assert refused.value.response.status_code == 401
        async with RawCharger.connect(
            run.url, "p1", password="s3cret-0123456789"
        ) as ok:
            assert (await ok.call(BOOT_16))[2]["status"] == "Accepted"


async def test_profile_2_tls_with_basic_auth(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    password = _password(tmp_path, "p2", "another-secret-99")
    charger = ChargerConfig("p2", versions=(V201,), password_file=password)
    config = ocpp_config(
        {}, security_profile=2, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    config.chargers["p2"] = charger
    async with running_central(config, tmp_path / "data") as run:
        assert run.url.startswith("wss://")
        context = pki.client_context()
        async with RawCharger.connect(
            run.url, "p2", V201, password="another-secret-99", ssl_context=context
        ) as ok:
            assert (await ok.call('[2,"h","Heartbeat",{}]'))[:2] == [3, "h"]
        with pytest.raises(InvalidStatus):
            async with RawCharger.connect(
                run.url, "p2", V201, password="x", ssl_context=context
            ):
                pass


async def test_profile_3_client_certificate_must_name_the_charger(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki", client_ids=("p3", "other"))
    config = ocpp_config(
        {"p3": (V16,), "other": (V16,)},
        security_profile=3,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.ca,
    )
    async with running_central(config, tmp_path / "data") as run:
        async with RawCharger.connect(
            run.url, "p3", ssl_context=pki.client_context("p3")
        ) as ok:
            assert (await ok.call(BOOT_16))[2]["status"] == "Accepted"
        # A valid certificate of another charger: refused.
        with pytest.raises(InvalidStatus) as refused:
            async with RawCharger.connect(
                run.url, "p3", ssl_context=pki.client_context("other")
            ):
                pass
        assert refused.value.response.status_code == 403
        # No certificate at all: the TLS handshake fails.
        with pytest.raises((OSError, InvalidHandshake)):
            async with RawCharger.connect(
                run.url, "p3", ssl_context=pki.client_context()
            ):
                await asyncio.sleep(0.2)


async def test_a_charger_that_does_not_wait_for_answers_gets_every_one(
    tmp_path: Path,
) -> None:
    # OCPP-J says one call at a time; some chargers burst. Nothing is refused for
    # being early: the agent stops reading while 16 are in hand (back-pressure).
    async with (
        running_central(ocpp_config({"burst": (V16,)}), tmp_path / "data") as run,
        RawCharger.connect(run.url, "burst") as charger,
    ):
        for index in range(60):
            await charger.send(f'[2,"h{index}","Heartbeat",{{}}]')
        answers = [await charger.answer() for _ in range(60)]
    assert sorted(a[1] for a in answers) == sorted(f"h{i}" for i in range(60))
    assert all(a[0] == 3 for a in answers)


async def test_an_ocpp_21_charger_boots_and_runs_a_transaction(tmp_path: Path) -> None:
    event = {
        "eventType": "Started",
        "timestamp": "2026-01-01T00:00:00Z",
        "triggerReason": "Authorized",
        "seqNo": 0,
        "transactionInfo": {"transactionId": "tx-21"},
        "evse": {"id": 1},
        "idToken": {"idToken": "TAG21", "type": "ISO14443"},
        "meterValue": [
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "sampledValue": [{"value": 1500}],
            }
        ],
    }
    boot = {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"}
    async with (
        running_central(
            ocpp_config({"cp21": (OcppVersion.V21,)}), tmp_path / "d"
        ) as run,
        RawCharger.connect(run.url, "cp21", OcppVersion.V21) as charger,
    ):
        assert charger.subprotocol == "ocpp2.1"
        answer = await charger.call(json.dumps([2, "1", "BootNotification", boot]))
        assert answer[2]["status"] == "Accepted"
        answer = await charger.call(json.dumps([2, "2", "TransactionEvent", event]))
        assert answer[:2] == [3, "2"]
        event.update(eventType="Ended", seqNo=1, triggerReason="StopAuthorized")
        event["meterValue"][0]["sampledValue"][0]["value"] = 2750
        assert (await charger.call(json.dumps([2, "3", "TransactionEvent", event])))[
            0
        ] == 3
        receipt = run.events("session_receipt")[0]
    assert receipt["version"] == "2.1" and receipt["energy_wh"] == "1250"


async def test_absurd_numbers_and_times_are_flagged_never_stored_as_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ocpp_config({"bloat": (V16,)})
    good_time = "2025-05-01T10:00:00Z"

    def meter_values(uid: str, value: str, timestamp: str = good_time) -> str:
        sampled = {"value": value, "measurand": "Voltage", "unit": "V"}
        payload = {
            "connectorId": 1,
            "meterValue": [{"timestamp": timestamp, "sampledValue": [sampled]}],
        }
        return json.dumps([2, uid, "MeterValues", payload])

    async with (
        running_central(config, tmp_path / "data") as run,
        RawCharger.connect(run.url, "bloat") as charger,
    ):
        await charger.call(BOOT_16)
        for uid, value in (("a", "1e100000"), ("b", "1e3000000"), ("c", "1" * 600)):
            assert await charger.call(meter_values(uid, value)) == [3, uid, {}]
        # An unparseable time: the value is good, the time flagged (twice, logged
        # once for the charger).
        for uid in ("t1", "t2"):
            answer = await charger.call(meter_values(uid, "230.1", "not-a-time"))
            assert answer == [3, uid, {}]
        readings = [e for e in run.entries() if e.get("type") == "reading"]
        assert [r["st"] for r in readings] == ["E", "E", "E", "G", "G"]
        assert all("val" not in r for r in readings[:3])
        assert all("value out of range" in r["note"] for r in readings[:3])
        assert max(len(json.dumps(r)) for r in readings) < 1200
        assert all("dt" not in r and "not a time" in r["note"] for r in readings[3:])
        assert [r["val"] for r in readings[3:]] == ["230.1", "230.1"]
        report = verify_path(tmp_path / "data")
        assert report.ok, report.summary()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("not a time" in m for m in logged) == 1
    assert any("value out of range" in m for m in logged)
    assert not any(r.exc_info for r in caplog.records)


async def test_201_transaction_event_with_invalid_seq_no_is_recorded_not_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ocpp_config({"seq": (V201,)})

    def event(uid: str, kind: str, tx: str, seq_no: int) -> str:
        payload = {
            "eventType": kind,
            "timestamp": "2025-05-01T10:00:00Z",
            "triggerReason": "Authorized",
            "seqNo": seq_no,
            "transactionInfo": {"transactionId": tx},
            "evse": {"id": 1, "connectorId": 1},
        }
        return json.dumps([2, uid, "TransactionEvent", payload])

    async with (
        running_central(config, tmp_path / "data") as run,
        RawCharger.connect(run.url, "seq", V201) as charger,
    ):
        assert (await charger.call(event("s", "Started", "T-1", 0)))[:2] == [3, "s"]
        answer = await charger.call(event("u", "Updated", "T-ghost", -1))
        assert answer == [3, "u", {}]
        recorded = run.events("transaction_event_unmatched")
        assert len(recorded) == 1
        assert recorded[0]["flags"] == ["seq_no_invalid", "unknown_transaction"]
        assert recorded[0]["seq_no"] == -1
        assert recorded[0]["candidate"]["transaction_id"] == "T-1"
        # Nothing was opened, nothing superseded or closed.
        assert run.events("session_receipt") == []
        assert run.state.chargers["seq"].open_transactions == 1
    assert any(
        "seqNo -1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    )
