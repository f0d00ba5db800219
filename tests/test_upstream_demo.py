"""Acceptance: ``ies-agent demo --mqtt`` through a broker outage, then verification.

``ies-agent demo --mqtt mqtt://127.0.0.1:PORT --for 40 --interval 5`` runs as a
subprocess against a real Mosquitto that is stopped for 15 s in the middle and
restarted. A collector with a persistent session must then hold every ``seq`` of the
log, none missing, and ``ies-agent verify`` on what it received (written as
``evidence.jsonl`` + ``checkpoints.jsonl`` beside the gateway's verifier key) must
exit 0. The same run's ``ies-agent export --format ies-meterdata`` must validate
against the IES MeterData v0.6 schema and the rules of its validation cases, and
its interval rows must sit on the boundary readings of the log.

This is the slowest upstream test (about 50 s): the duration is the acceptance
criterion itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from peers.ies_endpoint import load_codes, load_schema_validator, meterdata_problems
from peers.mosquitto import Collector, Mosquitto, mosquitto_available
from upstream_fixtures import interval_blocks, time_ms

pytestmark = pytest.mark.skipif(
    not mosquitto_available(),
    reason="needs Debian's mosquitto (apt-get install mosquitto)",
)

AGENT = [sys.executable, "-m", "ies_agent.cli"]


def test_demo_through_a_15_s_broker_outage_delivers_every_seq(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    collector = Collector(broker.port, gateway_id="demo-gw-0001")
    collector.start()
    data = tmp_path / "demo"
    try:
        started = time.monotonic()
        demo = subprocess.Popen(
            [
                *AGENT,
                "demo",
                "--data-dir",
                str(data),
                "--for",
                "40",
                "--interval",
                "5",
                "--mqtt",
                broker.url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(max(0.0, 12 - (time.monotonic() - started)))
        received_before = len(collector.entries)
        broker.stop()
        time.sleep(15)
        broker.restart()
        output, _ = demo.communicate(timeout=120)
        text = output.decode(errors="replace")
        assert demo.returncode == 0, text[-3000:]
        assert received_before > 0
        assert text.count("upstream unreachable") == 1, text[-3000:]
        assert text.count("upstream reachable again") == 1, text[-3000:]
        assert "caught_up=True" in text

        lines = (data / "evidence.jsonl").read_bytes().splitlines()
        assert collector.wait_for(len(lines), 10)
        assert collector.missing(len(lines) - 1) == []
        received = tmp_path / "received"
        collector.write_dir(received)
        verify = subprocess.run(
            [*AGENT, "verify", str(received), "--key", str(data / "keys" / "log.vkey")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        collector.stop()
        broker.stop()

    export = subprocess.run(
        [*AGENT, "export", str(data), "--format", "ies-meterdata"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert export.returncode == 0, export.stderr
    document = json.loads(export.stdout, parse_float=Decimal)
    assert list(load_schema_validator().iter_errors(document)) == []
    assert meterdata_problems(document, load_codes()) == []
    kinds = {p["profileType"] for p in document}
    assert kinds == {"DESCRIPTOR", "INTERVAL", "INSTANTANEOUS"}
    assert_rows_open_and_close_on_boundary_readings(document, lines)


def assert_rows_open_and_close_on_boundary_readings(
    document: list[dict[str, Any]], lines: list[bytes]
) -> None:
    """Every INTERVAL row of the demo (Modbus, SunSpec, DLMS meters and OCPP chargers
    whose meter values come between boundaries) opens and closes on the first
    reading of its register in the first fifth of an interval after a boundary; the
    rows of a register chain and add up to its rise."""
    entries = [json.loads(line) for line in lines]
    boot = entries[0]
    interval_ms = boot["interval_s"] * 1000
    refs = {
        e["dev"].get("ser") or e["dev"].get("serial"): e["src"]
        for e in entries
        if e.get("ev") == "source"
    }
    first_reading: dict[tuple[str, str, int], Decimal] = {}
    for e in entries:
        if e["type"] != "reading" or e.get("st") != "G" or "obis" not in e:
            continue
        t_ms = time_ms(e["t"].replace("Z", "+00:00"))
        boundary = t_ms - t_ms % interval_ms  # the demo's zone is whole minutes off
        if t_ms - boundary < interval_ms // 5:
            cde = e["obis"].split(":")[1].split("*")[0]
            scale = {"Wh": -3, "kWh": 0, "VAh": -3, "kVAh": 0}.get(e["unit"])
            if scale is not None:
                key = (e["src"], cde, boundary)
                first_reading.setdefault(key, Decimal(e["val"]).scaleb(scale))
    registers = {
        "kWh imp block": "1.8.0",
        "kWh exp block": "2.8.0",
        "kVAh imp block": "9.8.0",
    }
    checked = 0
    for (meter, kind), rows in interval_blocks([document]).items():
        src = refs.get(meter) or meter.split("/", 1)[1]
        cde = registers[kind]
        for row in rows:
            assert row.opening == first_reading[(src, cde, row.start_ms)], (meter, row)
            assert row.closing == first_reading[(src, cde, row.end_ms)], (meter, row)
            checked += 1
        assert all(a.closing == b.opening for a, b in pairwise(rows)), meter
        assert sum(r.value for r in rows) == rows[-1].closing - rows[0].opening
    assert checked > 40
