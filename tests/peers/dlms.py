"""Real DLMS peers for tests: our meter server on sockets and ptys, socat pairs.

- :class:`Pty`: two linked pseudo-terminals from ``socat -d -d pty,raw,echo=0
  pty,raw,echo=0`` (with fixed link names), stopped by the process's own pid.
- :class:`EchoingMeterServer`: our meter server on a serial line whose adapter hears
  itself, as many RS-485 converters do: every byte the client sends comes back to
  it before the meter's answer.
- :class:`SilentListener`: accepts TCP connections and never answers.

Every peer binds a free loopback port or a fresh pty and is stopped through its own
handle.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from ies_drivers.dlms.server import MeterServer


class Pty:
    """Two linked pseudo-terminals; what is written to ``a`` comes out of ``b``."""

    def __init__(self, directory: Path) -> None:
        self.a = str(directory / "dlms-a")
        self.b = str(directory / "dlms-b")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Pty:
        """Start socat and wait until both links exist."""
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError("socat is not installed: apt-get install -y socat")
        self.process = subprocess.Popen(
            [
                socat,
                "-d",
                "-d",
                f"pty,raw,echo=0,link={self.a}",
                f"pty,raw,echo=0,link={self.b}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("socat did not create the pty pair")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop socat by its pid."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class EchoingMeterServer(MeterServer):
    """Our meter server behind an RS-485 adapter that echoes the client's bytes."""

    def _serial_readable(self) -> None:
        try:
            data = os.read(self._serial_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(self._serial_fd)
            return
        if data:
            self._serial_write(data)  # the line repeats what the client sent
            if self._serial_conn is not None:
                self._serial_conn.received(data)


class SilentListener:
    """A TCP listener that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SilentListener:
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
