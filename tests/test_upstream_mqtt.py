"""MQTT upstream against a real Mosquitto: delivery, faults, TLS, credentials.

Every fault test ends the same way: the collector (a paho-mqtt subscriber with a
persistent session, ``peers.mosquitto.Collector``) holds every ``seq`` from 0 to the
last entry of the log, none missing, and what it holds verifies with
``ies-agent verify`` against the gateway's key.

Brokers are Debian's ``/usr/sbin/mosquitto`` on free loopback ports, stopped,
paused and killed by their process ids (``peers.mosquitto.Mosquitto``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conftest import ROOT
from ies_agent.cli import main as cli
from ies_agent.evidence.log import EvidenceLog
from ies_agent.state import AgentState
from ies_agent.upstream.manager import Upstreams
from ies_agent.upstream.settings import UpstreamConfig
from peers.mosquitto import (
    BlackHole,
    BrokerTls,
    Collector,
    Mosquitto,
    TestPki,
    mosquitto_available,
)
from upstream_fixtures import GATEWAY, StepClock, log_lines, reading

pytestmark = pytest.mark.skipif(
    not mosquitto_available(),
    reason="needs Debian's mosquitto (apt-get install mosquitto)",
)


def mqtt_config(url: str, **extra: object) -> UpstreamConfig:
    fields: dict[str, object] = {
        "backoff_max_s": 0.5,
        "timeout_s": 3.0,
        "telemetry_s": 0.0,
        "batch_max_entries": 50,
        "keepalive_s": 5,
    }
    fields.update(extra)
    return UpstreamConfig(name="broker", kind="mqtt", url=url, **fields)  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Site:
    """A log written in this process with its upstream connectors running."""

    def __init__(self, data: Path, configs: list[UpstreamConfig]) -> None:
        self.data = data
        self.clock = StepClock()
        self.log = EvidenceLog.open(data, gateway_id=GATEWAY, clock=self.clock)
        self.state = AgentState(GATEWAY)
        self.upstreams = Upstreams(
            configs,
            data_dir=data,
            gateway_id=GATEWAY,
            origin=self.log.origin,
            state=self.state,
            evidence=self.log,
        )
        self.upstreams.start()

    @property
    def broker(self):  # type: ignore[no-untyped-def]
        return self.state.upstreams["broker"]

    def append(self, n: int, *, checkpoint_every: int = 40) -> None:
        for _ in range(n):
            value = 1000 + self.log.size
            self.log.append_reading(
                reading(self.clock, "m1", "1-0:1.8.0*255", str(value), "kWh")
            )
            if self.log.size % checkpoint_every == 0:
                self.log.checkpoint()

    async def finish(self, wait_s: float = 15.0) -> bool:
        self.log.close()
        return await self.upstreams.finish(wait_s)


def assert_complete_and_verifies(collector: Collector, data: Path, tmp: Path) -> None:
    total = len(log_lines(data))
    assert collector.wait_for(total, 15.0), (
        f"missing {collector.missing(total - 1)[:10]}"
    )
    assert collector.missing(total - 1) == []
    out = tmp / "received"
    collector.write_dir(out)
    key = data / "keys" / "log.vkey"
    assert cli(["verify", str(out), "--key", str(key)]) == 0


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    peer = Mosquitto(tmp_path / "broker")
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def collector(broker: Mosquitto) -> AsyncIterator[Collector]:
    peer = Collector(broker.port, gateway_id=GATEWAY)
    peer.start()
    yield peer
    peer.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_every_entry_arrives_in_order_with_status_and_commands(
    tmp_path: Path, broker: Mosquitto, collector: Collector, protocol: str
) -> None:
    site = Site(tmp_path / "data", [mqtt_config(broker.url, protocol=protocol)])
    site.append(300)
    await until(lambda: site.broker.acked >= 299, 10, "delivery")
    assert site.broker.connected and site.broker.backlog_entries == 0

    # A command arrives on the command topic and is recorded as evidence.
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-p",
        str(broker.port),
        "-q",
        "1",
        "-t",
        f"ies/{GATEWAY}/cmd/curtail",
        "-m",
        '{"limit_w": 2000}',
    )
    assert await asyncio.wait_for(pub.wait(), 10) == 0
    await until(
        lambda: b"command_received" in (site.data / "evidence.jsonl").read_bytes(),
        10,
        "command event",
    )
    assert await site.finish()
    assert_complete_and_verifies(collector, site.data, tmp_path)
    events = [json.loads(x) for x in log_lines(site.data)]
    command = next(e for e in events if e.get("ev") == "command_received")
    assert command["name"] == "curtail" and command["bytes"] == len(
        b'{"limit_w": 2000}'
    )
    await until(
        lambda: bool(collector.status) and collector.status[-1]["state"] == "offline",
        5,
        "offline status",
    )
    states = [s["state"] for s in collector.status]
    assert states[0] == "online" and states[-1] == "offline"
    assert collector.status[-1]["reason"] == "shutdown"
    # Times as in evidence (UTC ISO 8601 text); every status says the cursor.
    for status in collector.status:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(status["t"]))
    assert collector.status[0]["acked"] == -1
    assert collector.status[-1]["acked"] == len(events) - 1
    cursor = json.loads((site.data / "upstream" / "broker.cursor.json").read_text())
    assert cursor["acked"] == len(events) - 1


async def test_fc13_publish_while_broker_hangs_does_not_advance_the_cursor(
    tmp_path: Path, broker: Mosquitto, collector: Collector
) -> None:
    site = Site(tmp_path / "data", [mqtt_config(broker.url, timeout_s=1.5)])
    site.append(20)
    await until(lambda: site.broker.acked >= 19, 10, "first delivery")
    acked = site.broker.acked

    # The broker stops answering; TCP stays up, so paho's publish() returns rc 0.
    broker.pause()
    site.append(60)
    await asyncio.sleep(2.5)
    assert site.broker.acked == acked  # no PUBACK, no progress
    assert "PUBACK" in (site.broker.last_error or "") or not site.broker.connected
    cursor = json.loads((site.data / "upstream" / "broker.cursor.json").read_text())
    assert cursor["acked"] <= acked

    # It dies and comes back with its data: everything arrives.
    broker.kill()
    broker.restart()
    assert await site.finish(20)
    assert_complete_and_verifies(collector, site.data, tmp_path)


async def test_broker_stopped_and_restarted_with_persistence_mid_publish(
    tmp_path: Path, broker: Mosquitto, collector: Collector
) -> None:
    site = Site(tmp_path / "data", [mqtt_config(broker.url)])

    async def writer() -> None:
        for _ in range(40):
            site.append(25)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.6)
    broker.stop()  # SIGTERM while messages are in flight; it saves its store
    await asyncio.sleep(1.0)
    broker.restart()
    await task
    assert await site.finish(20)
    assert_complete_and_verifies(collector, site.data, tmp_path)


async def test_broker_without_persistence_loses_acked_messages_e2e_resends(
    tmp_path: Path, broker: Mosquitto
) -> None:
    collector = Collector(broker.port, gateway_id=GATEWAY, confirm=True)
    collector.start()
    site = Site(
        tmp_path / "data",
        [mqtt_config(broker.url, e2e_ack=True, e2e_timeout_s=1.5)],
    )
    try:
        site.append(100)
        await until(lambda: site.broker.confirmed >= 99, 10, "confirmations")

        # The collector goes away; the broker queues for its session and PUBACKs...
        collector.stop()
        site.append(200)
        await until(lambda: site.broker.acked >= 299, 10, "broker acks")
        assert site.broker.confirmed < site.broker.acked
        # ...then the broker dies without persistence: those messages are gone.
        broker.kill()
        broker.restart(persistence=False)
        collector.start()  # the same collector, with what it stored, comes back
        site.append(50)
        assert await site.finish(25)
        assert site.broker.confirmed == len(log_lines(site.data)) - 1
        assert_complete_and_verifies(collector, site.data, tmp_path)
    finally:
        collector.stop()


async def test_agent_killed_with_sigkill_in_flight_loses_nothing(
    tmp_path: Path, broker: Mosquitto
) -> None:
    collector = Collector(broker.port, gateway_id="gw-kill")
    collector.start()
    data = tmp_path / "data"
    script = ROOT / "tests" / "peers" / "upstream_agent.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("agent", "drivers")),
    }
    rng = random.Random(4)
    try:
        args = [sys.executable, str(script), str(data), broker.url, "--until", "3000"]
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(
                *args, "--rate", "2000", stdout=subprocess.PIPE, env=env
            )
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"ready"
            await asyncio.sleep(rng.uniform(0.4, 0.9))
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
        final = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        out, err = await asyncio.wait_for(final.communicate(), 60)
        assert final.returncode == 0, out[-500:] + err[-2000:]
        events = [json.loads(x) for x in log_lines(data)]
        assert sum(e.get("ev") == "boot" for e in events) == 4
        assert_complete_and_verifies(collector, data, tmp_path)
    finally:
        collector.stop()


async def test_long_outage_replays_a_large_backlog_in_order(
    tmp_path: Path, broker: Mosquitto, collector: Collector
) -> None:
    broker.stop()
    site = Site(tmp_path / "data", [mqtt_config(broker.url, batch_max_entries=500)])
    site.append(20_000, checkpoint_every=1000)
    await asyncio.sleep(0.3)
    assert site.broker.acked == -1
    assert (
        site.broker.backlog_entries > 19_000 and site.broker.backlog_bytes > 2_000_000
    )
    broker.restart()
    assert await site.finish(60)
    assert_complete_and_verifies(collector, site.data, tmp_path)
    assert collector.duplicates == 0


# --- TLS and credentials --------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


async def test_tls_with_client_certificate_delivers(
    tmp_path: Path, pki: TestPki
) -> None:
    broker = Mosquitto(
        tmp_path / "broker", tls=BrokerTls(pki.ca, pki.server_cert, pki.server_key)
    )
    broker.start()
    try:
        config = mqtt_config(
            broker.url,
            tls_ca_file=pki.ca,
            tls_cert_file=pki.client_cert,
            tls_key_file=pki.client_key,
        )
        site = Site(tmp_path / "data", [config])
        site.append(50)
        assert await site.finish(15)
        assert site.broker.acked == len(log_lines(site.data)) - 1
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("server", "explained"),
    [
        ("expired", "expired"),
        ("foreign", "not signed by the configured CA"),
    ],
)
async def test_bad_server_certificate_is_a_clear_error_never_plaintext(
    tmp_path: Path, pki: TestPki, server: str, explained: str
) -> None:
    cert, key = (
        (pki.expired_cert, pki.expired_key)
        if server == "expired"
        else (pki.foreign_cert, pki.foreign_key)
    )
    broker = Mosquitto(
        tmp_path / "broker", tls=BrokerTls(pki.ca, cert, key, require_certificate=False)
    )
    broker.start()
    try:
        site = Site(tmp_path / "data", [mqtt_config(broker.url, tls_ca_file=pki.ca)])
        site.append(10)
        await until(lambda: site.broker.last_error is not None, 10, "TLS error")
        error = site.broker.last_error or ""
        assert explained in error and "without TLS" in error
        assert site.broker.acked == -1 and not site.broker.connected
        assert not await site.finish(1.0)
    finally:
        broker.stop()


async def test_plain_url_to_a_tls_port_and_missing_client_key_fail_clearly(
    tmp_path: Path, pki: TestPki
) -> None:
    broker = Mosquitto(
        tmp_path / "broker", tls=BrokerTls(pki.ca, pki.server_cert, pki.server_key)
    )
    broker.start()
    try:
        plain = mqtt_config(broker.url.replace("mqtts://", "mqtt://"))
        missing = dataclasses.replace(
            mqtt_config(broker.url),
            name="other",
            tls_ca_file=pki.ca,
            tls_cert_file=pki.client_cert,
            tls_key_file=tmp_path / "absent.key",
        )
        site = Site(tmp_path / "data", [plain])
        other = site.state.upstreams
        site.append(10)
        await until(lambda: site.broker.last_error is not None, 10, "error")
        assert site.broker.acked == -1
        assert not await site.finish(0.5)
        site2 = Site(tmp_path / "data2", [missing])
        await until(
            lambda: site2.state.upstreams["other"].last_error is not None, 10, "error"
        )
        assert "cannot load the client certificate" in (
            site2.state.upstreams["other"].last_error or ""
        )
        assert not await site2.finish(0.5)
        del other
    finally:
        broker.stop()


async def test_tls_url_to_a_plain_port_says_the_server_spoke_no_tls(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ies_agent.upstream")
    tls_url = broker.url.replace("mqtt://", "mqtts://")
    site = Site(tmp_path / "data", [mqtt_config(tls_url, backoff_max_s=0.2)])
    site.append(5)
    await until(lambda: site.broker.last_error is not None, 10, "error")
    error = site.broker.last_error or ""
    assert "the server did not speak TLS: is this a plain MQTT port?" in error
    assert "without TLS" in error and site.broker.acked == -1
    await asyncio.sleep(1.0)  # several attempts, one outage line (at ERROR)
    assert not await site.finish(0.3)
    outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outages) == 1 and outages[0].levelno == logging.ERROR


@pytest.mark.parametrize("silent", [False, True], ids=["unroutable", "silent"])
async def test_a_host_that_never_answers_times_out_with_one_outage_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, silent: bool
) -> None:
    """No SYN-ACK (an unroutable host) or no CONNACK (a server that never answers):
    either way the attempt ends after ``timeout_s`` with one outage line."""
    caplog.set_level(logging.INFO, logger="ies_agent.upstream")
    hole = BlackHole(silent=silent)
    try:
        url = f"mqtt://127.0.0.1:{hole.port}"
        site = Site(
            tmp_path / "data", [mqtt_config(url, timeout_s=0.5, backoff_max_s=0.2)]
        )
        site.append(5)
        started = time.monotonic()
        await until(lambda: site.broker.last_error is not None, 5, "the timeout")
        assert time.monotonic() - started < 2.0
        error = site.broker.last_error or ""
        assert "no answer from broker" in error and "within 0.5 s" in error
        await asyncio.sleep(1.0)  # more attempts time out: still one line
        assert not await site.finish(0.3)
        outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(outages) == 1 and outages[0].levelno == logging.WARNING
        assert site.broker.backlog_entries == len(log_lines(site.data))
    finally:
        hole.close()


async def test_username_and_password_file(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    passwords = tmp_path / "broker" / "passwd"
    passwd = await asyncio.create_subprocess_exec(
        "mosquitto_passwd", "-b", "-c", str(passwords), "gw", "s3cret"
    )
    assert await passwd.wait() == 0
    config_extra = f"allow_anonymous false\npassword_file {passwords}\n"
    original = broker._config

    def config() -> Path:
        path = original()
        text = path.read_text().replace("allow_anonymous true\n", "")
        path.write_text(text + config_extra)
        return path

    broker._config = config  # type: ignore[method-assign]
    broker.start()
    try:
        wrong = tmp_path / "wrong.pass"
        wrong.write_text("nope\n")
        right = tmp_path / "right.pass"
        right.write_text("s3cret\n")
        bad = Site(
            tmp_path / "bad",
            [mqtt_config(broker.url, username="gw", password_file=wrong)],
        )
        bad.append(5)
        await until(lambda: bad.broker.last_error is not None, 10, "auth error")
        assert "refused" in (bad.broker.last_error or "")
        assert "s3cret" not in (bad.broker.last_error or "")
        assert not await bad.finish(0.5)
        good = Site(
            tmp_path / "good",
            [mqtt_config(broker.url, username="gw", password_file=right)],
        )
        good.append(5)
        assert await good.finish(10)
    finally:
        broker.stop()
