"""The per-charger journal and the transaction book: recovery, bounds, receipts."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

from ies_agent.ocpp.journal import (
    AUTH_CACHE_MAX,
    COMPACT_BYTES,
    JOURNAL_FILE,
    ChargerStore,
)
from ies_agent.ocpp.transactions import TransactionBook
from ies_drivers.ocpp.versions import OcppVersion

V16, V201 = OcppVersion.V16, OcppVersion.V201


def _meter(value: str) -> dict[str, object]:
    return {"connectorId": 1, "meterValue": [{"sampledValue": [{"value": value}]}]}


def test_undelivered_entries_survive_a_reopen_in_order(tmp_path: Path) -> None:
    store = ChargerStore.open(tmp_path)
    first = store.append(V16, "StartTransaction", "a", {"meterStart": 1})
    store.append(V16, "MeterValues", "b", _meter("1.5"))
    store.append(V201, "TransactionEvent", "c", {"seqNo": 3, "v": Decimal("0.10")})
    assert store.peek() == first
    store.advance(first)
    store.close()

    store = ChargerStore.open(tmp_path)
    assert store.backlog == 2
    second = store.peek()
    assert second is not None and second.unique_id == "b" and second.n == 1
    store.advance(second)
    third = store.peek()
    assert third is not None and third.version is V201
    assert third.payload["v"] == Decimal("0.10")  # digits as sent
    assert store.append(V16, "MeterValues", "d", _meter("2")).n == 3


def test_a_torn_last_line_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    store = ChargerStore.open(tmp_path)
    store.append(V16, "MeterValues", "a", _meter("1"))
    store.append(V16, "MeterValues", "b", _meter("2"))
    store.close()
    with (tmp_path / JOURNAL_FILE).open("ab") as journal:
        journal.write(b'{"n":2,"t":1,"v":"1.6","a":"MeterVal')
    store = ChargerStore.open(tmp_path)
    assert store.backlog == 2
    assert store.append(V16, "MeterValues", "c", _meter("3")).n == 2
    ids = []
    while (entry := store.peek()) is not None:
        ids.append(entry.unique_id)
        store.advance(entry)
    assert ids == ["a", "b", "c"]


def test_a_delivered_journal_is_cut_back_so_disk_stays_bounded(tmp_path: Path) -> None:
    store = ChargerStore.open(tmp_path)
    padding = "x" * 1000
    count = COMPACT_BYTES // 1000 + 10
    for index in range(count):
        store.append(V16, "MeterValues", f"m{index}", {"pad": padding})
    assert os.path.getsize(tmp_path / JOURNAL_FILE) > COMPACT_BYTES
    while (entry := store.peek()) is not None:
        store.advance(entry)
    assert os.path.getsize(tmp_path / JOURNAL_FILE) == 0
    store.close()
    store = ChargerStore.open(tmp_path)
    assert store.backlog == 0 and store.next_n == count


def test_state_round_trips_and_the_auth_cache_is_bounded(tmp_path: Path) -> None:
    store = ChargerStore.open(tmp_path)
    for index in range(AUTH_CACHE_MAX + 50):
        store.state.auth[f"tag-{index}"] = {"info": {"status": "Accepted"}, "t": index}
    store.state.tx_map["2147483647"] = 1001
    store.state.boots["1.6"] = {"chargePointVendor": "V", "chargePointModel": "M"}
    store.save_state()
    store.close()
    again = ChargerStore.open(tmp_path)
    assert len(again.state.auth) == AUTH_CACHE_MAX
    assert "tag-0" not in again.state.auth  # the oldest went first
    assert again.state.tx_map == {"2147483647": 1001}
    assert again.state.boots["1.6"]["chargePointModel"] == "M"


def test_receipts_unmatched_stops_and_superseded_sessions(tmp_path: Path) -> None:
    store = ChargerStore.open(tmp_path)
    book = TransactionBook("goe", store.state)
    assert (
        book.start(
            V16,
            "45645645",
            connector=1,
            id_tag="TEST",
            timestamp="2022-12-06T20:28:00.000Z",
            meter_start_wh="8016",
        )
        == []
    )
    # FC-10: -1 closes nothing, is flagged, and never has a negative duration.
    unmatched = book.stop(
        "-1", timestamp="2022-12-06T20:17:05.000Z", meter_stop_wh="8016", reason=None
    )
    assert unmatched.ev == "session_stop_unmatched"
    assert unmatched.fields["energy_wh"] == "0"
    assert unmatched.fields["flags"] == ["unmatched", "time_inverted"]
    assert "duration_s" not in unmatched.fields
    assert book.is_open("45645645")
    # A new start on the same connector closes the old one as superseded.
    superseded = book.start(
        V16, "7", connector=1, id_tag="T2", timestamp=None, meter_start_wh="9000"
    )
    flags = [o.fields["flags"] for o in superseded]
    assert flags == [["superseded", "energy_unknown", "time_unknown"]]
    book.note_energy("7", "9250.5")
    receipt = book.stop("7", timestamp=None, meter_stop_wh=None, reason="Local")
    assert receipt.ev == "session_receipt"
    assert receipt.fields["energy_wh"] == "250.5"
    assert receipt.fields["meter_stop_wh"] == "9250.5"
    assert book.open_count == 0
    # A register that went back is flagged, never a negative energy.
    book.start(
        V201, "tx", connector=2, id_tag=None, timestamp=None, meter_start_wh="10"
    )
    backwards = book.stop("tx", timestamp=None, meter_stop_wh="5", reason=None)
    assert "energy_wh" not in backwards.fields
    assert "meter_decreased" in backwards.fields["flags"]


def test_the_dispatch_profile_is_valid_in_every_version() -> None:
    from datetime import UTC, datetime, timedelta

    from ies_agent.ocpp.session import DispatchLimit, dispatch_profile
    from ies_drivers.ocpp.validation import Quirks, check_payload

    now = datetime.now(UTC)
    limit = DispatchLimit(Decimal("7.5"), "A", now + timedelta(minutes=15))
    for version in OcppVersion:
        action, payload = dispatch_profile(version, limit, 90, now)
        # Strict: not even a tolerated deviation in what the agent itself sends.
        assert (
            check_payload(version, action, payload, quirks=Quirks.strict()).warnings
            == ()
        )
