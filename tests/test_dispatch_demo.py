"""Dispatch wired into the running agent: ``ies-agent demo``, ``ies-agent run``, config.

The demo test runs the real ``ies-agent demo --for 90 --interval 5`` as a child
process (simulated SunSpec inverter on pymodbus, simulated OCPP chargers) and checks
every step of its scripted dispatch in the evidence log, recomputes the M&V result
from the log, and verifies the log. The run test starts ``ies-agent run`` on a site
with a ``[dispatch]`` table and a persisted event that ended while the agent was down:
the agent reverts the real (simulated) inverter at start and stops cleanly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from cli_helpers import agent_cmd, agent_env, entries, run_agent
from dispatch_fixtures import (
    event_body,
    issuer_keys,
    signed_event,
    signed_pack,
    sunny,
)
from ies_agent.config import ConfigError, load_site
from ies_agent.demo.simulator import SunSpecInverter, sim_device
from ies_agent.dispatch import mv
from ies_agent.dispatch.model import parse_event
from ies_agent.dispatch.settings import KIND_CHARGER, KIND_INVERTER
from peers.mosquitto import Mosquitto, mosquitto_available
from test_cli_read import ServerThread

CHARGERS = ("demo-cp-16", "demo-cp-201")


def _by(
    log: list[dict[str, object]], ev: str, event_id: str
) -> list[dict[str, object]]:
    return [e for e in log if e.get("ev") == ev and e.get("event") == event_id]


def test_demo_runs_a_signed_dispatch_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    result = run_agent(
        "demo", "--data-dir", str(data), "--for", "90", "--interval", "5", timeout=180
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "dispatch     at ~8 s a signed event" in result.stdout  # the banner
    log = entries(data)

    # The event came through the MQTT command handler, signed by the demo issuer.
    received = [e for e in log if e.get("ev") == "dispatch_received" and "issuer" in e]
    assert len(received) == 1, received
    event_id = str(received[0]["event"])
    assert received[0]["source"] == "mqtt"
    assert received[0]["issuer"] == "demo-discom"
    commands = [e for e in log if e.get("ev") == "command_received"]
    assert commands and commands[0]["name"] == "dispatch" and commands[0]["handled"]
    # The demo's keys and pack were made in the data directory, not shipped ones.
    trust = sorted(p.name for p in (data / "dispatch-demo" / "trust").iterdir())
    assert trust == ["demo-issuer.pem", "demo-signer.pem"]
    assert (data / "dispatch-demo" / "issuer.key.pem").stat().st_mode & 0o077 == 0

    # The decision carries the clause trace of the demo pack.
    (decision,) = _by(log, "dispatch_decision", event_id)
    assert decision["accepted"] is True and decision["pack"] == "demo-generated@1"
    clauses = decision["clauses"]
    assert isinstance(clauses, list)
    assert {c["clause"] for c in clauses} >= {"INST-EXPORT", "PV-MIN", "EV-MIN"}
    assert all(c["result"] == "pass" for c in clauses)

    # SunSpec write to the inverter and charging profiles to both chargers ...
    sent = {e["device"]: e for e in _by(log, "dispatch_command", event_id)}
    assert set(sent) == {"inverter", *CHARGERS}, sent
    assert all(e["ok"] for e in sent.values())
    assert str(sent["inverter"]["command"]).startswith("sunspec:123:WMaxLimPct=50")
    assert all(str(sent[c]["command"]).startswith("ocpp:") for c in CHARGERS)
    # ... read back: the inverter's model 123 shows the 50 % limit, enabled.
    readback = {e["device"]: e for e in _by(log, "dispatch_readback", event_id)}
    inverter = readback["inverter"]
    assert inverter["ok"] is True
    assert inverter["observed"] == {
        "model": "123",
        "pct": "50",
        "enabled": "1",
        "revert_s": inverter["observed"]["revert_s"],  # type: ignore[index]
    }
    assert all(readback[c]["observed"] == {"status": "Accepted"} for c in CHARGERS)

    # Reverted at the end, never above the installer's 90 % export limit.
    reverts = {e["device"]: e for e in _by(log, "dispatch_revert", event_id)}
    assert set(reverts) == {"inverter", *CHARGERS}
    assert all(e["ok"] and e["reason"] == "event_end" for e in reverts.values())
    restored = reverts["inverter"]["restored"]
    assert isinstance(restored, dict) and Decimal(restored["pct"]) <= 90
    assert int(str(reverts["inverter"]["seq"])) > int(str(inverter["seq"]))

    statuses = [e["status"] for e in _by(log, "dispatch_ack", event_id)]
    assert statuses == ["received", "accepted", "started", "ended"], statuses

    # Simulated history for the baseline, marked so, then M&V on the event's grid.
    history = [e for e in log if e.get("ev") == "mv_history"]
    assert len(history) == 5 and all(e["simulated"] is True for e in history)
    (result_mv,) = _by(log, "mv_result", event_id)
    grid = result_mv["grid"]
    assert isinstance(grid, dict) and grid["interval_s"] == 5
    intervals = int(grid["intervals"])
    baseline, actual = result_mv["baseline"], result_mv["actual"]
    assert isinstance(baseline, list) and isinstance(actual, list)
    assert len(baseline) == len(actual) == intervals == 4
    assert None not in baseline and None not in actual
    assert result_mv["simulated_history"] is True
    assert result_mv["method"] == "high-3-of-5/1"
    # Anyone holding the log can recompute it.
    start = datetime.fromisoformat(str(grid["start"]).replace("Z", "+00:00"))
    again = mv.measure(
        [e for e in log if int(str(e["seq"])) < int(str(result_mv["seq"]))],
        event_id=event_id,
        meter="grid-meter",
        quantity="energy_active_import",
        start=start,
        interval_s=5,
        intervals=intervals,
        method=mv.parse_method("high-3-of-5"),
    )
    assert again["baseline"] == baseline and again["actual"] == actual

    # The end of the run tells the result.
    assert f"dispatch {event_id}: ended, measured" in result.stdout
    assert "clause INST-EXPORT" in result.stdout
    assert "baseline      actual" in result.stdout

    verify = run_agent("verify", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _write_site(path: Path, port: int, extra: str) -> None:
    path.write_text(
        f"""
[gateway]
id = "gw-dispatch"
interval = "5s"
demo = true
data_dir = "data"

[[buses]]
id = "lan"
kind = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 1.0

[[devices]]
id = "inverter"
bus = "lan"
unit = 1
template = "sunspec-inverter"
poll_s = 2
{extra}"""
    )


def test_run_with_dispatch_reverts_a_stale_event_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    issuer = issuer_keys(tmp_path / "trust")
    signed_pack(tmp_path / "site.pack.json", issuer.key)  # INST-EXPORT at 80 %
    # An event the agent was running when it was killed; it ended meanwhile.
    start = datetime.now(UTC) - timedelta(minutes=10)
    event = parse_event(
        event_body("stale-1", start, [{"limit_pct": "40"}] * 2, interval_s=60),
        source="mqtt",
        signed_by="k",
    )
    data = tmp_path / "data"
    data.mkdir()
    persisted = {
        "version": 1,
        "seen": {"discom-test/stale-1": 0},
        "days": {},
        "active": {"stale-1": {
            "event": event.to_document(), "source": "mqtt", "signed_by": "k",
            "state": "active", "pack": "test-site@1",
            "plan": [{"device": "inverter", "kind": KIND_INVERTER, "unit": "pct",
                      "values": ["40", "40"]}],
            "prior": {"inverter": {"model": "123", "pct": "100", "enabled": "0",
                                   "revert_s": "0"}},
            "applied": {"inverter": "40"},
        }},
    }  # fmt: skip
    (data / "dispatch-state.json").write_text(json.dumps(persisted))
    inverter = SunSpecInverter(1)
    sunny(inverter)
    inverter.set_pct, inverter.limit_pct, inverter.revert_s = 40, 40, 0  # still limited
    with ServerThread([sim_device(1, inverter)]) as server:
        site = tmp_path / "site.toml"
        _write_site(
            site,
            server.port,
            '\n[dispatch]\ntrust_dir = "trust"\npolicies = ["site.pack.json"]\n'
            "\n[[dispatch.devices]]\n"
            f'id = "inverter"\nkind = "{KIND_INVERTER}"\ngroups = ["pv"]\n',
        )
        agent = subprocess.Popen(
            agent_cmd("run", "--config", str(site)),
            env=agent_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and inverter.limit_pct == 40:
            time.sleep(0.2)
        time.sleep(1)
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, out + err
    assert "dispatch started" in out + err and "test-site@1" in out + err
    # The device really got its pre-event state back, capped at the installer's 80 %.
    assert inverter.limit_pct == 80

    log = entries(data)
    assert not [e for e in log if e.get("ev") == "config_error"]
    recovered = [e for e in log if e.get("ev") == "dispatch_recovered"]
    assert recovered == [recovered[0]] and recovered[0]["action"] == "revert"
    (revert,) = [e for e in log if e.get("ev") == "dispatch_revert"]
    assert revert["ok"] is True and revert["reason"] == "ended_while_stopped"
    assert revert["restored"]["pct"] == "80"
    state = json.loads((data / "dispatch-state.json").read_text())
    assert state["active"] == {}
    assert log[-2]["ev"] == "shutdown" and log[-1]["ev"] == "checkpoint"
    assert run_agent("verify", str(data)).returncode == 0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('\n[dispatch]\ntrust = "x"\n', "dispatch.trust: unknown key (did you mean"),
        (
            '\n[dispatch]\ntrust_dir = "nowhere"\n',
            "dispatch.trust_dir: ",
        ),
        (
            '\n[dispatch]\n[[dispatch.devices]]\nid = "cp-9"\n'
            f'kind = "{KIND_CHARGER}"\n',
            "dispatch.devices[0].id: 'cp-9': chargers need the [ocpp] table",
        ),
        (
            '\n[dispatch]\n[[dispatch.devices]]\nid = "meter"\n'
            f'kind = "{KIND_INVERTER}"\n',
            "only SunSpec inverters can be limited",
        ),
        (
            '\n[dispatch]\n[dispatch.mv]\nmethod = "high-9-of-3"\n',
            "dispatch.mv.method: baseline method 'high-9-of-3'",
        ),
        (
            '\n[dispatch]\n[dispatch.openadr]\nvtn_url = "ftp://x"\n',
            "dispatch.openadr.vtn_url: 'ftp://x' is not an http(s):// address",
        ),
    ],
)
def test_dispatch_table_problems_name_file_line_and_key(
    tmp_path: Path, extra: str, expected: str
) -> None:
    site = tmp_path / "site.toml"
    _write_site(
        site,
        502,
        '\n[[devices]]\nid = "meter"\nbus = "lan"\nunit = 2\n'
        'template = "eastron-sdm630"\n' + extra,
    )
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    text = str(caught.value)
    assert expected in text, text
    assert f"{site.name}:" in text  # file and line


def test_a_dispatch_table_reads_into_settings(tmp_path: Path) -> None:
    (tmp_path / "trust").mkdir()
    site = tmp_path / "site.toml"
    _write_site(
        site,
        502,
        '\n[dispatch]\ntrust_dir = "trust"\ncontact_timeout_s = 600\n'
        '[dispatch.mqtt]\ncommand = "dr"\n'
        '[dispatch.mv]\nmethod = "high-2-of-4"\nmeters = ["inverter"]\n'
        '[[dispatch.devices]]\nid = "inverter"\nkind = "sunspec-inverter"\n'
        'groups = ["pv"]\n',
    )
    config = load_site(site).dispatch
    assert config is not None and config.enabled
    assert config.trust_dir == tmp_path / "trust"
    assert config.contact_timeout_s == 600
    assert config.mqtt_command == "dr"
    assert config.mv.method == "high-2-of-4" and config.mv.meters == ("inverter",)
    assert [(d.device_id, d.kind, d.groups) for d in config.devices] == [
        ("inverter", KIND_INVERTER, ("pv",))
    ]


@pytest.mark.skipif(
    not mosquitto_available(),
    reason="needs Debian's mosquitto (apt-get install mosquitto)",
)
def test_run_takes_a_signed_event_over_mqtt_and_acks_on_its_channel(
    tmp_path: Path,
) -> None:
    issuer = issuer_keys(tmp_path / "trust")
    signed_pack(tmp_path / "site.pack.json", issuer.key)
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    inverter = SunSpecInverter(1)
    sunny(inverter)
    base = "ies/gw-dispatch"
    try:
        with ServerThread([sim_device(1, inverter)]) as server:
            site = tmp_path / "site.toml"
            _write_site(
                site,
                server.port,
                '\n[[upstreams]]\nname = "broker"\nkind = "mqtt"\n'
                f'url = "{broker.url}"\n'
                "backoff_max_s = 1\ntelemetry_s = 0\n"
                '\n[dispatch]\ntrust_dir = "trust"\npolicies = ["site.pack.json"]\n'
                f'\n[[dispatch.devices]]\nid = "inverter"\nkind = "{KIND_INVERTER}"\n',
            )
            acks = subprocess.Popen(
                ["mosquitto_sub", "-p", str(broker.port), "-q", "1", "-C", "4",
                 "-W", "40", "-t", f"{base}/dispatch/ack"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            agent = subprocess.Popen(
                agent_cmd("run", "--config", str(site)),
                env=agent_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            online = subprocess.run(
                ["mosquitto_sub", "-p", str(broker.port), "-C", "1", "-W", "20",
                 "-t", f"{base}/status"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert '"online"' in online.stdout, online
            start = datetime.now(UTC) + timedelta(seconds=2)
            body = event_body("mqtt-1", start, [{"limit_pct": "45"}] * 2, interval_s=2)
            (tmp_path / "event.json").write_bytes(signed_event(body, issuer.key))
            subprocess.run(
                ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t",
                 f"{base}/cmd/dispatch", "-f", str(tmp_path / "event.json")],
                check=True, timeout=10,
            )  # fmt: skip
            limited = False
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and acks.poll() is None:
                limited = limited or inverter.limit_pct == 45
                time.sleep(0.05)
            received, _ = acks.communicate(timeout=30)
            agent.send_signal(signal.SIGTERM)
            out, err = agent.communicate(timeout=30)
    finally:
        broker.stop()
    assert agent.returncode == 0, out + err
    assert limited  # the inverter really took the limit during the event
    messages = [json.loads(line) for line in received.splitlines()]
    assert [m["status"] for m in messages] == [
        "received",
        "accepted",
        "started",
        "ended",
    ]
    assert all(m["event"] == "mqtt-1" and m["gw"] == "gw-dispatch" for m in messages)
    log = entries(tmp_path / "data")
    delivered = [e for e in log if e.get("ev") == "dispatch_ack"]
    assert [e["delivered"] for e in delivered] == [True] * 4
    assert inverter.limit_pct == 80  # reverted to the installer's limit
