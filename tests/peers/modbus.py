"""Real Modbus peers for tests: pymodbus servers, socat ptys, scripted devices.

- :func:`start_tcp_server` / :func:`start_serial_server`: pymodbus 3.16 servers (Modbus
  TCP, RTU over TCP, RTU on a serial port) in the test's event loop, recording every
  request they receive through pymodbus's ``trace_pdu`` hook.
- :class:`peers.ptys.SocatPair`: the serial line these servers sit on.
- :class:`ScriptedDevice`: a small device of our own that misbehaves on purpose (echo,
  garbage, wrong unit id, short answer, bad CRC, any exception code, silence), speaking
  RTU on a pty or over TCP, or Modbus TCP. Its CRC comes from pymodbus, not from the
  code under test.
- :class:`SilentListener`: accepts TCP connections and never answers.
- :class:`UnitFilterProxy`: a Modbus TCP gateway in front of a server that drops
  requests for some unit ids, as a gateway does when a meter behind it is unplugged.

Every peer binds a free loopback port or a fresh pty and is stopped through its own
handle. Register images are deterministic: :func:`register_value`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from conftest import free_port

IMAGE_SIZE = 300
"""Registers in each table of a simulated unit (protocol addresses 0..299)."""


def register_value(unit: int, function: int, address: int) -> int:
    """Return what a simulated unit holds: distinct per unit, table and address."""
    table = 0 if function == 3 else 0x800
    return (unit << 12 | table | address) & 0xFFFF


def sim_device(unit: int, size: int = IMAGE_SIZE) -> SimDevice:
    """Return a pymodbus device with holding and input registers 0..size-1."""
    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    holding = [register_value(unit, 3, a) for a in range(size)]
    inputs = [register_value(unit, 4, a) for a in range(size)]
    return SimDevice(
        id=unit,
        simdata=(
            bits,
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],
            [SimData(0, values=inputs, datatype=DataType.REGISTERS)],
        ),
    )


@dataclass(frozen=True)
class SeenRequest:
    """A request as a server received it."""

    unit: int
    function: int
    address: int
    count: int


class PymodbusServer:
    """A running pymodbus server and the requests it has received."""

    def __init__(self, server: Any, host: str, port: int, path: str = "") -> None:
        self.server = server
        self.host = host
        self.port = port
        self.path = path
        self.requests: list[SeenRequest] = []

    def trace(self, sending: bool, pdu: Any) -> Any:
        """pymodbus ``trace_pdu`` hook: record received requests."""
        if not sending:
            self.requests.append(
                SeenRequest(
                    pdu.dev_id,
                    pdu.function_code,
                    getattr(pdu, "address", -1),
                    getattr(pdu, "count", -1),
                )
            )
        return pdu

    async def stop(self) -> None:
        """Shut the server down (closes its listener and connections)."""
        await self.server.shutdown()


async def start_tcp_server(
    units: Sequence[int] = (1,),
    *,
    framer: Literal["socket", "rtu"] = "socket",
    port: int | None = None,
    size: int = IMAGE_SIZE,
) -> PymodbusServer:
    """Start a pymodbus TCP server on 127.0.0.1 (Modbus TCP, or RTU over TCP with
    ``framer="rtu"``) serving ``units``."""
    port = port or free_port()
    handle = PymodbusServer(None, "127.0.0.1", port)
    handle.server = ModbusTcpServer(
        [sim_device(u, size) for u in units],
        framer=FramerType.SOCKET if framer == "socket" else FramerType.RTU,
        address=("127.0.0.1", port),
        trace_pdu=handle.trace,
    )
    await handle.server.serve_forever(background=True)
    return handle


async def start_serial_server(
    path: str, units: Sequence[int] = (1,), *, baudrate: int = 19200
) -> PymodbusServer:
    """Start a pymodbus RTU server on the serial port (pty) at ``path``."""
    handle = PymodbusServer(None, "", 0, path)
    handle.server = ModbusSerialServer(
        [sim_device(u) for u in units],
        framer=FramerType.RTU,
        port=path,
        baudrate=baudrate,
        trace_pdu=handle.trace,
    )
    await handle.server.serve_forever(background=True)
    return handle


def rtu_crc(frame: bytes) -> bytes:
    """Return the two CRC bytes of an RTU frame, computed by pymodbus."""
    return int(FramerRTU.compute_CRC(frame)).to_bytes(2, "big")


@dataclass
class Misbehaviour:
    """What a :class:`ScriptedDevice` does wrong. The default answers correctly."""

    echo: bool = False
    """Repeat the request before answering, as an RS-485 adapter that hears itself."""
    garbage_before: bytes = b""
    """Bytes sent just before the answer."""
    garbage_only: bytes | None = None
    """Send these bytes instead of any answer."""
    answer_as: int | None = None
    """Answer with this unit id instead of the one asked (a valid frame otherwise)."""
    truncate_to: int | None = None
    """Send only the first bytes of the answer."""
    bad_crc: bool = False
    """Corrupt the answer's CRC (RTU) or its protocol id (Modbus TCP)."""
    exception: int | None = None
    """Answer every request with this exception code."""
    silent_units: frozenset[int] = frozenset()
    """Never answer requests for these unit ids."""
    delay_s: float = 0.0
    """Wait this long before answering."""
    unit_delays: dict[int, float] = field(default_factory=dict)
    """Wait this long before answering these unit ids (overrides ``delay_s``)."""


@dataclass
class ScriptedDevice:
    """A Modbus device of our own, for the faults pymodbus servers cannot produce.

    Answers read (3, 4) and write (16) requests for ``units`` with
    :func:`register_value`, misbehaving as ``misbehaviour`` says. ``framing`` is
    ``"rtu"`` (on a pty or over TCP) or ``"mbap"`` (Modbus TCP). ``requests`` records
    every request frame received with its arrival time (monotonic seconds), and
    ``overlaps`` counts requests that arrived while an answer was still pending.
    """

    units: Sequence[int] = (1,)
    misbehaviour: Misbehaviour = field(default_factory=Misbehaviour)
    framing: Literal["rtu", "mbap"] = "rtu"
    requests: list[tuple[float, bytes]] = field(default_factory=list)
    overlaps: int = 0
    port: int = 0
    _busy: bool = False
    _server: asyncio.Server | None = None
    _fd: int = -1
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    # -- what to answer

    def answer(self, unit: int, pdu: bytes) -> tuple[int, bytes] | None:
        """Return the unit id and PDU to answer ``pdu`` with, or ``None`` (silence)."""
        bad = self.misbehaviour
        if unit in bad.silent_units or unit not in self.units:
            return None
        function = pdu[0]
        if bad.exception is not None:
            return unit, bytes((function | 0x80, bad.exception))
        if function in (3, 4):
            address = int.from_bytes(pdu[1:3], "big")
            count = int.from_bytes(pdu[3:5], "big")
            values = b"".join(
                register_value(unit, function, a).to_bytes(2, "big")
                for a in range(address, address + count)
            )
            return unit, bytes((function, len(values))) + values
        if function == 16:
            return unit, pdu[:5]
        return unit, bytes((function | 0x80, 1))

    def _rtu_reply(self, request: bytes) -> bytes | None:
        """Return the bytes to send for one RTU request frame."""
        bad = self.misbehaviour
        if bad.garbage_only is not None:
            return bad.garbage_only
        result = self.answer(request[0], request[1:-2])
        if result is None:
            return b""
        unit, pdu = result
        frame = bytes((bad.answer_as if bad.answer_as is not None else unit,)) + pdu
        crc = rtu_crc(frame)
        if bad.bad_crc:
            crc = bytes((crc[0] ^ 0xFF, crc[1]))
        reply = frame + crc
        if bad.truncate_to is not None:
            reply = reply[: bad.truncate_to]
        return (request if bad.echo else b"") + bad.garbage_before + reply

    def _mbap_reply(self, request: bytes) -> bytes | None:
        """Return the bytes to send for one Modbus TCP request frame."""
        bad = self.misbehaviour
        if bad.garbage_only is not None:
            return bad.garbage_only
        result = self.answer(request[6], request[7:])
        if result is None:
            return b""
        unit, pdu = result
        unit = bad.answer_as if bad.answer_as is not None else unit
        protocol = b"\x00\x07" if bad.bad_crc else b"\x00\x00"
        reply = (
            request[0:2] + protocol + (len(pdu) + 1).to_bytes(2, "big") + bytes((unit,))
        ) + pdu
        if bad.truncate_to is not None:
            reply = reply[: bad.truncate_to]
        return bad.garbage_before + reply

    # -- finding request frames in a byte stream

    def _take_request(self, buffer: bytearray) -> bytes | None:
        """Remove and return one whole request frame from ``buffer``, if there is
        one; drop bytes that cannot start one."""
        if self.framing == "mbap":
            if len(buffer) < 7:
                return None
            end = 6 + int.from_bytes(buffer[4:6], "big")
            if len(buffer) < end:
                return None
            frame = bytes(buffer[:end])
            del buffer[:end]
            return frame
        while len(buffer) >= 8:
            function = buffer[1]
            end = 9 + buffer[6] if function in (15, 16) else 8
            if len(buffer) < end:
                return None
            frame = bytes(buffer[:end])
            if rtu_crc(frame[:-2]) == frame[-2:]:
                del buffer[:end]
                return frame
            del buffer[:1]  # not a frame start: hunt on
        return None

    async def _handle(self, data: bytearray, send: Any) -> None:
        """Answer every whole request in ``data`` through ``send(bytes)``."""
        while (request := self._take_request(data)) is not None:
            self.requests.append((time.monotonic(), request))
            if self._busy:
                self.overlaps += 1
            reply = (
                self._mbap_reply(request)
                if self.framing == "mbap"
                else self._rtu_reply(request)
            )
            if not reply:
                continue
            self._busy = True
            unit = request[6] if self.framing == "mbap" else request[0]
            delay = self.misbehaviour.unit_delays.get(unit, self.misbehaviour.delay_s)
            try:
                if delay:
                    await asyncio.sleep(delay)
                send(reply)
            finally:
                self._busy = False

    # -- transports

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task, so requests arriving meanwhile are noticed."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve_tcp(self) -> int:
        """Listen on a free loopback port; return it."""

        async def client(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            self._writers.append(writer)
            buffer = bytearray()
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(1024):
                    buffer += chunk
                    self._spawn(self._handle(buffer, writer.write))
            writer.close()

        self._server = await asyncio.start_server(client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def serve_pty(self, path: str) -> None:
        """Answer on the pty at ``path`` (one end of a :class:`SocatPair`)."""
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        loop = asyncio.get_running_loop()
        buffer = bytearray()

        def send(data: bytes) -> None:
            os.write(self._fd, data)

        def readable() -> None:
            try:
                buffer.extend(os.read(self._fd, 1024))
            except BlockingIOError:
                return
            self._spawn(self._handle(buffer, send))

        loop.add_reader(self._fd, readable)

    async def stop(self) -> None:
        """Stop listening and close every connection and the pty."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
            self._server = None
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        for task in list(self._tasks):
            task.cancel()


class SilentListener:
    """A TCP listener that accepts connections, reads everything and never answers:
    a device that is there on the network but does not speak."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.received = bytearray()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""

        async def client(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            self.connections += 1
            self._writers.append(writer)
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(1024):
                    self.received += chunk
            writer.close()

        self._server = await asyncio.start_server(client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop the connections."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
            self._server = None


class UnitFilterProxy:
    """A Modbus TCP gateway in front of ``upstream_port`` that never forwards requests
    for ``dead_units``: those units simply never answer, the others answer through.

    ``forwarded`` and ``dropped`` count request frames by unit id.
    """

    def __init__(self, upstream_port: int, dead_units: Sequence[int]) -> None:
        self.upstream_port = upstream_port
        self.dead_units = set(dead_units)
        self.port = 0
        self.forwarded: dict[int, int] = {}
        self.dropped: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay one client connection, request frame by request frame."""
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        self._writers += [writer, up_writer]

        async def answers() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await up_reader.read(1024):
                    writer.write(chunk)

        task = asyncio.create_task(answers())
        self._tasks.add(task)
        buffer = bytearray()
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1024):
                buffer += chunk
                while len(buffer) >= 7 and len(buffer) >= 6 + int.from_bytes(
                    buffer[4:6], "big"
                ):
                    end = 6 + int.from_bytes(buffer[4:6], "big")
                    frame, buffer = bytes(buffer[:end]), buffer[end:]
                    unit = frame[6]
                    if unit in self.dead_units:
                        self.dropped[unit] = self.dropped.get(unit, 0) + 1
                        continue
                    self.forwarded[unit] = self.forwarded.get(unit, 0) + 1
                    up_writer.write(frame)
        task.cancel()
        up_writer.close()
        writer.close()

    async def stop(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            for task in self._tasks:
                task.cancel()
            await self._server.wait_closed()
            self._server = None
