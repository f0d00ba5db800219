"""Modbus frames as bytes, without I/O: RTU frames (with CRC) and Modbus TCP frames.

Everything here takes bytes and returns values or raises :class:`FrameError` /
:class:`DecodeError`; the asyncio bus in :mod:`ies_drivers.modbus.bus` is a thin shell
around it, and ``ies-agent decode --protocol modbus-rtu HEX`` calls
:func:`decode_rtu_frame` on a captured frame.

An RTU frame is ``unit | PDU | CRC`` with the CRC-16/MODBUS of ``unit | PDU`` sent low
byte first. A Modbus TCP frame is ``MBAP header | PDU``: transaction id, protocol id 0,
length of what follows, unit id. The PDU is the same in both: a function code and its
data. Only the functions an energy gateway uses are decoded: read coils / discrete
inputs / holding / input registers (1-4), write single coil / register (5, 6) and write
multiple coils / registers (15, 16), plus exception responses (function | 0x80).

Reading a response off a serial line means finding it among other bytes: the RS-485
echo of our own request, garbage from a line glitch before the frame, or a frame that
stops short. :func:`scan_rtu_response` and :func:`scan_mbap_response` look at what has
arrived so far and say "a frame", "not yet" or "this cannot become a frame", each with
a message a person can act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ies_drivers.errors import DecodeError, FrameError

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16

EXCEPTION_BIT = 0x80
MAX_READ_REGISTERS = 125
"""Most registers one read request may ask for (Modbus application protocol 6.3)."""
MAX_WRITE_REGISTERS = 123
"""Most registers one write-multiple request may carry (Modbus application protocol)."""
MAX_READ_BITS = 2000
MAX_WRITE_BITS = 1968
MAX_RTU_FRAME = 256
"""Longest RTU frame in bytes: unit, 253-byte PDU, two CRC bytes."""

_READS = (
    READ_COILS,
    READ_DISCRETE_INPUTS,
    READ_HOLDING_REGISTERS,
    READ_INPUT_REGISTERS,
)
_SINGLE_WRITES = (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER)
_MULTI_WRITES = (WRITE_MULTIPLE_COILS, WRITE_MULTIPLE_REGISTERS)
_KNOWN = (*_READS, *_SINGLE_WRITES, *_MULTI_WRITES)

FrameKind = Literal["request", "response", "exception"]


def _crc_table() -> tuple[int, ...]:
    """Return the 256-entry table of the reflected CRC-16 polynomial 0xA001."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Return the CRC-16/MODBUS of ``data`` (initial value 0xFFFF, reflected 0xA001).

    The frame carries it low byte first: the CRC of the bytes ``01 03 04 00 00 3F 80``
    is ``0x63EA``, sent as ``EA 63``.
    """
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


@dataclass(frozen=True, slots=True)
class RtuFrame:
    """One decoded Modbus frame.

    Named for RTU, where it carries a ``crc``; a frame read from Modbus TCP has
    ``crc = None`` and its MBAP ``transaction_id`` instead.

    ``function`` is the function code without the exception bit; ``kind`` says whether
    the frame is a request, a normal response or an exception response.
    ``address`` and ``count`` are the first register (0-based protocol address) and the
    quantity of a request or of a write response; for a register read response,
    ``count`` is the number of registers it holds. ``registers`` holds the 16-bit
    values of a register read response, of a write-multiple request and of a
    write-single frame. ``data`` is the PDU after the function code, as sent.
    """

    unit: int
    function: int
    kind: FrameKind
    data: bytes
    address: int | None = None
    count: int | None = None
    registers: tuple[int, ...] = ()
    exception_code: int | None = None
    crc: int | None = None
    transaction_id: int | None = None


def parse_hex(text: str) -> bytes:
    """Return the bytes written in ``text`` as hex: ``"01 03 04"``, ``"01:03:04"``,
    ``"010304"`` or ``"0x01 0x03"``.

    Raises :class:`FrameError` naming the first character that is not a hex digit or a
    separator, or when the digits do not pair up into whole bytes.
    """
    cleaned = re.sub(r"0[xX](?=[0-9a-fA-F])", "", text)
    digits = re.sub(r"[\s:,\-]", "", cleaned)
    bad = re.search(r"[^0-9a-fA-F]", digits)
    if bad:
        raise FrameError(
            f"{bad.group()!r} is not a hex digit: write the frame as bytes like "
            "'01 03 04 00 00 3F 80 EA 63'"
        )
    if len(digits) % 2:
        raise FrameError(
            f"{len(digits)} hex digits do not make whole bytes: each byte needs two"
        )
    return bytes.fromhex(digits)


# --- encoding ------------------------------------------------------------------------


def read_request_pdu(function: int, address: int, count: int) -> bytes:
    """Return the PDU asking for ``count`` registers or bits from ``address``.

    ``function`` is 1, 2, 3 or 4. Raises :class:`ValueError` for a function that does
    not read, an address outside 0..65535, or a count the protocol does not allow
    (1..125 registers, 1..2000 bits) or that runs past register 65535.
    """
    if function not in _READS:
        raise ValueError(f"function {function} is not a read (expected 1, 2, 3 or 4)")
    limit = MAX_READ_BITS if function in (1, 2) else MAX_READ_REGISTERS
    _check_range(address, count, limit)
    return bytes((function,)) + address.to_bytes(2, "big") + count.to_bytes(2, "big")


def write_registers_pdu(address: int, values: tuple[int, ...] | list[int]) -> bytes:
    """Return the write-multiple-registers (function 16) PDU for ``values`` at
    ``address``.

    Raises :class:`ValueError` for 0 or more than 123 values, a value outside
    0..65535, or an address range past register 65535.
    """
    _check_range(address, len(values), MAX_WRITE_REGISTERS)
    for value in values:
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value} is outside 0..65535")
    body = b"".join(v.to_bytes(2, "big") for v in values)
    return (
        bytes((WRITE_MULTIPLE_REGISTERS,))
        + address.to_bytes(2, "big")
        + len(values).to_bytes(2, "big")
        + bytes((len(body),))
        + body
    )


def _check_range(address: int, count: int, limit: int) -> None:
    """Raise :class:`ValueError` unless ``count`` items from ``address`` fit."""
    if not 0 <= address <= 0xFFFF:
        raise ValueError(f"address {address} is outside 0..65535")
    if not 1 <= count <= limit:
        raise ValueError(f"count {count} is outside 1..{limit}")
    if address + count > 0x10000:
        raise ValueError(f"{count} items from address {address} run past 65535")


def rtu_adu(unit: int, pdu: bytes) -> bytes:
    """Return the RTU frame for ``pdu`` to ``unit``: unit, PDU, CRC low byte first.

    Raises :class:`ValueError` for a unit outside 0..255 or a PDU over 253 bytes.
    """
    _check_unit(unit)
    if not 1 <= len(pdu) <= MAX_RTU_FRAME - 3:
        raise ValueError(f"a PDU has 1..253 bytes, not {len(pdu)}")
    body = bytes((unit,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def mbap_adu(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    """Return the Modbus TCP frame for ``pdu`` to ``unit`` with ``transaction_id``.

    Raises :class:`ValueError` for an id outside 0..65535, a unit outside 0..255 or a
    PDU over 253 bytes.
    """
    if not 0 <= transaction_id <= 0xFFFF:
        raise ValueError(f"transaction id {transaction_id} is outside 0..65535")
    _check_unit(unit)
    if not 1 <= len(pdu) <= MAX_RTU_FRAME - 3:
        raise ValueError(f"a PDU has 1..253 bytes, not {len(pdu)}")
    return (
        transaction_id.to_bytes(2, "big")
        + b"\x00\x00"
        + (len(pdu) + 1).to_bytes(2, "big")
        + bytes((unit,))
        + pdu
    )


def _check_unit(unit: int) -> None:
    """Raise :class:`ValueError` unless ``unit`` fits in one byte."""
    if not 0 <= unit <= 255:
        raise ValueError(f"unit id {unit} is outside 0..255")


def encode_read_request(unit: int, function: int, address: int, count: int) -> bytes:
    """Return the RTU frame asking ``unit`` for ``count`` items at ``address``.

    ``function`` is 1-4 (3 holding registers, 4 input registers). Raises
    :class:`ValueError` for arguments the protocol does not allow (see
    :func:`read_request_pdu`; unit ids are 0..255).
    """
    return rtu_adu(unit, read_request_pdu(function, address, count))


def encode_write_request(
    unit: int, address: int, values: tuple[int, ...] | list[int]
) -> bytes:
    """Return the RTU frame writing ``values`` to holding registers from ``address``.

    Raises :class:`ValueError` as :func:`write_registers_pdu` does.
    """
    return rtu_adu(unit, write_registers_pdu(address, values))


# --- decoding ------------------------------------------------------------------------


def decode_rtu_frame(data: bytes) -> RtuFrame:
    """Decode one complete RTU frame (unit, PDU, CRC), request or response.

    Raises :class:`FrameError` when the frame is too short or too long, when its CRC
    does not match (the message gives the CRC the bytes compute to and the one the
    frame carries), or when its length does not fit its function and byte count.
    Raises :class:`DecodeError` for a well-formed frame of a function this driver does
    not decode. Requests and responses are told apart by their length; write-single
    frames (functions 5, 6) look the same both ways and decode as requests.
    """
    if len(data) < 4:
        raise FrameError(
            f"{len(data)} bytes are too short for an RTU frame: it needs a unit id, a "
            "function code and two CRC bytes"
        )
    if len(data) > MAX_RTU_FRAME:
        raise FrameError(
            f"{len(data)} bytes are too long for one RTU frame "
            f"(at most {MAX_RTU_FRAME})"
        )
    expected = crc16(data[:-2])
    got = int.from_bytes(data[-2:], "little")
    if expected != got:
        raise FrameError(
            f"CRC mismatch: the bytes compute to 0x{expected:04X} (sent as "
            f"{expected & 0xFF:02X} {expected >> 8:02X}) but the frame carries "
            f"0x{got:04X} ({data[-2]:02X} {data[-1]:02X}); the frame is damaged or "
            "incomplete"
        )
    frame = decode_pdu(data[0], data[1:-2])
    return _with(frame, crc=got)


def decode_pdu(
    unit: int, pdu: bytes, *, role: Literal["request", "response"] | None = None
) -> RtuFrame:
    """Decode a PDU (function code and data) sent to or by ``unit``.

    ``role`` says whether the PDU is known to be a request or a response; ``None``
    tells them apart by length. Raises :class:`FrameError` when the data length does
    not fit the function (a short or padded frame, a byte count that disagrees with the
    data) and :class:`DecodeError` for a function this driver does not decode.
    """
    if not pdu:
        raise FrameError(f"frame from unit {unit} holds no function code")
    function, body = pdu[0], pdu[1:]

    # Exception response: function | 0x80 and one exception code.
    if function & EXCEPTION_BIT:
        base = function & ~EXCEPTION_BIT
        if len(body) != 1:
            raise FrameError(
                f"exception response to function {base} from unit {unit} has "
                f"{len(body)} data bytes, expected 1 (the exception code)"
            )
        return RtuFrame(unit, base, "exception", body, exception_code=body[0])
    if function not in _KNOWN:
        raise DecodeError(
            f"function {function} (0x{function:02X}) from unit {unit} is not decoded "
            "here; this driver decodes functions 1-6, 15 and 16"
        )

    if function in _READS:
        return _decode_read(unit, function, body, role)
    if function in _SINGLE_WRITES:
        if len(body) != 4:
            raise FrameError(
                f"function {function} frame from unit {unit} has {len(body)} data "
                "bytes, expected 4 (address and value)"
            )
        address = int.from_bytes(body[0:2], "big")
        value = int.from_bytes(body[2:4], "big")
        return RtuFrame(
            unit, function, role or "request", body, address, 1, registers=(value,)
        )
    return _decode_multi_write(unit, function, body, role)


def _decode_read(
    unit: int,
    function: int,
    body: bytes,
    role: Literal["request", "response"] | None,
) -> RtuFrame:
    """Decode the data of a read request (address, count) or response (byte count)."""
    registers = function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS)
    fits_request = len(body) == 4
    fits_response = (
        len(body) >= 1 and len(body) == 1 + body[0] and not (registers and body[0] % 2)
    )
    if role is None:
        role = "request" if fits_request else "response"
    if role == "request":
        if not fits_request:
            raise FrameError(
                f"read request (function {function}) to unit {unit} has {len(body)} "
                "data bytes, expected 4 (address and count)"
            )
        address = int.from_bytes(body[0:2], "big")
        count = int.from_bytes(body[2:4], "big")
        limit = MAX_READ_REGISTERS if registers else MAX_READ_BITS
        if not 1 <= count <= limit or address + count > 0x10000:
            raise FrameError(
                f"read request to unit {unit} asks for {count} items at {address}; "
                f"the protocol allows 1..{limit} within 0..65535"
            )
        return RtuFrame(unit, function, "request", body, address, count)
    if not fits_response:
        if not body:
            detail = "no byte count"
        elif registers and body[0] % 2 and len(body) == 1 + body[0]:
            detail = f"an odd byte count {body[0]}, which cannot hold whole registers"
        else:
            detail = f"byte count {body[0]} but {len(body) - 1} data bytes"
        raise FrameError(
            f"read response (function {function}) from unit {unit} has {detail}"
        )
    payload = body[1:]
    if not registers:
        return RtuFrame(unit, function, "response", body, count=len(payload) * 8)
    values = tuple(
        int.from_bytes(payload[i : i + 2], "big") for i in range(0, len(payload), 2)
    )
    return RtuFrame(
        unit, function, "response", body, count=len(values), registers=values
    )


def _decode_multi_write(
    unit: int,
    function: int,
    body: bytes,
    role: Literal["request", "response"] | None,
) -> RtuFrame:
    """Decode a write-multiple request (with values) or its 4-byte response."""
    if role is None:
        role = "response" if len(body) == 4 else "request"
    if len(body) < 4:
        raise FrameError(
            f"function {function} frame from unit {unit} has {len(body)} data bytes, "
            "expected at least 4 (address and quantity)"
        )
    address = int.from_bytes(body[0:2], "big")
    count = int.from_bytes(body[2:4], "big")
    if role == "response":
        if len(body) != 4:
            raise FrameError(
                f"write response (function {function}) from unit {unit} has "
                f"{len(body)} data bytes, expected 4"
            )
        return RtuFrame(unit, function, "response", body, address, count)
    if len(body) < 5 or len(body) != 5 + body[4]:
        raise FrameError(
            f"write request (function {function}) to unit {unit}: byte count and "
            f"data length disagree ({len(body)} data bytes)"
        )
    needed = 2 * count if function == WRITE_MULTIPLE_REGISTERS else (count + 7) // 8
    if body[4] != needed:
        raise FrameError(
            f"write request (function {function}) to unit {unit} writes {count} "
            f"items but carries {body[4]} bytes, expected {needed}"
        )
    values: tuple[int, ...] = ()
    if function == WRITE_MULTIPLE_REGISTERS:
        values = tuple(
            int.from_bytes(body[5 + i : 7 + i], "big") for i in range(0, body[4], 2)
        )
    return RtuFrame(unit, function, "request", body, address, count, registers=values)


def _with(
    frame: RtuFrame, *, crc: int | None = None, transaction_id: int | None = None
) -> RtuFrame:
    """Return ``frame`` with its RTU CRC or its MBAP transaction id filled in."""
    return RtuFrame(
        frame.unit,
        frame.function,
        frame.kind,
        frame.data,
        frame.address,
        frame.count,
        frame.registers,
        frame.exception_code,
        crc,
        transaction_id,
    )


# --- finding a response among the bytes that arrived -------------------------------


ScanState = Literal["incomplete", "frame", "invalid"]


@dataclass(frozen=True, slots=True)
class ResponseScan:
    """What the bytes received so far hold.

    ``state`` is ``"frame"`` when a whole response was found (``frame``),
    ``"incomplete"`` when more bytes may still complete one, and ``"invalid"`` when
    what arrived is complete but cannot be the response (bad CRC, inconsistent
    length, a broken MBAP header). ``problem`` is the :class:`FrameError` message to
    give if nothing better arrives; it is empty while nothing but our own echo has
    arrived. ``echo`` says the bytes began with our own request (RS-485 echo);
    ``skipped`` holds bytes before the frame that were neither echo nor frame
    (garbage, or stale Modbus TCP answers); ``end`` is the offset in the buffer just
    past the frame.
    """

    state: ScanState
    frame: RtuFrame | None = None
    problem: str = ""
    echo: bool = False
    skipped: bytes = b""
    end: int = 0


def _response_length(data: bytes, function: int) -> int | None:
    """Return the length of the RTU response starting at ``data[0]``, or ``None`` when
    not enough bytes arrived to tell. ``data[1]`` is ``function`` or its exception."""
    if data[1] & EXCEPTION_BIT:
        return 5
    if function in _READS:
        return 5 + data[2] if len(data) >= 3 else None
    return 8


def scan_rtu_response(
    buffer: bytes | bytearray, *, request: bytes, unit: int, function: int
) -> ResponseScan:
    """Find the response to ``request`` (sent to ``unit`` with ``function``) in the
    bytes received so far on an RTU line.

    Tolerates the echo of ``request`` at the start (RS-485 adapters that hear
    themselves) and garbage before the frame: every offset where ``function`` or its
    exception code follows a byte is tried, and the first candidate whose CRC is valid
    wins, whatever its unit id (the caller turns another unit's answer into
    :class:`WrongUnitError`). Nothing here raises: a frame that fails to decode is
    reported as ``"invalid"`` with the reason.
    """
    data = bytes(buffer)
    echo = False
    if request and data.startswith(request):
        data = data[len(request) :]
        echo = True
    elif data and request.startswith(data) and len(data) < len(request):
        return ResponseScan("incomplete", echo=True)
    if not data:
        return ResponseScan("incomplete", echo=echo)

    first_short = ""
    first_bad = ""
    for offset in range(len(data) - 1):
        code = data[offset + 1]
        if code not in (function, function | EXCEPTION_BIT):
            continue
        candidate = data[offset:]
        length = _response_length(candidate, function)
        if length is None or length > len(candidate):
            if not first_short:
                need = f"of {length} " if length else ""
                first_short = (
                    f"short response from unit {candidate[0]}: only "
                    f"{len(candidate)} bytes {need}arrived ({candidate.hex(' ')})"
                )
            continue
        expected = crc16(candidate[: length - 2])
        got = int.from_bytes(candidate[length - 2 : length], "little")
        if expected != got:
            if not first_bad and candidate[0] == unit:
                first_bad = (
                    f"CRC error in the response from unit {unit}: the bytes compute "
                    f"to 0x{expected:04X} but the frame carries 0x{got:04X} "
                    f"({candidate[:length].hex(' ')})"
                )
            continue
        try:
            frame = decode_pdu(candidate[0], candidate[1 : length - 2], role="response")
        except (FrameError, DecodeError) as exc:
            return ResponseScan("invalid", problem=str(exc), echo=echo)
        return ResponseScan(
            "frame",
            _with(frame, crc=got),
            echo=echo,
            skipped=data[:offset],
            end=(len(request) if echo else 0) + offset + length,
        )

    if first_short:
        # A damaged frame from the unit asked says more than a garbled length.
        return ResponseScan("incomplete", problem=first_bad or first_short, echo=echo)
    garbage = (
        f"{len(data)} bytes arrived that hold no response to function {function} "
        f"from unit {unit}: {data[:64].hex(' ')}"
    )
    if first_bad:
        return ResponseScan("invalid", problem=first_bad, echo=echo)
    if len(data) > 2 * MAX_RTU_FRAME:
        return ResponseScan("invalid", problem=garbage, echo=echo)
    return ResponseScan("incomplete", problem=garbage, echo=echo)


def scan_mbap_response(
    buffer: bytes | bytearray, *, transaction_id: int, unit: int, function: int
) -> ResponseScan:
    """Find the Modbus TCP response with ``transaction_id`` in the bytes received.

    Whole frames with other transaction ids (late answers to requests that timed out)
    are skipped. A protocol id other than 0, a length outside 2..254 or an answer to
    another function means the stream is out of step: ``"invalid"``. Nothing here
    raises. The caller checks ``frame.unit``.
    """
    data = bytes(buffer)
    offset = 0
    while True:
        rest = data[offset:]
        if len(rest) < 7:
            problem = ""
            if rest:
                problem = (
                    f"short response: {len(rest)} bytes of a Modbus TCP header "
                    f"arrived ({rest.hex(' ')})"
                )
            return ResponseScan("incomplete", problem=problem, skipped=data[:offset])
        tid = int.from_bytes(rest[0:2], "big")
        protocol = int.from_bytes(rest[2:4], "big")
        length = int.from_bytes(rest[4:6], "big")
        if protocol != 0:
            return ResponseScan(
                "invalid",
                problem=(
                    f"protocol id {protocol} in a Modbus TCP header (expected 0): "
                    f"this is not Modbus TCP or the stream is out of step "
                    f"({rest[:16].hex(' ')})"
                ),
            )
        if not 2 <= length <= 254:
            return ResponseScan(
                "invalid",
                problem=(
                    f"Modbus TCP header gives length {length}, outside 2..254 "
                    f"({rest[:16].hex(' ')})"
                ),
            )
        end = 6 + length
        if len(rest) < end:
            return ResponseScan(
                "incomplete",
                problem=(
                    f"short response: {len(rest)} of {end} bytes arrived "
                    f"({rest[:16].hex(' ')}...)"
                ),
                skipped=data[:offset],
            )
        if tid != transaction_id:
            offset += end
            continue
        pdu = rest[7:end]
        if pdu[0] & ~EXCEPTION_BIT != function:
            return ResponseScan(
                "invalid",
                problem=(
                    f"answer to transaction {tid} is for function {pdu[0] & 0x7F}, "
                    f"not {function}"
                ),
            )
        try:
            frame = decode_pdu(rest[6], pdu, role="response")
        except (FrameError, DecodeError) as exc:
            return ResponseScan("invalid", problem=str(exc))
        return ResponseScan(
            "frame",
            _with(frame, transaction_id=tid),
            skipped=data[:offset],
            end=offset + end,
        )
