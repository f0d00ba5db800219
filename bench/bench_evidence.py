"""Benchmark of the evidence log writer: append throughput and checkpoint time.

Measures, on one core (the process is pinned to one CPU where the OS allows):

- append throughput: entries per second for realistic reading entries (three meters,
  OBIS codes, exact decimals, raw register bytes), with the default durability policy
  (one write per entry, fsync every second);
- checkpoint time at 10^4 and 10^5 entries (and 10^6 with ``--full``): the log is built
  once and grown; at each size ``checkpoint()`` is timed several times (append the
  ``checkpoint`` event, fsync the log, sign the root, append and fsync the note);
- opening the log at the largest size (rebuild of the Merkle frontier and counters).

Targets (issue 3): append >= 20,000 entries/s, checkpoint < 50 ms at 10^6 entries.

Usage: ``python bench/bench_evidence.py [--full] [--dir DIR] [--alg ALG]``. The default
run takes well under a minute; ``--full`` builds 10^6 entries (about 1 minute more).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _src in ("agent", "drivers"):
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

from ies_agent.clock import SystemClock  # noqa: E402
from ies_agent.evidence.log import EvidenceLog  # noqa: E402
from ies_drivers.reading import Reading, ReadingState  # noqa: E402

APPEND_TARGET_PER_S = 20_000
CHECKPOINT_TARGET_MS = 50.0
QUANTITIES = (
    ("import_energy", "1-0:1.8.0*255", "kWh", True, "0x5000"),
    ("export_energy", "1-0:2.8.0*255", "kWh", True, "0x5004"),
    ("active_power", "1-0:1.7.0*255", "kW", False, "0x5010"),
    ("voltage_l1", "1-0:32.7.0*255", "V", False, "0x5020"),
)


def make_readings(count: int, clock: SystemClock) -> list[Reading]:
    """Return ``count`` realistic readings of three meters, stamped now."""
    stamp = clock.now()
    readings = []
    for index in range(count):
        quantity, obis, unit, cumulative, register = QUANTITIES[index % len(QUANTITIES)]
        counter = 12_345_678 + index
        readings.append(
            Reading(
                source=f"meter-{index % 3 + 1}",
                quantity=quantity,
                obis=obis,
                value=f"{counter // 1000}.{counter % 1000:03d}",
                unit=unit,
                state=ReadingState.OK,
                raw=f"modbus:fc03:{register}:{counter:016x}",
                t_ms=stamp.t_ms,
                tq=stamp.tq,
                mono_ns=stamp.mono_ns,
                cumulative=cumulative,
            )
        )
    return readings


def grow(log: EvidenceLog, readings: list[Reading], target: int) -> float:
    """Append readings until the log holds ``target`` entries; return entries/s."""
    count = target - log.size
    start = time.perf_counter()
    for index in range(count):
        log.append_reading(readings[index % len(readings)])
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("inf")


def time_checkpoints(log: EvidenceLog, repeats: int) -> list[float]:
    """Return the duration of ``repeats`` checkpoints, in ms."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        log.checkpoint()
        durations.append((time.perf_counter() - start) * 1000)
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also 10^6 entries")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    parser.add_argument(
        "--alg", default="ecdsa-p256", choices=["ecdsa-p256", "ed25519"]
    )
    parser.add_argument("--repeats", type=int, default=15, help="checkpoints per size")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-evidence-"))
    data_dir = base / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    sizes = [10_000, 100_000] + ([1_000_000] if args.full else [])
    clock = SystemClock()
    readings = make_readings(50_000, clock)

    print(f"evidence log benchmark in {data_dir} (key {args.alg}, one core)")
    log = EvidenceLog.open(
        data_dir, gateway_id="GW-BENCH", clock=clock, key_alg=args.alg
    )
    rates = []
    ok = True
    for size in sizes:
        rate = grow(log, readings, size)
        rates.append(rate)
        durations = time_checkpoints(log, args.repeats)
        median = statistics.median(durations)
        print(
            f"size {size:>9,}: append {rate:>9,.0f} entries/s; checkpoint median "
            f"{median:6.2f} ms, max {max(durations):6.2f} ms ({args.repeats} runs)"
        )
        if size == 1_000_000:
            ok &= median < CHECKPOINT_TARGET_MS
    log.close()
    line_bytes = (data_dir / "evidence.jsonl").stat().st_size / max(log.size, 1)

    start = time.perf_counter()
    reopened = EvidenceLog.open(data_dir, gateway_id="GW-BENCH", clock=clock)
    open_s = time.perf_counter() - start
    reopened.close()
    overall = statistics.median(rates)
    ok &= overall >= APPEND_TARGET_PER_S
    print(f"mean entry size {line_bytes:.0f} bytes")
    print(
        f"open (rebuild frontier and counters) at {log.size:,} entries: {open_s:.2f} s"
    )
    print(
        f"append throughput (median over sizes): {overall:,.0f} entries/s "
        f"(target >= {APPEND_TARGET_PER_S:,})"
    )
    if args.full:
        print(f"checkpoint target at 10^6: < {CHECKPOINT_TARGET_MS:.0f} ms")
    print("targets met" if ok else "TARGET MISSED")
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
