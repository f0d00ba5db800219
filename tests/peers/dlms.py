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

from ies_drivers.dlms.server import MeterServer


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
