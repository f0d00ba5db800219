"""Thin asyncio transports for DLMS/COSEM, and the async client that drives them.

:class:`DlmsClient` owns one connection to one meter: a serial port (HDLC, RS-485 or
an optical probe with the IEC 62056-21 mode E opening) or a TCP connection (the
wrapper on port 4059, or HDLC passed through a serial-to-Ethernet converter). It
moves bytes between the channel and the protocol state machines
(:class:`~ies_drivers.dlms.hdlc.HdlcLink` or
:class:`~ies_drivers.dlms.wrapper.WrapperLink`, and
:class:`~ies_drivers.dlms.client.ClientSession`) and does nothing else.

Every read has a hard deadline: a meter that sends nothing new for ``timeout_s``
seconds raises :class:`DlmsTimeout`. Any error leaves the client closed, never half
associated; :meth:`DlmsClient.release` ends an association politely (RLRQ, DISC) and
never raises. pyserial and ``OSError`` are translated into
:class:`DlmsTransportError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ies_drivers.dlms import hdlc
from ies_drivers.dlms.apdu import (
    AccessSelection,
    AttributeDescriptor,
    GetResult,
    MethodDescriptor,
)
from ies_drivers.dlms.axdr import Data
from ies_drivers.dlms.client import (
    ActionDone,
    Associated,
    ClientSession,
    ClientSettings,
    GetDone,
    PushReceived,
    Released,
    SendNext,
    SessionEvent,
    SetDone,
)
from ies_drivers.dlms.errors import (
    DataAccessError,
    DlmsError,
    DlmsTimeout,
    DlmsTransportError,
    SessionStateError,
)
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.wrapper import DEFAULT_PORT, WrapperLink

if TYPE_CHECKING:
    import serial

TransportKind = Literal["hdlc-serial", "hdlc-tcp", "wrapper-tcp"]
TRANSPORT_KINDS = ("hdlc-serial", "hdlc-tcp", "wrapper-tcp")


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Where a meter is and how its line works.

    ``transport``: ``"hdlc-serial"`` (``serial_port`` at ``baudrate``, 8N1; with
    ``mode_e`` the optical-probe opening at 300 baud first), ``"hdlc-tcp"`` (HDLC
    through a serial-to-Ethernet converter at ``host:port``) or ``"wrapper-tcp"``
    (IEC 62056-47, ``port`` 4059 by default). ``server_logical`` and
    ``server_physical`` form the HDLC server address of ``server_address_size``
    bytes (1, 2 or 4); the wrapper uses ``server_logical`` as destination wPort.
    ``timeout_s`` is the answer deadline in seconds, ``max_info`` the HDLC
    information field size we propose in bytes.
    """

    transport: TransportKind = "wrapper-tcp"
    serial_port: str = ""
    baudrate: int = 9600
    mode_e: bool = False
    host: str = ""
    port: int = DEFAULT_PORT
    server_logical: int = 1
    server_physical: int = 0
    server_address_size: int = 4
    max_info: int = 128
    timeout_s: float = 3.0
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORT_KINDS:
            raise DlmsTransportError(
                f"transport {self.transport!r} is not one of {TRANSPORT_KINDS}"
            )
        if self.transport == "hdlc-serial" and not self.serial_port:
            raise DlmsTransportError("an hdlc-serial meter needs a serial_port")
        if self.transport != "hdlc-serial" and not self.host:
            raise DlmsTransportError(f"a {self.transport} meter needs a host")
        if self.timeout_s <= 0:
            raise DlmsTransportError("timeout_s must be positive")

    @property
    def label(self) -> str:
        """Where the meter is, for identities and messages."""
        if self.transport == "hdlc-serial":
            return f"dlms-hdlc:{self.serial_port}"
        kind = "dlms-hdlc" if self.transport == "hdlc-tcp" else "dlms-tcp"
        return f"{kind}:{self.host}:{self.port}"


# --- channels -----------------------------------------------------------------------


class _Channel(ABC):
    """Bytes in both directions, with a buffer the reader waits on."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.buffer = bytearray()
        self.lost: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def _received(self, data: bytes) -> None:
        self.buffer += data
        self.bytes_in += len(data)
        self._wake()

    def _broken(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, deadline: float) -> bytes:
        """Return the bytes received so far, waiting until ``deadline``
        (``time.monotonic()``) for at least one; raises :class:`DlmsTimeout` or
        :class:`DlmsTransportError`."""
        while not self.buffer:
            if self.lost is not None:
                raise DlmsTransportError(f"{self.where}: connection lost ({self.lost})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DlmsTimeout(f"{self.where}: no answer before the deadline")
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(remaining, self._wake)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send ``data`` on the link; raise when the link is broken."""

    def close(self) -> None:
        self._broken(ConnectionResetError("closed"))


class _TcpChannel(_Channel, asyncio.Protocol):
    """A TCP connection."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"{host}:{port}")
        self.host = host
        self.port = port
        self._transport: asyncio.Transport | None = None

    async def open(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(lambda: self, self.host, self.port)
        except TimeoutError:
            raise DlmsTimeout(
                f"{self.where}: no TCP connection within {timeout_s} s"
            ) from None
        except OSError as exc:
            raise DlmsTransportError(f"{self.where}: cannot connect ({exc})") from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken(exc or ConnectionResetError("the meter closed the connection"))

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self.lost is not None:
            raise DlmsTransportError(f"{self.where}: connection is closed")
        transport.write(data)
        self.bytes_out += len(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        super().close()


class _SerialChannel(_Channel):
    """A serial port through pyserial, read without blocking the event loop."""

    def __init__(self, path: str, baudrate: int) -> None:
        super().__init__(path)
        self.path = path
        self.baudrate = baudrate
        self._serial: serial.Serial | None = None
        self._fd = -1

    async def open(self, timeout_s: float) -> None:
        """Open the port at ``baudrate``, 8N1, held exclusively."""
        import termios

        import serial  # only serial meters pay for pyserial

        del timeout_s  # opening a local port does not wait on the network
        try:
            port = serial.Serial(
                port=self.path,
                baudrate=self.baudrate,
                stopbits=1,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, termios.error, OSError, ValueError) as exc:
            raise DlmsTransportError(
                f"cannot open serial port {self.path}: {exc}"
            ) from None
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def reconfigure(
        self, baudrate: int, *, bytesize: int = 8, parity: str = "N"
    ) -> None:
        """Change line speed and format (mode E: 300 baud 7E1, then HDLC 8N1).

        The format is changed at the faster of the two speeds: some drivers, and
        Linux pseudo-terminals, refuse 7E1 and 300 baud in one step.
        """
        import termios

        import serial

        port = self._serial
        if port is None:
            raise DlmsTransportError(f"serial port {self.path} is closed")
        try:
            if baudrate < port.baudrate:
                port.bytesize, port.parity = bytesize, parity
                port.baudrate = baudrate
            else:
                port.baudrate = baudrate
                port.bytesize, port.parity = bytesize, parity
        except (serial.SerialException, termios.error, OSError, ValueError) as exc:
            if not _is_pseudo_terminal(self._fd):
                raise DlmsTransportError(
                    f"{self.path}: cannot set {baudrate} baud "
                    f"{bytesize}{parity}1: {exc}"
                ) from None
            # A pseudo-terminal (tests, socat bridges) has no line to format and
            # sometimes refuses 7E1; the bytes pass through all the same.
        self.baudrate = baudrate

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
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
        if self._serial is None or self.lost is not None:
            raise DlmsTransportError(f"serial port {self.path} is closed")
        self.bytes_out += len(data)
        view = memoryview(data)
        deadline = time.monotonic() + 2.0
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DlmsTransportError(
                        f"{self.path}: the port does not take data"
                    ) from None
                time.sleep(0.001)
            except OSError as exc:
                self._broken(exc)
                raise DlmsTransportError(f"{self.path}: write failed ({exc})") from None

    def _stop_watching(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._fd)

    def close(self) -> None:
        self._stop_watching()
        self._fd = -1
        if self._serial is not None:
            with contextlib.suppress(OSError):
                self._serial.close()
            self._serial = None
        super().close()


def _is_pseudo_terminal(fd: int) -> bool:
    """Tell whether ``fd`` is the slave side of a Unix 98 pseudo-terminal."""
    try:
        return 136 <= os.major(os.fstat(fd).st_rdev) <= 143
    except OSError:
        return False


# --- the client ---------------------------------------------------------------------


class DlmsClient:
    """One association with one meter over one channel.

    Use ``async with DlmsClient(link, settings) as client:`` or :meth:`connect`
    and :meth:`release`. Methods must not be called concurrently; the owner (a
    device) serialises them.
    """

    def __init__(self, link: LinkSettings, settings: ClientSettings) -> None:
        self.link_settings = link
        self.settings = settings
        self.session = ClientSession(settings)
        self.associated: Associated | None = None
        self.identification: hdlc.IecIdentification | None = None
        self._channel: _TcpChannel | _SerialChannel | None = None
        self._link: hdlc.HdlcLink | WrapperLink = self._new_link()
        self.exchanges = 0

    def _new_link(self) -> hdlc.HdlcLink | WrapperLink:
        link, settings = self.link_settings, self.settings
        if link.transport == "wrapper-tcp":
            return WrapperLink(settings.client_sap, link.server_logical)
        return hdlc.HdlcLink(
            hdlc.HdlcAddress.client(settings.client_sap),
            hdlc.HdlcAddress.server(
                link.server_logical, link.server_physical, link.server_address_size
            ),
            params=hdlc.HdlcParameters(link.max_info, link.max_info),
        )

    @property
    def line_bytes(self) -> tuple[int, int]:
        """Bytes sent and received on the current channel (for benchmarks)."""
        channel = self._channel
        return (0, 0) if channel is None else (channel.bytes_out, channel.bytes_in)

    @property
    def is_open(self) -> bool:
        """Whether the association is established and the channel up."""
        return (
            self.associated is not None
            and self._channel is not None
            and self._channel.lost is None
        )

    async def __aenter__(self) -> DlmsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    # -- life cycle

    async def connect(self) -> Associated:
        """Open the channel, bring the link up and associate.

        Raises :class:`DlmsError` subclasses (rejected association, timeout, broken
        frames, port missing); the client is closed again when it raises.
        """
        if self._channel is not None:
            raise SessionStateError("client is already connected")
        link = self.link_settings
        try:
            if link.transport == "hdlc-serial":
                channel = _SerialChannel(link.serial_port, link.baudrate)
                self._channel = channel
                await channel.open(link.connect_timeout_s)
                if link.mode_e:
                    await self._mode_e(channel)
            else:
                tcp = _TcpChannel(link.host, link.port)
                self._channel = tcp
                await tcp.open(link.connect_timeout_s)
            self._link = self._new_link()
            self.session = ClientSession(self.settings)
            self._link.connect()
            if isinstance(self._link, hdlc.HdlcLink):
                await self._link_exchange(want=hdlc.Connected)
            event = await self._request(self.session.associate())
            while isinstance(event, SendNext):  # HLS: our reply to the challenge
                event = await self._request(event.request)
            if not isinstance(event, Associated):
                raise SessionStateError(f"association ended with {event!r}")
        except BaseException:
            self._close_channel()
            raise
        self.associated = event
        return event

    async def _mode_e(self, channel: _SerialChannel) -> None:
        link = self.link_settings
        channel.reconfigure(300, bytesize=7, parity="E")
        channel.write(hdlc.iec_request())
        deadline = time.monotonic() + link.timeout_s
        line = b""
        while b"\r\n" not in line:
            line += await channel.read(deadline)
        ident = hdlc.parse_identification(line.split(b"\r\n", 1)[0] + b"\r\n")
        if not ident.mode_e:
            raise DlmsTransportError(
                f"optical port answered {ident.manufacturer}{ident.ident!r} without "
                "mode E (HDLC): it offers only the IEC 62056-21 readout"
            )
        ack = hdlc.mode_e_ack(ident.baud_char)
        channel.write(ack)
        await asyncio.sleep(len(ack) * 10 / 300)  # let the ACK leave at 300 baud
        channel.reconfigure(ident.baudrate)
        self.identification = ident

    async def release(self) -> None:
        """Release the association and close the channel; never raises."""
        try:
            if self.associated is not None and self.is_open:
                with contextlib.suppress(DlmsError, TimeoutError):
                    event = await self._request(self.session.release())
                    if not isinstance(event, Released):
                        self.session.abort()
            link, channel = self._link, self._channel
            if (
                isinstance(link, hdlc.HdlcLink)
                and channel is not None
                and channel.lost is None
                and link.state == "connected"
            ):
                with contextlib.suppress(DlmsError, TimeoutError):
                    link.disconnect()
                    await self._link_exchange(want=hdlc.Disconnected)
        finally:
            self._close_channel()

    def close(self) -> None:
        """Drop the channel without releasing (after an error)."""
        self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self.associated = None
        self.session.abort()
        self._link.reset()

    # -- services

    async def get(
        self,
        class_id: int,
        obis: Obis,
        attribute: int,
        access: AccessSelection | None = None,
    ) -> Data:
        """Read one attribute; raises :class:`DataAccessError` when the meter
        refuses it, or other :class:`DlmsError` subclasses."""
        value, _ = await self.get_with_raw(class_id, obis, attribute, access)
        return value

    async def get_with_raw(
        self,
        class_id: int,
        obis: Obis,
        attribute: int,
        access: AccessSelection | None = None,
    ) -> tuple[Data, tuple[bytes, ...]]:
        """Read one attribute; also return the plain response APDUs it came in."""
        descriptor = AttributeDescriptor(class_id, obis, attribute)
        event = await self._run(self.session.get(descriptor, access))
        if not isinstance(event, GetDone):
            raise SessionStateError(f"GET ended with {event!r}")
        result = event.results[0]
        if not isinstance(result, Data):
            raise DataAccessError(result.code, f"reading {descriptor}")
        return result, event.responses

    async def get_many(
        self, items: list[tuple[int, Obis, int]]
    ) -> tuple[list[GetResult], tuple[bytes, ...]]:
        """Read several attributes in one GET with list (when the meter accepts
        multiple references), returning results in order and the response APDUs."""
        descriptors = [(AttributeDescriptor(c, o, a), None) for c, o, a in items]
        event = await self._run(self.session.get_with_list(descriptors))
        if not isinstance(event, GetDone):
            raise SessionStateError(f"GET with list ended with {event!r}")
        return list(event.results), event.responses

    async def set(self, class_id: int, obis: Obis, attribute: int, value: Data) -> None:
        """Write one attribute; raises :class:`DataAccessError` when refused."""
        descriptor = AttributeDescriptor(class_id, obis, attribute)
        event = await self._run(self.session.set(descriptor, value))
        if not isinstance(event, SetDone):
            raise SessionStateError(f"SET ended with {event!r}")
        if event.result:
            raise DataAccessError(event.result, f"writing {descriptor}")

    async def action(
        self, class_id: int, obis: Obis, method: int, parameters: Data | None = None
    ) -> GetResult | None:
        """Invoke a method; return its return value. Raises :class:`DataAccessError`
        when the action result is not success."""
        descriptor = MethodDescriptor(class_id, obis, method)
        event = await self._run(self.session.action(descriptor, parameters))
        if not isinstance(event, ActionDone):
            raise SessionStateError(f"ACTION ended with {event!r}")
        if event.result:
            raise DataAccessError(event.result, f"invoking {descriptor}")
        return event.value

    # -- the exchange loop

    async def _run(self, request: bytes) -> SessionEvent:
        """Send ``request``, follow block transfer, close the client on errors."""
        if not self.is_open:
            raise SessionStateError("client is not connected")
        try:
            event = await self._request(request)
            while isinstance(event, SendNext):
                event = await self._request(event.request)
            return event
        except BaseException:
            self._close_channel()
            raise

    async def _request(self, apdu: bytes) -> SessionEvent:
        """Send one APDU and return the session's reading of the answer."""
        self._link.send(apdu)
        self.exchanges += 1
        while True:
            event = await self._link_exchange(want=hdlc.ApduReceived)
            assert isinstance(event, hdlc.ApduReceived)
            result = self.session.receive(event.apdu)
            if not isinstance(result, PushReceived):
                return result

    async def _link_exchange(self, want: type) -> hdlc.HdlcEvent:
        """Write what the link queued and read until it reports ``want``.

        The deadline restarts whenever a frame arrives, so a long segmented answer
        on a slow line is not cut off while it is still flowing.
        """
        channel = self._channel
        if channel is None:
            raise DlmsTransportError("client is not connected")
        link = self._link
        timeout = self.link_settings.timeout_s
        deadline = time.monotonic() + timeout
        frames = link.frames_in
        while True:
            out = link.data_to_send()
            if out:
                channel.write(out)
            event = link.next_event()
            if isinstance(event, want):
                return event
            if event is hdlc.NEED_DATA:
                out = link.data_to_send()  # e.g. RR for the next segment
                if out:
                    channel.write(out)
                if link.frames_in != frames:
                    frames = link.frames_in
                    deadline = time.monotonic() + timeout
                try:
                    link.receive_data(await channel.read(deadline))
                except DlmsTimeout:
                    raise DlmsTimeout(
                        f"{self.link_settings.label}: meter sent no complete answer "
                        f"within {timeout} s"
                    ) from None
                continue
            raise SessionStateError(f"unexpected link event {event!r}")
