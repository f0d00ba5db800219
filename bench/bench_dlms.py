"""DLMS: decode throughput of a block load profile, and a read over a 9600-baud line.

1. **Decode**: a 96-row IS 15959 block load profile buffer (one day of 15-minute
   blocks, as our meter server encodes it) is decoded from A-XDR and turned into
   exact decimal cells with scalers applied, repeatedly; rows per second.
2. **Line**: our meter server runs in a child process on one end of a socat pty pair
   and paces every answer like a 9600-baud line (10 bits a byte, request and answer
   both counted, half duplex); our client reads the same 96-row profile over HDLC
   (128-byte frames, RR between segments, block transfer). The time the bytes need
   on the wire divided by the time the read took is the share of the line's
   capacity spent on the wire rather than in our code. Target (issue 6): >= 0.9.

Usage: ``python bench/bench_dlms.py [--repeat 200] [--reads 3] [--baud 9600]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "drivers"))

BLOCK_LOAD = (1, 0, 99, 1, 0, 255)


def decode_throughput(repeat: int) -> tuple[float, int]:
    """Return (rows per second, bytes per buffer) for decoding 96 rows."""
    from ies_drivers.dlms import axdr
    from ies_drivers.dlms.obis import Obis
    from ies_drivers.dlms.profiles import ObjectRef, Scale, decode_rows, load_profile
    from ies_drivers.dlms.server import SimulatedMeter

    meter = SimulatedMeter(history_days=1)
    profile_obj = meter.find(7, Obis(*BLOCK_LOAD))
    assert profile_obj is not None
    encoded = axdr.encode(profile_obj.get(2, None))
    columns = [ObjectRef(8, Obis(0, 0, 1, 0, 0))] + [
        ObjectRef(3, Obis.parse(text))
        for text in ("1-0:12.27.0", "1-0:1.29.0", "1-0:9.29.0", "1-0:2.29.0")
    ]
    scales = {c.obis: Scale(-2 if c.obis.c == 12 else 0, 35) for c in columns[1:]}
    profile = load_profile("is15959")
    rows = decode_rows(columns, axdr.decode(encoded), profile, scales)
    assert len(rows) == 96, len(rows)
    started = time.perf_counter()
    for _ in range(repeat):
        decode_rows(columns, axdr.decode(encoded), profile, scales)
    elapsed = time.perf_counter() - started
    return 96 * repeat / elapsed, len(encoded)


async def line_read(path: str, reads: int, baud: int) -> list[tuple[float, float, int]]:
    """Read the block load profile ``reads`` times; return (seconds, wire seconds,
    bytes) for each read."""
    from ies_drivers.dlms.client import ClientSettings
    from ies_drivers.dlms.obis import Obis
    from ies_drivers.dlms.transport import DlmsClient, LinkSettings

    link = LinkSettings(
        "hdlc-serial", serial_port=path, baudrate=baud, server_physical=17, timeout_s=10
    )
    results = []
    async with DlmsClient(link, ClientSettings()) as client:
        for _ in range(reads):
            out0, in0 = client.line_bytes
            started = time.perf_counter()
            buffer = await client.get(7, Obis(*BLOCK_LOAD), 2)
            elapsed = time.perf_counter() - started
            out1, in1 = client.line_bytes
            assert len(buffer.items) == 96, len(buffer.items)
            moved = (out1 - out0) + (in1 - in0)
            results.append((elapsed, moved * 10 / baud, moved))
    return results


def main() -> int:
    """Run both measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--reads", type=int, default=3)
    parser.add_argument("--baud", type=int, default=9600)
    args = parser.parse_args()

    rate, size = decode_throughput(args.repeat)
    print(f"decode: 96-row block load profile ({size} bytes A-XDR)")
    print(f"  {rate:10.0f} rows/s ({rate / 96:.0f} profiles/s)")

    socat = shutil.which("socat")
    if socat is None:
        print("line: socat not installed, skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        pair = subprocess.Popen(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT / "drivers"))
        server = None
        try:
            while not (os.path.exists(a) and os.path.exists(b)):
                time.sleep(0.01)
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ies_drivers.dlms.server",
                    "--serial",
                    a,
                    "--baud",
                    str(args.baud),
                    "--history-days",
                    "1",
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert server.stdout is not None
            server.stdout.readline()  # "serving HDLC on ..."
            results = asyncio.run(line_read(b, args.reads, args.baud))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=5)
            pair.terminate()
            pair.wait(timeout=5)
    print(f"line: {args.baud} baud, HDLC 128-byte frames, server in a child process")
    for elapsed, wire, moved in results:
        print(
            f"  read {moved} bytes: {elapsed:.3f} s, on the wire {wire:.3f} s, "
            f"ratio {wire / elapsed:.3f}"
        )
    best = max(wire / elapsed for elapsed, wire, _ in results)
    worst = min(wire / elapsed for elapsed, wire, _ in results)
    print(f"ratio wire/total: best {best:.3f}, worst {worst:.3f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
