"""HDLC framing of DLMS/COSEM (IEC 62056-46), without I/O: bytes in, events out.

A frame on the line is ``7E | format | dest | src | control | HCS | info | FCS | 7E``.
The format field holds the frame type (0xA), the segmentation bit and an 11-bit
length: the number of bytes between the flags. :class:`FrameReader` uses that length
to find the end of a frame, so a 0x7E inside the FCS (field case FC-04) does not end
it early, and it tolerates garbage between frames, back-to-back flags and reads that
stop anywhere. HCS and FCS are the CRC-16/X.25 (:func:`fcs16`) sent low byte first.

Addresses are one byte for a client (its SAP) and 1, 2 or 4 bytes for a server: the
upper HDLC address is the logical device (1 for the management device), the lower one
the physical device address (often derived from the meter serial). Every address
byte carries 7 bits; the last byte has its low bit set.

:class:`HdlcLink` is one end of a link, client or server: ``connect()`` queues SNRM
with the sizes we propose, the UA answer fixes what both sides may send; ``send()``
splits an APDU into I-frames no longer than the peer takes (segmentation, one frame
in flight, the receiver answers RR for the next); frames are numbered N(S)/N(R)
modulo 8 and checked; ``disconnect()`` queues DISC. The link drops the RS-485 echo of
frames it sent itself.

For optical probes, the IEC 62056-21 mode E opening (:func:`iec_request`,
:func:`parse_identification`, :func:`mode_e_ack`) switches a meter from the 300-baud
readout to HDLC at the baud rate it announces.

Errors: :class:`HdlcFrameError` for broken frames and sequences, :class:`AddressError`
for a frame for another client or from another server.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

from ies_drivers.dlms.errors import AddressError, HdlcFrameError

FLAG: Final = 0x7E
FORMAT_TYPE_3: Final = 0xA000
SEGMENT_BIT: Final = 0x0800
LENGTH_MASK: Final = 0x07FF
MAX_FRAME_LENGTH: Final = LENGTH_MASK
LLC_REQUEST: Final = b"\xe6\xe6\x00"
LLC_RESPONSE: Final = b"\xe6\xe7\x00"

PUBLIC_CLIENT: Final = 0x10
"""Client SAP of the public client (no security), 16."""
MANAGEMENT_LOGICAL_DEVICE: Final = 1

# Control field values with the poll/final bit clear.
SNRM: Final = 0x83
DISC: Final = 0x43
UA: Final = 0x63
DM: Final = 0x0F
FRMR: Final = 0x87
UI: Final = 0x03
POLL_FINAL: Final = 0x10


# --- frame check sequence -----------------------------------------------------------


def _fcs_table() -> tuple[int, ...]:
    """Return the 256-entry table of the reflected CRC-16 polynomial 0x8408."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_FCS_TABLE = _fcs_table()


def fcs16(data: bytes) -> int:
    """Return the HDLC frame check sequence of ``data`` (CRC-16/X.25: initial value
    0xFFFF, reflected polynomial 0x8408, final XOR 0xFFFF); the frame carries it low
    byte first. The check value of ``b"123456789"`` is 0x906E."""
    crc = 0xFFFF
    table = _FCS_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF


# --- addresses ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HdlcAddress:
    """An HDLC address: ``upper`` (client SAP, or a server's logical device),
    ``lower`` (a server's physical address, ``None`` in a one-byte address) and its
    ``size`` on the wire (1, 2 or 4 bytes)."""

    upper: int
    lower: int | None = None
    size: int = 1

    def __post_init__(self) -> None:
        limit = {1: 0x7F, 2: 0x7F, 4: 0x3FFF}.get(self.size)
        if limit is None:
            raise ValueError(f"an HDLC address has 1, 2 or 4 bytes, not {self.size}")
        if not 0 <= self.upper <= limit:
            raise ValueError(
                f"upper address {self.upper} does not fit {self.size} bytes"
            )
        if self.size == 1 and self.lower is not None:
            raise ValueError("a one-byte address has no lower (physical) part")
        if self.size > 1 and (self.lower is None or not 0 <= self.lower <= limit):
            raise ValueError(
                f"lower address {self.lower} does not fit {self.size} bytes"
            )

    @classmethod
    def client(cls, sap: int) -> HdlcAddress:
        """Return a client address (one byte) for SAP ``sap`` (16 public, 32 reader)."""
        return cls(sap)

    @classmethod
    def server(cls, logical: int = 1, physical: int = 0, size: int = 4) -> HdlcAddress:
        """Return a server address of ``size`` bytes (physical ignored for size 1)."""
        if size == 1:
            return cls(logical)
        return cls(logical, physical, size)

    def to_bytes(self) -> bytes:
        """Return the address bytes, 7 bits each, the last with its low bit set."""
        if self.size == 1:
            return bytes(((self.upper << 1) | 1,))
        lower = self.lower or 0
        if self.size == 2:
            return bytes((self.upper << 1, (lower << 1) | 1))
        return bytes(
            (
                (self.upper >> 7) << 1,
                (self.upper & 0x7F) << 1,
                (lower >> 7) << 1,
                ((lower & 0x7F) << 1) | 1,
            )
        )

    def same(self, other: HdlcAddress) -> bool:
        """Tell whether ``other`` names the same station (size aside)."""
        return self.upper == other.upper and (self.lower or 0) == (other.lower or 0)

    def __str__(self) -> str:
        if self.lower is None:
            return str(self.upper)
        return f"{self.upper}/{self.lower}"


def decode_address(data: bytes, pos: int) -> tuple[HdlcAddress, int]:
    """Read an address at ``pos``; return it and the position after it.

    Raises :class:`HdlcFrameError` for an address of 3 or more than 4 bytes.
    """
    end = pos
    while end < len(data) and not data[end] & 1:
        end += 1
        if end - pos >= 4:
            break
    size = end - pos + 1
    if end >= len(data) or not data[end] & 1 or size == 3:
        raise HdlcFrameError(
            f"address at byte {pos} has no valid end (sizes 1, 2 or 4 bytes): "
            f"{data[pos : pos + 4].hex(' ')}"
        )
    raw = data[pos : end + 1]
    if size == 1:
        return HdlcAddress(raw[0] >> 1), end + 1
    if size == 2:
        return HdlcAddress(raw[0] >> 1, raw[1] >> 1, 2), end + 1
    upper = (raw[0] >> 1) << 7 | raw[1] >> 1
    lower = (raw[2] >> 1) << 7 | raw[3] >> 1
    return HdlcAddress(upper, lower, 4), end + 1


# --- frames -------------------------------------------------------------------------


class FrameKind(StrEnum):
    """What a control field says a frame is."""

    I = "I"  # noqa: E741 - the HDLC name of an information frame
    RR = "RR"
    RNR = "RNR"
    SNRM = "SNRM"
    DISC = "DISC"
    UA = "UA"
    DM = "DM"
    FRMR = "FRMR"
    UI = "UI"
    UNKNOWN = "?"


_UNNUMBERED = {
    SNRM: FrameKind.SNRM,
    DISC: FrameKind.DISC,
    UA: FrameKind.UA,
    DM: FrameKind.DM,
    FRMR: FrameKind.FRMR,
    UI: FrameKind.UI,
}


def frame_kind(control: int) -> FrameKind:
    """Return the kind of frame a control byte announces."""
    if not control & 0x01:
        return FrameKind.I
    if control & 0x03 == 0x01:
        return {0x01: FrameKind.RR, 0x05: FrameKind.RNR}.get(
            control & 0x0F, FrameKind.UNKNOWN
        )
    return _UNNUMBERED.get(control & ~POLL_FINAL & 0xFF, FrameKind.UNKNOWN)


def i_control(send_seq: int, recv_seq: int, poll: bool = True) -> int:
    """Return the control byte of an I-frame N(S)=``send_seq``, N(R)=``recv_seq``."""
    return (recv_seq & 7) << 5 | (POLL_FINAL if poll else 0) | (send_seq & 7) << 1


def rr_control(recv_seq: int, poll: bool = True) -> int:
    """Return the control byte of an RR (receive ready) frame N(R)=``recv_seq``."""
    return (recv_seq & 7) << 5 | (POLL_FINAL if poll else 0) | 0x01


@dataclass(frozen=True, slots=True)
class HdlcFrame:
    """One checked HDLC frame. ``info`` is the information field as sent (with the
    LLC header on the first segment of an APDU); ``segmented`` is the format
    field's S bit: more segments of the same APDU follow."""

    dest: HdlcAddress
    src: HdlcAddress
    control: int
    info: bytes = b""
    segmented: bool = False
    hcs: int | None = None
    fcs: int = 0

    @property
    def kind(self) -> FrameKind:
        """The frame's kind from its control byte."""
        return frame_kind(self.control)

    @property
    def send_seq(self) -> int:
        """N(S) of an I-frame."""
        return (self.control >> 1) & 7

    @property
    def recv_seq(self) -> int:
        """N(R) of an I, RR or RNR frame."""
        return (self.control >> 5) & 7

    @property
    def poll_final(self) -> bool:
        """The poll/final bit."""
        return bool(self.control & POLL_FINAL)

    def to_bytes(self) -> bytes:
        """Return the frame with flags, HCS (when there is info) and FCS."""
        return encode_frame(
            self.dest, self.src, self.control, self.info, segmented=self.segmented
        )


def encode_frame(
    dest: HdlcAddress,
    src: HdlcAddress,
    control: int,
    info: bytes = b"",
    *,
    segmented: bool = False,
) -> bytes:
    """Return a complete frame with flags, format field, HCS and FCS.

    Raises :class:`HdlcFrameError` when the frame would exceed the 11-bit length.
    """
    header_len = 2 + dest.size + src.size + 1
    length = header_len + (2 + len(info) if info else 0) + 2
    if length > MAX_FRAME_LENGTH:
        raise HdlcFrameError(
            f"a frame of {length} bytes does not fit the 11-bit length field"
        )
    fmt = FORMAT_TYPE_3 | (SEGMENT_BIT if segmented else 0) | length
    header = (
        fmt.to_bytes(2, "big") + dest.to_bytes() + src.to_bytes() + bytes((control,))
    )
    body = header
    if info:
        body += fcs16(header).to_bytes(2, "little") + info
    return b"\x7e" + body + fcs16(body).to_bytes(2, "little") + b"\x7e"


def decode_frame(frame: bytes) -> HdlcFrame:
    """Check and decode one complete frame (with its two flags).

    Raises :class:`HdlcFrameError` naming what is wrong: missing flags, a length
    field that disagrees with the frame, a format type other than 3, a bad address,
    or an HCS/FCS that does not match (with both values).
    """
    if len(frame) < 9 or frame[0] != FLAG or frame[-1] != FLAG:
        raise HdlcFrameError(
            f"not an HDLC frame ({len(frame)} bytes, must start and end with 7E): "
            f"{frame[:16].hex(' ')}"
        )
    body = frame[1:-1]
    fmt = int.from_bytes(body[0:2], "big")
    if fmt & 0xF000 != FORMAT_TYPE_3:
        raise HdlcFrameError(f"format field 0x{fmt:04X} is not frame format type 3")
    length = fmt & LENGTH_MASK
    if length != len(body):
        raise HdlcFrameError(
            f"length field says {length} bytes between the flags, frame has {len(body)}"
        )
    dest, pos = decode_address(body, 2)
    src, pos = decode_address(body, pos)
    if pos >= len(body) - 2:
        raise HdlcFrameError(f"frame of {length} bytes ends before its control field")
    control = body[pos]
    pos += 1
    fcs_read = int.from_bytes(body[-2:], "little")
    fcs_calc = fcs16(body[:-2])
    if fcs_read != fcs_calc:
        raise HdlcFrameError(
            f"FCS check failed: frame carries 0x{fcs_read:04X}, its bytes give "
            f"0x{fcs_calc:04X} (line noise or a cut frame)"
        )
    hcs: int | None = None
    info = b""
    if pos < len(body) - 2:
        if pos + 2 > len(body) - 2:
            raise HdlcFrameError("frame ends inside its header check sequence")
        hcs = int.from_bytes(body[pos : pos + 2], "little")
        hcs_calc = fcs16(body[:pos])
        if hcs != hcs_calc:
            raise HdlcFrameError(
                f"HCS check failed: frame carries 0x{hcs:04X}, its header gives "
                f"0x{hcs_calc:04X}"
            )
        info = bytes(body[pos + 2 : -2])
    return HdlcFrame(dest, src, control, info, bool(fmt & SEGMENT_BIT), hcs, fcs_read)


class FrameReader:
    """Find frames in a byte stream that arrives in pieces.

    :meth:`feed` adds bytes; :meth:`next_frame` returns the next complete frame,
    ``None`` when more bytes are needed, or raises :class:`HdlcFrameError` for a
    broken frame after dropping its bytes (the next call goes on with what
    follows). Bytes before a flag are noise and skipped; ``skipped`` counts them.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.skipped = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a frame."""
        return len(self._buffer)

    def next_frame(self) -> tuple[HdlcFrame, bytes] | None:
        """Return the next frame and its raw bytes, or ``None`` if incomplete."""
        buf = self._buffer
        while True:
            start = buf.find(FLAG)
            if start < 0:
                self.skipped += len(buf)
                buf.clear()
                return None
            if start:
                self.skipped += start
                del buf[:start]
            # Back-to-back flags: a closing flag followed by an opening one.
            while len(buf) >= 2 and buf[1] == FLAG:
                del buf[0]
            if len(buf) < 3:
                return None
            fmt = int.from_bytes(buf[1:3], "big")
            if fmt & 0xF000 != FORMAT_TYPE_3:
                del buf[0]
                self.skipped += 1
                continue
            length = fmt & LENGTH_MASK
            if length < 7:
                del buf[0]
                raise HdlcFrameError(f"length field {length} is too short for a frame")
            if len(buf) < length + 2:
                return None
            raw = bytes(buf[: length + 2])
            if raw[-1] != FLAG:
                del buf[0]
                raise HdlcFrameError(
                    f"no closing flag after the {length} bytes the length field "
                    f"announces (byte there is 0x{raw[-1]:02X}): frame cut or garbled"
                )
            # Keep the closing flag: it may open the next frame.
            del buf[: length + 1]
            return decode_frame(raw), raw


# --- link parameters ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HdlcParameters:
    """What one side may send and receive: information field sizes in bytes and
    window sizes in frames (IEC 62056-46 defaults: 128 bytes, 1 frame)."""

    max_info_tx: int = 128
    max_info_rx: int = 128
    window_tx: int = 1
    window_rx: int = 1

    def to_info(self) -> bytes:
        """Return the SNRM/UA information field carrying these parameters."""
        params = b""
        for ident, value, size in (
            (0x05, self.max_info_tx, 1 if self.max_info_tx < 256 else 2),
            (0x06, self.max_info_rx, 1 if self.max_info_rx < 256 else 2),
            (0x07, self.window_tx, 4),
            (0x08, self.window_rx, 4),
        ):
            params += bytes((ident, size)) + value.to_bytes(size, "big")
        return bytes((0x81, 0x80, len(params))) + params

    @classmethod
    def from_info(cls, info: bytes) -> HdlcParameters:
        """Read the parameters of a SNRM or UA; missing ones keep their defaults.

        Raises :class:`HdlcFrameError` when the field is not a parameter
        negotiation group or its lengths run past its end.
        """
        if not info:
            return cls()
        if len(info) < 3 or info[0] != 0x81 or info[1] != 0x80:
            raise HdlcFrameError(
                f"SNRM/UA information is not a parameter group: {info[:8].hex(' ')}"
            )
        end = 3 + info[2]
        if end > len(info):
            raise HdlcFrameError("parameter group is longer than the frame")
        values = {0x05: 128, 0x06: 128, 0x07: 1, 0x08: 1}
        pos = 3
        while pos < end:
            if pos + 2 > end:
                raise HdlcFrameError("parameter group ends inside a parameter")
            ident, size = info[pos], info[pos + 1]
            if pos + 2 + size > end or size > 4:
                raise HdlcFrameError(f"parameter 0x{ident:02X} has a bad length {size}")
            values[ident] = int.from_bytes(info[pos + 2 : pos + 2 + size], "big")
            pos += 2 + size
        return cls(values[0x05], values[0x06], values[0x07], values[0x08])


# --- the link -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The link is up; ``params`` are the sizes the peer answered (client) or
    asked for (server)."""

    params: HdlcParameters


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The link is down (UA or DM to our DISC, or the peer's DISC)."""


@dataclass(frozen=True, slots=True)
class ApduReceived:
    """A complete APDU, reassembled from ``frames`` frames, LLC header removed."""

    apdu: bytes
    frames: int = 1


class NeedData:
    """No event yet: feed more bytes (and send what :meth:`data_to_send` holds)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

HdlcEvent = Connected | Disconnected | ApduReceived | NeedData
LinkState = Literal["disconnected", "connecting", "connected", "disconnecting"]
ECHO_MEMORY = 4


class HdlcLink:
    """One end of an HDLC link, as a state machine without I/O.

    ``role="client"`` opens and closes the link and sends requests;
    ``role="server"`` answers SNRM and DISC by itself and sends responses.
    ``local`` and ``remote`` are the two stations' addresses; ``params`` the sizes
    this end proposes (client) or accepts (server).

    Feed bytes with :meth:`receive_data`, take events from :meth:`next_event`, and
    write out whatever :meth:`data_to_send` returns after every call.
    """

    def __init__(
        self,
        local: HdlcAddress,
        remote: HdlcAddress,
        *,
        role: Literal["client", "server"] = "client",
        params: HdlcParameters | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.role = role
        self.params = params or HdlcParameters()
        self.state: LinkState = "disconnected"
        self.peer_params = HdlcParameters()
        self._reader = FrameReader()
        self._out = bytearray()
        self._events: deque[HdlcEvent] = deque()
        self._send_seq = 0
        self._recv_seq = 0
        self._segments: deque[bytes] = deque()
        self._awaiting_ack = False
        self._assembly = bytearray()
        self._assembly_frames = 0
        self._sent: deque[bytes] = deque(maxlen=ECHO_MEMORY)
        self.frames_in = 0
        self.frames_out = 0
        self.echoes = 0

    # -- what the owner calls

    @property
    def max_info_tx(self) -> int:
        """Longest information field we may send, as negotiated."""
        return min(self.params.max_info_tx, self.peer_params.max_info_rx)

    def connect(self) -> None:
        """Queue SNRM with our parameters (client only)."""
        self._require_role("client", "connect")
        self._reset_numbers()
        self.state = "connecting"
        self._emit(SNRM | POLL_FINAL, self.params.to_info())

    def disconnect(self) -> None:
        """Queue DISC (client only)."""
        self._require_role("client", "disconnect")
        self.state = "disconnecting"
        self._emit(DISC | POLL_FINAL)

    def send(self, apdu: bytes) -> None:
        """Queue ``apdu`` as one or more I-frames; later segments go out as the
        peer acknowledges each one with RR.

        Raises :class:`HdlcFrameError` when the link is not connected or a previous
        APDU is still being sent.
        """
        if self.state != "connected":
            raise HdlcFrameError(f"cannot send an APDU: the link is {self.state}")
        if self._segments or self._awaiting_ack:
            raise HdlcFrameError("cannot send an APDU while the previous one is sent")
        llc = LLC_REQUEST if self.role == "client" else LLC_RESPONSE
        data = llc + apdu
        size = max(self.max_info_tx, 16)
        self._segments.extend(data[i : i + size] for i in range(0, len(data), size))
        self._send_next_segment()

    def send_ui(self, apdu: bytes) -> None:
        """Queue ``apdu`` in UI frames (unnumbered: a push or a broadcast)."""
        data = (LLC_RESPONSE if self.role == "server" else LLC_REQUEST) + apdu
        size = max(self.max_info_tx, 16)
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            self._emit(UI | (POLL_FINAL if last else 0), chunk, segmented=not last)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the line (any amount, any split)."""
        self._reader.feed(data)

    def data_to_send(self) -> bytes:
        """Return and forget the bytes queued for the line."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> HdlcEvent:
        """Return the next event, or :data:`NEED_DATA`.

        Raises :class:`HdlcFrameError` for a broken frame or a sequence error and
        :class:`AddressError` (client) for a frame from another station; the
        frame's bytes are dropped, so the link can go on or be reset.
        """
        while not self._events:
            found = self._reader.next_frame()
            if found is None:
                return NEED_DATA
            frame, raw = found
            if raw in self._sent:
                self.echoes += 1  # RS-485 echo of our own frame
                continue
            self.frames_in += 1
            self._handle(frame)
        return self._events.popleft()

    def reset(self) -> None:
        """Forget everything in flight and go to ``disconnected``."""
        self.state = "disconnected"
        self._reader = FrameReader()
        self._out.clear()
        self._events.clear()
        self._segments.clear()
        self._awaiting_ack = False
        self._assembly.clear()
        self._assembly_frames = 0
        self._reset_numbers()

    # -- internals

    def _require_role(self, role: str, action: str) -> None:
        if self.role != role:
            raise HdlcFrameError(f"only a {role} can {action} an HDLC link")

    def _reset_numbers(self) -> None:
        self._send_seq = 0
        self._recv_seq = 0

    def _emit(
        self, control: int, info: bytes = b"", *, segmented: bool = False
    ) -> None:
        raw = encode_frame(self.remote, self.local, control, info, segmented=segmented)
        self._out += raw
        self._sent.append(raw)
        self.frames_out += 1

    def _send_next_segment(self) -> None:
        chunk = self._segments.popleft()
        more = bool(self._segments)
        control = i_control(self._send_seq, self._recv_seq)
        self._send_seq = (self._send_seq + 1) & 7
        self._emit(control, chunk, segmented=more)
        self._awaiting_ack = more

    def _handle(self, frame: HdlcFrame) -> None:
        if self.role == "server":
            if not _addressed_to(frame.dest, self.local):
                return  # another station's traffic on a shared line
            if frame.kind is FrameKind.SNRM or self.state == "disconnected":
                # Answer in the address form the client chose, to the client it is.
                self.local = frame.dest
                self.remote = frame.src
            elif not frame.src.same(self.remote):
                return
        elif not (frame.dest.same(self.local) and frame.src.same(self.remote)):
            raise AddressError(
                f"frame from {frame.src} to {frame.dest}, expected from "
                f"{self.remote} to {self.local}: wrong client or server address, "
                "or another meter answers on this line"
            )
        kind = frame.kind
        if kind is FrameKind.I:
            self._handle_information(frame)
        elif kind in (FrameKind.RR, FrameKind.RNR):
            self._handle_ready(frame)
        elif kind is FrameKind.UI:
            self._collect(frame)
        elif self.role == "client":
            self._handle_client_unnumbered(frame, kind)
        else:
            self._handle_server_unnumbered(frame, kind)

    def _handle_client_unnumbered(self, frame: HdlcFrame, kind: FrameKind) -> None:
        if kind is FrameKind.UA and self.state == "connecting":
            self.peer_params = HdlcParameters.from_info(frame.info)
            self.state = "connected"
            self._events.append(Connected(self.peer_params))
        elif kind in (FrameKind.UA, FrameKind.DM) and self.state == "disconnecting":
            self.state = "disconnected"
            self._events.append(Disconnected())
        elif kind is FrameKind.DM:
            self.state = "disconnected"
            raise HdlcFrameError(
                "meter answered DM (disconnected mode): it refuses the link or "
                "dropped it after its inactivity timeout"
            )
        elif kind is FrameKind.FRMR:
            raise HdlcFrameError(f"meter rejected our frame (FRMR {frame.info.hex()})")
        else:
            raise HdlcFrameError(
                f"unexpected {kind.value} frame while the link is {self.state}"
            )

    def _handle_server_unnumbered(self, frame: HdlcFrame, kind: FrameKind) -> None:
        if kind is FrameKind.SNRM:
            asked = HdlcParameters.from_info(frame.info)
            self.peer_params = asked
            answer = HdlcParameters(
                max_info_tx=min(self.params.max_info_tx, asked.max_info_rx),
                max_info_rx=min(self.params.max_info_rx, asked.max_info_tx),
                window_tx=1,
                window_rx=1,
            )
            self.peer_params = HdlcParameters(
                asked.max_info_tx, answer.max_info_tx, 1, 1
            )
            self._reset_numbers()
            self._segments.clear()
            self._awaiting_ack = False
            self._assembly.clear()
            self.state = "connected"
            self._emit(UA | POLL_FINAL, answer.to_info())
            self._events.append(Connected(asked))
        elif kind is FrameKind.DISC:
            was = self.state
            self.state = "disconnected"
            self._emit((UA if was == "connected" else DM) | POLL_FINAL)
            self._events.append(Disconnected())
        else:
            self._emit(FRMR | POLL_FINAL)

    def _handle_information(self, frame: HdlcFrame) -> None:
        if self.state != "connected":
            if self.role == "server":
                self._emit(DM | POLL_FINAL)
                return
            raise HdlcFrameError(f"I-frame received while the link is {self.state}")
        if frame.send_seq != self._recv_seq:
            raise HdlcFrameError(
                f"frame out of sequence: N(S)={frame.send_seq}, expected "
                f"{self._recv_seq} (a frame was lost or repeated)"
            )
        if frame.recv_seq != self._send_seq:
            raise HdlcFrameError(
                f"peer acknowledges N(R)={frame.recv_seq}, we sent up to "
                f"{(self._send_seq - 1) & 7}"
            )
        self._recv_seq = (self._recv_seq + 1) & 7
        self._awaiting_ack = False
        self._collect(frame)
        if frame.segmented:
            self._emit(rr_control(self._recv_seq))

    def _collect(self, frame: HdlcFrame) -> None:
        self._assembly += frame.info
        self._assembly_frames += 1
        if frame.segmented:
            return
        data = bytes(self._assembly)
        frames = self._assembly_frames
        self._assembly.clear()
        self._assembly_frames = 0
        if len(data) < 3 or data[0] != 0xE6 or data[1] not in (0xE6, 0xE7) or data[2]:
            raise HdlcFrameError(
                f"information field does not start with the LLC header E6 E6/E7 00: "
                f"{data[:3].hex(' ')}"
            )
        self._events.append(ApduReceived(data[3:], frames))

    def _handle_ready(self, frame: HdlcFrame) -> None:
        if frame.recv_seq != self._send_seq:
            raise HdlcFrameError(
                f"RR acknowledges N(R)={frame.recv_seq}, expected {self._send_seq}"
            )
        if frame.kind is FrameKind.RR and self._segments:
            self._send_next_segment()
        elif self.role == "server" and not self._segments:
            self._emit(rr_control(self._recv_seq))


def _addressed_to(dest: HdlcAddress, station: HdlcAddress) -> bool:
    """Tell whether ``dest`` names ``station``: same logical device, and the same
    physical address when the frame gives one."""
    if dest.upper != station.upper:
        return False
    return dest.lower is None or station.lower is None or dest.lower == station.lower


def reassemble(frames: list[bytes]) -> bytes:
    """Check ``frames`` (complete frames with flags) and return the APDU they carry.

    The first frame must start with the LLC header; every frame but the last must
    have its segmentation bit set, the last must not. Raises
    :class:`HdlcFrameError` for a broken frame, a missing LLC header, or a
    sequence that ends while the segmentation bit still says "more follows" —
    one frame of a segmented APDU alone never yields partial data (FC-05).
    """
    if not frames:
        raise HdlcFrameError("no frames to reassemble")
    info = bytearray()
    for index, raw in enumerate(frames):
        frame = decode_frame(raw)
        last = index == len(frames) - 1
        if frame.segmented and last:
            raise HdlcFrameError(
                f"frame {index + 1} of {len(frames)} says more segments follow: "
                "the APDU is incomplete"
            )
        if not frame.segmented and not last:
            raise HdlcFrameError(
                f"frame {index + 1} ends the APDU but {len(frames) - index - 1} "
                "more frames were given"
            )
        info += frame.info
    if len(info) < 3 or info[0] != 0xE6 or info[1] not in (0xE6, 0xE7) or info[2]:
        raise HdlcFrameError(
            f"information does not start with the LLC header: {bytes(info[:3]).hex()}"
        )
    return bytes(info[3:])


# --- IEC 62056-21 mode E ------------------------------------------------------------

IEC_BAUD = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}
"""Baud rate characters of IEC 62056-21 protocol modes C and E."""


@dataclass(frozen=True, slots=True)
class IecIdentification:
    """The identification message of a meter's optical port: ``/XXXZ\\Wident``."""

    manufacturer: str
    baud_char: str
    mode_e: bool
    ident: str

    @property
    def baudrate(self) -> int:
        """The baud rate the meter proposes for the data exchange."""
        return IEC_BAUD[self.baud_char]


def iec_request(device_address: str = "") -> bytes:
    """Return the sign-on request ``/?address!CR LF`` (sent at 300 baud, 7E1)."""
    return b"/?" + device_address.encode("ascii") + b"!\r\n"


def parse_identification(line: bytes) -> IecIdentification:
    """Read the meter's identification message.

    Raises :class:`HdlcFrameError` when it is not ``/XXXZ...CR LF`` with a known
    baud rate character.
    """
    text = line.decode("ascii", "replace").strip("\r\n\x00 ")
    if len(text) < 5 or text[0] != "/" or text[4] not in IEC_BAUD:
        raise HdlcFrameError(
            f"not an IEC 62056-21 identification: {text!r} (expected '/XXXZ...')"
        )
    rest = text[5:]
    mode_e = rest.startswith("\\2")
    if mode_e:
        rest = rest[2:]
    return IecIdentification(text[1:4], text[4], mode_e, rest)


def mode_e_ack(baud_char: str) -> bytes:
    """Return the acknowledgement that switches the meter to HDLC (mode E) at the
    baud rate of ``baud_char``: ``ACK 2 Z 2 CR LF``."""
    if baud_char not in IEC_BAUD:
        raise HdlcFrameError(f"{baud_char!r} is not an IEC 62056-21 baud character")
    return b"\x062" + baud_char.encode("ascii") + b"2\r\n"
