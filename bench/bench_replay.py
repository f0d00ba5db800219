"""Benchmark of backlog replay: a long outage's backlog delivered to a local Mosquitto.

A log of N reading entries (with a checkpoint every 1000) is written while no broker
is up; then a local Mosquitto starts and the real MQTT connector replays the whole
backlog from its cursor. The time runs from the connector's start until the broker
acknowledged (PUBACK) the last entry; that gives entries per second and payload bytes
per second.

For comparison, in the same run, ``mosquitto_pub -l -q 1`` publishes exactly the same
payloads (the evidence batch messages, one per line, as the connector built them) to
the same broker; the ratio compares bytes per second.

Targets (issue 4): >= 10,000 entries/s, and >= 0.5 of mosquitto_pub's bytes/s.

With ``--subscriber`` a ``mosquitto_sub`` consumes both streams at QoS 1 during the
run (the broker then forwards every message, as it does to a utility's collector);
without it the broker only acknowledges.

Usage: ``python bench/bench_replay.py [--entries N] [--full] [--batch N]
[--subscriber]``. The default
(20,000 entries) takes a few seconds; ``--full`` replays 10^6 entries (minutes, mostly
writing the log).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _src in ("agent", "drivers", "tests"):
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

from ies_agent.clock import SystemClock  # noqa: E402
from ies_agent.evidence.log import EvidenceLog  # noqa: E402
from ies_agent.state import AgentState  # noqa: E402
from ies_agent.upstream.manager import Upstreams  # noqa: E402
from ies_agent.upstream.payload import encode_batch  # noqa: E402
from ies_agent.upstream.reader import LogReader  # noqa: E402
from ies_agent.upstream.settings import UpstreamConfig  # noqa: E402
from ies_drivers.reading import Reading, ReadingState  # noqa: E402
from peers.mosquitto import Mosquitto  # noqa: E402

ENTRIES_TARGET_PER_S = 10_000
RATIO_TARGET = 0.5
GATEWAY = "bench-gw"


def write_log(data: Path, entries: int) -> None:
    """Write about ``entries`` realistic reading entries (three meters)."""
    clock = SystemClock()
    log = EvidenceLog.open(data, gateway_id=GATEWAY, clock=clock, fsync_interval_s=5)
    sources = ("grid-meter", "house-meter", "inverter")
    while log.size < entries - 2:
        stamp = clock.now()
        n = log.size
        value = 18_723_400 + n
        log.append_reading(
            Reading(
                source=sources[n % 3],
                quantity="energy_active_import",
                obis="1-0:1.8.0*255",
                value=f"{value // 1000}.{value % 1000:03d}",
                unit="kWh",
                state=ReadingState.OK,
                raw=f"modbus:fc04:0x0156:{value:08x}",
                t_ms=stamp.t_ms,
                tq=stamp.tq,
                mono_ns=stamp.mono_ns,
                cumulative=True,
            )
        )
        if log.size % 1000 == 0:
            log.checkpoint()
    log.close()


def batch_payloads(data: Path, batch: int, max_bytes: int) -> list[bytes]:
    """The evidence messages the connector sends for the whole log, in order."""
    reader = LogReader(data)
    end = reader.count()
    payloads = []
    seq, offset, cp = 0, 0, 0
    while seq < end:
        chunk = reader.read(
            seq, offset, upto=end - 1, max_entries=batch, max_bytes=max_bytes
        )
        stop = reader.checkpoints_covering(chunk.last + 1)
        payloads.append(
            encode_batch(
                gw=GATEWAY,
                origin=f"ies-agent/{GATEWAY}/log-1",
                first=seq,
                lines=chunk.lines,
                checkpoints=reader.checkpoints(cp, stop),
            )
        )
        seq, offset, cp = chunk.last + 1, chunk.end, stop
    return payloads


async def replay(data: Path, url: str, batch: int, max_bytes: int) -> float:
    """Replay the log to ``url`` from an empty cursor; return seconds taken."""
    state = AgentState(GATEWAY)
    config = UpstreamConfig(
        name="bench",
        kind="mqtt",
        url=url,
        telemetry_s=0,
        batch_max_entries=batch,
        batch_max_bytes=max_bytes,
        timeout_s=30,
    )
    upstreams = Upstreams(
        [config],
        data_dir=data,
        gateway_id=GATEWAY,
        origin=f"ies-agent/{GATEWAY}/log-1",
        state=state,
    )
    started = time.perf_counter()
    upstreams.start()
    done = await upstreams.finish(3600)
    elapsed = time.perf_counter() - started
    if not done:
        raise SystemExit("replay did not finish")
    return elapsed


def raw_publish(port: int, payloads: list[bytes], workdir: Path) -> float:
    """Publish the payloads with ``mosquitto_pub -l -q 1``; return seconds taken."""
    source = workdir / "payloads.txt"
    source.write_bytes(b"\n".join(payloads) + b"\n")
    started = time.perf_counter()
    with source.open("rb") as stream:
        subprocess.run(
            ["mosquitto_pub", "-p", str(port), "-q", "1", "-l", "-t", "bench/raw"],
            stdin=stream,
            check=True,
        )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--full", action="store_true", help="10^6 entries")
    parser.add_argument("--batch", type=int, default=200, help="entries per message")
    parser.add_argument("--max-bytes", type=int, default=256 * 1024)
    parser.add_argument(
        "--subscriber", action="store_true", help="a mosquitto_sub consumes both"
    )
    args = parser.parse_args()
    entries = 1_000_000 if args.full else args.entries
    if shutil.which("mosquitto_pub") is None:
        raise SystemExit("needs mosquitto and mosquitto-clients")
    workdir = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    broker = Mosquitto(workdir / "broker", persistence=False)
    try:
        data = workdir / "data"
        started = time.perf_counter()
        write_log(data, entries)
        count = LogReader(data).count()
        print(f"log: {count} entries written in {time.perf_counter() - started:.1f} s")
        broker.start()
        consumer = None
        if args.subscriber:
            consumer = subprocess.Popen(
                [
                    "mosquitto_sub",
                    "-p",
                    str(broker.port),
                    "-q",
                    "1",
                    "-t",
                    "ies/#",
                    "-t",
                    "bench/#",
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        seconds = asyncio.run(replay(data, broker.url, args.batch, args.max_bytes))
        payloads = batch_payloads(data, args.batch, args.max_bytes)
        size = sum(len(p) for p in payloads)
        raw_seconds = raw_publish(broker.port, payloads, workdir)
        if consumer is not None:
            consumer.terminate()
            consumer.wait(timeout=10)
        rate = count / seconds
        ratio = (size / seconds) / (size / raw_seconds)
        print(
            f"replay: {count} entries in {len(payloads)} messages, "
            f"{size / 1e6:.1f} MB, {seconds:.2f} s -> {rate:,.0f} entries/s, "
            f"{size / seconds / 1e6:.1f} MB/s "
            f"(target >= {ENTRIES_TARGET_PER_S:,}: "
            f"{'ok' if rate >= ENTRIES_TARGET_PER_S else 'MISSED'})"
        )
        print(
            f"mosquitto_pub -q 1 of the same payloads: {raw_seconds:.2f} s -> "
            f"{size / raw_seconds / 1e6:.1f} MB/s; ratio {ratio:.2f} "
            f"(target >= {RATIO_TARGET}: {'ok' if ratio >= RATIO_TARGET else 'MISSED'})"
        )
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
