"""A Beckn DemandFlexNeed reaches the running agent over MQTT and is answered.

Real peers: Debian's Mosquitto (``peers.mosquitto``), the demo's SunSpec inverter on
a real pymodbus TCP server, and the real ``ies-agent run`` as a child process with an
MQTT upstream and ``[dispatch.beckn]``. The issuer side is the ``mosquitto_pub`` /
``mosquitto_sub`` clients; its messages are signed the Beckn way (BECKN-006).

One run takes, in order: a need signed by another key under the pinned key id (wrong
signature), one under a key id not pinned, one whose signature expired, and a
correctly signed need. The first three are refused with their reason (evidence log
and agent log, and a ``rejected`` notice on the ack topic); the last one limits the
inverter (model 123 read back at 45 %) and is answered with a signed
``on_confirm`` commitment on ``{prefix}/{gw}/dispatch/ack``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cli_helpers import agent_cmd, agent_env, entries
from dispatch_fixtures import iso, issuer_keys, signed_pack, sunny
from ies_agent.demo.simulator import SunSpecInverter, sim_device
from ies_agent.upstream.beckn import BecknSigner, verify_authorization
from peers.mosquitto import Mosquitto, mosquitto_available
from test_cli_read import ServerThread

pytestmark = pytest.mark.skipif(
    not mosquitto_available(),
    reason="needs Debian's mosquitto (apt-get install mosquitto)",
)

BASE = "ies/gw-beckn"
ISSUER = "discom.example"


def _pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def need_body(need_id: str, start: datetime) -> str:
    """A Beckn ``confirm`` with a 45 % limit on the inverter, two 2 s intervals."""
    message = {
        "context": {"action": "confirm", "bap_id": ISSUER,
                    "transaction_id": f"t-{need_id}", "message_id": f"m-{need_id}"},
        "message": {"order": {"demandFlexNeed": {
            "id": need_id,
            "intervalPeriod": {"start": iso(start), "duration": "PT2S"},
            "payloadDescriptors": [{"payloadType": "LIMIT_PCT", "units": "PCT"},
                                   {"payloadType": "PRICE", "currency": "INR"}],
            "intervals": [{"id": i, "payloads": [
                {"type": "LIMIT_PCT", "values": ["45"]},
                {"type": "PRICE", "values": ["6.00"]}]} for i in range(2)],
            "targets": ["inverter"],
        }}},
    }  # fmt: skip
    return json.dumps(message)


def wrapped(
    body: str, key: Ed25519PrivateKey, key_id: str, created: int, expires: int
) -> bytes:
    """The ``cmd/beckn`` payload: the Authorization header and the exact body."""
    header = BecknSigner(ISSUER, key_id, key).authorization(
        body.encode(), created=created, expires=expires
    )
    return json.dumps({"authorization": header, "body": body}).encode()


def _site(path: Path, port: int, broker_url: str, gw_key: Path) -> None:
    path.write_text(
        f"""
[gateway]
id = "gw-beckn"
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

[[upstreams]]
name = "broker"
kind = "mqtt"
url = "{broker_url}"
backoff_max_s = 1
telemetry_s = 0

[[upstreams]]                # the gateway's Beckn identity; not sending here
name = "ies"
kind = "ies-https"
enabled = false
url = "https://127.0.0.1:9/beckn"
mode = "direct"
subscriber_id = "gw-beckn.example"
key_id = "gwk1"
signing_key_file = "{gw_key.name}"

[dispatch]
trust_dir = "trust"
policies = ["site.pack.json"]

[dispatch.beckn]
key_lookup = "pinned"

[[dispatch.devices]]
id = "inverter"
kind = "sunspec-inverter"
groups = ["pv"]
"""
    )


def _publish(port: int, payload: bytes, path: Path) -> None:
    path.write_bytes(payload)
    subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-q", "1", "-t", f"{BASE}/cmd/beckn",
         "-f", str(path)],
        check=True, timeout=10,
    )  # fmt: skip


def test_a_signed_need_is_executed_and_answered_and_bad_ones_are_refused(
    tmp_path: Path,
) -> None:
    # Keys: the pack signer, the pinned Beckn issuer key, strangers, the gateway.
    pack_signer = issuer_keys(tmp_path / "trust", "pack-signer")
    signed_pack(tmp_path / "site.pack.json", pack_signer.key)  # INST-EXPORT 80 %
    beckn_key = Ed25519PrivateKey.generate()
    (tmp_path / "trust" / f"{ISSUER}.k1.pem").write_bytes(_pem(beckn_key.public_key()))
    stranger = Ed25519PrivateKey.generate()
    gw_key = Ed25519PrivateKey.generate()
    gw_key_file = tmp_path / "gw-beckn.key.pem"
    gw_key_file.write_bytes(
        gw_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    gw_key_file.chmod(0o600)

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    inverter = SunSpecInverter(1)
    sunny(inverter)
    try:
        with ServerThread([sim_device(1, inverter)]) as server:
            site = tmp_path / "site.toml"
            _site(site, server.port, broker.url, gw_key_file)
            acks = subprocess.Popen(
                ["mosquitto_sub", "-p", str(broker.port), "-q", "1", "-C", "8",
                 "-W", "40", "-t", f"{BASE}/dispatch/ack"],
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
                 "-t", f"{BASE}/status"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert '"online"' in online.stdout, online

            # Three needs that must not pass, then the good one.
            now = int(time.time())
            start = datetime.fromtimestamp(now, UTC) + timedelta(seconds=3)
            body = need_body("dfn-bad", start)
            out_file = tmp_path / "msg.json"
            for payload in (
                wrapped(body, stranger, "k1", now - 5, now + 300),  # wrong signature
                wrapped(body, stranger, "k9", now - 5, now + 300),  # key not pinned
                wrapped(body, beckn_key, "k1", now - 400, now - 100),  # expired
                wrapped(need_body("dfn-1", start), beckn_key, "k1", now - 5, now + 300),
            ):
                _publish(broker.port, payload, out_file)

            limited = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and acks.poll() is None:
                limited = limited or inverter.limit_pct == 45
                time.sleep(0.05)
            received, _ = acks.communicate(timeout=30)
            agent.send_signal(signal.SIGTERM)
            out, err = agent.communicate(timeout=30)
    finally:
        broker.stop()
    assert agent.returncode == 0, out + err
    messages = [json.loads(line) for line in received.splitlines()]

    # The refusals: on the ack topic, in the agent's log and in the evidence log.
    refused = [m for m in messages if "event" not in m]
    assert [m["status"] for m in refused] == ["rejected"] * 3, messages
    reasons = [str(m["reason"]) for m in refused]
    assert "does not verify" in reasons[0]
    assert "no key registered for discom.example|k9" in reasons[1]
    assert "expired" in reasons[2]
    assert (
        out.count("dispatch message refused") + err.count("dispatch message refused")
        == 3
    )
    log = entries(tmp_path / "data")
    recorded = [
        e for e in log if e.get("ev") == "dispatch_received" and e.get("source")
    ]
    refusals = [e for e in recorded if e.get("accepted") is False]
    assert [e["reason"] for e in refusals] == ["auth"] * 3
    assert [e["error"].split(": ", 1)[0] for e in refusals] == ["Beckn signature"] * 3
    assert not [e for e in log if e.get("ev") == "config_error"]

    # The good need: acknowledged on its channel, executed, answered and signed.
    mine = [m for m in messages if m.get("event") == "dfn-1"]
    assert [m["status"] for m in mine] == [
        "received", "accepted", "on_confirm", "started", "ended",
    ]  # fmt: skip
    assert all(m["channel"] == "beckn" and m["gw"] == "gw-beckn" for m in mine)
    answer = next(m for m in mine if m["status"] == "on_confirm")
    gw_public = gw_key.public_key()
    params = verify_authorization(
        answer["authorization"],
        answer["body"].encode(),
        lambda sub, kid: gw_public if (sub, kid) == ("gw-beckn.example", "gwk1")
        else None,
        now=time.time(),
    )  # fmt: skip
    assert params.subscriber_id == "gw-beckn.example"
    reply: dict[str, Any] = json.loads(answer["body"])
    assert reply["context"]["action"] == "on_confirm"
    assert reply["context"]["message_id"] == "m-dfn-1"
    assert reply["context"]["bpp_id"] == "gw-beckn.example"
    committed = reply["message"]["order"]["demandFlexCommitment"]
    assert committed["needId"] == "dfn-1" and committed["status"] == "ACCEPTED"
    assert committed["intervalPeriod"] == {
        "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration": "PT2S",
    }
    assert len(committed["intervals"]) == 2  # the need's own grid

    # The inverter really took the limit: model 123 read back, then reverted.
    assert limited
    (readback,) = [
        e for e in log if e.get("ev") == "dispatch_readback" and e["event"] == "dfn-1"
    ]
    assert readback["ok"] is True
    assert readback["observed"]["model"] == "123"
    assert readback["observed"]["pct"] == "45"
    assert readback["observed"]["enabled"] == "1"
    assert inverter.limit_pct == 80  # back to the installer's limit
    answered = [
        e for e in log if e.get("ev") == "dispatch_ack" and e["status"] == "on_confirm"
    ]
    assert [(e["accepted"], e["signed"], e["delivered"]) for e in answered] == [
        (True, True, True)
    ]


class AckCollector:
    """Stands in for an MQTT transport in the in-process test below (the broker path
    is the test above): keeps what ``publish_dispatch_ack`` was given."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def publish_dispatch_ack(self, body: dict[str, Any]) -> bool:
        self.sent.append(dict(body))
        return True


async def test_without_a_gateway_key_answers_go_unsigned_and_replays_are_refused(
    tmp_path: Path,
) -> None:
    from dispatch_fixtures import events, live_inverter, until
    from ies_agent.dispatch.auth import load_trust
    from ies_agent.dispatch.beckn_route import UNSIGNED_NOTE, BecknRoute
    from ies_agent.dispatch.engine import DispatchEngine
    from ies_agent.dispatch.executor import SunSpecLimit
    from ies_agent.dispatch.planner import KIND_INVERTER, DispatchDevice
    from ies_agent.dispatch.policy import load_pack
    from ies_agent.evidence.log import EvidenceLog

    pack_signer = issuer_keys(tmp_path / "trust", "pack-signer")
    beckn_key = Ed25519PrivateKey.generate()
    (tmp_path / "trust" / f"{ISSUER}.k1.pem").write_bytes(_pem(beckn_key.public_key()))
    trust = load_trust([tmp_path / "trust"])
    data_dir = tmp_path / "data"
    evidence = EvidenceLog.open(data_dir, gateway_id="gw-beckn")
    pack = load_pack(signed_pack(tmp_path / "pack.json", pack_signer.key), trust)
    collector = AckCollector()
    async with live_inverter() as (inverter, bus):
        engine = DispatchEngine(
            evidence=evidence,
            evidence_path=data_dir / "evidence.jsonl",
            data_dir=data_dir,
            trust=trust,
            packs=[pack],
            devices=[DispatchDevice("inverter", KIND_INVERTER)],
            actuators={"inverter": SunSpecLimit("inverter", bus, 1)},
        )
        route = BecknRoute(engine, transports=[collector], gateway_id="gw-beckn")
        route.register()
        await engine.start()
        now = int(time.time())
        start = datetime.fromtimestamp(now, UTC) + timedelta(seconds=2)
        need = wrapped(need_body("dfn-2", start), beckn_key, "k1", now - 5, now + 60)
        await route.handle("beckn", b'{"body": "{}"}')  # no Authorization
        await route.handle("beckn", need)
        await route.handle("beckn", need)  # the same message again
        await until(lambda: inverter.limit_pct == 45, timeout_s=5)
        await engine.close(revert=True)
    evidence.close()

    sent = collector.sent
    assert (
        sent[0]["status"] == "rejected" and "lacks authorization" in sent[0]["reason"]
    )
    answers = [m for m in sent if m["status"] == "on_confirm"]
    assert len(answers) == 2
    for answer in answers:
        assert answer["authorization"] is None and answer["note"] == UNSIGNED_NOTE
    first, again = (
        json.loads(a["body"])["message"]["order"]["demandFlexCommitment"]
        for a in answers
    )
    assert first["status"] == "ACCEPTED" and again["status"] == "REJECTED"
    assert again["reason"].startswith("replayed: event dfn-2 modification 0")
    assert json.loads(answers[0]["body"])["context"]["bpp_id"] == "gw-beckn"
    refused = [e for e in events(data_dir, "dispatch_received") if "error" in e]
    assert [(e["reason"], e["source"]) for e in refused] == [("format", "beckn")]
    acks = events(data_dir, "dispatch_ack")
    assert [
        (e["status"], e.get("signed")) for e in acks if e["status"] == "on_confirm"
    ] == [
        ("on_confirm", False),
        ("on_confirm", False),
    ]


def test_the_beckn_table_turns_the_route_on(tmp_path: Path) -> None:
    from ies_agent.config import load_site

    (tmp_path / "trust").mkdir()
    (tmp_path / "site.pack.json").write_text("{}")  # read at start, not here
    site = tmp_path / "site.toml"
    _site(site, 502, "mqtt://127.0.0.1:1883", tmp_path / "gw.key")
    config = load_site(site).dispatch
    assert config is not None and config.beckn_command == "beckn"
    site.write_text(
        site.read_text().replace(
            'key_lookup = "pinned"\n', 'key_lookup = "pinned"\ncommand = "flex"\n'
        )
    )
    config = load_site(site).dispatch
    assert config is not None and config.beckn_command == "flex"
    text = (
        site.read_text()
        .replace("[dispatch.beckn]\n", "")
        .replace('key_lookup = "pinned"\ncommand = "flex"\n', "")
    )
    site.write_text(text)
    config = load_site(site).dispatch
    assert config is not None and config.beckn_command is None
