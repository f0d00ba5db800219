"""Polling overhead: the agent's bus owner against a bare pymodbus client loop.

Both loops read the same 10-register block from the same pymodbus TCP server, one
request at a time, for the same time, in the same run; rounds alternate so drift (CPU
frequency, other load) hits both alike. The server runs in a child process started here
and stopped by its pid, so it does not share the event loop with the loop measured.

Target (issue 2): the agent reaches at least 0.9 of the bare loop's reads per second.

Usage: ``python bench/bench_polling.py [--seconds 6] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "drivers"))

BLOCK = 10
"""Registers per read."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def serve(port: int) -> None:
    """Run a pymodbus TCP server with one unit until killed (child process)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    registers = [SimData(0, values=list(range(100)), datatype=DataType.REGISTERS)]
    device = SimDevice(id=1, simdata=(bits, bits, registers, registers))
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever()


def start_server(port: int) -> subprocess.Popen[bytes]:
    """Start the server child and wait until it accepts connections."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return child
        except OSError:
            time.sleep(0.05)
    child.kill()
    raise RuntimeError("the pymodbus server did not start")


async def agent_loop(port: int, seconds: float) -> int:
    """Read the block through ModbusBus for ``seconds``; return the reads done."""
    from ies_drivers.modbus.bus import BusSpec, ModbusBus

    reads = 0
    async with ModbusBus(BusSpec("bench", port=port, timeout_s=1.0)) as bus:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            block = await bus.read_registers(1, "holding", 0, BLOCK)
            assert len(block.registers) == BLOCK
            reads += 1
    return reads


async def bare_loop(port: int, seconds: float) -> int:
    """Read the block with a bare AsyncModbusTcpClient for ``seconds``."""
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await client.connect()
    reads = 0
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            response = await client.read_holding_registers(0, count=BLOCK, device_id=1)
            assert not response.isError() and len(response.registers) == BLOCK
            reads += 1
    finally:
        client.close()
    return reads


async def measure(port: int, seconds: float, rounds: int) -> tuple[float, float]:
    """Return reads per second of the agent loop and the bare loop."""
    per_round = seconds / rounds
    agent = bare = 0
    for number in range(rounds):
        # Alternate which loop goes first so warm-up and drift favour neither.
        if number % 2:
            bare += await bare_loop(port, per_round)
            agent += await agent_loop(port, per_round)
        else:
            agent += await agent_loop(port, per_round)
            bare += await bare_loop(port, per_round)
    return agent / seconds, bare / seconds


def main() -> int:
    """Run the benchmark and print reads/s of both loops and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0

    port = free_port()
    server = start_server(port)
    try:
        agent, bare = asyncio.run(measure(port, args.seconds, args.rounds))
    finally:
        server.terminate()
        server.wait(timeout=5)
    print(f"block: {BLOCK} holding registers, pymodbus TCP server in a child process")
    print(f"agent ModbusBus.read_registers: {agent:8.0f} reads/s")
    print(f"bare AsyncModbusTcpClient:      {bare:8.0f} reads/s")
    print(f"ratio agent/bare: {agent / bare:.2f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
