"""Delivery machinery without a network: cursors, the log reader, the batch message,
back-off, the file upstream end to end, and the disk guard.

Real files and a real ``EvidenceLog`` in temporary directories; the file upstream is
a real directory (a "USB stick" that appears and disappears). No mocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import free_port
from ies_agent.cli import main as cli
from ies_agent.config import ConfigError, load_site
from ies_agent.evidence.log import EvidenceLog
from ies_agent.state import AgentState
from ies_agent.upstream.cursor import Cursor, CursorStore
from ies_agent.upstream.delivery import Backoff
from ies_agent.upstream.diskguard import DiskGuard
from ies_agent.upstream.filesink import collect
from ies_agent.upstream.manager import Upstreams
from ies_agent.upstream.payload import (
    PayloadError,
    decode_batch,
    decode_confirmation,
    encode_batch,
    encode_confirmation,
)
from ies_agent.upstream.reader import LogReader, LogReadError
from ies_agent.upstream.settings import StorageConfig, UpstreamConfig
from upstream_fixtures import GATEWAY, StepClock, log_lines, reading, write_site_log


def file_upstream(path: Path, **extra: object) -> UpstreamConfig:
    return UpstreamConfig(
        name="stick",
        kind="file",
        path=path,
        backoff_max_s=0.2,
        **extra,  # type: ignore[arg-type]
    )


# --- cursor ---------------------------------------------------------------------------


def test_cursor_round_trip_damage_and_other_log(tmp_path: Path) -> None:
    store = CursorStore(tmp_path, "broker")
    assert store.load("log-a") == Cursor("broker", log="log-a")
    store.save(Cursor("broker", log="log-a", acked=41, confirmed=30, checkpoints=3))
    assert store.load("log-a").acked == 41
    assert not list(store.path.parent.glob("*.tmp"))
    # A cursor of another log never applies.
    assert store.load("log-b").acked == -1
    # A damaged file restarts from the beginning (duplicates, never a gap).
    store.path.write_text('{"acked": "many"')
    assert store.load("log-a").acked == -1
    assert store.path.with_suffix(".bad").exists()


# --- reader and payload ---------------------------------------------------------------


def test_reader_finds_reads_and_checks_entries(tmp_path: Path) -> None:
    write_site_log(tmp_path, 40)
    lines = log_lines(tmp_path)
    reader = LogReader(tmp_path)
    assert reader.count() == len(lines)
    offset = reader.locate(100)
    assert offset == sum(len(line) + 1 for line in lines[:100])
    assert reader.locate(100, hint=offset) == offset
    assert LogReader(tmp_path).locate(100, hint=offset + 1) == offset  # bad hint
    chunk = reader.read(
        100, offset, upto=len(lines) - 1, max_entries=7, max_bytes=1 << 20
    )
    assert chunk.lines == lines[100:107] and chunk.last == 106
    small = reader.read(100, offset, upto=len(lines) - 1, max_entries=99, max_bytes=600)
    assert (
        1 <= len(small.lines) <= 3
        and small.lines == lines[100 : 100 + len(small.lines)]
    )
    tiny = reader.read(100, offset, upto=len(lines) - 1, max_entries=9, max_bytes=10)
    assert tiny.lines == [lines[100]]  # one entry always fits, however long
    assert reader.read(100, offset, upto=99, max_entries=9, max_bytes=999).lines == []
    assert reader.history(100, 3) == lines[97:100]
    with pytest.raises(LogReadError, match="expected entry 101"):
        reader.read(101, offset, upto=200, max_entries=2, max_bytes=9999)
    with pytest.raises(LogReadError, match="fewer"):
        reader.locate(len(lines) + 5)
    assert reader.checkpoint_count() == 41  # one per boundary, one at close
    sizes = [reader.checkpoint_size(i) for i in range(41)]
    assert reader.checkpoints_covering(sizes[3]) == 4
    assert reader.checkpoints_covering(sizes[3] - 1) == 3
    assert [s for s, _ in reader.checkpoints(2, 4)] == sizes[2:4]


def test_batch_message_carries_lines_byte_for_byte(tmp_path: Path) -> None:
    write_site_log(tmp_path, 2)
    lines = log_lines(tmp_path)
    cps = [(5, "note five\n— sig\n")]
    payload = encode_batch(
        gw="g", origin="o", first=3, lines=lines[3:9], checkpoints=cps
    )
    batch = decode_batch(payload)
    assert batch.entries == tuple(lines[3:9]) and batch.last == 8
    assert batch.checkpoints == ((5, "note five\n— sig\n"),)
    assert json.loads(payload)["kind"] == "evidence"
    empty = decode_batch(
        encode_batch(gw="g", origin="o", first=9, lines=[], checkpoints=cps)
    )
    assert empty.entries == () and empty.last == 8
    data = json.loads(payload)
    bad = [
        b"not json",
        json.dumps({**data, "kind": "x"}).encode(),
        json.dumps({**data, "first": 4}).encode(),
        json.dumps({**data, "last": 99}).encode(),
        json.dumps({**data, "checkpoints": [{"size": "5"}]}).encode(),
        json.dumps(
            {
                **data,
                "entries": [{**data["entries"][0], "x": 1.5}, *data["entries"][1:]],
            }
        ).encode(),
    ]
    for item in bad:
        with pytest.raises(PayloadError):
            decode_batch(item)
    assert decode_confirmation(encode_confirmation(41)) == 41
    for item in (b"[]", b'{"upto": "41"}', b'{"upto": true}', b"{"):
        with pytest.raises(PayloadError):
            decode_confirmation(item)


def test_batch_entries_are_the_lines_and_re_encode_to_their_bytes(
    tmp_path: Path,
) -> None:
    """What the README promises a collector: each entry is the log line spliced into
    the message, and re-encoding the parsed object (sorted keys, no spaces, UTF-8 as
    is) gives back the exact line bytes, also for text that JSON escapes."""
    clock = StepClock()
    log = EvidenceLog.open(tmp_path, gateway_id=GATEWAY, clock=clock)
    awkward = 'tab\there "quoted" back\\slash\nnewline \x01 é € \u2028 😀'
    log.append_event("config_change", {"note": awkward, "n": 2**53 - 1})
    log.append_reading(reading(clock, "m\u00e9", "1-0:1.8.0*255", "-0.0010", "kWh"))
    log.close()
    lines = log_lines(tmp_path)
    payload = encode_batch(gw="g", origin="o", first=0, lines=lines, checkpoints=[])
    entries = json.loads(payload)["entries"]
    for line, entry in zip(lines, entries, strict=True):
        assert line in payload  # spliced in verbatim
        again = json.dumps(
            entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        assert again == line
    assert b"\\u2028" not in lines[1] and "\u2028".encode() in lines[1]


async def test_backlog_counts_every_durable_entry_while_the_upstream_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An MQTT upstream to a port where nothing listens: the backlog follows the
    durable log as it grows (not the count of the first failure), in entries and
    bytes, and the shutdown line says how much was left."""
    data = tmp_path / "data"
    clock = StepClock()
    log = EvidenceLog.open(data, gateway_id=GATEWAY, clock=clock, fsync_interval_s=3600)
    state = AgentState(GATEWAY)
    config = UpstreamConfig(
        name="broker",
        kind="mqtt",
        url=f"mqtt://127.0.0.1:{free_port()}",
        backoff_max_s=5.0,
        timeout_s=1.0,
        telemetry_s=0.0,
    )
    upstreams = Upstreams(
        [config],
        data_dir=data,
        gateway_id=GATEWAY,
        origin=log.origin,
        state=state,
        evidence=log,
    )
    caplog.set_level(logging.INFO, logger="ies_agent.upstream")
    upstreams.start()
    broker = state.upstreams["broker"]
    await until(lambda: broker.last_error is not None, 5.0, "the first failure")

    path = data / "evidence.jsonl"
    for _ in range(3):
        for k in range(40):
            log.append_reading(reading(clock, "m", "1-0:1.8.0*255", str(k), "kWh"))
        log.checkpoint()  # makes everything so far durable
        durable = log.durable_seq + 1
        await until(
            lambda d=durable: broker.backlog_entries == d,  # type: ignore[misc]
            3.0,
            f"a backlog of {durable}",
        )
        assert broker.backlog_bytes == path.stat().st_size
        assert not broker.connected and broker.acked == -1
    # Entries not yet fsynced are not counted as backlog.
    for k in range(5):
        log.append_reading(reading(clock, "m", "1-0:1.8.0*255", str(k), "kWh"))
    await asyncio.sleep(1.2)
    assert broker.backlog_entries == log.durable_seq + 1 < log.size

    log.close()
    assert not await upstreams.finish(0.5)
    assert broker.backlog_entries == log.size == len(log_lines(data))
    assert broker.backlog_bytes == path.stat().st_size
    shutdown = [r for r in caplog.records if "at shutdown" in r.getMessage()]
    assert f"backlog={log.size}" in shutdown[0].kv["broker"]  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- upstream urls --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "url", "message"),
    [
        ("mqtt", "mqtt://gwuser:s3cret@broker.example/path?x=1", "password_file"),
        ("mqtt", "mqtts://gwuser@broker.example:8883", "user name or password"),
        ("mqtt", "mqtt://broker.example:1883/ies", "a path ('/ies')"),
        ("mqtt", "mqtt://broker.example?x=1", "a query ('?x=1')"),
        ("mqtt", "mqtt://broker.example:1883/#frag", "a fragment ('#frag')"),
        ("ies-https", "https://gwuser:s3cret@ies.example/beckn", "tls_cert_file"),
        ("ies-https", "https://ies.example/beckn?token=1", "a query"),
        ("ies-https", "http://gwuser:s3cret@ies.example", "user name or password"),
    ],
)
def test_upstream_urls_with_extra_parts_or_secrets_are_refused(
    tmp_path: Path, kind: str, url: str, message: str
) -> None:
    """A url part the agent would ignore is a config error, not a silent no-op, and
    credentials in a url are refused without being repeated in the message."""
    site = tmp_path / "site.toml"
    site.write_text(
        f'[gateway]\nid = "gw-1"\n\n[[upstreams]]\nname = "u"\nkind = "{kind}"\n'
        f'url = "{url}"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    problems = [p for p in caught.value.problems if p.key.endswith("url")]
    assert len(problems) == 1 and message in problems[0].message, problems
    assert "s3cret" not in problems[0].message and "gwuser" not in problems[0].message
    assert problems[0].line == 7


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("mqtt", "mqtts://broker.example:8883"),
        ("mqtt", "mqtt://127.0.0.1/"),
        ("ies-https", "https://ies.example/beckn/v2"),
        ("ies-https", "http://127.0.0.1:8080"),
    ],
)
def test_plain_upstream_urls_load(tmp_path: Path, kind: str, url: str) -> None:
    site = tmp_path / "site.toml"
    site.write_text(
        f'[gateway]\nid = "gw-1"\n\n[[upstreams]]\nname = "u"\nkind = "{kind}"\n'
        f'url = "{url}"\n'
    )
    assert load_site(site).upstreams[0].url == url


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    draws: list[tuple[float, float]] = []

    def rng(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    backoff = Backoff(3.0, base_s=0.5, rng=rng)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(low == high / 2 for low, high in draws)
    backoff.reset()
    assert backoff.next_delay() == 0.5


# --- the file upstream, end to end ----------------------------------------------------


async def deliver(upstreams: Upstreams, timeout_s: float = 10.0) -> bool:
    upstreams.start()
    return await upstreams.finish(timeout_s)


async def test_file_upstream_delivers_every_entry_and_verifies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, stick = tmp_path / "data", tmp_path / "stick"
    write_site_log(data, 30)
    total = len(log_lines(data))
    state = AgentState(GATEWAY)
    config = file_upstream(stick, batch_max_entries=25)
    upstreams = Upstreams(
        [config], data_dir=data, gateway_id=GATEWAY, origin="o", state=state
    )
    caplog.set_level(logging.INFO, logger="ies_agent.upstream")

    # The stick is not there: an outage, logged once, nothing lost.
    upstreams.start()
    await asyncio.sleep(1.0)
    assert state.upstreams["stick"].acked == -1
    stick.mkdir()
    assert await upstreams.finish(10.0)
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert state.upstreams["stick"].acked == total - 1
    assert state.upstreams["stick"].backlog_entries == 0

    out = tmp_path / "received"
    assert collect(stick / GATEWAY, out) == (total, 31)
    assert (out / "evidence.jsonl").read_bytes() == (
        data / "evidence.jsonl"
    ).read_bytes()
    assert cli(["verify", str(out), "--key", str(data / "keys" / "log.vkey")]) == 0

    # A restart continues from the persisted cursor: nothing is written twice.
    before = sorted(p.name for p in (stick / GATEWAY).glob("batch-*"))
    again = Upstreams(
        [config], data_dir=data, gateway_id=GATEWAY, origin="o", state=state
    )
    assert await deliver(again)
    assert sorted(p.name for p in (stick / GATEWAY).glob("batch-*")) == before


async def test_connector_sends_only_durable_entries_and_checkpoints_ride_along(
    tmp_path: Path,
) -> None:
    data, stick = tmp_path / "data", tmp_path / "stick"
    stick.mkdir()
    clock = StepClock()
    log = EvidenceLog.open(data, gateway_id=GATEWAY, clock=clock, fsync_interval_s=3600)
    state = AgentState(GATEWAY)
    upstreams = Upstreams(
        [file_upstream(stick)],
        data_dir=data,
        gateway_id=GATEWAY,
        origin=log.origin,
        state=state,
        evidence=log,
    )
    upstreams.start()
    for k in range(50):
        log.append_reading(reading(clock, "m", "1-0:1.8.0*255", str(100 + k), "kWh"))
        if k % 10 == 9:
            log.checkpoint()
        await asyncio.sleep(0.01)
        # Whatever the upstream holds is on disk for good.
        assert state.upstreams["stick"].acked <= log.durable_seq
    log.close()
    assert await upstreams.finish(10.0)
    received = tmp_path / "received"
    entries, checkpoints = collect(stick / GATEWAY, received)
    assert entries == log.size and checkpoints == 6  # 5 + at close
    assert cli(["verify", str(received), "--key", str(data / "keys" / "log.vkey")]) == 0


# --- disk quota -----------------------------------------------------------------------


async def test_disk_quota_alarm_keeps_evidence_and_stops_telemetry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, stick = tmp_path / "data", tmp_path / "stick"
    stick.mkdir()
    clock = StepClock()
    log = EvidenceLog.open(data, gateway_id=GATEWAY, clock=clock)
    state = AgentState(GATEWAY)
    storage = StorageConfig(reserve_mb=0, quota_mb=0.02, check_s=0.1)
    upstreams = Upstreams(
        [file_upstream(stick)],
        data_dir=data,
        gateway_id=GATEWAY,
        origin=log.origin,
        state=state,
        storage=storage,
        evidence=log,
    )
    guard = upstreams.guard
    caplog.set_level(logging.INFO, logger="ies_agent.upstream")
    upstreams.start()
    assert guard.telemetry_allowed()
    for k in range(120):  # about 30 KB of evidence: over the 20 KB quota
        log.append_reading(reading(clock, "m", "1-0:1.8.0*255", str(100 + k), "kWh"))
    await asyncio.sleep(0.5)
    assert guard.alarms() == ["evidence_quota"]
    assert not guard.telemetry_allowed()
    assert state.storage["alarms"] == ["evidence_quota"]
    # Evidence keeps being written after the alarm.
    seq = log.append_reading(reading(clock, "m", "1-0:1.8.0*255", "999", "kWh"))
    # Room is made (quota raised): the alarm clears, once.
    guard.config = StorageConfig(reserve_mb=0, quota_mb=10, check_s=0.1)
    await asyncio.sleep(0.3)
    assert guard.telemetry_allowed()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "storage alarm" in errors[0].getMessage()
    log.close()
    assert await upstreams.finish(10.0)
    entries = [json.loads(line) for line in log_lines(data)]
    alarms = [e for e in entries if e.get("ev") == "storage_alarm"]
    assert [a["state"] for a in alarms] == ["raised", "cleared"]
    assert alarms[0]["reasons"] == ["evidence_quota"]
    assert entries[seq]["val"] == "999"
    received = tmp_path / "received"
    assert collect(stick / GATEWAY, received)[0] == len(entries)


def test_disk_low_reserve_raises_the_alarm(tmp_path: Path) -> None:
    total = shutil.disk_usage(tmp_path).total
    state = AgentState("g")
    guard = DiskGuard(tmp_path, StorageConfig(reserve_mb=total / 2**20 + 1), state)
    assert guard.check() == ["disk_low"]
    assert state.storage["free_bytes"] < state.storage["reserve_bytes"]
