"""The owner of one physical Modbus bus: every device on it queues through here.

A bus is an RS-485 line (``rtu``, a serial port through pyserial), a Modbus TCP
endpoint (``tcp``) or a serial-to-Ethernet converter that passes RTU frames through a
TCP socket (``rtu-over-tcp``). One :class:`ModbusBus` owns it: requests from all devices
wait in FIFO order and exactly one is on the wire at a time, with the configured gap
between them.

Failures are kept per unit id. After a timeout, a garbled or foreign answer, or a
gateway saying the device is unreachable (exception 10/11), the unit is backed off
(exponential, capped, jittered): calls for it raise :class:`DeviceBackedOff` at once,
so a dead meter costs one timeout per back-off period and never stalls its
neighbours. Any answer resets the back-off. The connection itself is reconnected here
and nowhere else, lazily at the next request and with its own back-off; an outage and
its recovery are each logged once.

Framing is our own (:mod:`ies_drivers.modbus.rtu`) rather than pymodbus's client:
pymodbus 3.16's async client drops frames with a bad CRC or a foreign unit id in
silence (they surface as timeouts), takes no per-request timeout, and closes a TCP
connection after ``retries + 3`` unanswered requests in a row, which would let one
dead unit behind a gateway cut off the live ones. Owning the bytes also lets us strip
an RS-485 echo and garbage before a frame, and keeps pymodbus out of the agent's
memory. Errors raised (from :mod:`ies_drivers.errors`)::

    ExceptionResponse   the device answered with an exception code (1-4, 6, 10, 11)
    WrongUnitError      another unit id answered
    FrameError          garbage, a bad CRC, a short or inconsistent answer
    DeviceTimeout       no answer within the timeout
    DeviceBackedOff     the unit failed recently; not asked until its back-off expires
    TransportError      the serial port or TCP connection failed, or the bus is closed

pyserial and ``OSError`` exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ies_drivers.errors import (
    DeviceBackedOff,
    DeviceTimeout,
    DriverError,
    ExceptionResponse,
    FrameError,
    TransportError,
    WrongUnitError,
)
from ies_drivers.modbus.model import PointSpec
from ies_drivers.modbus.plan import (
    DEFAULT_MAX_GAP,
    MAX_BLOCK,
    Block,
    PointRead,
    decode_device,
    plan_blocks,
)
from ies_drivers.modbus.rtu import (
    ResponseScan,
    RtuFrame,
    mbap_adu,
    read_request_pdu,
    rtu_adu,
    scan_mbap_response,
    scan_rtu_response,
    write_registers_pdu,
)

if TYPE_CHECKING:
    import serial

log = logging.getLogger(__name__)

BusKind = Literal["tcp", "rtu", "rtu-over-tcp"]
Parity = Literal["N", "E", "O"]

GATEWAY_EXCEPTIONS = frozenset({10, 11})
"""Exception codes by which a gateway says the unit behind it is unreachable."""
_TCP_SILENT_LIMIT = 3
"""Unanswered requests in a row, across all units, after which a TCP link is renewed."""
_RECENT_FRAMES = 16


@dataclass(frozen=True, slots=True)
class BusSpec:
    """How to reach one physical bus and how patient to be with it.

    ``kind`` is ``"tcp"`` (Modbus TCP at ``host:port``), ``"rtu"`` (RTU frames on
    ``serial_port`` at ``baudrate``/``bytesize``/``parity``/``stopbits``) or
    ``"rtu-over-tcp"`` (RTU frames through a TCP socket to a converter). ``gap_s`` is
    the pause between the end of one exchange and the next request, in seconds; ``None``
    means 0 for TCP kinds and 3.5 character times on a serial line, which is also the
    least a serial line gets. ``timeout_s`` is the default answer timeout per request,
    ``connect_timeout_s`` the limit for opening the link. ``backoff_initial_s`` and
    ``backoff_max_s`` bound the back-off of a failing unit and of a failing link.

    Raises :class:`ValueError` from the constructor for values that cannot work.
    """

    name: str
    kind: BusKind = "tcp"
    host: str = "127.0.0.1"
    port: int = 502
    serial_port: str = ""
    baudrate: int = 9600
    parity: Parity = "N"
    stopbits: int = 1
    bytesize: int = 8
    gap_s: float | None = None
    timeout_s: float = 1.0
    connect_timeout_s: float = 3.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        """Check the values; raise :class:`ValueError` naming the one that is wrong."""
        if self.kind not in ("tcp", "rtu", "rtu-over-tcp"):
            raise ValueError(
                f"bus {self.name}: kind {self.kind!r} is not tcp, rtu or rtu-over-tcp"
            )
        if self.kind == "rtu" and not self.serial_port:
            raise ValueError(f"bus {self.name}: an rtu bus needs a serial_port")
        if self.kind != "rtu" and not 1 <= self.port <= 65535:
            raise ValueError(f"bus {self.name}: port {self.port} is outside 1..65535")
        if self.parity not in ("N", "E", "O"):
            raise ValueError(
                f"bus {self.name}: parity {self.parity!r} is not N, E or O"
            )
        if self.stopbits not in (1, 2) or self.bytesize not in (7, 8):
            raise ValueError(
                f"bus {self.name}: {self.bytesize} data bits and {self.stopbits} stop "
                "bits: expected 7 or 8 data bits and 1 or 2 stop bits"
            )
        if self.baudrate <= 0:
            raise ValueError(f"bus {self.name}: baudrate {self.baudrate} must be > 0")
        for key in ("timeout_s", "connect_timeout_s", "backoff_initial_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"bus {self.name}: {key} must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"bus {self.name}: backoff_max_s must be >= backoff_initial_s"
            )
        if self.gap_s is not None and self.gap_s < 0:
            raise ValueError(f"bus {self.name}: gap_s must be >= 0")

    @property
    def char_time_s(self) -> float:
        """Time one character takes on the serial line, in seconds (start, data,
        parity and stop bits at ``baudrate``)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    @property
    def silent_interval_s(self) -> float:
        """The RTU inter-frame silence t3.5 in seconds: 3.5 character times, fixed
        at 1.75 ms above 19200 baud (Modbus over serial line, section 2.5.1.1)."""
        if self.baudrate > 19200:
            return 0.00175
        return 3.5 * self.char_time_s

    @property
    def effective_gap_s(self) -> float:
        """The pause actually kept between exchanges, in seconds."""
        if self.kind == "rtu":
            return max(self.gap_s or 0.0, self.silent_interval_s)
        return self.gap_s or 0.0

    @property
    def endpoint(self) -> str:
        """Where the bus is, for messages: ``tcp 10.0.0.5:502`` or
        ``rtu /dev/ttyUSB0 9600 8N1``."""
        if self.kind == "rtu":
            return (
                f"rtu {self.serial_port} {self.baudrate} "
                f"{self.bytesize}{self.parity}{self.stopbits}"
            )
        return f"{self.kind} {self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RegisterBlock:
    """Registers read in one request: ``registers`` from ``address`` with
    ``function_code``; ``latency_s`` from request sent to answer complete."""

    function_code: int
    address: int
    registers: tuple[int, ...]
    latency_s: float


@dataclass(frozen=True, slots=True)
class DeviceRead:
    """Every point of one device read once.

    ``values`` holds one :class:`PointRead` (spec, value, raw) per point asked for, in
    the order asked. ``requests`` is the number of read requests sent, ``refused`` how
    many of them the device answered with an exception (their points are ERROR), and
    ``latency_s`` the sum of the answered requests' latencies.
    """

    unit: int
    values: tuple[PointRead, ...]
    requests: int
    refused: int
    latency_s: float


@dataclass(frozen=True, slots=True)
class UnitStats:
    """Counters of one unit id on a bus, for status pages and metrics.

    ``requests`` were sent, ``answers`` came back with data or an exception code.
    ``errors`` counts failures by kind: ``timeout``, ``frame``, ``wrong_unit``,
    ``exception``, ``transport`` and ``backed_off`` (calls refused during back-off).
    ``backoff_remaining_s`` is 0 when the unit may be asked.
    """

    unit: int
    requests: int
    answers: int
    errors: Mapping[str, int]
    consecutive_failures: int
    last_latency_s: float | None
    backoff_remaining_s: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class BusStatus:
    """State of the link of one bus: ``connected``, how long it has been down,
    why, how many requests wait for the wire, and how many times it reconnected."""

    name: str
    endpoint: str
    connected: bool
    down_for_s: float | None
    last_error: str | None
    queue_depth: int
    reconnects: int


@dataclass(slots=True)
class _UnitState:
    """Mutable per-unit bookkeeping behind :class:`UnitStats`."""

    requests: int = 0
    answers: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    consecutive_failures: int = 0
    last_latency_s: float | None = None
    backoff_until: float = 0.0
    last_error: str | None = None
    down_since: float | None = None

    def count(self, kind: str) -> None:
        """Add one failure of ``kind``."""
        self.errors[kind] = self.errors.get(kind, 0) + 1


# --- links: byte pipes with a receive buffer ----------------------------------------


class _Link(ABC):
    """A byte pipe to the bus: ``write`` bytes, watch ``buffer`` grow.

    ``lost`` is set when the pipe broke; ``wait_data`` wakes on new bytes or loss.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.lost: BaseException | None = None
        self._waiter: asyncio.Future[bool] | None = None

    @abstractmethod
    async def open(self, timeout_s: float) -> None:
        """Open the pipe within ``timeout_s``; raise ``OSError``/``TimeoutError``."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send ``data``; raise :class:`TransportError` when the pipe is broken."""

    def close(self) -> None:
        """Close the pipe and wake a waiting reader."""
        self._broken(TransportError("the bus was closed"))

    def clear(self) -> None:
        """Forget bytes received so far (stale answers, noise)."""
        self.buffer.clear()

    def _received(self, data: bytes) -> None:
        """Append ``data`` and wake the reader."""
        self.buffer += data
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _broken(self, exc: BaseException) -> None:
        """Record that the pipe broke and wake the reader."""
        if self.lost is None:
            self.lost = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    async def wait_data(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for more bytes; return whether any came."""
        if timeout_s <= 0 or self.lost is not None:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_s, _settle, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _settle(waiter: asyncio.Future[bool]) -> None:
    """Resolve ``waiter`` with "no data" when its time is up."""
    if not waiter.done():
        waiter.set_result(False)


class _TcpLink(_Link, asyncio.Protocol):
    """A TCP connection (Modbus TCP or RTU over TCP)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self._transport: asyncio.Transport | None = None

    async def open(self, timeout_s: float) -> None:
        """Connect within ``timeout_s`` seconds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: self, self.host, self.port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport asyncio made for us."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Collect bytes from the peer."""
        self._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """Note that the peer or the network closed the connection."""
        self._broken(exc or ConnectionResetError("the peer closed the connection"))

    def write(self, data: bytes) -> None:
        """Send ``data`` on the connection."""
        transport = self._transport
        if transport is None or transport.is_closing() or self.lost is not None:
            raise TransportError(f"connection to {self.host}:{self.port} is closed")
        transport.write(data)

    def close(self) -> None:
        """Close the connection."""
        if self._transport is not None:
            self._transport.abort()
        super().close()


class _SerialLink(_Link):
    """A serial port opened through pyserial, read without blocking the event loop."""

    def __init__(self, spec: BusSpec) -> None:
        super().__init__()
        self.spec = spec
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._pending = b""

    async def open(self, timeout_s: float) -> None:
        """Open and configure the port; hold it exclusively (one owner per line)."""
        import serial  # only buses on a serial line pay for pyserial

        del timeout_s  # opening a local port does not wait on the network
        try:
            port = serial.Serial(
                port=self.spec.serial_port,
                baudrate=self.spec.baudrate,
                bytesize=self.spec.bytesize,
                parity=self.spec.parity,
                stopbits=self.spec.stopbits,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except serial.SerialException as exc:
            if "exclusively lock" in str(exc):
                # One owner per line: usually the running agent holds it.
                raise OSError(
                    f"{self.spec.serial_port} is in use by another program (a "
                    "running ies-agent owns its serial lines; stop it to use this "
                    "line, or look at its live values)"
                ) from None
            raise
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        """Read what the port holds; a vanished port (USB pulled) breaks the link."""
        try:
            data = os.read(self._fd, 512)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stop_watching()
            self._broken(exc)
            return
        if not data:
            self._stop_watching()
            self._broken(ConnectionResetError("the serial port reported end of file"))
            return
        self._received(data)

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the port; what the driver cannot take now follows when
        it is writable."""
        if self._serial is None or self.lost is not None:
            raise TransportError(f"serial port {self.spec.serial_port} is closed")
        self._pending += data
        self._flush()

    def _flush(self) -> None:
        """Write as much pending data as the port takes."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                written = os.write(self._fd, self._pending)
                self._pending = self._pending[written:]
        except BlockingIOError:
            loop.add_writer(self._fd, self._flush)
            return
        except OSError as exc:
            self._stop_watching()
            self._broken(exc)
            return
        loop.remove_writer(self._fd)

    def clear(self) -> None:
        """Forget received bytes, including those still in the driver's queue."""
        super().clear()
        if self._serial is not None and self.lost is None:
            try:
                self._serial.reset_input_buffer()
            except OSError as exc:
                self._broken(exc)

    def _stop_watching(self) -> None:
        """Stop watching the port's file descriptor."""
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)

    def close(self) -> None:
        """Release the port."""
        self._stop_watching()
        self._fd = -1
        if self._serial is not None:
            with contextlib.suppress(OSError):  # the port may be gone already
                self._serial.close()
            self._serial = None
        super().close()


# --- the bus owner -------------------------------------------------------------------


class ModbusBus:
    """The single owner of one physical bus; see the module docstring.

    Use as ``async with ModbusBus(spec) as bus:`` or call :meth:`start` and
    :meth:`close`. All methods must run on one event loop.
    """

    def __init__(self, spec: BusSpec, *, rng: random.Random | None = None) -> None:
        self._spec = spec
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()
        self._link: _Link | None = None
        self._closed = False
        self._units: dict[int, _UnitState] = {}
        self._waiting = 0
        self._transaction_id = 0
        self._last_exchange_end = 0.0
        self._quiet_until = 0.0
        self._late_unit: int | None = None
        self._silent_streak = 0
        self._frames: deque[str] = deque(maxlen=_RECENT_FRAMES)
        # Link health, owned by _open_link / _drop_link only.
        self._link_failures = 0
        self._link_retry_at = 0.0
        self._link_down_since: float | None = None
        self._link_error: str | None = None
        self._reconnects = 0
        self._ever_connected = False
        if spec.kind == "rtu":
            self._settle_s = max(0.05, 10 * spec.char_time_s)
        else:
            self._settle_s = 0.05

    # -- life cycle

    @property
    def spec(self) -> BusSpec:
        """The bus's settings."""
        return self._spec

    async def start(self) -> None:
        """Open the link now so the first request does not pay for it.

        Never raises for an unreachable bus: the outage is logged once and requests
        raise :class:`TransportError` until a later attempt (at a request, after the
        link's back-off) succeeds.
        """
        async with self._lock:
            with contextlib.suppress(TransportError):  # logged once; requests report it
                await self._ensure_link()

    async def close(self) -> None:
        """Close the link; requests after this raise :class:`TransportError`."""
        self._closed = True
        if self._link is not None:
            self._link.close()
            self._link = None

    async def __aenter__(self) -> ModbusBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- status

    @property
    def connected(self) -> bool:
        """Whether the link is open right now."""
        return self._link is not None and self._link.lost is None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the wire (not counting the one on it)."""
        return self._waiting

    @property
    def stats(self) -> dict[int, UnitStats]:
        """A snapshot of every unit id's counters, keyed by unit id."""
        now = time.monotonic()
        return {
            unit: UnitStats(
                unit=unit,
                requests=state.requests,
                answers=state.answers,
                errors=dict(state.errors),
                consecutive_failures=state.consecutive_failures,
                last_latency_s=state.last_latency_s,
                backoff_remaining_s=max(0.0, state.backoff_until - now),
                last_error=state.last_error,
            )
            for unit, state in sorted(self._units.items())
        }

    @property
    def status(self) -> BusStatus:
        """A snapshot of the link's state."""
        since = self._link_down_since
        return BusStatus(
            name=self._spec.name,
            endpoint=self._spec.endpoint,
            connected=self.connected,
            down_for_s=None if since is None else time.monotonic() - since,
            last_error=self._link_error,
            queue_depth=self._waiting,
            reconnects=self._reconnects,
        )

    @property
    def recent_frames(self) -> tuple[str, ...]:
        """The last frames on the wire as ``> hex`` (sent) and ``< hex`` (received)."""
        return tuple(self._frames)

    # -- requests

    async def read_registers(
        self,
        unit: int,
        function: str | int,
        address: int,
        count: int,
        *,
        timeout_s: float | None = None,
        probe: bool = False,
    ) -> RegisterBlock:
        """Read ``count`` (1..125) registers from ``address`` of ``unit``.

        ``function`` is ``"holding"`` / 3 or ``"input"`` / 4. ``timeout_s`` overrides
        the bus's timeout for this request. ``probe=True`` (used by scans) neither
        honours nor starts the unit's back-off and logs nothing, so probing empty unit
        ids does not look like an outage. Raises :class:`ValueError` for arguments the
        protocol does not allow and the errors listed in the module docstring.
        """
        code = _function_code(function)
        frame, latency = await self._request(
            unit,
            code,
            read_request_pdu(code, address, count),
            address,
            timeout_s,
            probe,
        )
        if frame.count != count:
            error = FrameError(
                f"asked unit {unit} on bus {self._spec.name} for {count} registers at "
                f"{address}, the answer holds {frame.count}"
            )
            self._failed(unit, error, "frame", probe)
            raise error
        return RegisterBlock(code, address, frame.registers, latency)

    async def write_registers(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Write ``values`` (1..123 registers, each 0..65535) to the holding registers
        of ``unit`` from ``address`` with function 16, and check the confirmation.

        Raises :class:`ValueError` for values the protocol cannot carry and the errors
        listed in the module docstring.
        """
        pdu = write_registers_pdu(address, list(values))
        frame, _ = await self._request(unit, 16, pdu, address, timeout_s, False)
        if frame.address != address or frame.count != len(values):
            error = FrameError(
                f"unit {unit} on bus {self._spec.name} confirmed a write of "
                f"{frame.count} registers at {frame.address}, not {len(values)} at "
                f"{address}"
            )
            self._failed(unit, error, "frame", False)
            raise error

    async def read_points(
        self,
        unit: int,
        points: Sequence[PointSpec],
        *,
        sunspec: bool = False,
        max_block: int = MAX_BLOCK,
        max_gap: int = DEFAULT_MAX_GAP,
        timeout_s: float | None = None,
    ) -> DeviceRead:
        """Read and decode every point of one device.

        The points are merged into blocks (:func:`plan_blocks`); each block is one
        request. An exception response marks only that block's points ERROR. Any other
        failure (timeout, garbled answer, back-off, transport) stops the remaining
        blocks and is raised, because the device is not answering. Raises
        :class:`TemplateError` for points that cannot be planned.
        """
        blocks = plan_blocks(points, max_block=max_block, max_gap=max_gap)
        outcomes: list[tuple[Block, Sequence[int] | Exception]] = []
        refused = 0
        latency = 0.0
        for block in blocks:
            try:
                read = await self.read_registers(
                    unit,
                    block.function,
                    block.address,
                    block.count,
                    timeout_s=timeout_s,
                )
            except ExceptionResponse as exc:
                outcomes.append((block, exc))
                refused += 1
                continue
            outcomes.append((block, read.registers))
            latency += read.latency_s
        values = decode_device(points, outcomes, sunspec=sunspec)
        return DeviceRead(unit, tuple(values), len(blocks), refused, latency)

    # -- internals

    def _unit_state(self, unit: int) -> _UnitState:
        """Return the bookkeeping of ``unit``, creating it on first use."""
        state = self._units.get(unit)
        if state is None:
            state = self._units[unit] = _UnitState()
        return state

    def _check_unit(self, unit: int) -> None:
        """Raise :class:`ValueError` for a unit id requests cannot address."""
        low, high = (1, 247) if self._spec.kind != "tcp" else (0, 255)
        if not low <= unit <= high:
            raise ValueError(
                f"unit id {unit} cannot be asked on a {self._spec.kind} bus "
                f"(expected {low}..{high})"
            )

    def _refuse_if_backed_off(self, unit: int, state: _UnitState) -> None:
        """Raise :class:`DeviceBackedOff` while ``unit`` is in its back-off."""
        remaining = state.backoff_until - time.monotonic()
        if remaining > 0:
            state.count("backed_off")
            raise DeviceBackedOff(
                f"unit {unit} on bus {self._spec.name} failed "
                f"{state.consecutive_failures} time(s) in a row ({state.last_error}); "
                f"not asked again for {remaining:.1f} s"
            )

    async def _request(
        self,
        unit: int,
        function: int,
        pdu: bytes,
        address: int,
        timeout_s: float | None,
        probe: bool,
    ) -> tuple[RtuFrame, float]:
        """Send ``pdu`` to ``unit`` when the bus is free; return the answer and its
        latency in seconds. Exception responses are raised here."""
        self._check_unit(unit)
        timeout = self._spec.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} s must be > 0")
        state = self._unit_state(unit)
        if not probe:
            self._refuse_if_backed_off(unit, state)

        # Wait for the wire, first come first served.
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            if not probe:
                self._refuse_if_backed_off(unit, state)  # it may have failed meanwhile
            try:
                link = await self._ensure_link()
            except TransportError:
                state.count("transport")
                raise
            await self._keep_gap()

            # One exchange on the wire.
            state.requests += 1
            started = time.monotonic()
            try:
                frame = await self._exchange(link, unit, function, pdu, timeout)
            except DeviceTimeout as exc:
                self._failed(unit, exc, "timeout", probe)
                if not probe:
                    self._note_silence()
                if self._spec.kind != "tcp":
                    # RTU has no transaction ids: give a late answer a moment to
                    # arrive and be discarded, and recognise it if it comes later.
                    self._quiet_until = time.monotonic() + self._settle_s
                    self._late_unit = unit
                raise
            except WrongUnitError as exc:
                self._failed(unit, exc, "wrong_unit", probe)
                raise
            except FrameError as exc:
                self._failed(unit, exc, "frame", probe)
                if self._spec.kind == "tcp":
                    self._drop_link(f"the Modbus TCP stream is out of step: {exc}")
                raise
            except TransportError as exc:
                state.count("transport")
                self._drop_link(str(exc))
                raise
            finally:
                self._last_exchange_end = time.monotonic()
            latency = self._last_exchange_end - started
            self._silent_streak = 0

            # An answer: data or an exception code.
            if frame.kind == "exception":
                code = frame.exception_code or 0
                error = ExceptionResponse(code, function, unit, address)
                if code in GATEWAY_EXCEPTIONS:
                    self._failed(unit, error, "exception", probe)
                else:
                    state.count("exception")
                    self._answered(unit, latency)
                raise error
            self._answered(unit, latency)
            return frame, latency
        finally:
            self._lock.release()

    async def _exchange(
        self, link: _Link, unit: int, function: int, pdu: bytes, timeout_s: float
    ) -> RtuFrame:
        """Send one request and collect its answer from the link's bytes."""
        link.clear()
        late_unit, self._late_unit = self._late_unit, None
        scan: Callable[[bytes | bytearray], ResponseScan]
        if self._spec.kind == "tcp":
            self._transaction_id = self._transaction_id % 0xFFFF + 1
            tid = self._transaction_id
            adu = mbap_adu(tid, unit, pdu)

            def scan(data: bytes | bytearray) -> ResponseScan:
                return scan_mbap_response(
                    data, transaction_id=tid, unit=unit, function=function
                )

        else:
            adu = rtu_adu(unit, pdu)

            def scan(data: bytes | bytearray) -> ResponseScan:
                return scan_rtu_response(
                    data, request=adu, unit=unit, function=function
                )

        link.write(adu)
        self._frames.append("> " + adu.hex())
        deadline = time.monotonic() + timeout_s
        while True:
            result = scan(link.buffer)
            if result.state == "frame":
                assert result.frame is not None
                self._frames.append("< " + link.buffer[: result.end].hex())
                if result.frame.unit != unit:
                    if result.frame.unit == late_unit:
                        # The late answer of the unit that just timed out: drop it
                        # and keep waiting for ours.
                        del link.buffer[: result.end]
                        late_unit = None
                        continue
                    raise WrongUnitError(unit, result.frame.unit)
                return result.frame
            if link.lost is not None:
                raise TransportError(
                    f"bus {self._spec.name} ({self._spec.endpoint}) lost its link: "
                    f"{_describe(link.lost)}"
                )
            remaining = deadline - time.monotonic()
            if result.state == "invalid":
                # An RTU frame ends with silence: wait briefly for bytes that might
                # still turn what arrived into a valid frame.
                quiet = min(remaining, self._settle_s)
                if self._spec.kind == "tcp" or not await link.wait_data(quiet):
                    self._frames.append("< " + link.buffer.hex())
                    raise FrameError(f"bus {self._spec.name}: {result.problem}")
                continue
            if remaining <= 0:
                if link.buffer:
                    self._frames.append("< " + link.buffer.hex())
                if result.problem:
                    raise FrameError(
                        f"bus {self._spec.name}: {result.problem}; nothing more came "
                        f"within {timeout_s:g} s"
                    )
                echo = " (only the echo of our own request came back)"
                raise DeviceTimeout(
                    f"unit {unit} on bus {self._spec.name} did not answer function "
                    f"{function} within {timeout_s:g} s{echo if result.echo else ''}"
                )
            await link.wait_data(remaining)

    async def _keep_gap(self) -> None:
        """Sleep until the configured gap since the last exchange has passed (and,
        after an RTU timeout, the line has been quiet for a moment)."""
        ready = max(
            self._last_exchange_end + self._spec.effective_gap_s, self._quiet_until
        )
        wait = ready - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _answered(self, unit: int, latency_s: float) -> None:
        """Record an answer from ``unit``: reset its failures, log a recovery once."""
        state = self._unit_state(unit)
        state.answers += 1
        state.last_latency_s = latency_s
        if state.down_since is not None:  # set by a polled failure only
            log.info(
                "unit answers again",
                extra={
                    "kv": {
                        "bus": self._spec.name,
                        "unit": unit,
                        "failures": state.consecutive_failures,
                        "down_s": f"{time.monotonic() - state.down_since:.1f}",
                    }
                },
            )
        state.down_since = None
        state.consecutive_failures = 0
        state.backoff_until = 0.0

    def _failed(self, unit: int, error: DriverError, kind: str, probe: bool) -> None:
        """Record a failure of ``unit``; back it off; log the first one of a run."""
        state = self._unit_state(unit)
        state.count(kind)
        state.last_error = str(error)
        if probe:
            return
        state.consecutive_failures += 1
        delay = self._backoff(state.consecutive_failures)
        state.backoff_until = time.monotonic() + delay
        if state.down_since is None:
            state.down_since = time.monotonic()
            log.warning(
                "unit stopped answering; backing off",
                extra={
                    "kv": {
                        "bus": self._spec.name,
                        "unit": unit,
                        "error": str(error),
                        "backoff_s": f"{delay:.1f}",
                        "frames": " | ".join(list(self._frames)[-4:]),
                    }
                },
            )
        else:
            log.debug(
                "unit still failing",
                extra={
                    "kv": {"bus": self._spec.name, "unit": unit, "error": str(error)}
                },
            )

    def _backoff(self, failures: int) -> float:
        """Return the back-off after ``failures`` failures in a row, in seconds:
        doubling from the initial value, capped, scaled by a random 0.75..1."""
        base = min(
            self._spec.backoff_max_s,
            self._spec.backoff_initial_s * 2.0 ** min(failures - 1, 32),
        )
        return base * (0.75 + 0.25 * self._rng.random())

    def _note_silence(self) -> None:
        """Renew a TCP link after several unanswered requests in a row: a NAT or a
        converter may have dropped the connection without telling us."""
        self._silent_streak += 1
        if self._spec.kind != "rtu" and self._silent_streak >= _TCP_SILENT_LIMIT:
            self._silent_streak = 0
            self._drop_link(
                f"{_TCP_SILENT_LIMIT} requests in a row went unanswered; reconnecting",
                outage=False,
            )

    async def _ensure_link(self) -> _Link:
        """Return the open link, opening it if needed; this is the only place that
        (re)connects. Raises :class:`TransportError` when the bus is closed, during
        the link's back-off, or when opening fails."""
        if self._closed:
            raise TransportError(f"bus {self._spec.name} is closed")
        link = self._link
        if link is not None and link.lost is None:
            return link
        if link is not None:
            self._drop_link(_describe(link.lost) if link.lost else "link lost")
        wait = self._link_retry_at - time.monotonic()
        if wait > 0:
            raise TransportError(
                f"bus {self._spec.name} ({self._spec.endpoint}) is down: "
                f"{self._link_error}; next attempt in {wait:.1f} s"
            )
        return await self._open_link()

    async def _open_link(self) -> _Link:
        """Open a new link; on failure log the outage once and back the link off."""
        spec = self._spec
        link: _Link = (
            _SerialLink(spec) if spec.kind == "rtu" else _TcpLink(spec.host, spec.port)
        )
        try:
            await link.open(spec.connect_timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            link.close()
            self._link_failures += 1
            delay = self._backoff(self._link_failures)
            self._link_retry_at = time.monotonic() + delay
            reason = _describe(exc)
            self._link_error = reason
            if self._link_down_since is None:
                self._link_down_since = time.monotonic()
                log.warning(
                    "bus unreachable",
                    extra={
                        "kv": {
                            "bus": spec.name,
                            "endpoint": spec.endpoint,
                            "error": reason,
                            "retry_s": f"{delay:.1f}",
                        }
                    },
                )
            raise TransportError(
                f"bus {spec.name} ({spec.endpoint}) is unreachable: {reason}"
            ) from None
        if self._link_down_since is not None:
            log.info(
                "bus reachable again",
                extra={
                    "kv": {
                        "bus": spec.name,
                        "endpoint": spec.endpoint,
                        "down_s": f"{time.monotonic() - self._link_down_since:.1f}",
                    }
                },
            )
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        self._link_down_since = None
        self._link_failures = 0
        self._link = link
        self._last_exchange_end = 0.0
        return link

    def _drop_link(self, reason: str, *, outage: bool = True) -> None:
        """Close the current link; the next request reconnects at once. Logs the
        outage once when ``outage`` (a renewal on silence is not one)."""
        if self._link is not None:
            self._link.close()
            self._link = None
        self._link_error = reason
        if outage and self._link_down_since is None:
            self._link_down_since = time.monotonic()
            log.warning(
                "bus link lost; reconnecting",
                extra={
                    "kv": {
                        "bus": self._spec.name,
                        "endpoint": self._spec.endpoint,
                        "error": reason,
                    }
                },
            )


def _function_code(function: str | int) -> int:
    """Return the read function code for ``"holding"``/3 or ``"input"``/4."""
    if isinstance(function, str):
        if function == "holding":
            return 3
        if function == "input":
            return 4
        raise ValueError(f"register table {function!r} is not holding or input")
    if function not in (3, 4):
        raise ValueError(
            f"function {function} does not read registers (expected 3 or 4)"
        )
    return function


def _describe(exc: BaseException) -> str:
    """Return a short human description of a lower-layer exception."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
