"""A real evidence log writer process for tests that need a second process.

Usage: ``python evidence_writer.py DATA_DIR MODE [--gateway-id ID]``

- ``hold``: open the log, print ``ready``, keep it open until stdin closes, close it.
- ``append``: open the log, print ``ready``, then append readings as fast as it can
  (three sources), calling ``sync()`` every 7 entries and ``checkpoint()`` every 97,
  and print ``durable <seq>`` after each, until killed. The SIGKILL tests kill it at
  random moments and check that every seq it printed is still in the log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ies_agent.clock import SystemClock
from ies_agent.evidence.log import EvidenceLog
from ies_drivers.reading import Reading, ReadingState


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("mode", choices=["hold", "append"])
    parser.add_argument("--gateway-id", default="GW-PEER")
    args = parser.parse_args()
    clock = SystemClock()
    log = EvidenceLog.open(args.data_dir, gateway_id=args.gateway_id, clock=clock)
    print("ready", flush=True)
    if args.mode == "hold":
        sys.stdin.read()
        log.close()
        return 0
    count = 0
    # Meter counts keep rising across runs: the log only grows.
    base = 1_000_000 + log.size
    sources = ("m1", "m2", "inv1")
    while True:
        stamp = clock.now()
        src = sources[count % len(sources)]
        energy = base + count
        reading = Reading(
            source=src,
            quantity="import_energy",
            obis="1-0:1.8.0*255",
            value=f"{energy // 1000}.{energy % 1000:03d}",
            unit="kWh",
            state=ReadingState.OK,
            raw=f"modbus:fc03:0x5000:{energy:016x}",
            t_ms=stamp.t_ms,
            tq=stamp.tq,
            mono_ns=stamp.mono_ns,
            cumulative=True,
        )
        log.append_reading(reading)
        count += 1
        if count % 97 == 0:
            log.checkpoint()
            print(f"durable {log.durable_seq}", flush=True)
        elif count % 7 == 0:
            print(f"durable {log.sync()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
