"""The DLMS/COSEM TCP wrapper (IEC 62056-47), without I/O.

Over TCP (port 4059 by default) every APDU travels behind an 8-byte header:
version (0x0001), source wPort, destination wPort (the client SAP and the server's
logical device, 16 and 1 for the public client of a management device) and the APDU
length. There is no link to open: the association starts with the first AARQ.

:class:`WrapperLink` has the same shape as :class:`~ies_drivers.dlms.hdlc.HdlcLink`
(feed bytes, take events, send what is queued), so the client and the server run on
either. Errors: :class:`WrapperFrameError` for a header with another version, an
APDU for other wPorts (with the ports named) or a length beyond our limit.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Literal

from ies_drivers.dlms.errors import WrapperFrameError
from ies_drivers.dlms.hdlc import NEED_DATA, ApduReceived, HdlcEvent

VERSION: Final = 1
HEADER_SIZE: Final = 8
DEFAULT_PORT: Final = 4059
MAX_APDU: Final = 0xFFFF


def wrap(source: int, destination: int, apdu: bytes) -> bytes:
    """Return ``apdu`` behind a wrapper header from wPort ``source`` to
    ``destination``. Raises :class:`WrapperFrameError` for an APDU over 65535
    bytes or a port outside 0..65535."""
    if len(apdu) > MAX_APDU:
        raise WrapperFrameError(f"an APDU of {len(apdu)} bytes does not fit a wrapper")
    if not (0 <= source <= 0xFFFF and 0 <= destination <= 0xFFFF):
        raise WrapperFrameError(f"wPorts {source} and {destination} must be 0..65535")
    return (
        VERSION.to_bytes(2, "big")
        + source.to_bytes(2, "big")
        + destination.to_bytes(2, "big")
        + len(apdu).to_bytes(2, "big")
        + apdu
    )


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Return ``(source, destination, length)`` of the 8-byte header at the start
    of ``data``. Raises :class:`WrapperFrameError` for a short header or a version
    other than 1."""
    if len(data) < HEADER_SIZE:
        raise WrapperFrameError(f"a wrapper header has 8 bytes, not {len(data)}")
    version = int.from_bytes(data[0:2], "big")
    if version != VERSION:
        raise WrapperFrameError(
            f"wrapper version {version} (expected 1): not a DLMS TCP wrapper stream "
            f"({bytes(data[:8]).hex(' ')})"
        )
    return (
        int.from_bytes(data[2:4], "big"),
        int.from_bytes(data[4:6], "big"),
        int.from_bytes(data[6:8], "big"),
    )


class WrapperLink:
    """One end of a wrapper connection; ``local``/``remote`` are wPorts.

    A client's ``local`` is its SAP and ``remote`` the logical device; a server the
    other way round. ``connect`` and ``disconnect`` only change the state.
    """

    def __init__(
        self,
        local: int,
        remote: int,
        *,
        role: Literal["client", "server"] = "client",
        max_apdu: int = MAX_APDU,
    ) -> None:
        self.local = local
        self.remote = remote
        self.role = role
        self.max_apdu = max_apdu
        self.state = "disconnected"
        self._buffer = bytearray()
        self._out = bytearray()
        self._events: deque[HdlcEvent] = deque()
        self.frames_in = 0
        self.frames_out = 0

    def connect(self) -> None:
        """Mark the connection usable (TCP itself is the link)."""
        self.state = "connected"

    def disconnect(self) -> None:
        """Mark the connection closed."""
        self.state = "disconnected"

    def send(self, apdu: bytes) -> None:
        """Queue ``apdu`` behind a header."""
        self._out += wrap(self.local, self.remote, apdu)
        self.frames_out += 1

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the connection."""
        self._buffer += data

    def data_to_send(self) -> bytes:
        """Return and forget the bytes queued for the connection."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> HdlcEvent:
        """Return the next :class:`ApduReceived` or :data:`NEED_DATA`.

        Raises :class:`WrapperFrameError` for a bad header, an APDU for other
        wPorts or one longer than ``max_apdu``; the stream cannot be resynchronised
        after that, so the owner closes the connection.
        """
        if self._events:
            return self._events.popleft()
        if len(self._buffer) < HEADER_SIZE:
            return NEED_DATA
        source, destination, length = parse_header(bytes(self._buffer[:HEADER_SIZE]))
        if length > self.max_apdu:
            raise WrapperFrameError(
                f"wrapper announces an APDU of {length} bytes, more than the "
                f"{self.max_apdu} we accept"
            )
        if self.role == "server" and destination == self.local:
            self.remote = source  # any client SAP may connect; it is checked later
        if (source, destination) != (self.remote, self.local):
            self._buffer.clear()
            raise WrapperFrameError(
                f"APDU from wPort {source} to {destination}, expected from "
                f"{self.remote} to {self.local}: check the client and server "
                "addresses"
            )
        if len(self._buffer) < HEADER_SIZE + length:
            return NEED_DATA
        apdu = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        self.frames_in += 1
        return ApduReceived(apdu)

    def reset(self) -> None:
        """Forget everything buffered."""
        self._buffer.clear()
        self._out.clear()
        self._events.clear()
        self.state = "disconnected"
